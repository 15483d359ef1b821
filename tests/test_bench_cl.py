"""tools/bench_cl.py's summary: the results.json entry (percent values, plasticity beside
OP/BWT/FWT, one entry per profile and order, merged without losing the others)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.bench_cl import merge_results, summary  # noqa: E402


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
