"""tools/trial_task.py: a setting's gain over the base on a task's holdout, paired, per seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools.trial_task import main  # noqa: E402


def test_trial_reports_each_settings_paired_gain_over_the_base(tiny_dir, tmp_path):
    from edgekif.records import Record

    # as the daemon writes them (jobs/N/train.jsonl, holdout/TASK.jsonl)
    lines = [Record.from_prompt(f"Word {i}?", ["red", "blue"][i % 2]).to_json() for i in range(12)]
    (tmp_path / "train.jsonl").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "t.jsonl").write_text("\n".join(lines[8:]) + "\n")
    (tmp_path / "t.spec.json").write_text(json.dumps({"metric": "normalized_exact_match", "max_new_tokens": 3}))
    out = tmp_path / "trial.json"
    rc = main(["--train", str(tmp_path / "train.jsonl"), "--holdout", str(tmp_path / "t.jsonl"), "--out", str(out),
               "--set", f"model.base={tiny_dir}", "--set", "train.batch_size=4", "--set", "data.max_length=48",
               "--setting", "one", "train.max_steps=1", "--setting", "two", "train.max_steps=2;train.lr=1e-2", "--seeds", "0", "1"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["metric"] == "normalized_exact_match" and res["max_new_tokens"] == 3 and (res["train"], res["holdout"]) == (8, 4)
    assert sorted(res["runs"]) == ["one/seed0", "one/seed1", "two/seed0", "two/seed1"]
    assert [res["runs"][k]["steps"] for k in ("one/seed0", "two/seed1")] == [1, 2]
    for run in res["runs"].values():  # the gain is the paired mean difference against the base's scores
        assert len(run["scores"]) == 4
        assert abs(run["gain"] - (sum(run["scores"]) - sum(res["base"]["scores"])) / 4) < 1e-9
        assert run["interval"][0] <= run["gain"] <= run["interval"][1] and 0 <= run["p_value"] <= 1
