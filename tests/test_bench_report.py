"""tools/bench_all.py's report: it must say which run its numbers come from, and carry them into
the README's headline block without touching the rest of the README. No benchmark runs here:
each section's results are written by hand in the shapes the tools write."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_all():
    spec = importlib.util.spec_from_file_location("bench_all_under_test", REPO / "tools" / "bench_all.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cl_result(seeds: list[int]) -> dict:
    def strat(ops, bwts):
        return {
            "op_mean": sum(ops) / len(ops), "op_std": 0.05 if len(ops) > 1 else 0.0,
            "bwt_mean": None if bwts is None else sum(bwts) / len(bwts), "bwt_std": 0.02 if len(ops) > 1 else 0.0,
            "sec_per_step": 2.0, "runs": [{"examples_per_sec": 4.0}] * len(ops),
        }

    n = len(seeds)
    return {
        "profile": "standard",
        "settings": {"seeds": seeds, "test_per_task": 24},
        "strategies": {
            "seq_lora": strat([0.30] * n, [-0.35] * n),
            "replay": strat([0.45] * n, [-0.05] * n),
            "recurrent_kif": strat([0.50] * n, [-0.04] * n),
            "mtl": strat([0.48] * n, None),
        },
    }


def _write_out(out: Path, starts: dict[str, str], seeds: list[int]) -> dict:
    results = {
        "cl-order1": _cl_result(seeds),
        "train": {},
        "serving": {"headline": {"genai_int4_vs_eager_fp32_tokens_per_s_ratio": 6.5, "genai_int4_tokens_per_s": 130.0, "eager_fp32_tokens_per_s": 20.0}},
        "daemon": {"headline": {"drop_to_published_s_100": 61.0, "drop_to_published_s_1000": 142.0}},
    }
    runs = {}
    for name, res in results.items():
        d = out / name
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(res))
        (d / "result.md").write_text(f"### {name} section\n")
        info = {"command": f"python tools/{name}.py", "rc": 0, "seconds": 60.0, "finished": "2026-11-23T05:00:00+00:00",
                "run_started": starts[name], "commit": "abc1234"}
        (d / ".done.json").write_text(json.dumps(info))
        runs[name] = info
    for s in seeds:  # bench_cl names the first seed's heatmaps plainly, the others _s<seed>
        for strat in ("seq_lora", "recurrent_kif"):
            (out / "cl-order1" / f"heatmap_{strat}{'' if s == seeds[0] else f'_s{s}'}.png").write_bytes(b"\x89PNG")
    return runs


README = "# edgekif\n\nintro\n\n<!-- bench:headline:begin -->\nold figures\n<!-- bench:headline:end -->\n\nafter\n"


def test_one_run_report_and_readme_headline(bench_all, tmp_path):
    same = "2026-11-23T04:00:00+00:00"
    runs = _write_out(tmp_path / "out", dict.fromkeys(("cl-order1", "train", "serving", "daemon"), same), [0, 1, 2])
    readme = tmp_path / "README.md"
    readme.write_text(README)
    report = bench_all.write_report(tmp_path / "out", runs, "standard", 1234.0, tmp_path / "docs", readme)
    text = report.read_text()

    assert "Every number below comes from that one run (started 2026-11-23T04:00:00+00:00, all 4 sections)" in text
    assert "commit `abc1234`" in text and "finished 2026-11-23 05:00 UTC" in text
    assert "wall time 20.6 min" in text
    # the seeds' spread is in the headline
    assert "Recurrent-KIF OP 50.0 ± 5.0 / BWT -4.0 ± 2.0 vs sequential LoRA OP 30.0 ± 5.0 / BWT -35.0 ± 2.0" in text
    assert "mean ± std over 3 seeds" in text
    assert "a 1000-example task in 142 s" in text
    # first seed's heatmaps inline, all of them copied beside the report
    assert "cl-order1-heatmap_recurrent_kif.png" in text and "heatmap_recurrent_kif_s1" not in text
    assert len(list((tmp_path / "docs" / "benchmarks").glob("cl-order1-heatmap_*_s*.png"))) == 4

    new_readme = readme.read_text()
    assert "old figures" not in new_readme
    assert "6.5× the tokens/s of PyTorch eager fp32 (130 vs 20 tokens/s" in new_readme
    assert new_readme.startswith("# edgekif\n\nintro\n\n<!-- bench:headline:begin -->\n")
    assert new_readme.endswith("<!-- bench:headline:end -->\n\nafter\n")


def test_regenerating_the_report_keeps_the_trials_below_the_marker(bench_all, tmp_path):
    runs = _write_out(tmp_path / "out", dict.fromkeys(("cl-order1", "train", "serving", "daemon"), "2026-11-23T04:00:00+00:00"), [0])
    docs = tmp_path / "docs"
    docs.mkdir()
    trials = f"{bench_all.TRIALS_MARKER}\n\n## Validation sweep\n\n| a | b |\n"
    (docs / "benchmarks.md").write_text("# old report\n\nold numbers\n\n" + trials)
    text = bench_all.write_report(tmp_path / "out", runs, "standard", 1.0, docs, None).read_text()
    assert "old numbers" not in text and text.endswith(trials) and text.count(bench_all.TRIALS_MARKER) == 1


def test_report_from_several_runs_says_so(bench_all, tmp_path):
    starts = {"cl-order1": "2026-11-23T01:00:00+00:00", "train": "2026-11-23T04:00:00+00:00",
              "serving": "2026-11-23T04:00:00+00:00", "daemon": "2026-11-23T04:00:00+00:00"}
    runs = _write_out(tmp_path / "out", starts, [0])
    text = bench_all.write_report(tmp_path / "out", runs, "standard", 240.0, tmp_path / "docs", None).read_text()
    assert "**The sections come from 2 different runs**" in text
    assert "that one run" not in text
    assert "One seed and 24 test examples per task" in text  # a single seed is flagged as noisy
