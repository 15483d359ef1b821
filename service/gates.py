"""The gate between a checked export and publishing: what a new version must keep and must gain.

    forgetting_gate   no task the live version knows may lose more than service.forgetting_threshold points
    base_gate         the new task must beat the untrained base by service.min_gain_over_base points
    publish_gate      both, on export-measured accuracies (what the daemon's gate stage calls)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .stages import EvalResult, Published

if TYPE_CHECKING:
    from edgekif.config import Config


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


def publish_gate(result: EvalResult, published: Published | None, config: "Config") -> tuple[bool, list[str]]:
    """The forgetting gate plus the base gate, on export-measured accuracies."""
    _ok, reasons = forgetting_gate(result.accuracies, published, config.service.forgetting_threshold)
    reasons += base_gate(result.accuracies, result.details.get("zero_shot") or {}, config.service.min_gain_over_base)
    return not reasons, reasons
