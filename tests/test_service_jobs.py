"""state.db and the job state machine (service/jobs.py)."""

from __future__ import annotations

import json
import sqlite3

import pytest

from service.jobs import PIPELINE, TERMINAL, DuplicateFile, JobStore, TransitionError


def _new_job(store: JobStore, name: str = "a.jsonl", sha: str = "ab" * 32) -> int:
    file_id = store.begin_take(name, sha, 10, "2025-01-01T00:00:00+00:00", f"/data/accepted/{sha[:12]}_{name}")
    return store.finish_take(file_id)


@pytest.fixture()
def store(tmp_path):
    s = JobStore(tmp_path / "state.db")
    yield s
    s.close()


def test_pragmas_wal_and_foreign_keys(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
    assert store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
    with pytest.raises(sqlite3.IntegrityError):
        store.conn.execute("INSERT INTO jobs(file_id, state, created_at, updated_at) VALUES (999, 'received', 'x', 'x')")


def test_walk_the_whole_pipeline_with_events(store):
    job_id = _new_job(store)
    assert store.get(job_id).state == "received"
    store.advance(job_id, "received", "validated", metrics={"validate": {"examples": 3}}, task={"name": "a", "examples": 3})
    store.advance(job_id, "validated", "buffered", metrics={"buffer": {}}, holdout="/h.json")
    for a, b in zip(PIPELINE[2:], PIPELINE[3:]):
        store.advance(job_id, a, b, version="v1" if b == "published" else None)
    job = store.get(job_id)
    assert job.state == "published" and job.version == "v1" and job.terminal
    assert job.metrics == {"validate": {"examples": 3}, "buffer": {}}
    task = store.task(job.task_id)
    assert (task["name"], task["examples"], task["holdout"]) == ("a", 3, "/h.json")
    assert [e.kind for e in store.events(job_id)] == list(PIPELINE)
    assert store.next_job() is None


def test_advance_is_compare_and_set(store):
    job_id = _new_job(store)
    with pytest.raises(TransitionError, match="expected 'validated'"):
        store.advance(job_id, "validated", "buffered")
    with pytest.raises(TransitionError, match="not a legal transition"):
        store.advance(job_id, "received", "published")
    store.advance(job_id, "received", "validated")
    with pytest.raises(TransitionError):  # a second worker doing the same step loses
        store.advance(job_id, "received", "validated")
    assert store.get(job_id).state == "validated"
    assert [e.kind for e in store.events(job_id)] == ["received", "validated"]


def test_failed_transaction_leaves_no_trace(store):
    job_id = _new_job(store)
    with pytest.raises(sqlite3.IntegrityError):
        # the tasks insert fails (name NOT NULL) inside the transaction: all of it rolls back
        store.advance(job_id, "received", "validated", task={"name": None, "examples": 1})
    job = store.get(job_id)
    assert job.state == "received" and job.task_id is None
    assert [e.kind for e in store.events(job_id)] == ["received"]


def test_next_job_is_oldest_non_terminal_and_survives_reopen(tmp_path):
    path = tmp_path / "state.db"
    with JobStore(path) as s:
        ids = [_new_job(s, f"f{i}.jsonl", f"{i:064x}") for i in range(4)]
        s.advance(ids[0], "received", "rejected", error={"kind": "bad"})
        s.advance(ids[1], "received", "validated")
        assert s.next_job().id == ids[1]
    with JobStore(path) as s:  # a restart resumes from the committed state
        job = s.next_job()
        assert (job.id, job.state) == (ids[1], "validated")
        assert [j.id for j in s.queue()] == ids[1:]


def test_duplicate_sha_is_refused_and_recorded(store):
    job_id = _new_job(store, "a.jsonl", "cd" * 32)
    with pytest.raises(DuplicateFile) as exc:
        store.begin_take("b.jsonl", "cd" * 32, 10, "t", "/x")
    assert exc.value.job.id == job_id and exc.value.name == "a.jsonl"
    dup = store.record_duplicate("b.jsonl", "cd" * 32, exc.value, "/data/rejected/b.jsonl")
    job = store.get(dup)
    assert job.state == "duplicate" and job.state in TERMINAL
    assert job.error["duplicate_of_job"] == job_id and job.file_id == store.get(job_id).file_id
    assert store.next_job().id == job_id


def test_attempts_errors_fail_and_retry(store):
    job_id = _new_job(store)
    assert store.begin_attempt(job_id, "received", "validate") == 1
    store.record_error(job_id, "received", {"kind": "RuntimeError", "message": "boom"})
    assert store.begin_attempt(job_id, "received", "validate") == 2
    store.refund_attempt(job_id, "received")
    assert store.get(job_id).attempts == 1
    store.fail(job_id, "received", {"kind": "RuntimeError", "message": "boom"})
    job = store.get(job_id)
    assert job.state == "failed" and job.error["failed_from"] == "received"
    assert store.next_job() is None
    job = store.retry(job_id)
    assert (job.state, job.attempts, job.error) == ("received", 0, None)


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "state.db"
    with JobStore(path) as s:
        s.conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(Exception, match="schema version 99"):
        JobStore(path)


def test_schema_1_database_is_migrated_to_one_state_per_stage(tmp_path):
    """A state.db written by a schema-1 daemon (one `training` state for train + evaluate)
    opens with its jobs mapped to the state whose stage ran last, events kept."""
    import sqlite3

    from service import jobs as jobs_mod

    db = tmp_path / "state.db"
    v1 = jobs_mod._SCHEMA.replace("'trained', ", "").replace("'approved', ", "").replace("'buffered', ", "'buffered', 'training', ")
    conn = sqlite3.connect(db)
    conn.executescript(v1)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    conn.execute("INSERT INTO files VALUES (1, 'a.jsonl', 'a', 1, 't', 'taken', '/a')")
    rows = [(1, "training", "{}", None), (2, "training", '{"train": {"steps": 3}}', None),
            (3, "failed", '{"train": {"steps": 3}}', '{"failed_from": "training", "stage": "evaluate"}'), (4, "published", "{}", None)]
    for job_id, state, metrics, error in rows:
        conn.execute("INSERT INTO jobs(id, file_id, state, metrics, error, created_at, updated_at) VALUES (?, 1, ?, ?, ?, 't', 't')",
                     (job_id, state, metrics, error))
        conn.execute("INSERT INTO events(job_id, ts, kind) VALUES (?, 't', 'received')", (job_id,))
    conn.commit()
    conn.close()
    with JobStore(db) as store:
        assert [j.state for j in store.jobs()] == ["buffered", "trained", "failed", "published"]
        assert store.get(3).error["failed_from"] == "trained"
        assert store.retry(3).state == "trained"
        assert len(store.events()) == 5  # 4 kept + the retry
        assert store.conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"


def test_schema_2_database_sends_unpublished_evaluated_jobs_back_to_export(tmp_path):
    """Schema 2 evaluated and gated the PyTorch model before exporting. Jobs it left between
    training and publishing, held ones included (held before any export existed), are exported
    again, evaluated on the export and gated anew; the schema-2 gate result moves from the
    job's metrics to a `migrated` event that says why."""
    import sqlite3

    from service import jobs as jobs_mod

    db = tmp_path / "state.db"
    conn = sqlite3.connect(db)
    conn.executescript(jobs_mod._SCHEMA)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '2')")
    conn.execute("INSERT INTO files VALUES (1, 'a.jsonl', 'a', 1, 't', 'taken', '/a')")
    held_gate = {"ok": False, "reasons": ["a: 90.0 -> 80.0"]}
    forced_gate = {"ok": False, "reasons": ["a: 90.0 -> 70.0"], "forced": True}
    rows = [(1, "evaluated", "{}", None), (2, "approved", json.dumps({"gate": forced_gate}), None), (3, "exported", "{}", None),
            (4, "held", json.dumps({"train": {"steps": 3}, "gate": held_gate}), json.dumps({"kind": "gate", "message": "a: 90.0 -> 80.0"})),
            (5, "failed", "{}", '{"failed_from": "approved", "stage": "export"}'), (6, "published", "{}", None), (7, "buffered", "{}", None)]
    for job_id, state, metrics, error in rows:
        conn.execute("INSERT INTO jobs(id, file_id, state, metrics, error, created_at, updated_at) VALUES (?, 1, ?, ?, ?, 't', 't')",
                     (job_id, state, metrics, error))
    conn.commit()
    conn.close()
    with JobStore(db) as store:
        assert [j.state for j in store.jobs()] == ["trained", "trained", "trained", "trained", "failed", "published", "buffered"]
        assert store.get(5).error["failed_from"] == "trained"
        held = store.get(4)
        assert held.error is None and held.metrics == {"train": {"steps": 3}}  # no gate result: the gate decides anew
        assert "gate" not in store.get(2).metrics  # forced on the PyTorch model: gated anew on the export
        migrated = {e.job_id: e.data for e in store.events(kinds=("migrated",))}
        assert sorted(migrated) == [1, 2, 3, 4, 5]
        assert migrated[4]["state"] == "held" and migrated[4]["to"] == "trained" and migrated[4]["gate"] == held_gate
        assert migrated[2]["gate"] == forced_gate and migrated[5]["failed_from"] == "approved"
        assert "gate again on the export" in migrated[4]["why"]
        assert store.conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
