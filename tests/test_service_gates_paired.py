"""The paired gates (service.gates.beats_base / significant_loss) on built per-record score
vectors: a real gain passes and noise does not; an old task's loss blocks only when it is
significant and larger than the tolerance. 0/1 (exact match) and continuous (ROUGE-L) scores."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgekif.config import Config, validate_config
from edgekif.errors import ConfigError
from service.gates import beats_base, forgetting_gate, significant_loss
from service.stages import Published

CONF = 0.95


def pairs(candidate_only: int, reference_only: int, n: int = 48) -> tuple[list[int], list[int]]:
    """0/1 scores on n records: the given discordant pairs, the rest concordant (half right, half wrong)."""
    rest = n - candidate_only - reference_only
    cand = [1] * candidate_only + [0] * reference_only + [1] * (rest // 2) + [0] * (rest - rest // 2)
    ref = [0] * candidate_only + [1] * reference_only + [1] * (rest // 2) + [0] * (rest - rest // 2)
    return cand, ref


def rouge_like(mean_shift: float, noise: float, seed: int, n: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Candidate = reference + shift + per-record noise, in [0, 1] like ROUGE-L."""
    rng = np.random.default_rng(seed)
    ref = rng.uniform(0.05, 0.4, n)
    return np.clip(ref + mean_shift + rng.normal(0, noise, n), 0, 1), ref


# --- beats_base -----------------------------------------------------------------------------

def test_a_real_gain_passes_exact_match():
    cand, base = pairs(30, 10)  # right on 30 the base misses, wrong on 10 it gets
    decision = beats_base(cand, base, confidence=CONF, task="agnews", metric="exact match")
    assert decision.passed
    f = decision.figures
    assert f["method"] == "exact McNemar" and f["n"] == 48 and f["confidence"] == CONF
    assert f["mean_diff"] == pytest.approx(20 / 48) and f["p_value"] < 0.01
    assert f["interval"][0] > 0
    assert "agnews: exact match" in decision.reason and "30 vs 10 discordant" in decision.reason


@pytest.mark.parametrize("b, c", [(1, 1), (2, 0), (0, 0), (3, 1)])
def test_noise_does_not_pass_exact_match(b, c):
    # two records flipped both ways, or a couple won: what re-sampling the holdout would do
    cand, base = pairs(b, c)
    decision = beats_base(cand, base, confidence=CONF, task="random-labels")
    assert not decision.passed
    assert "not a significant gain" in decision.reason and "p=" in decision.reason


def test_a_real_gain_passes_rouge():
    cand, base = rouge_like(0.077, 0.06, seed=1)
    decision = beats_base(cand, base, confidence=CONF, task="headlines", metric="ROUGE-L")
    assert decision.passed, decision.reason
    assert decision.figures["method"] == "paired bootstrap" and decision.figures["interval"][0] > 0
    # in points, the tolerances' unit: e.g. "ROUGE-L 19.8 vs base 12.1, +7.7 points"
    diff = 100 * decision.figures["mean_diff"]
    assert decision.reason.startswith(f"headlines: ROUGE-L {100 * np.mean(cand):.1f} vs base {100 * np.mean(base):.1f}, {diff:+.1f} points [")
    assert 5 < diff < 10  # a gain of 0.077 on the 0-1 scale is 7.7 points
    assert "[95% CI +" in decision.reason and "paired bootstrap (sign-flip p=" in decision.reason and "n=48" in decision.reason


def test_rouge_noise_does_not_pass():
    base = np.random.default_rng(2).uniform(0.05, 0.4, 48)
    cand = base.copy()
    cand[0] += 0.2  # two records differ, both ways
    cand[1] -= 0.15
    decision = beats_base(cand, base, confidence=CONF, task="headlines", metric="ROUGE-L")
    assert not decision.passed
    assert decision.figures["interval"][0] < 0 < decision.figures["interval"][1]


def test_rouge_zero_mean_noise_does_not_pass():
    cand, base = rouge_like(0.0, 0.05, seed=4)
    assert not beats_base(cand, base, confidence=CONF).passed


def test_a_worse_candidate_never_passes():
    cand, base = pairs(0, 20)
    decision = beats_base(cand, base, confidence=CONF)
    assert not decision.passed and decision.figures["p_value"] < 0.001  # significant, the wrong way


def test_min_gain_still_applies_on_a_significant_gain():
    # 2000 records: a 1.5-point gain is significant, but below a 2-point minimum
    cand, base = pairs(40, 10, n=2000)
    assert beats_base(cand, base, confidence=CONF, min_gain_points=1.0).passed
    held = beats_base(cand, base, confidence=CONF, min_gain_points=2.0)
    assert not held.passed and "1.5 points < 2 required" in held.reason


def test_confidence_is_the_knob():
    cand, base = pairs(8, 1)  # McNemar p = 2 * 10/512 = 0.039
    assert beats_base(cand, base, confidence=0.95).passed
    assert not beats_base(cand, base, confidence=0.99).passed


# --- significant_loss -----------------------------------------------------------------------

def test_a_significant_loss_beyond_tolerance_blocks():
    cand, live = pairs(2, 20)  # loses 18 records of 48: 37.5 points
    decision = significant_loss(cand, live, tolerance_points=5.0, confidence=CONF, task="dbpedia", metric="exact match")
    assert not decision.passed
    assert "significant loss of 37.5 points > 5 allowed" in decision.reason
    assert decision.figures["gate"] == "significant_loss" and decision.figures["tolerance_points"] == 5.0


def test_an_insignificant_loss_beyond_tolerance_does_not_block():
    # 3 records lost of 48 = 6.25 points: over a 5-point margin, which today's gate holds on,
    # but 3 vs 0 discordant pairs is p = 0.25: noise
    cand, live = pairs(0, 3)
    decision = significant_loss(cand, live, tolerance_points=5.0, confidence=CONF)
    assert decision.passed and "no significant loss" in decision.reason
    published = Published(version="v1", job_id=1, accuracies={"t": float(np.mean(live))})
    assert not forgetting_gate({"t": float(np.mean(cand))}, published, 5.0)[0]  # the margin gate would hold


def test_a_significant_loss_within_tolerance_does_not_block():
    cand, live = pairs(0, 6)  # 12.5 points, p = 2 / 64 = 0.031: significant
    decision = significant_loss(cand, live, tolerance_points=15.0, confidence=CONF)
    assert decision.passed and "within the 15 allowed" in decision.reason
    # the same loss over a 5-point tolerance blocks, though its interval is not all below -5 points
    blocked = significant_loss(cand, live, tolerance_points=5.0, confidence=CONF)
    assert not blocked.passed and blocked.figures["interval"][1] > -0.05


def test_a_gain_never_blocks():
    cand, live = pairs(20, 0)
    assert significant_loss(cand, live, tolerance_points=0.0, confidence=CONF).passed


def test_rouge_losses():
    big_cand, big_live = rouge_like(-0.2, 0.05, seed=6)
    assert not significant_loss(big_cand, big_live, tolerance_points=5.0, confidence=CONF, metric="ROUGE-L").passed
    small_cand, small_live = rouge_like(-0.02, 0.01, seed=7)  # significant, but 2 points
    small = significant_loss(small_cand, small_live, tolerance_points=5.0, confidence=CONF)
    assert small.passed and small.figures["p_value"] < 0.05
    one_cand, one_live = rouge_like(0.0, 0.0, seed=8)
    one_cand[0] = max(0.0, one_cand[0] - 0.35)  # one record got much worse: not significant
    assert significant_loss(one_cand, one_live, tolerance_points=0.5, confidence=CONF).passed


# --- what goes into the manifest -----------------------------------------------------------

def test_figures_are_manifest_ready_and_deterministic():
    cand, base = rouge_like(0.05, 0.08, seed=9)
    a = beats_base(cand, base, confidence=CONF, task="headlines", metric="ROUGE-L")
    b = beats_base(list(cand), list(base), confidence=CONF, task="headlines", metric="ROUGE-L")
    assert a == b
    assert json.loads(json.dumps(a.figures)) == a.figures
    assert {"mean_diff", "interval", "p_value", "n", "method", "confidence", "alpha", "passed", "metric"} <= a.figures.keys()


def test_gate_confidence_config():
    assert Config().service.gate_confidence == 0.95
    cfg = Config()
    cfg.service.gate_confidence = 1.0
    with pytest.raises(ConfigError, match="gate_confidence"):
        validate_config(cfg)


# --------------------------------------------------------------------------- general ability


def _candidate(general):
    from edgekif.export.manifest import Manifest

    return Manifest(files={"model.onnx": "00"}, general_ability=general)


def _no_tasks():
    from service.stages import EvalResult

    return EvalResult(accuracies={}, details={})


def test_the_gate_holds_a_version_whose_general_answers_drifted():
    from service.gates import paired_publish_gate

    cfg = Config()
    drifted_far = {"n": 63, "rouge_l": 0.08, "identical": 0.0, "loglik_base": -1.1, "loglik_candidate": -1.3}
    ok, reasons, decisions = paired_publish_gate(_no_tasks(), None, cfg, _candidate(drifted_far), None)
    assert not ok and reasons == ["general ability: answers ROUGE-L 0.08 vs the base's own (needs >= 0.20) over 63 prompts"]
    assert decisions["general ability"]["passed"] is False and decisions["general ability"]["rouge_l"] == 0.08
    # the log-likelihood bound: answers still alike, but the base's own answers became unlikely
    unlikely = {**drifted_far, "rouge_l": 0.6, "loglik_candidate": -2.0}
    ok, reasons, _ = paired_publish_gate(_no_tasks(), None, cfg, _candidate(unlikely), None)
    assert not ok and "drop 0.90, allowed <= 0.50" in reasons[0]
    # a model that still answers like the base passes; the bound is the config's
    kept = {**drifted_far, "rouge_l": 0.45, "loglik_candidate": -1.2}
    ok, reasons, decisions = paired_publish_gate(_no_tasks(), None, cfg, _candidate(kept), None)
    assert ok and reasons == [] and decisions["general ability"]["passed"] is True
    cfg.general_ability.min_rouge_l = 0.5
    assert not paired_publish_gate(_no_tasks(), None, cfg, _candidate(kept), None)[0]
    cfg.general_ability.enabled = False
    assert paired_publish_gate(_no_tasks(), None, cfg, _candidate(drifted_far), None)[:2] == (True, [])
    # a manifest without the figures (older versions, fake stages): nothing to judge
    assert paired_publish_gate(_no_tasks(), None, Config(), _candidate(None), None)[:2] == (True, [])
    # a pretrained base (the export stage found no chat template of its own): recorded, not gated
    ok, reasons, decisions = paired_publish_gate(_no_tasks(), None, Config(), _candidate({**drifted_far, "instruct_base": False}), None)
    assert ok and reasons == [] and decisions["general ability"]["passed"] is True
    assert "not gated, the base is not an instruction-following model" in decisions["general ability"]["reason"]


def test_general_ability_config_is_validated():
    cfg = Config()
    cfg.general_ability.min_rouge_l = 2.0
    with pytest.raises(ConfigError, match="general_ability.min_rouge_l"):
        validate_config(cfg)


def test_a_loss_on_too_few_records_to_test_is_judged_by_the_margin():
    """n paired records give at best p = 2 / 2**n: at n <= 5 (95%) no loss could ever be
    significant, so a task wiped out on a 5-record holdout would pass. There the tolerance
    decides."""
    wiped = significant_loss([0] * 5, [1] * 5, tolerance_points=5.0, confidence=CONF, task="tiny")
    assert not wiped.passed and wiped.figures["testable"] is False
    assert "5 records are too few for the test to reach p < 0.05; a loss of 100.0 points > 5 allowed" in wiped.reason
    assert significant_loss([0.9] * 5, [0.9] * 5, tolerance_points=5.0, confidence=CONF).passed  # nothing lost
    six = significant_loss([0] * 6, [1] * 6, tolerance_points=5.0, confidence=CONF)  # p = 2/64: testable
    assert not six.passed and six.figures["testable"] is True and "a significant loss" in six.reason


def test_a_free_text_task_whose_holdout_changed_is_judged_by_its_headline_metric():
    """Not the same records on both sides (the holdout's hash differs): the margin rule on the
    task's own metric, not on exact match, which reads 0 against 0 for free text."""
    from edgekif.export.manifest import Manifest
    from service.gates import paired_publish_gate
    from service.stages import EvalResult

    def manifest(score, sha):
        ev = {"metric": "rouge_l", "score": score, "scores": [score] * 8, "records_sha256": sha, "exact_match": 0.0, "n": 8}
        return Manifest(files={"model.onnx": "00"}, evaluation={"headlines": ev})

    live, published = manifest(0.40, "a" * 64), Published("v0001", 1, {"headlines": 0.0})
    result = EvalResult(accuracies={"headlines": 0.0}, details={})
    ok, reasons, _ = paired_publish_gate(result, published, Config(), manifest(0.05, "b" * 64), live)
    assert not ok and reasons == ["headlines: 40.0 -> 5.0 (-35.0 points > 5 allowed) (rouge_l; the holdout changed since v0001: not paired)"]
    assert paired_publish_gate(result, published, Config(), manifest(0.39, "b" * 64), live)[:2] == (True, [])


def test_a_new_task_with_nothing_held_out_is_held():
    """A file of 1-2 records keeps no holdout record: no test can show it learned anything,
    and "nothing learned is not published" holds for the first model too."""
    from service.gates import paired_publish_gate
    from service.stages import EvalResult

    result = EvalResult(accuracies={}, details={"unjudged": ["tiny"]})
    ok, reasons, decisions = paired_publish_gate(result, None, Config(), _candidate(None), None)
    assert not ok and reasons[0].startswith("tiny: none of its records was held out to judge it")
    assert decisions["tiny vs base"]["passed"] is False
