"""The continual-learning accuracy matrix: OP / BWT / FWT / plasticity by hand, missing cells,
JSON and markdown, and the heatmap PNG."""

from __future__ import annotations

import json
import math

import pytest

from edgekif.accuracy_matrix import AccuracyMatrix, plot_heatmap
from edgekif.errors import EdgekifError

# a[j][i]: accuracy on task i after training task j
A3 = [
    [0.80, 0.10, 0.20],
    [0.60, 0.90, 0.30],
    [0.50, 0.70, 0.95],
]
ZERO_SHOT = [0.05, 0.05, 0.10]


def matrix3() -> AccuracyMatrix:
    m = AccuracyMatrix(["dbpedia", "amazon", "yahoo"])
    for j, row in enumerate(A3):
        for i, v in enumerate(row):
            m.set(j, i, v)
    return m


def test_metrics_by_hand():
    m = matrix3()
    assert m.op() == pytest.approx((0.50 + 0.70 + 0.95) / 3)  # 0.71667
    assert m.bwt() == pytest.approx(((0.50 - 0.80) + (0.70 - 0.90)) / 2)  # -0.25
    assert m.fwt(ZERO_SHOT) == pytest.approx(((0.10 - 0.05) + (0.30 - 0.10)) / 2)  # 0.125
    s = m.summary(ZERO_SHOT)
    assert s == {"op": pytest.approx(0.716666, abs=1e-5), "bwt": pytest.approx(-0.25), "fwt": pytest.approx(0.125)}
    assert not any(math.isnan(v) for v in s.values())


def test_plasticity_is_the_diagonal_mean():
    m = matrix3()
    assert m.plasticity() == pytest.approx((0.80 + 0.90 + 0.95) / 3)
    m.set(1, 1, None)
    assert m.plasticity() is None  # a partial mean would mean something else


def test_no_forgetting_gives_zero_bwt():
    m = AccuracyMatrix(["a", "b"])
    m.set("a", "a", 0.9)
    m.set("b", "a", 0.9)
    m.set("b", "b", 0.7)
    assert m.bwt() == 0.0
    assert m.op() == pytest.approx(0.8)


def test_single_task():
    m = AccuracyMatrix(["only"])
    m.set(0, 0, 0.4)
    assert m.op() == pytest.approx(0.4)
    assert m.bwt() is None
    assert m.fwt([0.1]) is None


def test_missing_cells_make_metrics_undefined():
    m = matrix3()
    m.set(1, 1, float("nan"))  # NaN is stored as "not evaluated"
    assert m.get(1, 1) is None
    assert m.bwt() is None  # needs a[1][1]
    assert m.op() == pytest.approx((0.50 + 0.70 + 0.95) / 3)  # final row is complete
    m.set(2, 0, None)
    assert m.op() is None
    assert matrix3().fwt([0.05, None, 0.1]) is None


def test_set_rejects_percentages_and_fwt_checks_length():
    m = matrix3()
    with pytest.raises(ValueError):
        m.set(0, 0, 80.0)
    with pytest.raises(ValueError):
        m.fwt([0.1, 0.2])


def test_add_task_grows_matrix():
    m = AccuracyMatrix()
    assert m.op() is None
    assert m.add_task("t0") == 0
    m.set(0, 0, 0.5)
    assert m.add_task("t1") == 1
    assert m.a == [[0.5, None], [None, None]]
    with pytest.raises(ValueError):
        m.add_task("t0")


def test_dict_round_trip_is_json_safe():
    m = matrix3()
    m.set(0, 2, None)
    text = json.dumps(m.to_dict(), allow_nan=False)
    back = AccuracyMatrix.from_dict(json.loads(text))
    assert back.tasks == m.tasks and back.a == m.a
    assert back.bwt() == pytest.approx(-0.25)
    with pytest.raises(EdgekifError):
        AccuracyMatrix.from_dict({"tasks": ["a", "b"], "a": [[0.1, 0.2]]})
    with pytest.raises(EdgekifError):
        AccuracyMatrix.from_dict({"tasks": ["a"], "a": [[1.5]]})


def test_markdown_table():
    m = matrix3()
    m.set(0, 2, None)
    lines = m.to_markdown().strip().splitlines()
    assert lines[0] == "| after \\ eval | dbpedia | amazon | yahoo |"
    assert lines[2] == "| after dbpedia | 80.0 | 10.0 | – |"
    assert lines[4] == "| after yahoo | 50.0 | 70.0 | 95.0 |"


def test_heatmap_writes_png(tmp_path):
    m = matrix3()
    m.set(0, 2, None)
    out = tmp_path / "heat.png"
    plot_heatmap(m, out, "test")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert [p.name for p in tmp_path.iterdir()] == ["heat.png"]  # no temp file left behind
