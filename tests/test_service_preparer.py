"""The base's one-time work while the daemon is idle (service/preparer.py): started when no job
is queued, killed (its whole process group) when a job comes or the daemon stops, started
again when idle, given up after MAX_STARTS, its outcome logged; the child gets the daemon's
own config."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from edgekif.config import load_config
from edgekif.layout import DataLayout
from service import preparer as preparer_mod
from service.daemon import Daemon, status_line
from service.jobs import JobStore
from service.fake_stages import FakeStages
from service.preparer import MAX_STARTS, RECHECK_SECONDS, BasePreparer

from test_service_daemon import drop, jobs, running, wait_for

# The child: writes its pid and the config it was given beside the request, then waits (or exits).
CHILD = ("import json, os, sys, time; req = json.load(open(sys.argv[1])); "
         "open(sys.argv[1] + '.pid-' + str(os.getpid()), 'w').write(json.dumps(req['config']['model'])); "
         "time.sleep(float(os.environ.get('PREP_SLEEP', '60'))); sys.exit(int(os.environ.get('PREP_RC', '0')))")


def _pids(tmp_path: Path) -> list[int]:
    return sorted(int(p.name.rsplit("-", 1)[1]) for p in tmp_path.glob("prepare-request.json.pid-*"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is dead too: its state letter in /proc is Z
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] == "Z")


def _preparer(tmp_path: Path, monkeypatch, sleep: str = "60", rc: str = "0") -> BasePreparer:
    monkeypatch.setenv("PREP_SLEEP", sleep)
    monkeypatch.setenv("PREP_RC", rc)
    cfg = load_config(None, [f"data_dir={tmp_path}", "model.base=/some/base.gguf"])
    layout = DataLayout(tmp_path)
    layout.create()
    return BasePreparer(cfg, layout, command=(sys.executable, "-c", CHILD))


def test_started_when_idle_killed_for_a_job_started_again_then_given_up(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="service.preparer")
    p = _preparer(tmp_path, monkeypatch)
    seen: set[int] = set()
    for start in range(1, MAX_STARTS + 1):
        p.when_idle()
        assert p.state == "running" and p.starts == start
        assert wait_for(lambda: len(_pids(tmp_path)) == start, timeout=30)
        (pid,) = set(_pids(tmp_path)) - seen
        seen.add(pid)
        assert json.loads((tmp_path / f"prepare-request.json.pid-{pid}").read_text())["base"] == "/some/base.gguf"  # the daemon's config
        p.when_idle()  # still running: nothing new
        assert p.starts == start and _alive(pid)
        p.before_job()
        assert p.state == "idle" and wait_for(lambda: not _alive(pid), timeout=10)
    p.when_idle()
    assert p.state == "given-up" and p.starts == MAX_STARTS
    assert len(_pids(tmp_path)) == MAX_STARTS
    msgs = [r.getMessage() for r in caplog.records]
    assert msgs.count("base preparation stopped") == MAX_STARTS and msgs[-1].startswith("base preparation left to the jobs")


def test_its_end_is_noticed_and_logged_with_the_exit_code(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="service.preparer")
    for rc, state in ((0, "done"), (2, "failed")):
        p = _preparer(tmp_path, monkeypatch, sleep="0", rc=str(rc))
        p.when_idle()
        assert wait_for(lambda: (p.when_idle(), p.state)[1] != "running", timeout=30)
        assert p.state == state and p.starts == 1
        p.when_idle()
        p.before_job()
        assert p.state == state and p.starts == 1  # not started again for a day
        ended = [r for r in caplog.records if r.getMessage() == "base preparation ended"]
        assert ended[-1].returncode == rc
        ended_at = p._ended_at
        p._clock = lambda: ended_at + RECHECK_SECONDS - 1  # (whole seconds: float sums round)
        p.when_idle()
        assert p.state == state
        p._clock = lambda: ended_at + RECHECK_SECONDS + 1  # a day on: checked again (and the cache pruned), once more
        p.when_idle()
        assert p.state == "running" and p.starts == 1
        assert wait_for(lambda: (p.when_idle(), p.state)[1] == state, timeout=30) and len(_pids(tmp_path)) == 2
        for f in tmp_path.glob("prepare-request.json.pid-*"):
            f.unlink()
    monkeypatch.setenv("PREP_SLEEP", "60")
    p.reconfigure(load_config(None, [f"data_dir={tmp_path}", "model.base=/another.gguf"]))
    p.when_idle()  # a reloaded config is prepared again, with the new config
    assert p.state == "running" and p.starts == 1
    assert wait_for(lambda: any("/another.gguf" in f.read_text() for f in tmp_path.glob("prepare-request.json.pid-*")), timeout=30)
    p.stop("test")


def _daemon_preparing(tmp_path: Path, monkeypatch) -> tuple:
    """(config, preparer, daemon): a daemon with fake stages and a stand-in preparation of 120 s."""
    monkeypatch.setenv("PREP_SLEEP", "120")
    cfg = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0", "service.scan_interval=0.2"])
    prep = BasePreparer(cfg, DataLayout(tmp_path), command=(sys.executable, "-c", CHILD))
    return cfg, prep, Daemon(cfg, FakeStages(tmp_path), retry_base_seconds=0, preparer=prep)


def test_the_daemon_prepares_while_idle_and_stops_it_for_the_first_file(tmp_path, monkeypatch):
    cfg, prep, d = _daemon_preparing(tmp_path, monkeypatch)
    with running(d):
        assert wait_for(lambda: len(_pids(tmp_path)) == 1, timeout=30)
        (pid,) = _pids(tmp_path)
        time.sleep(0.5)
        assert _alive(pid) and prep.state == "running"  # nothing to do but prepare
        drop(tmp_path, "t.jsonl")
        assert wait_for(lambda: [j.state for j in jobs(tmp_path)] == ["published"], timeout=60)
        assert not _alive(pid)  # stopped for the job
        assert wait_for(lambda: len(_pids(tmp_path)) == 2, timeout=30)  # idle again: started again
        (second,) = set(_pids(tmp_path)) - {pid}
    assert not _alive(second)  # the daemon's stop took it down


def test_the_daemon_uses_a_preparer_only_with_the_real_stages_and_when_configured(tmp_path):
    cfg = load_config(None, [f"data_dir={tmp_path}"])
    assert Daemon(cfg, FakeStages(tmp_path)).preparer is None  # tests' fakes: no torch child
    assert isinstance(Daemon(cfg).preparer, BasePreparer)
    off = load_config(None, [f"data_dir={tmp_path}", "service.prepare_base_when_idle=false"])
    assert Daemon(off).preparer is None
    assert preparer_mod.PREPARE_COMMAND[1:] == ("-m", "service.preparer")


def test_the_child_reports_a_base_it_cannot_prepare_and_exits_2(tmp_path):
    """The daemon's own command, in a process of its own as the daemon runs it."""
    import subprocess

    from edgekif.atomic import atomic_write_json

    cfg = load_config(None, [f"data_dir={tmp_path}", f"model.base={tmp_path / 'missing.gguf'}"])
    request = tmp_path / "prepare-request.json"
    atomic_write_json(request, {"config": cfg.to_dict()})
    out = subprocess.run([*preparer_mod.PREPARE_COMMAND, str(request)], cwd=Path(__file__).resolve().parents[1],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    (line,) = [json.loads(x) for x in out.stdout.splitlines() if "base preparation failed" in x]
    assert "missing.gguf" in line["error"]  # one JSON line: the daemon relays it into its log


def test_the_child_reports_a_request_it_cannot_read_and_exits_2(tmp_path):
    """A damaged prepare-request.json (not JSON, no config, a bad setting) is one logged line
    naming the file and exit code 2, not a traceback: the jobs then do the work. (In a process
    of its own: the child takes over the root logger.)"""
    import subprocess

    request = tmp_path / "prepare-request.json"
    for text, says in (("{not json", "JSONDecodeError"), ('{"other": 1}', "KeyError"),
                       ('{"config": {"train": {"lr": "fast"}}}', "ConfigError")):
        request.write_text(text)
        out = subprocess.run([*preparer_mod.PREPARE_COMMAND, str(request)], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "Traceback" not in out.stderr
        (line,) = [json.loads(x) for x in out.stdout.splitlines() if "cannot be read" in x]
        assert line["request"] == str(request) and line["error"].startswith(says)


def test_status_shows_the_preparation_while_it_runs(tmp_path, monkeypatch):
    from service.status import format_status, status

    cfg, prep, d = _daemon_preparing(tmp_path, monkeypatch)
    with running(d):
        assert wait_for(lambda: (status(cfg)["daemon"]["preparing_base"] or {}).get("pid") is not None, timeout=30)
        st = status(cfg)
        assert st["daemon"]["preparing_base"]["pid"] == prep.running["pid"]
        assert "preparing the base while idle (pid" in format_status(st)
        with JobStore(tmp_path / "state.db") as store:  # systemd's STATUS line
            assert status_line(store, DataLayout(tmp_path), None, preparing=True) == "idle; 0 unfinished; live none; preparing the base"
    st = status(cfg)
    assert st["daemon"]["preparing_base"] is None and "preparing the base" not in format_status(st)  # stopped: not shown


def test_a_preparation_that_cannot_start_is_logged_and_never_stops_the_worker(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="service.preparer")
    layout = DataLayout(tmp_path)
    layout.create()
    p = BasePreparer(load_config(None, [f"data_dir={tmp_path}"]), layout, command=(str(tmp_path / "no-such-python"),))
    p.when_idle()  # FileNotFoundError from the exec: caught
    assert p.state == "failed" and p.running is None
    p.when_idle()
    p.before_job()
    assert p.state == "failed"
    assert [r.getMessage() for r in caplog.records] == ["base preparation could not start"]


def test_stopping_it_removes_its_builder_scratch_and_only_its(tmp_path, monkeypatch):
    """A preparation killed in its base export leaves the genai builder's scratch folder in the
    system temp dir (named with its pid); stopping it removes that folder at once, not at the
    next daemon start, and leaves a live process's."""
    import tempfile

    from edgekif.export.build import GENAI_CACHE_PREFIX

    systmp = tmp_path / "systmp"
    systmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(systmp))
    monkeypatch.setattr(tempfile, "tempdir", str(systmp))
    child = ("import os, sys, tempfile, time; "
             f"d = tempfile.mkdtemp(prefix='{GENAI_CACHE_PREFIX}' + str(os.getpid()) + '-'); "
             "open(os.path.join(d, 'model.onnx.data'), 'wb').write(b'x' * 1000); time.sleep(60)")
    cfg = load_config(None, [f"data_dir={tmp_path}", "model.base=/some/base.gguf"])
    layout = DataLayout(tmp_path)
    layout.create()
    p = BasePreparer(cfg, layout, command=(sys.executable, "-c", child))
    live = systmp / f"{GENAI_CACHE_PREFIX}{os.getpid()}-abcdefgh"  # an export running in this process
    live.mkdir()
    p.when_idle()
    assert wait_for(lambda: len(list(systmp.iterdir())) == 2)
    p.before_job()
    assert p.state == "idle" and list(systmp.iterdir()) == [live]
