"""The export check per kind of task (free text is held to its metric, not to identical
answers) and the history that stops re-trying a variant the base keeps failing."""

from __future__ import annotations

import json

import pytest

from edgekif.export.check import AnswerSet, GenerationRule, compare_answers, prefix_agreement, score_answers
from edgekif.export.history import SkipPolicy, VariantHistory, setting_key
from edgekif.records import Record

GEN, CLS = "generation", "classification"


def _recs(labels):
    return [Record.from_prompt(f"q{i}", label) for i, label in enumerate(labels)]


def _set(answers, labels, metric="rouge_l"):
    return score_answers(answers, _recs(labels), metric)


HEADLINES = ["stocks fall on rate fears", "rain ends long drought in kenya", "new phone sells out in hours", "team wins title after late goal"]


def test_prefix_agreement_by_hand():
    ref = ["stocks fall on rate fears", "rain ends", "a b c d"]
    got = ["stocks fall on oil", "rain ends today", "a b x d"]
    # first 3 words: "stocks fall on" equal; "rain ends" vs "rain ends today" -> [rain, ends] != [rain, ends, today]; "a b c" != "a b x"
    assert prefix_agreement(ref, got, 3) == pytest.approx(1 / 3)
    assert prefix_agreement(ref, got, 2) == pytest.approx(3 / 3)


def test_free_text_passes_on_its_metric_although_few_answers_are_identical():
    ref = _set(HEADLINES, HEADLINES)
    # every answer changed late (a different last word): 0% identical, ROUGE-L 0.8 -> 0.8
    changed = [h.rsplit(" ", 1)[0] + " now" for h in HEADLINES]
    got = _set(changed, HEADLINES)
    check = compare_answers({"h": ref}, {"h": got}, min_agreement=0.95, max_accuracy_drop=1.0, kinds={"h": GEN},
                            generation=GenerationRule(max_score_drop=25.0, min_prefix_agreement=0.6, prefix_words=3))
    assert check.agreement == 0.0 and check.label_agreement is None
    # the mean paired drop: 1 - mean ROUGE-L(changed, ref); e.g. 5 words, 4 shared -> F1 0.8
    expected_drop = 100 * (1 - sum(got.scores) / 4)
    assert check.per_task["h"]["score_drop_points"] == pytest.approx(expected_drop) and 15 < expected_drop < 25
    assert check.per_task["h"]["prefix_agreement"] == 1.0
    assert check.passed and check.generation_rule == {"max_score_drop": 25.0, "min_prefix_agreement": 0.6, "prefix_words": 3}
    # the same answers as a label task fail: identical answers are the label rule
    as_labels = compare_answers({"h": ref}, {"h": got}, min_agreement=0.95, max_accuracy_drop=1.0, kinds={"h": CLS})
    assert not as_labels.passed and as_labels.reasons[0].startswith("answers agree with the fp32 model on 0.0% of 4 records")


def test_free_text_fails_on_a_score_drop_or_on_changed_beginnings_with_the_figures():
    ref = _set(HEADLINES, HEADLINES)
    worse = _set(["stocks", "rain", "new", "team"], HEADLINES)  # same first word, most of each headline lost
    check = compare_answers({"h": ref}, {"h": worse}, min_agreement=0.95, max_accuracy_drop=1.0, kinds={"h": GEN},
                            generation=GenerationRule(max_score_drop=2.0, min_prefix_agreement=0.0, prefix_words=1))
    drop = check.per_task["h"]["score_drop_points"]
    assert not check.passed and drop > 50
    assert check.reasons == [f"h: rouge_l {100 * worse.score:.1f} vs fp32 100.0 (mean paired drop {drop:.1f} points > 2 allowed)"]
    reworded = _set(["shares drop on rate fears", "rains end drought in kenya", "new phone sells out in hours", "team wins title after late goal"], HEADLINES)
    check = compare_answers({"h": ref}, {"h": reworded}, min_agreement=0.95, max_accuracy_drop=1.0, kinds={"h": GEN},
                            generation=GenerationRule(max_score_drop=100.0, min_prefix_agreement=0.6, prefix_words=3))
    assert not check.passed and check.reasons == ["h: 50.0% of 4 answers begin with fp32's first 3 words (needs >= 60%)"]


def test_mixed_holdout_label_rule_counts_only_label_tasks():
    labels = ["World", "Sports", "Business", "World"]
    ref = {"news": _set(labels, labels, "normalized_exact_match"), "h": _set(HEADLINES, HEADLINES)}
    got = {"news": _set(labels, labels, "normalized_exact_match"), "h": _set([h + " today" for h in HEADLINES], HEADLINES)}
    check = compare_answers(ref, got, min_agreement=0.95, max_accuracy_drop=1.0, kinds={"news": CLS, "h": GEN},
                            generation=GenerationRule(max_score_drop=20.0))
    # identical: 4 of 8 records overall, 4 of 4 label records: the label rule reads the latter
    assert check.agreement == 0.5 and check.label_agreement == 1.0
    assert check.accuracy == check.reference_accuracy == 1.0  # pooled exact match over the label task only
    assert check.passed, check.reasons
    flipped = {**got, "news": _set(["World", "Sports", "Business", "Sports"], labels, "normalized_exact_match")}
    check = compare_answers(ref, flipped, min_agreement=0.95, max_accuracy_drop=1.0, kinds={"news": CLS, "h": GEN}, generation=GenerationRule(max_score_drop=20.0))
    assert check.reasons == ["answers agree with the fp32 model on 75.0% of 4 label-task records (needs >= 95%)",
                             "exact match 75.0 vs fp32 100.0 (-25.0 points > 1 allowed)"]


def test_without_kinds_every_task_is_a_label_task_as_before():
    ref = {"t": AnswerSet(["a", "b"], 2, 1.0)}
    got = {"t": AnswerSet(["a", "c"], 2, 0.5)}
    check = compare_answers(ref, got, min_agreement=0.95, max_accuracy_drop=1.0)
    assert check.label_agreement == check.agreement == 0.5 and len(check.reasons) == 2 and check.generation_rule is None


def test_generation_rule_rejects_nonsense():
    with pytest.raises(ValueError):
        GenerationRule(max_score_drop=-1)
    with pytest.raises(ValueError):
        GenerationRule(min_prefix_agreement=1.5)


# --------------------------------------------------------------------------- the history


def test_a_variant_rejected_twice_is_skipped_then_retried_and_the_last_never(tmp_path):
    path = tmp_path / "export-history.json"
    h = VariantHistory(path, "s1", SkipPolicy(skip_after=2, retry_after=3))
    names = ["int4", "int8", "fp32"]
    assert h.skip(names) == set()
    h.record("int4", False)
    assert h.skip(names) == set()  # one rejection is not a pattern
    h.record("int4", False)
    h.record("int8", True)
    assert h.skip(names) == {"int4"}
    for _ in range(3):
        assert h.skip(names) == {"int4"}
        h.note_skipped("int4")
    assert h.skip(names) == set()  # after retry_after skips it is tried again
    h.record("int4", True)  # ... and passing clears it at once
    h.record("int4", False)
    assert h.skip(names) == set()
    h.record("fp32", False)
    h.record("fp32", False)
    assert "fp32" not in h.skip(names)  # the fallback is always tried
    # another setting (other base or rules) starts clean; a damaged file is an empty history
    assert VariantHistory(path, "s2", SkipPolicy(2, 3)).skip(names) == set()
    path.write_text('{"format": 1, "settings": ')
    assert VariantHistory(path, "s1").skip(names) == set()
    VariantHistory(path, "s1").record("int4", False)
    assert json.loads(path.read_text())["settings"]["s1"]["int4"]["outcomes"] == [False]


def test_setting_key_changes_with_base_target_and_rules():
    rules = {"min_agreement": 0.95, "generation": {"max_score_drop": 2.0}}
    k = setting_key("ab" * 32, "genai", "cpu", rules)
    assert k == setting_key("ab" * 32, "genai", "cpu", dict(rules))
    assert len({k, setting_key("cd" * 32, "genai", "cpu", rules), setting_key("ab" * 32, "onnx", "cpu", rules),
                setting_key("ab" * 32, "genai", "cpu", {**rules, "min_agreement": 0.9})}) == 4


def test_int8_on_the_cpu_genai_target_is_the_builders_default_unless_the_settings_say_otherwise():
    from edgekif.config import Config, apply_overrides, validate_config
    from edgekif.errors import ConfigError
    from edgekif.export.build import AUTO_VARIANTS_GENAI_CPU, INT8_CPU, export_candidates, int8_variant

    cfg = Config()
    # the default is named as before the settings existed: histories and zero-shot caches still apply
    assert int8_variant(cfg.export.int8_block_size, cfg.export.int8_symmetric) == INT8_CPU == AUTO_VARIANTS_GENAI_CPU[1]
    assert INT8_CPU.name == "int8" and INT8_CPU.builder_options() == {}
    assert export_candidates("genai", "int4", "cpu", "auto") == list(AUTO_VARIANTS_GENAI_CPU)
    assert export_candidates("genai", "int8", "cpu", "int8") == [INT8_CPU]
    # the free-text setting: both auto and precision = int8 build it
    faithful = int8_variant(16, False)
    assert faithful.name == "int8/block_size=16/is_symmetric=false"
    assert [v.name for v in export_candidates("genai", "int4", "cpu", "auto", int8=faithful)] == [
        "int4/algo_config=k_quant_mixed", "int8/block_size=16/is_symmetric=false", "fp32"]
    assert export_candidates("genai", "int8", "cpu", "int8", int8=faithful) == [faithful]
    # the user's builder options win; only the CPU genai target takes the setting
    assert export_candidates("genai", "int8", "cpu", "int8", {"block_size": "64"}, int8=faithful)[0].builder_options() == {"block_size": "64"}
    assert export_candidates("genai", "int8", "cuda", "int8", int8=faithful)[0].builder_options() == {}
    assert export_candidates("onnx", "int8", "cpu", "int8", int8=faithful)[0].builder_options() == {}
    with pytest.raises(ConfigError, match="int8_block_size: 24"):
        validate_config(apply_overrides(cfg, ["export.int8_block_size=24"]))


def test_a_model_that_answers_only_free_text_gets_int8_with_a_zero_point_in_blocks_of_16():
    from edgekif.config import Config, apply_overrides
    from edgekif.export.build import FREE_TEXT_INT8, INT8_CPU, int8_for_tasks, int8_variant

    cfg = Config()
    assert cfg.export.int8_by_task_kind is True
    assert FREE_TEXT_INT8 == int8_variant(16, False)
    assert int8_for_tasks(["generation"]) == int8_for_tasks(["generation", "generation"]) == FREE_TEXT_INT8
    # a label task anywhere, or a task without a spec (scored like a label), keeps the configured variant
    assert int8_for_tasks(["generation", "classification"]) == INT8_CPU
    assert int8_for_tasks(["generation", None]) == INT8_CPU
    assert int8_for_tasks([]) == INT8_CPU
    assert int8_for_tasks(["classification"], 64, False) == int8_variant(64, False)
    # off: the two settings decide for every model
    off = apply_overrides(cfg, ["export.int8_by_task_kind=false"]).export
    assert int8_for_tasks(["generation"], off.int8_block_size, off.int8_symmetric, off.int8_by_task_kind) == INT8_CPU


def test_auto_tries_the_other_int8_before_fp32():
    """Which label answers an int8 flips depends on how it rounds: when one int8 fails the
    check, the other (the configured one or blocks of 16 with a zero point) goes next, then fp32."""
    from edgekif.config import Config
    from edgekif.export.build import FREE_TEXT_INT8, INT8_CPU, export_candidates, int8_variant, second_int8

    assert Config().export.int8_second_try is True
    assert second_int8(INT8_CPU, INT8_CPU) == FREE_TEXT_INT8  # a label version: the zero point next
    assert second_int8(FREE_TEXT_INT8, INT8_CPU) == INT8_CPU  # a free-text version: the builder's next
    assert second_int8(FREE_TEXT_INT8, int8_variant(64, False)) == int8_variant(64, False)  # the configured one
    assert second_int8(FREE_TEXT_INT8, FREE_TEXT_INT8) is None  # configured as the zero point: nothing else to try
    names = [v.name for v in export_candidates("genai", "int4", "cpu", "auto", int8=INT8_CPU, int8_second=FREE_TEXT_INT8)]
    assert names == ["int4/algo_config=k_quant_mixed", "int8", "int8/block_size=16/is_symmetric=false", "fp32"]
    assert export_candidates("genai", "int4", "cpu", "auto", int8=INT8_CPU, int8_second=INT8_CPU) == export_candidates("genai", "int4", "cpu", "auto")
    # a precision asked for is built alone; other targets are not the CPU genai chain
    assert export_candidates("genai", "int8", "cpu", "int8", int8=INT8_CPU, int8_second=FREE_TEXT_INT8) == [INT8_CPU]
    assert FREE_TEXT_INT8 not in export_candidates("genai", "int4", "cuda", "auto", int8_second=FREE_TEXT_INT8)
