"""kill -9 of the daemon at random points of its jobs, then a restart.

Whatever the moment of the kill (taking the file, any stage, between a stage's side effects
and its commit), a restarted daemon finishes every job with: one job per dropped file, each
published exactly once, one replay-buffer entry per task with its example count, and
`current` naming a complete version. Subprocess tests with FakeStages (no torch); the kill
points come from random.Random(seed), so a failing seed replays the same plan.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from edgekif.config import load_config
from edgekif.export.manifest import verify_manifest
from edgekif.publish import ModelStore, version_name
from service.daemon import Daemon
from service.jobs import JobStore
from service.fake_stages import FakeStages, SimulatedCrash
from test_service_process import DaemonProcess, _no_leftover_daemons, drop  # noqa: F401 (autouse fixture)

TRAIN_STEPS = 8
# validate, buffer, evaluate, export sleep 0.2 s each and train is 8 x 0.1 s: ~1.6 s a job.
# export also runs a 0.2 s child process through edgekif.children.run_child, as the genai builder.
OPTS = {"train_steps": TRAIN_STEPS, "step_seconds": 0.1, "stage_seconds": 0.2, "export_child_seconds": 0.2}
OVERRIDES = ["service.quiet_seconds=0.1", "service.scan_interval=0.2", "service.stop_timeout=20"]
PIPELINE = ["received", "validated", "buffered", "trained", "evaluated", "approved", "exported", "published"]
# the state a job is in while the stage runs
STAGE_STATE = {"validate": "received", "buffer": "validated", "train": "buffered",
               "evaluate": "trained", "export": "approved", "publish": "exported"}
TARGETS = [*STAGE_STATE, "anytime"]
# seconds after the stage is seen running: less than the stage lasts; publish takes milliseconds
MAX_DELAY = {"validate": 0.15, "buffer": 0.15, "train": 0.6, "evaluate": 0.15, "export": 0.15, "publish": 0.0}


def _processes_naming(path: Path) -> list[str]:
    """Command lines of live processes that name `path` (the export child carries its job dir)."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (p / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if str(path) in cmd and state != "Z" and "-m service" not in cmd:
            out.append(cmd)
    return out


def job_states(data_dir: Path) -> dict[int, str]:
    """{job id: state}, read-only (the daemon may be running)."""
    db = data_dir / "state.db"
    if not db.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)
        try:
            return dict(conn.execute("SELECT id, state FROM jobs").fetchall())
        finally:
            conn.close()
    except sqlite3.Error:  # schema not created yet
        return {}


def reached(daemon: DaemonProcess, job_id: int, stage: str) -> bool:
    """The job is running `stage` now, or is past it (so the kill lands no later than needed)."""
    cur = (daemon.runtime() or {}).get("current") or {}
    if cur.get("job_id") == job_id and cur.get("stage") == stage:
        return True
    state = job_states(daemon.data_dir).get(job_id)
    if state is None or state not in PIPELINE:
        return False
    return PIPELINE.index(state) > PIPELINE.index(STAGE_STATE[stage])


def checkpoints(data_dir: Path) -> dict[int, int]:
    """{job id: step of its last checkpoint}: what a restart must resume from."""
    out = {}
    for ckpt in data_dir.glob("jobs/*/checkpoint.json"):
        out[int(ckpt.parent.name)] = json.loads(ckpt.read_text())["step"]
    return out


def task_text(name: str, n: int) -> str:
    return "".join(json.dumps({"task": name, "i": i}) + "\n" for i in range(n))


@pytest.mark.parametrize("seed", range(7))
def test_kill_9_at_random_points_then_restart_publishes_each_job_once(tmp_path, seed):
    rng = random.Random(seed)
    n_files = rng.choice([1, 2])
    examples = {f"task{seed}_{i}.jsonl": rng.randint(2, 9) for i in range(n_files)}
    n_kills = rng.choice([1, 2])
    kills = []  # what each kill aimed at, and the job states and checkpoints it left

    daemon = DaemonProcess(tmp_path, fake_options=OPTS, overrides=OVERRIDES).start()
    try:
        for name, n in examples.items():
            drop(tmp_path, name, task_text(name, n))
        for k in range(n_kills):
            if k > 0:  # a second crash, on top of what the first one left half done
                daemon = DaemonProcess(tmp_path, fake_options=OPTS, overrides=OVERRIDES).start()
            target_job = rng.randint(1, n_files)
            stage = TARGETS[(2 * seed + k) % len(TARGETS)]  # the seeds' first kills cover every target
            if stage == "anytime":  # a plain random moment: taking files, startup repairs, between stages
                delay = rng.uniform(0.0, 1.5 * n_files)
            else:
                delay = rng.uniform(0.0, MAX_DELAY[stage])
                if stage == "publish":  # lasts milliseconds: wait (cheaply) for its version folder to appear
                    version_dir = tmp_path / "models" / version_name(target_job)
                    cond = version_dir.exists
                else:
                    cond = lambda: reached(daemon, target_job, stage)  # noqa: E731
                assert daemon.wait_for(cond, timeout=30, interval=0.0005), daemon.output()
            time.sleep(delay)
            assert daemon.proc.poll() is None, "the daemon exited before the kill:\n" + daemon.output()
            assert daemon.kill() == -9
            kills.append({"job": target_job, "stage": stage, "delay": round(delay, 3),
                          "states": job_states(tmp_path), "checkpoints": checkpoints(tmp_path),
                          "calls": len(FakeStages.read_calls(tmp_path))})
    finally:
        daemon.kill()

    # The first kill aimed at a stage before publish, with less delay than one stage lasts,
    # must have caught a job in the middle (otherwise this test would test nothing).
    if kills[0]["stage"] not in ("publish", "anytime"):
        assert any(s != "published" for s in kills[0]["states"].values()), kills

    again = DaemonProcess(tmp_path, fake_options=OPTS, overrides=OVERRIDES).start()
    with again:
        done = lambda: (s := job_states(tmp_path)) and len(s) >= n_files and set(s.values()) == {"published"}  # noqa: E731
        assert again.wait_for(done, timeout=40), f"{kills}\n{job_states(tmp_path)}\n{again.output()}"
        time.sleep(0.3)  # a stray duplicate job would show up within a scan interval
        assert again.stop() == 0, again.output()

    # One job per dropped file, all published, in arrival order v0001, v0002, ...
    with JobStore(tmp_path / "state.db") as store:
        jobs = store.jobs()
        published_events = Counter(e.job_id for e in store.events(kinds=("published",)))
        live = store.last_published()
        tasks = {j.id: store.task(j.task_id) for j in jobs}
    assert sorted(j.file_name for j in jobs) == sorted(examples), kills
    assert all(j.state == "published" and j.error is None and j.attempts == 0 for j in jobs), kills
    assert [j.version for j in jobs] == [version_name(i) for i in range(1, n_files + 1)], kills
    assert published_events == {j.id: 1 for j in jobs}, kills
    for j in jobs:
        assert tasks[j.id]["examples"] == examples[j.file_name]
        assert j.metrics["train"]["steps"] == TRAIN_STEPS
        assert j.metrics["publish"] == {"version": j.version}
        assert json.loads((tmp_path / "jobs" / str(j.id) / "adapter.json").read_text())["steps"] == TRAIN_STEPS

    # Stage calls across all processes. A kill can land after a stage's work and before it
    # records the call, so "made a version" / "inserted into the buffer" are at most once per
    # job here; that they happened exactly once is checked on the files below.
    calls = FakeStages.read_calls(tmp_path)
    version_of = {j.id: j.version for j in jobs}
    publish_calls = Counter(c["job_id"] for c in calls if c["stage"] == "publish")
    assert all(1 <= publish_calls[j.id] <= 1 + n_kills for j in jobs), (publish_calls, kills)
    assert all(c["version"] == version_of[c["job_id"]] for c in calls if c["stage"] == "publish"), kills
    made = Counter(c["job_id"] for c in calls if c["stage"] == "publish" and c["made"])
    assert all(made[j.id] <= 1 for j in jobs), (made, kills)
    applied = Counter(c["job_id"] for c in calls if c["stage"] == "buffer" and c["applied"])
    assert all(applied[j.id] <= 1 for j in jobs), (applied, kills)
    # Training resumed from the checkpoint each kill left, never from an earlier step.
    for j in jobs:
        finishing = [c for c in calls if c["stage"] == "train" and c["job_id"] == j.id
                     and c["end_step"] == TRAIN_STEPS and not c.get("resumed_done")]
        assert finishing, kills
        for k in kills:
            later = [c for c in calls[k["calls"]:] if c["stage"] == "train" and c["job_id"] == j.id]
            assert all(c["start_step"] >= k["checkpoints"].get(j.id, 0) for c in later), (later, kills)

    # The fake replay buffer: exactly one entry per task, with the file's example count.
    replay = json.loads((tmp_path / "fake_replay.json").read_text())
    assert replay == {str(j.id): {"task": Path(j.file_name).stem, "examples": examples[j.file_name]} for j in jobs}, kills

    # `current` names the last job's version, which is complete; no half-built folders.
    models = tmp_path / "models"
    current = ModelStore(tmp_path).current()
    assert current == live.version == version_name(n_files), kills
    model = json.loads((models / current / "model.json").read_text())
    assert model == {"job_id": live.id, "sha256": live.sha256}
    assert verify_manifest(models / current).job_id == live.id
    assert sorted(p.name for p in models.iterdir() if p.is_dir() and not p.is_symlink()) == sorted(version_of.values()), kills
    for j in jobs:
        assert not [p.name for p in (tmp_path / "jobs" / str(j.id)).iterdir() if p.is_dir() and p.name.startswith(".")]
        assert verify_manifest(models / j.version).job_id == j.id

    # No process outlived the daemon that started it, no temp file outlived the restart.
    assert _processes_naming(tmp_path) == [], kills
    # (models/ is ModelStore's, which clears its own staging)
    assert not [str(p) for p in tmp_path.rglob("*.tmp") if not {"inbox", "models"} & set(p.parts)], kills

    # Nothing left in the inbox or half-taken; every file kept once in accepted/.
    assert not [p for p in (tmp_path / "inbox").iterdir() if not p.name.startswith(".")]
    assert len(list((tmp_path / "accepted").iterdir())) == n_files
    assert not list((tmp_path / "rejected").iterdir())


def test_crash_between_making_a_version_and_switching_current_is_repaired(tmp_path, monkeypatch):
    """Deterministic companion to the random kills: the narrowest publish window. The version
    folder exists, models/current still points at the previous one, and the daemon has not
    committed. The re-run publish must find the version it made *and* make it current."""
    config = load_config(None, [f"data_dir={tmp_path}", "service.quiet_seconds=0"])
    (tmp_path / "inbox").mkdir(parents=True)
    (tmp_path / "inbox" / "a.jsonl").write_text('{"a": 1}\n')
    d = Daemon(config, FakeStages(tmp_path), retry_base_seconds=0)
    d.run_until_idle()
    d.close()
    (tmp_path / "inbox" / "b.jsonl").write_text('{"b": 1}\n{"b": 2}\n')

    def crash_on_switch(self, name):
        raise SimulatedCrash("killed before models/current was switched")

    monkeypatch.setattr(ModelStore, "_switch", crash_on_switch)
    d = Daemon(config, FakeStages(tmp_path), retry_base_seconds=0)
    try:
        with pytest.raises(SimulatedCrash):
            d.run_until_idle()
    finally:
        d.close()
    monkeypatch.undo()
    assert ModelStore(tmp_path).current() == "v0001"
    assert (tmp_path / "models" / "v0002" / "model.json").exists()

    d = Daemon(config, FakeStages(tmp_path), retry_base_seconds=0)
    d.run_until_idle()
    d.close()
    with JobStore(tmp_path / "state.db") as store:
        assert [(j.file_name, j.state, j.version) for j in store.jobs()] == [("a.jsonl", "published", "v0001"), ("b.jsonl", "published", "v0002")]
    assert ModelStore(tmp_path).current() == "v0002"
    assert verify_manifest(tmp_path / "models" / "v0002").job_id == 2
