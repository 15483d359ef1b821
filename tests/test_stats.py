"""edgekif.stats on built score vectors: McNemar p-values checked by hand, the bootstrap interval
deterministic, the test picked by the data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgekif.stats import BOOTSTRAP, MCNEMAR, mcnemar_p, paired_difference


def pairs(candidate_only: int, reference_only: int, both: int = 0, neither: int = 0) -> tuple[list[int], list[int]]:
    """0/1 score vectors with the given discordant and concordant counts."""
    cand = [1] * candidate_only + [0] * reference_only + [1] * both + [0] * neither
    ref = [0] * candidate_only + [1] * reference_only + [1] * both + [0] * neither
    return cand, ref


def exact_two_sided(b: int, c: int) -> float:
    """By hand: under H0 the b + c discordant pairs split Binomial(b + c, 1/2), which is symmetric,
    so the two-sided p is twice the tail of the smaller count (capped at 1)."""
    m = b + c
    tail = sum(math.comb(m, k) for k in range(min(b, c) + 1)) / 2**m
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("b, c", [(10, 0), (0, 10), (3, 1), (30, 10), (1, 1), (5, 5), (7, 2)])
def test_mcnemar_matches_hand_computed_exact_p(b, c):
    assert mcnemar_p(b, c) == pytest.approx(exact_two_sided(b, c), rel=1e-12)


def test_mcnemar_hand_values():
    assert mcnemar_p(10, 0) == pytest.approx(2 * 0.5**10)  # 0.001953125
    assert mcnemar_p(3, 1) == pytest.approx(2 * (1 + 4) / 16)  # 0.625
    assert mcnemar_p(1, 1) == 1.0
    assert mcnemar_p(0, 0) == 1.0  # nothing discordant: no evidence


def test_binary_scores_take_mcnemar_on_the_discordant_pairs():
    cand, ref = pairs(30, 10, both=4, neither=4)
    d = paired_difference(cand, ref)
    assert d.method == MCNEMAR and d.n == 48
    assert (d.candidate_only, d.reference_only) == (30, 10)
    assert d.mean_diff == pytest.approx(20 / 48)
    assert d.candidate_mean == pytest.approx(34 / 48) and d.reference_mean == pytest.approx(14 / 48)
    assert d.p_value == pytest.approx(exact_two_sided(30, 10))
    assert 0 < d.low < d.mean_diff < d.high < 1


def test_concordant_records_do_not_change_mcnemar():
    # McNemar looks only at the pairs that disagree
    few = paired_difference(*pairs(10, 0))
    many = paired_difference(*pairs(10, 0, both=20, neither=18))
    assert few.p_value == many.p_value == pytest.approx(2 * 0.5**10)


def test_continuous_scores_take_the_paired_bootstrap():
    rng = np.random.default_rng(3)
    ref = rng.uniform(0.05, 0.3, 48)
    cand = np.clip(ref + 0.08 + rng.normal(0, 0.03, 48), 0, 1)
    d = paired_difference(cand, ref)
    assert d.method == BOOTSTRAP and d.candidate_only is None
    assert d.mean_diff == pytest.approx(float(np.mean(cand - ref)))
    assert 0 < d.low < d.mean_diff < d.high
    assert d.p_value < 0.001


def test_bootstrap_interval_is_deterministic():
    rng = np.random.default_rng(5)
    ref = rng.uniform(0, 1, 48)
    cand = np.clip(ref + rng.normal(0.02, 0.2, 48), 0, 1)
    first = paired_difference(cand, ref, seed=7)
    again = paired_difference(list(cand), list(ref), seed=7)
    assert first == again  # same scores, same seed: same interval and p, to the last bit
    other = paired_difference(cand, ref, seed=8)
    assert other.mean_diff == first.mean_diff
    assert abs(other.low - first.low) < 0.02 and abs(other.high - first.high) < 0.02  # seed noise is small


def test_binary_interval_is_deterministic_too():
    cand, ref = pairs(6, 2, both=20, neither=20)
    assert paired_difference(cand, ref) == paired_difference(cand, ref)


def test_higher_confidence_widens_the_interval():
    cand, ref = pairs(12, 4, both=16, neither=16)
    narrow = paired_difference(cand, ref, confidence=0.8)
    wide = paired_difference(cand, ref, confidence=0.99)
    assert wide.low < narrow.low and wide.high > narrow.high
    assert wide.p_value == narrow.p_value  # the test does not depend on the interval's level


def test_no_difference_at_all():
    same = [1, 0, 1, 1, 0] * 8
    d = paired_difference(same, same)
    assert (d.mean_diff, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)
    cont = [0.2, 0.4, 0.9] * 10
    d = paired_difference(cont, cont, binary=False)
    assert (d.mean_diff, d.low, d.high, d.p_value, d.method) == (0.0, 0.0, 0.0, 1.0, BOOTSTRAP)


def test_binary_override():
    cand, ref = pairs(10, 0, neither=38)
    assert paired_difference(cand, ref, binary=False).method == BOOTSTRAP  # a 0/1-valued ROUGE-L stays continuous
    with pytest.raises(ValueError, match="not all 0 or 1"):
        paired_difference([0.5, 1.0], [0.0, 1.0], binary=True)


@pytest.mark.parametrize("cand, ref, match", [
    ([1, 0], [1], "one length"),
    ([], [], "no records"),
    ([50.0, 20.0], [10.0, 0.0], r"\[0, 1\]"),  # points, not fractions
    ([float("nan"), 0.1], [0.1, 0.1], r"\[0, 1\]"),
])
def test_bad_vectors_are_refused(cand, ref, match):
    with pytest.raises(ValueError, match=match):
        paired_difference(cand, ref)


def test_confidence_must_be_a_fraction():
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1, 0], [0, 0], confidence=95)


def test_figures_are_plain_json():
    import json

    figures = paired_difference(*pairs(10, 2, both=10, neither=26)).figures()
    assert json.loads(json.dumps(figures)) == figures
    assert {"mean_diff", "low", "high", "p_value", "method", "n", "confidence"} <= figures.keys()
