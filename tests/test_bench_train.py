"""tools/bench_train.py's plan and report for the LoRA placement, dropout and bf16 autocast points. No
training runs here: the result is written by hand in the shape `run_point` returns."""

from __future__ import annotations

import pytest

from tools import bench_train


def test_lora_points_vary_only_placement_and_dropout():
    points, _ = bench_train.plan_points(quick=True)
    lora = {k: v for k, v in points.items() if k.startswith("lora/")}
    assert sorted(lora) == ["lora/all linear/0", "lora/all linear/0.05", "lora/q,v/0", "lora/q,v/0.05"]
    assert lora["lora/all linear/0"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert lora["lora/all linear/0"]["dropout"] == 0.0 and lora["lora/q,v/0.05"]["dropout"] == 0.05
    # apart from these two keys a lora point is the fp32 reference point
    ref = points["precision/fp32"]
    for p in lora.values():
        assert {k: v for k, v in p.items() if k not in ("targets", "dropout")} == ref
    # the 256-token points: both placements without dropout, and every linear layer checkpointed
    long = {k: v for k, v in points.items() if k.startswith("long/")}
    assert sorted(long) == ["long/all linear", "long/all linear, checkpointing", "long/q,v"]
    assert long["long/q,v"] == {**ref, "max_length": 256, "targets": ["q_proj", "v_proj"], "dropout": 0.0}
    assert long["long/all linear, checkpointing"] == {**long["long/all linear"], "checkpointing": True}
    # the other points leave the config's LoRA alone
    assert all("targets" not in p and "dropout" not in p for k, p in points.items() if not k.startswith(("lora/", "long/")))


def test_lora_table_compares_with_its_first_row():
    def pt(sec, params):
        return {"sec_per_step": sec, "peak_rss_mb": 3000.0, "peak_anon_mb": 2000.0, "lora_params": params}

    pts = {
        "lora/q,v/0.05": pt(4.0, 460800),
        "lora/q,v/0": pt(3.0, 460800),
        "lora/all linear/0.05": pt(6.0, 2442240),
        "lora/all linear/0": {"error": "boom"},
    }
    md = bench_train.to_markdown({"command": "x", "batch_size": 8, "points": {**{f"precision/{p}": {"error": "not run"} for p in ("fp32", "bf16", "nf4")}, **pts}, "skipped": {}})
    rows = [line for line in md.splitlines() if line.startswith("| q,v") or line.startswith("| all linear")]
    assert rows[0].startswith("| q,v | 0.05 | 4.00 | 1.00× |")
    assert rows[1].startswith("| q,v | 0 | 3.00 | 0.75× |")
    assert rows[2].startswith("| all linear | 0.05 | 6.00 | 1.50× | 3000 | 2000 | 2,442,240 |")
    assert rows[3] == "| all linear | 0 | failed: boom | | | | |"


def test_long_table_lists_each_256_token_point():
    pts = {"long/q,v": {"sec_per_step": 6.08, "peak_rss_mb": 4923.4, "peak_anon_mb": 4284.0},
           "long/all linear, checkpointing": {"error": "oom"}}
    failed = {f"precision/{p}": {"error": "not run"} for p in ("fp32", "bf16", "nf4")}
    md = bench_train.to_markdown({"command": "x", "batch_size": 8, "points": {**failed, **pts}, "skipped": {}})
    assert "| q,v | 6.08 | 4923 | 4284 |" in md.splitlines()
    assert "| all linear, checkpointing | failed: oom | | |" in md.splitlines()


@pytest.mark.parametrize("native", [True, False])
def test_autocast_point_only_where_bf16_is_native(monkeypatch, native):
    import edgekif.compute

    monkeypatch.setattr(edgekif.compute, "fast_bf16", lambda device_type="cpu": native)
    points, skipped = bench_train.plan_points(quick=True)
    key = f"precision/{bench_train.AUTOCAST}"
    if native:
        assert points[key] == {**points["precision/fp32"], "train_dtype": "bf16"}
        assert key not in skipped
    else:
        assert key not in points and "precision/bf16" not in points
        assert "no bf16 instructions" in skipped[key]
