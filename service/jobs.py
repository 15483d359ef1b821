"""state.db: received files, tasks, jobs and their event log, and the job state machine.

Every job moves along one path, one committed step at a time; each state names the result
of one stage, and the stage after it is what runs next:

    received -validate-> validated -buffer-> buffered -train-> trained -export-> exported
    exported -evaluate-> evaluated -gate-> approved -publish-> published

The export comes before the evaluation because what is evaluated and gated is the exported
model a client loads, not the PyTorch one. Plus the terminal states `failed` (an unexpected
error, after retries), `held` (the gate refused to publish; `edgekif publish --force` sends it on to `approved`),
`rejected` (bad input) and `duplicate` (same bytes as a file seen before). A restarted daemon
resumes every job from exactly its state.

Each connection is used by one thread; the daemon opens one JobStore per thread. SQLite runs
in WAL mode (readers never block the writer) with synchronous=FULL: a committed step must
survive a power cut on an edge box, and commits are rare (a handful per job).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from edgekif.errors import EdgekifError

SCHEMA_VERSION = 3  # 2: one state per stage ('training' split into buffered/trained, gate -> approved)
# 3: export before evaluate (the gate scores the export)

PIPELINE = ("received", "validated", "buffered", "trained", "exported", "evaluated", "approved", "published")
TERMINAL = frozenset({"published", "failed", "held", "rejected", "duplicate"})
STATES = PIPELINE + ("failed", "held", "rejected", "duplicate")
# States a job can be retried from after `failed` (the state it failed in).
RETRYABLE = frozenset(PIPELINE) - {"published"}

TRANSITIONS: dict[str, frozenset[str]] = {
    "received": frozenset({"validated", "rejected", "failed"}),
    "validated": frozenset({"buffered", "rejected", "failed"}),
    "buffered": frozenset({"trained", "rejected", "failed"}),
    "trained": frozenset({"exported", "rejected", "failed"}),
    "exported": frozenset({"evaluated", "failed"}),
    "evaluated": frozenset({"approved", "held", "failed"}),
    "approved": frozenset({"published", "held", "failed"}),  # held: the live model changed since it trained (replaced_unseen)
    "held": frozenset({"approved"}),  # `edgekif publish --force`: on to publish, gate overridden
    "failed": RETRYABLE,  # `edgekif retry JOB`: back to the state it failed in
    "published": frozenset(),
    "rejected": frozenset(),
    "duplicate": frozenset(),
}

FILE_STATUSES = ("taking", "taken", "rejecting", "rejected")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,                 -- the name as dropped into inbox/
    sha256 TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    received_at TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ({", ".join(repr(s) for s in FILE_STATUSES)})),
    path TEXT NOT NULL                  -- where the file is now (or is being moved to while 'taking')
);
CREATE TABLE IF NOT EXISTS tasks (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL,
    file_id INTEGER NOT NULL REFERENCES files(id),
    examples INTEGER NOT NULL,
    holdout TEXT,                       -- path of the holdout JSON(L) written by the buffer stage
    created_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    file_id INTEGER NOT NULL REFERENCES files(id),
    task_id INTEGER REFERENCES tasks(id),
    state TEXT NOT NULL CHECK (state IN ({", ".join(repr(s) for s in STATES)})),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,                         -- JSON
    metrics TEXT NOT NULL DEFAULT '{{}}', -- JSON: one key per committed stage result
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    version TEXT                        -- the published model version
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER REFERENCES jobs(id), -- NULL for inbox-level events (e.g. a rejected symlink)
    ts TEXT NOT NULL,
    kind TEXT NOT NULL,
    data TEXT NOT NULL DEFAULT '{{}}'
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id);
CREATE INDEX IF NOT EXISTS events_by_job ON events(job_id, id);
CREATE INDEX IF NOT EXISTS events_by_kind ON events(kind);
"""


class JobStoreError(EdgekifError):
    """state.db is unusable (newer schema, corrupt) or a request names no such job."""


class TransitionError(JobStoreError):
    """A compare-and-set state change found the job in another state, or the move is illegal."""


@dataclass
class DuplicateFile(Exception):
    """The bytes were seen before: `file_id` is the earlier file, `job` its latest job (or None)."""

    file_id: int
    name: str
    job: "Job | None"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, ensure_ascii=False)


@dataclass
class Job:
    id: int
    file_id: int
    task_id: int | None
    state: str
    attempts: int
    error: dict[str, Any] | None
    metrics: dict[str, Any]
    created_at: str
    updated_at: str
    version: str | None
    file_name: str
    file_path: str
    sha256: str
    file_status: str

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> "Job":
        return cls(
            id=row["id"],
            file_id=row["file_id"],
            task_id=row["task_id"],
            state=row["state"],
            attempts=row["attempts"],
            error=json.loads(row["error"]) if row["error"] else None,
            metrics=json.loads(row["metrics"] or "{}"),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
            version=row["version"],
            file_name=row["file_name"],
            file_path=row["file_path"],
            sha256=row["sha256"],
            file_status=row["file_status"],
        )


@dataclass
class FileRow:
    id: int
    name: str
    sha256: str
    size: int
    received_at: str
    status: str
    path: str


@dataclass
class Event:
    id: int
    job_id: int | None
    ts: str
    kind: str
    data: dict[str, Any] = field(default_factory=dict)


_JOB_SELECT = """
SELECT jobs.*, files.name AS file_name, files.path AS file_path, files.sha256 AS sha256,
       files.status AS file_status
FROM jobs JOIN files ON files.id = jobs.file_id
"""


def unique_task_name(c: sqlite3.Connection, name: str) -> str:
    """Each file is its own task: a file named like an earlier task (other bytes; the same
    bytes are a duplicate) becomes `NAME~2`, `NAME~3`, ... so that its holdout and its share
    of the replay buffer never overwrite or merge with the earlier task's."""
    taken = {r[0] for r in c.execute("SELECT name FROM tasks")}  # a few per dropped file: small
    if name not in taken:
        return name
    n = 2
    while f"{name}~{n}" in taken:
        n += 1
    return f"{name}~{n}"


def known_file(c: sqlite3.Connection, sha256: str) -> DuplicateFile | None:
    """The earlier file with these bytes (what begin_take refuses), or None. A read: `c` may be
    a read-only connection (edgekif check) with rows as sqlite3.Row."""
    row = c.execute("SELECT id, name FROM files WHERE sha256 = ?", (sha256,)).fetchone()
    if row is None:
        return None
    job = c.execute(_JOB_SELECT + " WHERE jobs.file_id = ? ORDER BY jobs.id DESC LIMIT 1", (row["id"],)).fetchone()
    return DuplicateFile(row["id"], row["name"], Job.from_row(job) if job else None)


def _migrate_v1(c: sqlite3.Connection) -> None:
    """Schema 1 had one `training` state for train + evaluate and gated inside export. Rebuild
    the jobs table with the new CHECK (SQLite cannot alter one) and map each job to the state
    whose stage ran last: training -> trained if its train result was committed, else buffered."""
    jobs_sql = next(s for s in _SCHEMA.split(";") if "CREATE TABLE IF NOT EXISTS jobs" in s)
    c.execute(jobs_sql.replace("IF NOT EXISTS jobs", "jobs_v2"))
    c.execute(
        "INSERT INTO jobs_v2 SELECT id, file_id, task_id,"
        " CASE WHEN state = 'training' THEN CASE WHEN json_extract(metrics, '$.train') IS NULL THEN 'buffered' ELSE 'trained' END"
        " ELSE state END,"
        " attempts,"
        " CASE WHEN json_extract(error, '$.failed_from') = 'training'"
        " THEN json_set(error, '$.failed_from', CASE WHEN json_extract(metrics, '$.train') IS NULL THEN 'buffered' ELSE 'trained' END)"
        " ELSE error END,"
        " metrics, created_at, updated_at, version FROM jobs"
    )
    c.execute("DROP TABLE jobs")
    c.execute("ALTER TABLE jobs_v2 RENAME TO jobs")
    c.execute("CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, id)")
    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


def _migrate_v2(c: sqlite3.Connection) -> None:
    """Schema 2 evaluated and gated the PyTorch model, then exported. Every job that schema-2
    stage order left between training and publishing goes back to `trained`: it is exported,
    evaluated on the export and gated again, like any job (a schema-2 export has no
    export-measured accuracies). That includes `held` jobs (schema 2 held them before any export
    existed) and jobs forced past the gate: the gate decides anew on the export, and
    `edgekif publish --force` can override it again. Their schema-2 gate result leaves the job's
    metrics; each moved job gets a `migrated` event with the reason and that gate result."""
    before = "('evaluated', 'approved', 'exported')"
    back = "('evaluated', 'approved', 'exported', 'held')"
    moved = f"state IN {back} OR (state = 'failed' AND json_extract(error, '$.failed_from') IN {before})"
    why = "schema 2 evaluated and gated the PyTorch model before exporting: export, evaluate and gate again on the export"
    c.execute(
        "INSERT INTO events(job_id, ts, kind, data) SELECT id, ?, 'migrated', json_object('from_schema', 2, 'state', state,"
        " 'failed_from', json_extract(error, '$.failed_from'), 'to', 'trained', 'why', ?, 'gate', json(json_extract(metrics, '$.gate')))"
        f" FROM jobs WHERE {moved}",
        (utc_now(), why),
    )
    c.execute(f"UPDATE jobs SET metrics = json_remove(metrics, '$.gate') WHERE {moved}")
    c.execute(f"UPDATE jobs SET error = json_set(error, '$.failed_from', 'trained') WHERE state = 'failed' AND json_extract(error, '$.failed_from') IN {before}")
    c.execute("UPDATE jobs SET error = NULL WHERE state = 'held'")  # the gate's reasons: no longer held
    c.execute(f"UPDATE jobs SET state = 'trained' WHERE state IN {back}")
    c.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))


class JobStore:
    """One connection to state.db. Not thread-safe: open one per thread."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA busy_timeout=30000")
        self._init_schema()  # foreign keys off meanwhile: a schema migration rebuilds a table
        self.conn.execute("PRAGMA foreign_keys=ON")

    @classmethod
    def reader(cls, path: str | os.PathLike) -> "JobStore":
        """A read-only connection, for `status` and `jobs`: no schema set-up and no pragma that
        writes, so an operator who may read the data dir but not write it can run them with the
        daemon stopped. A file that is not this edgekif's state.db is a JobStoreError."""
        store = cls.__new__(cls)
        store.path = Path(path)
        uri = f"file:{urllib.parse.quote(str(store.path))}?mode=ro"

        def connect(uri: str) -> sqlite3.Row | None:
            store.conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None)
            store.conn.row_factory = sqlite3.Row
            store.conn.execute("PRAGMA busy_timeout=30000")
            return store.conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()

        try:
            try:
                row = connect(uri)
            except sqlite3.OperationalError:
                # A stopped daemon leaves no -wal/-shm beside state.db, and a reader of a WAL
                # database must create the -shm, which a user without write access to the data
                # dir cannot. With no -wal, nothing is written anywhere: read it as immutable.
                if os.path.exists(f"{store.path}-wal"):
                    raise
                if getattr(store, "conn", None) is not None:
                    store.conn.close()
                row = connect(uri + "&immutable=1")
        except sqlite3.Error as e:
            raise JobStoreError(f"{store.path}: cannot read it as edgekif's state.db: {e}") from None
        if row is None or int(row["value"]) != SCHEMA_VERSION:
            store.conn.close()
            raise JobStoreError(f"{store.path}: written by another edgekif (schema {row['value'] if row else '?'}, this one reads "
                                f"{SCHEMA_VERSION}); start this edgekif's daemon once to upgrade it")
        return store

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "JobStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so two threads never deadlock upgrading.
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def _init_schema(self) -> None:
        with self.transaction() as c:
            # statement by statement: executescript() would COMMIT our open transaction
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    c.execute(stmt)
            row = c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise JobStoreError(
                    f"{self.path}: schema version {row['value']} is newer than this edgekif ({SCHEMA_VERSION}); upgrade edgekif"
                )
            else:
                if int(row["value"]) == 1:
                    _migrate_v1(c)
                if int(row["value"]) <= 2:
                    _migrate_v2(c)

    # ---- events -------------------------------------------------------------------------

    def _event(self, c: sqlite3.Connection, job_id: int | None, kind: str, data: dict[str, Any] | None = None) -> None:
        c.execute(
            "INSERT INTO events(job_id, ts, kind, data) VALUES (?, ?, ?, ?)",
            (job_id, utc_now(), kind, _dumps(data or {})),
        )

    def log_event(self, job_id: int | None, event_kind: str, **data: Any) -> None:
        with self.transaction() as c:
            self._event(c, job_id, event_kind, data)

    def events(self, job_id: int | None = None, kinds: tuple[str, ...] | None = None) -> list[Event]:
        sql, args = "SELECT * FROM events WHERE 1=1", []
        if job_id is not None:
            sql += " AND job_id = ?"
            args.append(job_id)
        if kinds:
            sql += f" AND kind IN ({','.join('?' * len(kinds))})"
            args.extend(kinds)
        rows = self.conn.execute(sql + " ORDER BY id", args).fetchall()
        return [Event(r["id"], r["job_id"], r["ts"], r["kind"], json.loads(r["data"])) for r in rows]

    # ---- files: taking a file from the inbox ---------------------------------------------
    #
    # Crash-safe order: begin_take() records the file as 'taking' with its destination, the
    # caller renames it into accepted/, finish_take() marks it 'taken' and creates the job in
    # one transaction. reconcile (daemon start) finishes or forgets half-done takes.

    def file(self, file_id: int) -> FileRow:
        row = self.conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"no file with id {file_id}")
        return FileRow(**dict(row))

    def files(self, status: str | None = None) -> list[FileRow]:
        if status is None:
            rows = self.conn.execute("SELECT * FROM files ORDER BY id").fetchall()
        else:
            rows = self.conn.execute("SELECT * FROM files WHERE status = ? ORDER BY id", (status,)).fetchall()
        return [FileRow(**dict(r)) for r in rows]

    def begin_take(self, name: str, sha256: str, size: int, received_at: str, dest: str) -> int:
        """Record a file about to be moved to `dest`. Raises DuplicateFile if the bytes are known."""
        with self.transaction() as c:
            if (known := known_file(c, sha256)) is not None:
                raise known
            cur = c.execute(
                "INSERT INTO files(name, sha256, size, received_at, status, path) VALUES (?, ?, ?, ?, 'taking', ?)",
                (name, sha256, size, received_at, dest),
            )
            return int(cur.lastrowid)

    def finish_take(self, file_id: int) -> int:
        """The file is in accepted/: mark it taken and queue its job (state `received`)."""
        with self.transaction() as c:
            f = c.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
            if f is None or f["status"] != "taking":
                raise TransitionError(f"file {file_id} is not being taken")
            c.execute("UPDATE files SET status = 'taken' WHERE id = ?", (file_id,))
            now = utc_now()
            cur = c.execute(
                "INSERT INTO jobs(file_id, state, created_at, updated_at) VALUES (?, 'received', ?, ?)",
                (file_id, now, now),
            )
            job_id = int(cur.lastrowid)
            self._event(c, job_id, "received", {"file": f["name"], "sha256": f["sha256"], "size": f["size"]})
            return job_id

    def forget_take(self, file_id: int) -> None:
        """A 'taking' row whose file never reached accepted/ (crash before the rename)."""
        with self.transaction() as c:
            c.execute("DELETE FROM files WHERE id = ? AND status = 'taking'", (file_id,))

    def record_duplicate(self, name: str, sha256: str, original: DuplicateFile, rejected_path: str) -> int:
        """A job in state `duplicate` pointing at the earlier file (sha256 is UNIQUE in files)."""
        with self.transaction() as c:
            now = utc_now()
            error = {
                "kind": "duplicate",
                "message": f"same content as {original.name!r}" + (f" (job {original.job.id}, {original.job.state})" if original.job else ""),
                "file": name,
                "sha256": sha256,
                "duplicate_of_file": original.file_id,
                "duplicate_of_job": original.job.id if original.job else None,
                "rejected_path": rejected_path,
            }
            cur = c.execute(
                "INSERT INTO jobs(file_id, state, error, created_at, updated_at) VALUES (?, 'duplicate', ?, ?, ?)",
                (original.file_id, _dumps(error), now, now),
            )
            job_id = int(cur.lastrowid)
            self._event(c, job_id, "duplicate", error)
            return job_id

    def set_file(self, file_id: int, *, status: str, path: str) -> None:
        with self.transaction() as c:
            c.execute("UPDATE files SET status = ?, path = ? WHERE id = ?", (status, path, file_id))

    # ---- tasks --------------------------------------------------------------------------

    def task(self, task_id: int) -> dict[str, Any] | None:
        row = self.conn.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        return dict(row) if row else None

    def tasks(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.conn.execute("SELECT * FROM tasks ORDER BY id").fetchall()]

    # ---- jobs ---------------------------------------------------------------------------

    def get(self, job_id: int) -> Job:
        row = self.conn.execute(_JOB_SELECT + " WHERE jobs.id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"no job with id {job_id}")
        return Job.from_row(row)

    def jobs(self, states: tuple[str, ...] | frozenset[str] | None = None, *, limit: int | None = None, newest_first: bool = False) -> list[Job]:
        sql, args = _JOB_SELECT + " WHERE 1=1", []
        if states:
            sql += f" AND jobs.state IN ({','.join('?' * len(states))})"
            args.extend(states)
        sql += " ORDER BY jobs.id" + (" DESC" if newest_first else "")
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        return [Job.from_row(r) for r in self.conn.execute(sql, args).fetchall()]

    def queue(self) -> list[Job]:
        """Non-terminal jobs in arrival order."""
        return self.jobs(tuple(s for s in STATES if s not in TERMINAL))

    def next_job(self) -> Job | None:
        """The oldest non-terminal job (jobs are numbered in arrival order)."""
        q = self.jobs(tuple(s for s in STATES if s not in TERMINAL), limit=1)
        return q[0] if q else None

    def last_published(self) -> Job | None:
        jobs = self.jobs(("published",), limit=1, newest_first=True)
        return jobs[0] if jobs else None

    def live(self) -> Job | None:
        """The job whose version `models/current` points at. That link is the one source of
        truth for what is live: `edgekif models rollback` moves it, and status, the forgetting
        gate's baseline and the next job's starting adapter follow. A version no job made
        (published by hand with `edgekif export --publish`) has no job: None. No link: nothing
        is live, None."""
        from edgekif.publish import ModelStore  # torch-free

        version = ModelStore(self.path.parent).current()  # state.db lives in the data dir
        if version is None:
            return None
        # one indexed row, not every published job: status and metrics ask this every second
        row = self.conn.execute(_JOB_SELECT + " WHERE jobs.state = 'published' AND jobs.version = ? ORDER BY jobs.id DESC LIMIT 1",
                                (version,)).fetchone()
        return Job.from_row(row) if row else None

    def replaced_unseen(self, job: Job) -> str | None:
        """Why publishing `job` now would replace a live model its own was not trained on top
        of, or None. Its model started from the live job of its training
        (metrics.train.started_from); publishing is safe while that job is still live. After a
        later job was published (`publish --force` racing with it, `retry` of a job that failed
        while publishing), the live model knows a task this one never learned; after a rollback
        away from its start, publishing would undo the rollback. A job from before that record:
        refused once a later job was published."""
        live = self.live()
        train = job.metrics.get("train") or {}
        if "started_from" not in train:
            later = [j for j in self.jobs(("published",)) if j.id > job.id]
            return (f"job {later[-1].id} ({later[-1].file_name}) was published after it; publishing it would replace that newer model"
                    if later else None)
        started_from = train["started_from"]
        now = live.id if live is not None else None
        if now == started_from:
            return None
        if live is not None and live.id > job.id:
            return (f"job {live.id} ({live.file_name}) was published as {live.version} after this job started training; "
                    "publishing this one would replace that newer model with one that never learned its task")
        since = f"job {started_from}'s model" if started_from is not None else "the base"
        return (f"the live version changed since this job started training on top of {since} "
                f"(now {live.version if live is not None else 'none'}); publishing it would undo that change")

    def lineage(self, job: Job) -> list[Job]:
        """The published jobs whose training `job`'s model carries, oldest first, `job` last:
        each job records the live job it started from (metrics.train.started_from). Jobs from
        before that record: every earlier published job."""

        def recorded(j: Job) -> bool:
            return "started_from" in (j.metrics.get("train") or {})

        chain: list[Job] = [job]
        seen = {job.id}
        while recorded(chain[-1]):
            prev = chain[-1].metrics["train"]["started_from"]
            if prev is None or prev in seen:
                break
            chain.append(self.get(prev))
            seen.add(prev)
        if not recorded(chain[-1]):  # an old job: assume a straight line
            chain += [j for j in self.jobs(("published",), newest_first=True) if j.id < chain[-1].id and j.id not in seen]
        return list(reversed(chain))

    def _cas(self, c: sqlite3.Connection, job_id: int, from_state: str) -> sqlite3.Row:
        row = c.execute("SELECT state, metrics, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobStoreError(f"no job with id {job_id}")
        if row["state"] != from_state:
            raise TransitionError(f"job {job_id} is {row['state']!r}, expected {from_state!r}")
        return row

    def advance(
        self,
        job_id: int,
        from_state: str,
        to_state: str,
        *,
        metrics: dict[str, Any] | None = None,
        error: dict[str, Any] | None = None,
        version: str | None = None,
        task: dict[str, Any] | None = None,
        holdout: str | None = None,
        file_status: str | None = None,
        **event_data: Any,
    ) -> Job:
        """Compare-and-set `from_state` -> `to_state` in one transaction, with an event.

        `metrics` is merged into the job's metrics JSON (one key per stage result); `task`
        ({name, examples}) creates the job's tasks row; `holdout` sets its holdout path;
        `file_status` changes the job's files row in the same transaction.
        attempts restart at 0: they count tries of the *next* step.
        """
        if to_state not in TRANSITIONS.get(from_state, ()):
            raise TransitionError(f"job {job_id}: {from_state!r} -> {to_state!r} is not a legal transition")
        with self.transaction() as c:
            row = self._cas(c, job_id, from_state)
            merged = json.loads(row["metrics"] or "{}")
            merged.update(metrics or {})
            now = utc_now()
            sets = ["state = ?", "metrics = ?", "attempts = 0", "updated_at = ?"]
            args: list[Any] = [to_state, _dumps(merged), now]
            if error is not None or to_state in PIPELINE:
                # leaving `failed` or making progress clears the last error
                sets.append("error = ?")
                args.append(_dumps(error) if error is not None else None)
            if version is not None:
                sets.append("version = ?")
                args.append(version)
            if task is not None:
                file_id = c.execute("SELECT file_id FROM jobs WHERE id = ?", (job_id,)).fetchone()["file_id"]
                cur = c.execute(
                    "INSERT INTO tasks(name, file_id, examples, holdout, created_at) VALUES (?, ?, ?, NULL, ?)",
                    (unique_task_name(c, task["name"]), file_id, int(task["examples"]), now),
                )
                sets.append("task_id = ?")
                args.append(int(cur.lastrowid))
            c.execute(f"UPDATE jobs SET {', '.join(sets)} WHERE id = ?", (*args, job_id))
            if file_status is not None:
                c.execute("UPDATE files SET status = ? WHERE id = (SELECT file_id FROM jobs WHERE id = ?)", (file_status, job_id))
            if holdout is not None:
                c.execute("UPDATE tasks SET holdout = ? WHERE id = (SELECT task_id FROM jobs WHERE id = ?)", (holdout, job_id))
            data = dict(event_data)
            data["from"] = from_state
            if error is not None:
                data["error"] = error
            if version is not None:
                data["version"] = version
            self._event(c, job_id, to_state, data)
        return self.get(job_id)

    def begin_attempt(self, job_id: int, state: str, stage: str) -> int:
        """Count a try of the step after `state` *before* running it, so a stage that crashes
        the process (OOM kill, power loss) still uses up attempts. Returns the new count."""
        with self.transaction() as c:
            row = self._cas(c, job_id, state)
            attempts = row["attempts"] + 1
            c.execute("UPDATE jobs SET attempts = ?, updated_at = ? WHERE id = ?", (attempts, utc_now(), job_id))
            self._event(c, job_id, "attempt", {"stage": stage, "state": state, "attempt": attempts})
            return attempts

    def refund_attempt(self, job_id: int, state: str) -> None:
        """Give back an attempt that ended through no fault of the stage (stop request, low memory)."""
        with self.transaction() as c:
            c.execute("UPDATE jobs SET attempts = MAX(attempts - 1, 0) WHERE id = ? AND state = ?", (job_id, state))

    def record_error(self, job_id: int, state: str, error: dict[str, Any]) -> Job:
        """Remember a failed try; the job stays in `state` for a retry."""
        with self.transaction() as c:
            self._cas(c, job_id, state)
            c.execute("UPDATE jobs SET error = ?, updated_at = ? WHERE id = ?", (_dumps(error), utc_now(), job_id))
            self._event(c, job_id, "error", error)
        return self.get(job_id)

    def fail(self, job_id: int, from_state: str, error: dict[str, Any]) -> Job:
        return self.advance(job_id, from_state, "failed", error={**error, "failed_from": from_state})

    def retry(self, job_id: int) -> Job:
        """failed -> the state it failed in, with attempts reset."""
        job = self.get(job_id)
        if job.state != "failed":
            raise TransitionError(f"job {job_id} is {job.state!r}, not 'failed'")
        back = (job.error or {}).get("failed_from")
        if back not in RETRYABLE:
            raise TransitionError(f"job {job_id}: don't know which state it failed in")
        return self.advance(job_id, "failed", back, retried=True)

    # ---- numbers for metrics/status -----------------------------------------------------

    def count_events(self, *kinds: str) -> int:
        row = self.conn.execute(
            f"SELECT COUNT(*) AS n FROM events WHERE kind IN ({','.join('?' * len(kinds))})", kinds
        ).fetchone()
        return int(row["n"])

    def sum_event_field(self, kind: str, key: str) -> float:
        total = 0.0
        for (data,) in self.conn.execute("SELECT data FROM events WHERE kind = ?", (kind,)):
            value = json.loads(data).get(key)
            if isinstance(value, (int, float)):
                total += float(value)
        return total

    def state_counts(self) -> dict[str, int]:
        rows = self.conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state").fetchall()
        return {r["state"]: int(r["n"]) for r in rows}
