"""tools/bench_cl.py's summary: the results.json entry (percent values, plasticity beside
OP/BWT/FWT, one entry per profile and order, merged without losing the others)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
