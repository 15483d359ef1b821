"""The CLI's version and daemon listings agree with the disk: `models` lists by default,
percentages read as percentages, a removed version says so in `jobs`, `status` refuses a data
dir that does not exist, and `models list` and `status` show one publish time per version."""

from __future__ import annotations

import json
from pathlib import Path

from edgekif.export.manifest import read_manifest, verify_manifest, write_manifest
from edgekif.publish import ModelStore
from service.cli import main
from service.daemon import Daemon
from service.fake_stages import FakeStages

from test_service_daemon import config_for, drop


def _published_twice(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    for name in ("first.jsonl", "second.jsonl"):
        drop(data, name, json.dumps({"a": name}) + "\n")
        d = Daemon(config_for(data), FakeStages(data), retry_base_seconds=0)
        d.run_until_idle()
        d.close()
    assert ModelStore(data).versions() == ["v0001", "v0002"]
    return data


def test_models_without_an_action_lists(tmp_path, capsys):
    data = _published_twice(tmp_path)
    assert main(["models", "--data-dir", str(data)]) == 0
    default = capsys.readouterr().out
    assert main(["models", "list", "--data-dir", str(data)]) == 0
    assert default == capsys.readouterr().out and "v0001" in default and "* v0002" in default


def test_status_and_models_list_show_the_same_publish_time_and_jobs_marks_a_removed_version(tmp_path, capsys):
    data = _published_twice(tmp_path)
    args = ["--data-dir", str(data)]
    assert main(["models", "list", "--json", *args]) == 0
    listed = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    manifest = verify_manifest(data / "models" / "v0002")  # recording the time kept the file hashes valid
    assert manifest.published and listed["v0002"]["published"] == manifest.published_at == manifest.published
    assert main(["status", "--json", *args]) == 0
    assert json.loads(capsys.readouterr().out)["published"]["published_at"] == listed["v0002"]["published"]
    assert main(["status", *args]) == 0
    assert f"v0002 (job 2, second.jsonl, {manifest.published})" in capsys.readouterr().out

    assert main(["jobs", *args]) == 0
    before = capsys.readouterr().out
    assert "removed" not in before
    assert main(["models", "rm", "v0001", *args]) == 0
    capsys.readouterr()
    assert main(["jobs", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    (first,) = [ln for ln in lines if "first.jsonl" in ln]
    (second,) = [ln for ln in lines if "second.jsonl" in ln]
    assert "published" in first and "v0001 (removed)" in first
    assert "v0002" in second and "removed" not in second
    assert main(["jobs", "--json", *args]) == 0
    rows = {r["file"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["first.jsonl"]["version_removed"] is True and rows["second.jsonl"]["version_removed"] is False


def test_status_on_a_data_dir_that_does_not_exist_says_so(tmp_path, capsys):
    missing = tmp_path / "typo"
    for cmd in ("status", "jobs"):
        assert main([cmd, "--data-dir", str(missing)]) == 2
        err = capsys.readouterr().err
        assert "does not exist" in err and str(missing) in err and "Traceback" not in err
        assert not missing.exists()  # looking did not create it


def test_models_show_prints_shares_as_percentages_and_the_threads(tmp_path, capsys):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"x" * 10)
    (folder / "export_info.json").write_text(json.dumps({"target": "genai", "precision": "int8", "execution_provider": "cpu",
                                                         "session_options": {"intra_op_num_threads": 2}}))
    write_manifest(folder, parity={"passed": True, "agreement": 0.96875, "n": 96, "accuracy": 0.7604166666666666,
                                   "reference_accuracy": 0.7291666666666666, "variant": "int8"})
    assert read_manifest(folder).threads == 2
    data = tmp_path / "data"
    ModelStore(data).publish(folder)
    assert main(["models", "show", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "parity:      passed, agreement 96.9% on 96 answers, exact match 76.0% (fp32 72.9%), variant int8" in out
    assert "0.76041" not in out and "export:      genai/int8 on cpu, 2 CPU threads (genai_config.json)" in out
    assert "published:   " in out


def test_status_and_jobs_only_read_state_db(tmp_path, capsys):
    """An operator may read the data dir but not write it: status and jobs open state.db
    read-only (a set-up that writes waited out the daemon's write lock, then failed). A file
    that is not a state.db is an error that says so, not a traceback."""
    import sqlite3

    data = _published_twice(tmp_path)
    writer = sqlite3.connect(data / "state.db", isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the daemon in the middle of a commit
    try:
        assert main(["status", "--json", "--data-dir", str(data)]) == 0
        assert json.loads(capsys.readouterr().out)["published"]["version"] == "v0002"
        assert main(["jobs", "--data-dir", str(data)]) == 0
        assert "second.jsonl" in capsys.readouterr().out
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    (data / "state.db").write_bytes(b"not a database" * 100)
    for cmd in ("status", "jobs"):
        assert main([cmd, "--data-dir", str(data)]) == 2
        err = capsys.readouterr().err
        assert "cannot read it as edgekif's state.db" in err and "Traceback" not in err


def test_status_shows_a_live_version_that_no_job_made(tmp_path, capsys):
    """`edgekif export --publish` publishes without a job: status names it, not "no model"."""
    from service.fake_stages import _build_export

    data = _published_twice(tmp_path)
    export = tmp_path / "by-hand"
    _build_export(export, {"model.json": "{}"}, accuracies={"handmade": 0.5})
    assert ModelStore(data).publish(export) == "v0003"
    assert main(["status", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "live:     v0003 (published by hand, no job," in out and "handmade" in out


def test_changing_versions_in_a_mistyped_data_dir_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "typo"
    for argv in (["models", "gc"], ["models", "rm", "v0001"], ["models", "rollback", "v0001"]):
        assert main([*argv, "--data-dir", str(missing)]) == 2
        assert "no published versions here" in capsys.readouterr().err
    assert not missing.exists()


def test_an_operator_who_may_not_write_the_data_dir_reads_jobs_of_a_stopped_daemon(tmp_path):
    """A stopped daemon leaves no -wal/-shm beside state.db; reading a WAL database creates the
    -shm, which needs write access to the data dir. Run as a user without it: root through
    setpriv as nobody, anyone else with the folder made read-only."""
    import os
    import shutil
    import subprocess
    import sys
    import tempfile

    import pytest

    data = Path(tempfile.mkdtemp(prefix="edgekif-ro-"))  # not under pytest's 0700 basetemp: nobody must reach it
    try:
        drop(data, "a.jsonl", '{"a": 1}\n')
        d = Daemon(config_for(data), FakeStages(data), retry_base_seconds=0)
        d.run_until_idle()
        d.close()
        assert not Path(f"{data}/state.db-wal").exists()
        os.chmod(data, 0o755)
        cmd = [sys.executable, "-c", "import sys; from service.cli import main; sys.exit(main(sys.argv[1:]))", "jobs", "--data-dir", str(data)]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HOME": str(data), "XDG_CONFIG_HOME": str(data / "none")}
        if os.geteuid() == 0:
            if shutil.which("setpriv") is None:
                pytest.skip("root without setpriv: cannot run as a user without write access")
            cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
        else:
            os.chmod(data, 0o555)
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, cwd="/")
        assert res.returncode == 0, res.stderr
        assert "a.jsonl" in res.stdout and "published" in res.stdout
    finally:
        os.chmod(data, 0o755)
        shutil.rmtree(data, ignore_errors=True)
