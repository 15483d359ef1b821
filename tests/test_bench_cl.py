"""tools/bench_cl.py's summary: the results.json entry (percent values, plasticity beside
OP/BWT/FWT, one entry per profile and order, merged without losing the others)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_cl import entry_key, merge_results, summary, to_markdown  # noqa: E402


def _result():
    run = lambda op, bwt, pl, fwt: {"op": op, "bwt": bwt, "plasticity": pl, "fwt": fwt}  # noqa: E731
    return {
        "profile": "standard", "command": "python tools/bench_cl.py --profile standard",
        "settings": {"order": ["a", "b"], "seeds": [0, 1, 2], "train_per_task": 128, "test_per_task": 100},
        "strategies": {
            "recurrent_kif": {"runs": [run(0.5, -0.01, 0.6, None)], "op_mean": 0.5, "op_std": 0.02, "bwt_mean": -0.01, "plasticity_mean": 0.6, "fwt_mean": None, "label_op_mean": 0.55},
            "mtl": {"runs": [run(0.7, None, None, None)], "op_mean": 0.7, "op_std": 0.0, "bwt_mean": None},
        },
    }


def test_summary_has_the_documented_shape():
    s = summary(_result())
    assert s["metric"] == "exact_match" and s["seeds"] == [0, 1, 2] and s["test_per_task"] == 100
    assert s["strategies"]["recurrent_kif"] == {"op": 50.0, "op_std": 2.0, "bwt": -1.0, "plasticity": 60.0, "fwt": None, "label_op": 55.0}
    assert s["strategies"]["mtl"] == {"op": 70.0, "op_std": 0.0}


def test_a_task_suite_reports_each_tasks_metric_budget_zero_shot_and_general_drift():
    r = _result()
    r["name"] = "gen-order1"
    r["settings"].update(task_specs={"a": {"kind": "generation", "metric": "rouge_l", "max_new_tokens": 24, "source": "detected", "stated": []},
                                     "b": {"kind": "classification", "metric": "normalized_exact_match", "max_new_tokens": 5, "source": "detected", "stated": []}},
                         eval_prompt_tokens={"a": 104, "b": 123})
    r["zero_shot"] = {"a": 0.1561, "b": 0.25}
    st = r["strategies"]["recurrent_kif"]
    st["runs"][0]["general_drift"] = {"rouge_l": 0.41, "loglik_drop": 0.2}
    st.update(drift_rouge_l_mean=0.41, drift_loglik_drop_mean=0.2)
    s = summary(r)
    assert entry_key(r) == "gen-order1" and entry_key(_result()) == "standard-custom"
    assert s["metric"] == {"a": "rouge_l", "b": "normalized_exact_match"} and s["max_new_tokens"] == {"a": 24, "b": 5}
    assert s["zero_shot"] == {"a": 15.61, "b": 25.0}
    assert s["strategies"]["recurrent_kif"]["general_drift"] == {"rouge_l": 0.41, "loglik_drop": 0.2}
    assert "general_drift" not in s["strategies"]["mtl"]
    r["settings"].update(lora={"r": 8, "alpha": 32, "target_modules": ["q_proj"]}, lr=1e-3, batch_size=8, task_steps=16, max_length=128, metric="m",
                         replay_fraction=0.02, replay_min_per_task=16, precision="fp32",
                         kif={"inner_steps": 8, "outer_steps": 4, "outer_lr": 1e-3, "beta1": 0.85, "beta2": 0.85, "mask_quantile": 0.8,
                              "w_both_in": 0.4, "w_both_out": 0.6, "w_neither_in": 0.5, "w_neither_out": 0.5, "reset_importance": False})
    for st in r["strategies"].values():
        st.setdefault("sec_per_step", 1.0)
        for run in st["runs"]:
            run.update(grad_steps=10, seconds=5.0)
    md = to_markdown(r)
    assert "Tasks: a: generation, rouge_l, 24 new tokens, prompt fitted into 104; b: classification, normalized_exact_match, 5 new tokens" in md
    assert "| recurrent_kif | 50.0 | -1.0 | 60.0 | — | 55.0 | 0.410 | 0.200 |" in md
    assert "- recurrent_kif: 0.410 / 0.200" in md
    # the stream's order, not result.json's sorted keys
    r["settings"]["order"] = ["b", "a"]
    assert "Tasks: b: classification, normalized_exact_match, 5 new tokens, prompt fitted into 123; a: generation" in to_markdown(r)


def test_merge_keeps_other_entries(tmp_path):
    path = tmp_path / "results.json"
    merge_results(path, "standard-order1", summary(_result()))
    merge_results(path, "full-order2", {"profile": "full"})
    merge_results(path, "standard-order1", {"profile": "standard", "again": True})
    data = json.loads(path.read_text())
    assert set(data["cl"]) == {"standard-order1", "full-order2"} and data["cl"]["standard-order1"]["again"] is True


def test_validation_split_is_the_last_n_disjoint_and_fixed():
    from tools.bench_cl import _subset, validation_split

    records = [{"id": f"t_{i}", "output": str(i % 3)} for i in range(100)]
    train, val = validation_split(records, 20)
    assert len(val) == 20 and len(train) == 80
    assert val == records[-20:] and train == records[:-20]  # the last N records, in file order
    assert not {r["id"] for r in train} & {r["id"] for r in val}  # disjoint
    assert validation_split(records, 20) == (train, val)  # deterministic: no seed involved
    # the training subset is drawn from the part before the slice, for any seed
    for seed in range(5):
        assert {r["id"] for r in _subset(train, 50, seed)} <= {r["id"] for r in train}
    # N per task: every task gets its own last N
    other = [{"id": f"u_{i}", "output": "x"} for i in range(30)]
    assert [r["id"] for r in validation_split(other, 20)[1]] == [f"u_{i}" for i in range(10, 30)]
    for bad in (0, 100, 150):
        with pytest.raises(SystemExit):
            validation_split(records, bad)


def _run_dir(root: Path, name: str, seeds, strategies, zero=None, **settings) -> Path:
    """A finished bench_cl run's result.json, as one process per seed writes it."""
    from dataclasses import asdict

    from edgekif.strategies import KIFConfig

    base = {"order": ["dbpedia", "amazon"], "seeds": list(seeds), "train_per_task": 128, "test_per_task": 100, "lr": 1e-3, "precision": "fp32",
            "task_steps": 16, "batch_size": 8, "max_length": 128, "eval_prompt_tokens": 120, "metric": "exact match", "replay_fraction": 0.02,
            "replay_min_per_task": 16, "label_scoring": True, "kif": asdict(KIFConfig()), "lora": {"r": 8, "alpha": 32, "target_modules": ["q_proj", "v_proj"]}}
    res = {"profile": "standard", "command": f"python tools/bench_cl.py --seeds {' '.join(map(str, seeds))}", "wall_seconds": 60.0,
           "settings": {**base, **settings}, "strategies": {}}
    for strat, cells in strategies.items():
        runs = []
        for seed, a in zip(seeds, cells):
            runs.append({"seed": seed, "matrix": {"tasks": ["dbpedia", "amazon"], "a": a}, "op": sum(a[-1]) / 2,
                         "bwt": None if a[0][0] is None else a[1][0] - a[0][0], "plasticity": None if a[0][0] is None else (a[0][0] + a[1][1]) / 2,
                         "fwt": None, "label_op": None, "grad_steps": 32, "sec_per_step": 3.0, "seconds": 30.0})
        res["strategies"][strat] = {"runs": runs}
    if zero:
        res["zero_shot_by_seed"] = zero
    d = root / name
    d.mkdir()
    (d / "result.json").write_text(json.dumps(res))
    return d


def test_merge_combines_seed_processes_and_fills_fwt_from_each_seeds_zero_shot(tmp_path):
    from tools.bench_cl import main

    a = _run_dir(tmp_path, "s1", [1], {"replay": [[[0.5, 0.2], [0.6, 0.8]]], "mtl": [[[None, None], [0.7, 0.9]]]})
    b = _run_dir(tmp_path, "s2", [2], {"replay": [[[0.7, 0.4], [0.6, 0.6]]], "mtl": [[[None, None], [0.5, 0.7]]]})
    # the zero-shot part ran without label scoring (FWT is on exact match): still mergeable
    z = _run_dir(tmp_path, "z", [1, 2], {}, zero={"1": {"dbpedia": 0.1, "amazon": 0.1}, "2": {"dbpedia": 0.0, "amazon": 0.3}},
                 zero_shot_only=True, label_scoring=False)
    out = tmp_path / "merged"
    rj = tmp_path / "results.json"
    assert main(["--merge", str(z), str(b), str(a), "--out", str(out), "--results-json", str(rj)]) == 0
    res = json.loads((out / "result.json").read_text())
    replay = res["strategies"]["replay"]
    assert [r["seed"] for r in replay["runs"]] == [1, 2] and res["settings"]["seeds"] == [1, 2]
    assert replay["op_mean"] == pytest.approx((0.7 + 0.6) / 2) and replay["op_std"] == pytest.approx(0.05)
    # FWT = a[0][1] - the zero-shot of the SAME seed's examples: seed 1 0.2 - 0.1, seed 2 0.4 - 0.3
    assert [r["fwt"] for r in replay["runs"]] == [pytest.approx(0.1), pytest.approx(0.1)]
    assert res["strategies"]["mtl"]["runs"][0]["fwt"] is None  # joint: no FWT
    entry = json.loads(rj.read_text())["cl"]["standard-custom"]
    assert entry["seeds"] == [1, 2] and entry["strategies"]["replay"]["fwt"] == pytest.approx(10.0)
    assert set(entry["strategies"]["mtl"]) == {"op", "op_std"}
    assert "Merged from" in (out / "result.md").read_text()


def test_merge_refuses_runs_of_other_settings_or_a_seed_twice(tmp_path):
    from tools.bench_cl import main

    a = _run_dir(tmp_path, "a", [1], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]})
    b = _run_dir(tmp_path, "b", [2], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}, lr=2e-3)
    c = _run_dir(tmp_path, "c", [1], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]})
    with pytest.raises(SystemExit, match="other settings than .*: lr"):
        main(["--merge", str(a), str(b), "--out", str(tmp_path / "m")])
    # a --set that no other setting holds (train.loss_average) is recorded, and compared
    from tools.bench_cl import recorded_overrides

    assert recorded_overrides(["kif.inner_steps=8", "train.loss_average = example", "model.base=gemma3-270m", "data.max_length=256"]) == \
        ["data.max_length=256", "train.loss_average=example"]
    assert recorded_overrides(["model.chat_template = /my templates/t.jinja"]) == ["model.chat_template=/my templates/t.jinja"]
    e = _run_dir(tmp_path, "e", [2], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}, overrides=recorded_overrides(["train.loss_average=example"]))
    with pytest.raises(SystemExit, match="other settings than .*: overrides"):
        main(["--merge", str(a), str(e), "--out", str(tmp_path / "m")])
    z = _run_dir(tmp_path, "z", [1], {}, zero={"1": {"dbpedia": 0.1, "amazon": 0.1}}, zero_shot_only=True, test_per_task=50)
    with pytest.raises(SystemExit, match="other settings than .*: test_per_task"):
        main(["--merge", str(a), str(z), "--out", str(tmp_path / "m")])
    with pytest.raises(SystemExit, match="replay has seed 1 more than once"):
        main(["--merge", str(a), str(c), "--out", str(tmp_path / "m")])
    unfinished = json.loads((c / "result.json").read_text())
    del unfinished["wall_seconds"]
    unfinished["strategies"] = {}
    (c / "result.json").write_text(json.dumps(unfinished))
    with pytest.raises(SystemExit, match="did not finish any strategy"):
        main(["--merge", str(a), str(c), "--out", str(tmp_path / "m")])
    (c / "result.json").write_text('{"profile": "standard", "settings": {')  # half-written (a killed run, another filesystem)
    with pytest.raises(SystemExit, match=r"cannot read .*c/result\.json"):
        main(["--merge", str(a), str(c), "--out", str(tmp_path / "m")])
    assert not (tmp_path / "m").exists()  # a refused merge writes nothing


def test_merge_compares_a_strategys_own_section_only_where_that_strategy_ran(tmp_path):
    """Recurrent-KIF run alone at Q=8/M=4 (its [experience_replay] left at the default) merges
    with replay run alone at Q=8/M=4; the report states each section as the part that ran it;
    two parts that both ran Recurrent-KIF at other schedules still do not merge."""
    from dataclasses import asdict, replace

    from tools.bench_cl import main

    from edgekif.strategies import KIFConfig, ReplayScheduleConfig

    q8m4_kif = asdict(replace(KIFConfig(), inner_steps=8, outer_steps=4))
    q8m4, q2m1 = asdict(ReplayScheduleConfig(inner_steps=8, outer_steps=4)), asdict(ReplayScheduleConfig())
    both = _run_dir(tmp_path, "s0", [0], {"recurrent_kif": [[[0.5, 0.2], [0.6, 0.8]]], "replay": [[[0.5, 0.2], [0.4, 0.7]]]},
                    kif=q8m4_kif, experience_replay=q8m4)
    kif1 = _run_dir(tmp_path, "s1-kif", [1], {"recurrent_kif": [[[0.6, 0.2], [0.6, 0.9]]]}, kif=q8m4_kif, experience_replay=q2m1)
    replay1 = _run_dir(tmp_path, "s1-replay", [1], {"replay": [[[0.6, 0.2], [0.5, 0.9]]]}, experience_replay=q8m4)  # [kif] at Q=2/M=1
    out = tmp_path / "m"
    assert main(["--merge", str(kif1), str(both), str(replay1), "--out", str(out)]) == 0
    merged = json.loads((out / "result.json").read_text())
    assert [r["seed"] for r in merged["strategies"]["recurrent_kif"]["runs"]] == [0, 1]
    assert [r["seed"] for r in merged["strategies"]["replay"]["runs"]] == [0, 1]
    # kif1 comes first, but its [experience_replay] is not what replay ran with
    assert merged["settings"]["experience_replay"]["inner_steps"] == 8 and merged["settings"]["kif"]["inner_steps"] == 8
    assert "(min 16), the replay strategy at Q=8, M=4; Recurrent-KIF Q=8, M=4," in (out / "result.md").read_text()
    replay_q2m1 = _run_dir(tmp_path, "s2-replay", [2], {"replay": [[[0.6, 0.2], [0.5, 0.9]]]}, experience_replay=q2m1)
    with pytest.raises(SystemExit, match=r"s2-replay was run with other settings than .*s0: experience_replay$"):
        main(["--merge", str(kif1), str(both), str(replay_q2m1), "--out", str(tmp_path / "m2")])
    kif2 = _run_dir(tmp_path, "s2-kif", [2], {"recurrent_kif": [[[0.6, 0.2], [0.6, 0.9]]]}, experience_replay=q8m4)  # [kif] at Q=2/M=1
    with pytest.raises(SystemExit, match=r"s2-kif was run with other settings than .*s1-kif: kif$"):
        main(["--merge", str(kif1), str(both), str(kif2), "--out", str(tmp_path / "m3")])


def test_merge_takes_the_finished_strategies_of_a_stopped_run(tmp_path):
    """A run stopped between strategies (no wall_seconds) contributes the strategies it
    finished, its wall time is theirs, and the report says it stopped."""
    from tools.bench_cl import main

    stopped = _run_dir(tmp_path, "s0", [0], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]})
    res = json.loads((stopped / "result.json").read_text())
    del res["wall_seconds"]
    (stopped / "result.json").write_text(json.dumps(res))
    rest = _run_dir(tmp_path, "s0-mtl", [0], {"mtl": [[[None, None], [0.7, 0.9]]]})
    seed1 = _run_dir(tmp_path, "s1", [1], {"replay": [[[0.4, 0.2], [0.5, 0.6]]]})
    out = tmp_path / "m"
    assert main(["--merge", str(stopped), str(rest), str(seed1), "--out", str(out)]) == 0
    merged = json.loads((out / "result.json").read_text())
    assert set(merged["strategies"]) == {"replay", "mtl"} and merged["wall_seconds"] == pytest.approx(30.0 + 60.0 + 60.0)
    md = (out / "result.md").read_text()
    assert "(stopped; its finished strategies: replay)" in md
    # the per-seed table keeps its columns where a strategy lacks a seed
    assert "| replay | 70.0 / 10.0 | 55.0 / 10.0 |" in md and "| mtl | 80.0 / — | not run |" in md


def test_merge_keeps_bases_apart_and_reads_older_runs_as_the_default_base(tmp_path):
    """A run recorded before the base was (settings without "base") ran on the default base:
    it merges with an explicit SmolLM2 run, not with a Gemma 3 one, and the entry names the base."""
    from tools.bench_cl import main

    older = _run_dir(tmp_path, "old", [0], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]})
    smol = _run_dir(tmp_path, "smol", [1], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}, base="smollm2-135m-instruct")
    gemma = _run_dir(tmp_path, "gemma", [2], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}, base="gemma3-270m")
    with pytest.raises(SystemExit, match="other settings than .*: base"):
        main(["--merge", str(older), str(gemma), "--out", str(tmp_path / "m")])
    rj = tmp_path / "results.json"
    assert main(["--merge", str(older), str(smol), "--out", str(tmp_path / "m"), "--results-json", str(rj)]) == 0
    assert json.loads(rj.read_text())["cl"]["standard-custom"]["base"] == "smollm2-135m-instruct"
    assert "smollm2-135m-instruct (fp32)" in (tmp_path / "m" / "result.md").read_text()


def test_merge_reads_runs_from_before_eval_dtype_as_fp32_evaluation(tmp_path):
    """eval_dtype was recorded once bf16 evaluation existed: an older run evaluated in fp32 merges
    with an `--eval-dtype fp32` run and not with a bf16 one."""
    from tools.bench_cl import main

    older = _run_dir(tmp_path, "old", [0], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]})
    fp32 = _run_dir(tmp_path, "fp32", [1], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}, eval_dtype="fp32")
    bf16 = _run_dir(tmp_path, "bf16", [2], {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}, eval_dtype="bf16")
    with pytest.raises(SystemExit, match="other settings than .*: eval_dtype"):
        main(["--merge", str(older), str(bf16), "--out", str(tmp_path / "m")])
    assert main(["--merge", str(older), str(fp32), "--out", str(tmp_path / "m")]) == 0
    assert json.loads((tmp_path / "m" / "result.json").read_text())["settings"]["seeds"] == [0, 1]


def test_merge_reads_the_general_rehearsal_share_of_runs_from_before_it_was_recorded(tmp_path):
    """replay_general_share was recorded from 2026-12-06 on: an older run that set it with --set
    merges with a newer run at that share, and an older run without it (no rehearsal) does not."""
    from tools.bench_cl import main

    cells = {"replay": [[[0.5, 0.2], [0.6, 0.8]]]}
    older_with = _run_dir(tmp_path, "old-with", [0], cells, overrides=["replay.general_share=0.125"])
    older_without = _run_dir(tmp_path, "old-without", [1], cells)
    newer = _run_dir(tmp_path, "new", [2], cells, replay_general_share=0.125, overrides=["replay.general_share=0.125"])
    with pytest.raises(SystemExit, match="other settings than .*replay_general_share"):
        main(["--merge", str(older_without), str(newer), "--out", str(tmp_path / "m")])
    assert main(["--merge", str(older_with), str(newer), "--out", str(tmp_path / "m")]) == 0
    merged = json.loads((tmp_path / "m" / "result.json").read_text())["settings"]
    assert merged["seeds"] == [0, 2] and merged["replay_general_share"] == 0.125


def test_a_run_on_a_configured_base_scores_labels_only_in_the_final_row(tiny_dir, tmp_path):
    """End to end on the tiny random Llama given as `--set model.base`, on a stream of a label
    task and a free-text one: the run records that base, fills every cell of the headline
    matrix, label-scores only the final row (the label OP's row) and only the label task, and
    the label OP is that task's label score (not "none" because the free-text task has none)."""
    from tools.bench_cl import main

    colours = [json.dumps({"instruction": f"The colour of item {i}?", "input": "", "output": ["red", "blue"][i % 2]}) for i in range(12)]
    names = [json.dumps({"instruction": f"Name item {i}.", "input": "", "output": f"item number {i} of the list"}) for i in range(12)]
    for t, recs in (("colours", colours), ("names", names)):
        d = tmp_path / "tasks" / t
        d.mkdir(parents=True)
        (d / "train.jsonl").write_text("\n".join(recs[:8]) + "\n")
        (d / "test.jsonl").write_text("\n".join(recs[8:]) + "\n")
    out = tmp_path / "run"
    rc = main(["--quick", "--tasks", str(tmp_path / "tasks" / "colours"), str(tmp_path / "tasks" / "names"), "--strategies", "seq_lora",
               "--seeds", "0", "--task-steps", "1", "--train-per-task", "8", "--test-per-task", "4", "--label-scoring", "--no-zero-shot",
               "--no-drift", "--no-full-matrix", "--eval-dtype", "bf16", "--set", f"model.base={tiny_dir}", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "result.json").read_text())
    assert res["settings"]["base"] == tiny_dir.name
    assert res["settings"]["eval_dtype"] == "bf16"
    # the wall time by part: they add up to it, and the report says where it went
    from tools.bench_cl import _time_breakdown

    parts = _time_breakdown(res)
    assert parts is not None and parts["training"] > 0 and parts["cells"] > 0 and parts["zero-shot"] == 0.0
    assert abs(sum(parts.values()) - res["wall_seconds"]) < 1e-6 and parts["rest"] >= 0
    assert "Where the wall time went (s): training " in (out / "result.md").read_text()
    assert "evaluation (bf16) = cells + zero-shot + general prompts" in (out / "result.md").read_text()
    assert res["settings"]["full_matrix"] is False  # two tasks: the metrics' cells are all three
    train_s = res["strategies"]["seq_lora"]["runs"][0]["train_seconds"]
    share = 100 * (1 - train_s / res["wall_seconds"])
    assert f"**{share:.0f}%** of the wall time (the cells the metrics read" in (out / "result.md").read_text()
    assert [res["settings"]["task_specs"][t]["kind"] for t in ("colours", "names")] == ["classification", "generation"]
    run = res["strategies"]["seq_lora"]["runs"][0]
    a, labels = run["matrix"]["a"], run["label_matrix"]["a"]
    assert a[0][0] is not None and all(v is not None for v in a[1])
    assert labels[0] == [None, None] and labels[1][1] is None and 0.0 <= labels[1][0] <= 1.0
    assert run["label_op"] == labels[1][0] == res["strategies"]["seq_lora"]["label_op_mean"]


def test_the_report_says_where_replay_batches_carried_general_rehearsal():
    from tools.bench_cl import _general_rehearsal

    assert _general_rehearsal({"replay_general_share": 0.0}) == "" and _general_rehearsal({}) == ""
    assert _general_rehearsal({"replay_general_share": 0.125}).startswith(", 0.125 of each replay batch the base's own answers")
    # a report written before the share was recorded: its --set overrides tell
    assert "0.25 of each replay batch" in _general_rehearsal({"overrides": ["train.lr=1e-3", "replay.general_share=0.25"]})


def test_the_report_says_at_what_rate_free_text_trained():
    from tools.bench_cl import _free_text_rate

    # recorded only for streams with free text; a factor of 1 is one rate for every kind
    assert _free_text_rate({}) == "" and _free_text_rate({"generation_lr_scale": 1.0}) == ""
    assert _free_text_rate({"generation_lr_scale": 0.5}) == " (free-text tasks × 0.5, also the outer lr)"
