"""Paired comparisons of two models' per-record scores on the same holdout records.

The publish gates compare a candidate with the base (did it learn?) and with the live version
(did it forget?) on ~50 holdout records. A margin on two means cannot tell a real change from
which records happened to flip; a paired test can, because each record is its own control.

    paired_difference   one entry point: the mean difference candidate - reference, its interval
                        at a stated confidence and a p-value, with the test picked by the data:
      0/1 scores (exact match)    exact McNemar test (a binomial test on the discordant pairs);
      scores in [0, 1] (ROUGE-L)  sign-flip permutation test of the mean difference;
      both                        seeded paired-bootstrap percentile interval of the mean difference.

The p-values and intervals come from scipy.stats (binomtest, permutation_test, bootstrap), not
from formulas of our own. scipy is imported inside the functions: the daemon imports the gates
and must stay small while idle. Everything is seeded, so the same scores give the same figures
(a gate decision must not change when a job is re-run).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

# 9999 resamples: the percentile interval's ends move by well under a point between seeds at
# n ~ 50, and both resampling calls take milliseconds on a vector this size.
N_RESAMPLES = 9999
MCNEMAR = "exact McNemar"
BOOTSTRAP = "paired bootstrap"


@dataclass(frozen=True)
class PairedDifference:
    """candidate - reference on the same records (fractions, not points)."""

    mean_diff: float
    low: float  # two-sided interval at `confidence`
    high: float
    p_value: float  # two-sided, H0: no difference
    method: str  # MCNEMAR or BOOTSTRAP: which test gave p_value
    n: int
    confidence: float
    candidate_mean: float
    reference_mean: float
    # 0/1 scores only: records the candidate alone got right / the reference alone got right
    candidate_only: int | None = None
    reference_only: int | None = None

    def figures(self) -> dict:
        """Plain floats and ints for a JSON manifest."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def _as_vectors(candidate: Sequence[float], reference: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    cand = np.asarray(candidate, dtype=float)
    ref = np.asarray(reference, dtype=float)
    if cand.ndim != 1 or cand.shape != ref.shape:
        raise ValueError(f"paired scores need two 1-d vectors of one length, got {cand.shape} and {ref.shape}")
    if cand.size == 0:
        raise ValueError("paired scores: no records to compare")
    # Scores are fractions: a vector in points (0..100) would make every difference "significant".
    if not (np.isfinite(cand).all() and np.isfinite(ref).all()) or cand.min() < 0 or ref.min() < 0 or cand.max() > 1 or ref.max() > 1:
        raise ValueError("paired scores must be finite and in [0, 1]")
    return cand, ref


def _is_binary(*vectors: np.ndarray) -> bool:
    return all(np.isin(v, (0.0, 1.0)).all() for v in vectors)


def mcnemar_p(candidate_only: int, reference_only: int) -> float:
    """Two-sided exact McNemar p-value: under H0 each discordant pair falls either way with 1/2."""
    from scipy.stats import binomtest

    discordant = candidate_only + reference_only
    if discordant == 0:
        return 1.0  # nothing disagrees: no evidence either way
    return float(binomtest(candidate_only, discordant, 0.5, alternative="two-sided").pvalue)


def bootstrap_interval(diffs: np.ndarray, confidence: float, seed: int) -> tuple[float, float]:
    """Percentile interval of the mean of per-record differences, records resampled with
    replacement (resampling the differences is resampling the pairs). Percentile, not BCa: on
    0/±1 differences with many ties BCa's jackknife acceleration degenerates to NaN."""
    from scipy.stats import bootstrap

    if np.ptp(diffs) == 0:  # every record differs by the same amount: no spread to resample
        return float(diffs[0]), float(diffs[0])
    res = bootstrap((diffs,), np.mean, confidence_level=confidence, n_resamples=N_RESAMPLES,
                    method="percentile", vectorized=True, rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def permutation_p(diffs: np.ndarray, seed: int) -> float:
    """Two-sided p of the mean difference by flipping each pair's sign (H0: the two models'
    scores are exchangeable on every record). Exact when 2**n <= N_RESAMPLES."""
    from scipy.stats import permutation_test

    if not diffs.any() or diffs.size < 2:
        return 1.0  # no difference, or one record: its two signs are equally likely under H0
    # one sample of differences with permutation_type="samples" = random sign flips
    res = permutation_test((diffs,), lambda d, axis: np.mean(d, axis=axis), permutation_type="samples",
                           alternative="two-sided", n_resamples=N_RESAMPLES, vectorized=True,
                           rng=np.random.default_rng(seed))
    return float(min(1.0, res.pvalue))


def paired_difference(
    candidate: Sequence[float],
    reference: Sequence[float],
    *,
    binary: bool | None = None,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """candidate - reference on the same records, in order. `binary=None` picks McNemar when both
    vectors are all 0/1 and the bootstrap/permutation pair otherwise; True insists on 0/1 scores,
    False forces the continuous path (e.g. a metric that happens to score only 0 and 1 here)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    cand, ref = _as_vectors(candidate, reference)
    is_binary = _is_binary(cand, ref)
    if binary and not is_binary:
        raise ValueError("binary=True but the scores are not all 0 or 1")
    use_mcnemar = is_binary if binary is None else binary
    diffs = cand - ref
    low, high = bootstrap_interval(diffs, confidence, seed)
    common = dict(mean_diff=float(diffs.mean()), low=low, high=high, n=int(cand.size), confidence=confidence,
                  candidate_mean=float(cand.mean()), reference_mean=float(ref.mean()))
    if use_mcnemar:
        b, c = int((diffs > 0).sum()), int((diffs < 0).sum())
        return PairedDifference(p_value=mcnemar_p(b, c), method=MCNEMAR, candidate_only=b, reference_only=c, **common)
    return PairedDifference(p_value=permutation_p(diffs, seed), method=BOOTSTRAP, **common)
