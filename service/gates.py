"""The gate between a checked export and publishing: what a new version must keep and must gain.

The daemon's gate stage (paired_publish_gate) asks two questions of per-record scores paired
on one holdout (edgekif.stats), at service.gate_confidence, not of a margin on two means:
    beats_base        the new task beats the base's zero-shot with confidence
    significant_loss  an old task lost significantly AND more than the tolerance vs live
and one of the candidate's answers to general prompts, measured in the export stage:
    general ability   its answers drifted from the base's beyond [general_ability]'s bounds
The margin rules remain for what has no per-record scores on both sides (versions published
before them; the fake stages):
    forgetting_gate   no task the live version knows may lose more than service.forgetting_threshold points
    base_gate         the new task must beat the untrained base by service.min_gain_over_base points
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

from edgekif.general_ability import DriftFigures, drifted

from .stages import EvalResult, Published

if TYPE_CHECKING:
    from edgekif.config import Config
    from edgekif.export.manifest import Manifest
    from edgekif.stats import PairedDifference


def forgetting_gate(
    accuracies: dict[str, float], published: Published | None, threshold_points: float
) -> tuple[bool, list[str]]:
    """No past task may lose more than `threshold_points` accuracy points vs what is live."""
    if published is None:
        return True, []
    reasons = []
    for task, before in sorted(published.accuracies.items()):
        after = accuracies.get(task)
        if after is None:
            reasons.append(f"{task}: not evaluated (was {100 * before:.1f})")
            continue
        drop = 100 * (before - after)
        if drop > threshold_points:
            reasons.append(
                f"{task}: {100 * before:.1f} -> {100 * after:.1f} (-{drop:.1f} points > {threshold_points:g} allowed)"
            )
    return not reasons, reasons


def base_gate(accuracies: dict[str, float], zero_shot: dict[str, float], min_gain_points: float) -> list[str]:
    """The tasks whose accuracy does not beat the untrained base's by `min_gain_points`."""
    reasons = []
    for task, base in sorted(zero_shot.items()):
        after = accuracies.get(task)
        if after is not None and 100 * (after - base) < min_gain_points:
            reasons.append(f"{task}: {100 * after:.1f} does not beat the base model's zero-shot {100 * base:.1f} "
                           f"by {min_gain_points:g} points (nothing learned to publish)")
    return reasons


@dataclass(frozen=True)
class GateDecision:
    """One paired gate's verdict: `passed` False holds the publish; `reason` carries the statistic
    either way (it goes to the log and the hold reason); `figures` go to the manifest as they are."""

    passed: bool
    reason: str
    figures: dict


def _alpha(confidence: float) -> float:
    # rounded so that confidence 0.95 is alpha 0.05, not 0.05000000000000004 (p = 0.05 is not < 0.05)
    return round(1.0 - confidence, 12)


def _describe(task: str, metric: str, other: str, d: "PairedDifference") -> str:
    """e.g. `headlines: rouge_l 19.8 vs base 12.1, +7.7 points [95% CI +4.1, +11.3], paired bootstrap (sign-flip p=0.0004), n=48`.
    In points (x 100), the unit of the tolerances it is read against, of `status` and of `models`."""
    if d.candidate_only is not None:  # McNemar: the discordant pairs are what it counted
        test = f"{d.method} ({d.candidate_only} vs {d.reference_only} discordant) p={d.p_value:.3g}"
    else:  # the interval is the bootstrap's, the p-value the sign-flip permutation test's
        test = f"{d.method} (sign-flip p={d.p_value:.3g})"
    return (f"{task}: {metric} {100 * d.candidate_mean:.1f} vs {other} {100 * d.reference_mean:.1f}, "
            f"{100 * d.mean_diff:+.1f} points [{100 * d.confidence:g}% CI {100 * d.low:+.1f}, {100 * d.high:+.1f}], {test}, n={d.n}")


def _figures(d: "PairedDifference", **extra: object) -> dict:
    figures = d.figures()
    figures["interval"] = [figures.pop("low"), figures.pop("high")]
    return {**figures, **extra}


def beats_base(
    candidate_scores: Sequence[float],
    base_scores: Sequence[float],
    *,
    confidence: float,
    min_gain_points: float = 0.0,
    task: str = "task",
    metric: str = "score",
    seed: int = 0,
) -> GateDecision:
    """A new task passes when its gain over the base's zero-shot, record by record on the same
    holdout, is significant at `confidence` (two-sided p < 1 - confidence, gain positive) and its
    mean is at least `min_gain_points` (service.min_gain_over_base). Two-sided, to match the
    two-sided interval in the reason; the test decides where the two disagree at the border (for 0/1
    scores the McNemar p is exact, the bootstrap interval approximate)."""
    from edgekif.stats import paired_difference  # numpy + scipy: only when a gate runs, not in the idle daemon

    d = paired_difference(candidate_scores, base_scores, confidence=confidence, seed=seed)
    alpha = _alpha(confidence)
    significant = d.mean_diff > 0 and d.p_value < alpha
    big_enough = 100 * d.mean_diff >= min_gain_points
    reason = _describe(task, metric, "base", d)
    if not significant:
        reason += f": not a significant gain over the base (p >= {alpha:g} or no gain; nothing learned to publish)"
    elif not big_enough:
        reason += f": gain of {100 * d.mean_diff:.1f} points < {min_gain_points:g} required"
    passed = significant and big_enough
    return GateDecision(passed, reason, _figures(d, gate="beats_base", metric=metric, alpha=alpha,
                                                 min_gain_points=min_gain_points, passed=passed))


def significant_loss(
    candidate_scores: Sequence[float],
    live_scores: Sequence[float],
    *,
    tolerance_points: float,
    confidence: float,
    task: str = "task",
    metric: str = "score",
    seed: int = 0,
) -> GateDecision:
    """An old task blocks publishing (passed=False) only when its loss vs the live version is
    significant (two-sided p < 1 - confidence) AND its mean loss exceeds `tolerance_points`
    (service.forgetting_threshold). Not "the whole interval below -tolerance": at n ~ 50 that
    would let a significant 12-point loss through a 5-point tolerance."""
    from edgekif.stats import paired_difference  # numpy + scipy: only when a gate runs, not in the idle daemon

    d = paired_difference(candidate_scores, live_scores, confidence=confidence, seed=seed)
    alpha = _alpha(confidence)
    loss_points = -100 * d.mean_diff
    # Both tests are exact at their extreme: n paired records give at best p = 2 / 2**n. Below
    # that (n <= 5 at 95%) no loss, however large, could be significant: the margin decides.
    testable = 2 * 0.5 ** d.n < alpha
    significant = d.mean_diff < 0 and d.p_value < alpha
    blocks = (significant or not testable) and loss_points > tolerance_points
    reason = _describe(task, metric, "live", d)
    if not testable:
        reason += (f": {d.n} records are too few for the test to reach p < {alpha:g}; a loss of {max(loss_points, 0.0):.1f} points "
                   + (f"> {tolerance_points:g} allowed" if blocks else f"is within the {tolerance_points:g} allowed"))
    elif blocks:
        reason += f": a significant loss of {loss_points:.1f} points > {tolerance_points:g} allowed"
    elif significant:
        reason += f": a significant loss of {loss_points:.1f} points, within the {tolerance_points:g} allowed"
    else:
        reason += f": no significant loss (p >= {alpha:g} or no loss)"
    return GateDecision(not blocks, reason, _figures(d, gate="significant_loss", metric=metric, alpha=alpha,
                                                     tolerance_points=tolerance_points, testable=testable, passed=not blocks))


def _headline_means(task: str, candidate: "Manifest", live: "Manifest | None") -> tuple[str, float, float] | None:
    """(metric, candidate's mean, live's mean) of a task's headline metric when both exports
    recorded it with the same metric, else None."""
    if live is None:
        return None
    mine, theirs = (candidate.evaluation or {}).get(task) or {}, (live.evaluation or {}).get(task) or {}
    if mine.get("metric") and mine.get("metric") == theirs.get("metric") and mine.get("score") is not None and theirs.get("score") is not None:
        return str(mine["metric"]), float(mine["score"]), float(theirs["score"])
    return None


def paired_publish_gate(result: EvalResult, published: Published | None, config: "Config", candidate: "Manifest",
                        live: "Manifest | None") -> tuple[bool, list[str], dict[str, Any]]:
    """The daemon's gate: per-record paired tests at service.gate_confidence wherever both sides
    have per-record scores on the same records with the same metric (significant_loss against the
    live version for every task it knows, beats_base for the new task); the margin rules above
    for a task whose other side has none (versions and base scores from before per-record scores).
    Returns (ok, reasons, decisions): decisions has each test's figures, for the manifest."""
    conf, tolerance, min_gain = config.service.gate_confidence, config.service.forgetting_threshold, config.service.min_gain_over_base
    reasons: list[str] = []
    decisions: dict[str, Any] = {}
    if published is not None:
        for task, before in sorted(published.accuracies.items()):
            mine, theirs = candidate.record_scores(task), live.record_scores(task) if live is not None else None
            if mine is not None and theirs is not None and (mine[0], mine[2]) == (theirs[0], theirs[2]):
                d = significant_loss(mine[1], theirs[1], tolerance_points=tolerance, confidence=conf, task=task, metric=mine[0])
                decisions[f"{task} vs live"] = {**d.figures, "reason": d.reason}
                reasons += [] if d.passed else [d.reason]
            elif (headline := _headline_means(task, candidate, live)) is not None:
                # not the same records on both sides (the holdout changed since the live version was
                # measured): the margin rule on the task's own headline metric; exact match would
                # read 0 against 0 for a free-text task and never block
                metric, now, then = headline
                one = Published(published.version, published.job_id, {task: then})
                reasons += [f"{r} ({metric}; the holdout changed since {published.version}: not paired)"
                            for r in forgetting_gate({task: now}, one, tolerance)[1]]
            else:
                one = Published(published.version, published.job_id, {task: before})
                reasons += forgetting_gate(result.accuracies, one, tolerance)[1]
    for task, base in sorted((result.details.get("zero_shot_scores") or {}).items()):
        mine = candidate.record_scores(task)
        if mine is not None and base.get("scores") is not None and (mine[0], mine[2]) == (base.get("metric"), base.get("records_sha256")):
            d = beats_base(mine[1], base["scores"], confidence=conf, min_gain_points=min_gain, task=task, metric=mine[0])
            decisions[f"{task} vs base"] = {**d.figures, "reason": d.reason}
            reasons += [] if d.passed else [d.reason]
        elif task in result.accuracies and base.get("exact_match") is not None:
            reasons += base_gate({task: result.accuracies[task]}, {task: float(base["exact_match"])}, min_gain)
    for task in result.details.get("unjudged") or []:
        reason = (f"{task}: none of its records was held out to judge it (the file is too small), so nothing shows that "
                  "it learned the task; drop a file with more records")
        decisions[f"{task} vs base"] = {"gate": "beats_base", "passed": False, "reason": reason}
        reasons.append(reason)
    general = candidate.general_ability
    if general is not None and config.general_ability.enabled:
        # the verdict the export stage measured (edgekif.workflow.general_ability), under this config's bounds
        figures = DriftFigures(n=int(general.get("n") or 0), rouge_l=general.get("rouge_l"), identical=general.get("identical"),
                               loglik_base=general.get("loglik_base"), loglik_candidate=general.get("loglik_candidate"))
        held, reason = drifted(figures, config.general_ability, instruct_base=bool(general.get("instruct_base", True)))
        decisions["general ability"] = {"rouge_l": figures.rouge_l, "loglik_drop": figures.loglik_drop, "min_rouge_l": config.general_ability.min_rouge_l,
                                        "max_loglik_drop": config.general_ability.max_loglik_drop, "passed": not held, "reason": reason}
        reasons += [reason] if held else []
    return not reasons, reasons, decisions
