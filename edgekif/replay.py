"""Reservoir replay buffer in SQLite.

Capacity is shared fairly across tasks: with n tasks each gets `capacity // n` slots and the
remainder goes to the earliest tasks. Inside its quota a task keeps a uniform sample of the
records it offered (Algorithm R over the offered stream, continued across calls for the same
task). When a new task arrives, older tasks over their new quota are shrunk by uniform random
eviction; a uniform subsample of a uniform sample is still uniform.

Every add/remove is one SQLite transaction (WAL, synchronous=FULL), so a crash mid-add leaves
the buffer exactly as before. Adding a source whose sha256 is already known is a no-op.

Each task's stored examples occupy the dense slots 0..stored-1, so a sample picks positions
with a seeded RNG and fetches by the (task_id, slot) index instead of `ORDER BY RANDOM()`.

Not safe for concurrent writers from several processes beyond what SQLite locking provides
(writers serialise on BEGIN IMMEDIATE); one instance may be shared between threads.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import logging
import math
import random
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Sequence


from .config import ReplayConfig
from .errors import ReplayError
from .records import Record

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

# Version 1 schema. `tasks.stored` caches COUNT(*) per task so quota bookkeeping stays
# O(n_tasks) instead of O(total rows) per add.
_SCHEMA_V1 = [
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE tasks (
        task_id TEXT PRIMARY KEY,
        arrival INTEGER NOT NULL UNIQUE,
        seen INTEGER NOT NULL DEFAULT 0,      -- offered records streamed through the reservoir
        records INTEGER NOT NULL DEFAULT 0,   -- records in all of the task's sources
        stored INTEGER NOT NULL DEFAULT 0,
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL
    )""",
    """CREATE TABLE sources (
        sha256 TEXT PRIMARY KEY,
        task_id TEXT NOT NULL REFERENCES tasks(task_id),
        source_file TEXT NOT NULL,
        records INTEGER NOT NULL,
        offered INTEGER NOT NULL,
        seq INTEGER NOT NULL UNIQUE,
        added_at TEXT NOT NULL
    )""",
    "CREATE INDEX sources_task ON sources(task_id)",
    """CREATE TABLE examples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,  -- insertion order
        task_id TEXT NOT NULL REFERENCES tasks(task_id),
        slot INTEGER NOT NULL,
        record_id TEXT NOT NULL,
        label TEXT NOT NULL,
        record_json TEXT NOT NULL,
        source_file TEXT NOT NULL,
        source_sha256 TEXT NOT NULL REFERENCES sources(sha256),
        source_index INTEGER NOT NULL,         -- 0-based position of the record in its source
        UNIQUE (task_id, slot)
    )""",
    # Foreign-key checks on deleting a source would otherwise scan every example.
    "CREATE INDEX examples_source ON examples(source_sha256)",
]

# version -> statements upgrading from version-1 to version. Empty until a v2 exists.
_MIGRATIONS: dict[int, list[str]] = {}

_INSERT_CHUNK = 500  # bound on SQL variables per statement


@dataclass
class AddResult:
    task_id: str  # the task the source belongs to (the earlier owner when duplicate)
    offered: int  # records of this call offered to the reservoir
    stored: int  # examples the task holds after the call
    evicted: int  # examples removed from *other* tasks to make room (quota shrink)
    duplicate: bool  # the source was already added; nothing changed
    inserted: int = 0  # records of this call that are in the buffer after it
    replaced: int = 0  # examples of this task replaced by newer ones (Algorithm R)
    quota: int = 0
    source_sha256: str = ""


# ---------------------------------------------------------------------------------------------
# Pure sampling routines (no SQLite), exposed for direct statistical tests.


def task_quotas(capacity: int, n_tasks: int) -> list[int]:
    """Fair shares in arrival order: capacity // n each, remainder to the earliest tasks."""
    if n_tasks <= 0:
        return []
    base, extra = divmod(capacity, n_tasks)
    return [base + (1 if i < extra else 0) for i in range(n_tasks)]


def offered_count(n_records: int, fraction: float, min_per_task: int) -> int:
    """How many of a source's records are offered: max(min_per_task, round(fraction*n)) <= n."""
    return min(n_records, max(min_per_task, round(fraction * n_records)))


def reservoir_assign(stored: int, seen: int, quota: int, n_new: int, rng: random.Random) -> tuple[dict[int, int], int]:
    """Continue Algorithm R over `n_new` new items.

    `stored` examples are held, a uniform sample of the `seen` items so far. Returns
    ({slot: index of the new item that ends up there}, stored afterwards). Item i (1-based over
    everything seen) replaces a random slot with probability k/i.

    The reservoir size k is the quota while nothing was ever dropped (stored == seen). Once a
    task has lost items (its reservoir filled, or it was shrunk), k stays at the current
    `stored`: growing back towards a larger quota would need the dropped items and would bias
    the sample towards new data.
    """
    k = quota if stored == seen else min(stored, quota)
    assign: dict[int, int] = {}
    for t in range(n_new):
        seen += 1
        if stored < k:  # only reachable while stored == seen - 1: plain fill
            assign[stored] = t
            stored += 1
        else:
            j = rng.randrange(seen)
            if j < k:
                assign[j] = t
    return assign, stored


def reservoir_sample(items: Sequence[Any], k: int, rng: random.Random) -> list[Any]:
    """Algorithm R over `items` into a reservoir of size k (returned in slot order)."""
    assign, stored = reservoir_assign(0, 0, k, len(items), rng)
    return [items[assign[s]] for s in range(stored)]


def allocate_per_label(counts: dict[str, int], m: int, rng: random.Random) -> dict[str, int]:
    """Split m picks over labels proportionally to their counts, at least 1 per label where
    m allows, never more than a label has. Labels left out (m < n_labels) are chosen at random."""
    total = sum(counts.values())
    if m >= total:
        return dict(counts)
    labels = sorted(counts)
    if m < len(labels):
        return {label: 1 for label in rng.sample(labels, m)}
    ideal = {label: m * counts[label] / total for label in labels}
    alloc = {label: min(counts[label], max(1, math.floor(ideal[label]))) for label in labels}
    diff = m - sum(alloc.values())
    # Largest-remainder rounding, then correct any overshoot caused by the at-least-1 floor.
    while diff > 0:
        room = sorted((l for l in labels if alloc[l] < counts[l]), key=lambda l: (alloc[l] - ideal[l], l))
        for label in room[:diff]:
            alloc[label] += 1
        diff = m - sum(alloc.values())
    while diff < 0:
        spare = sorted((l for l in labels if alloc[l] > 1), key=lambda l: (ideal[l] - alloc[l], l))
        for label in spare[:-diff]:
            alloc[label] -= 1
        diff = m - sum(alloc.values())
    return alloc


def select_offered(labels: Sequence[str], m: int, rng: random.Random, stratify: bool) -> list[int]:
    """Indices (ascending, i.e. file order) of the m records offered to the reservoir."""
    n = len(labels)
    if m >= n:
        return list(range(n))
    if not stratify:
        return sorted(rng.sample(range(n), m))
    by_label: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_label.setdefault(label, []).append(i)
    alloc = allocate_per_label({l: len(ix) for l, ix in by_label.items()}, m, rng)
    picked: list[int] = []
    for label in sorted(alloc):
        picked.extend(rng.sample(by_label[label], alloc[label]))
    return sorted(picked)


def content_sha256(records: Sequence[Record]) -> str:
    """Stand-in source hash when the caller has no file hash: the records' canonical JSON."""
    h = hashlib.sha256()
    for r in records:
        h.update(r.to_json().encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _rng(*parts: Any) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`, so this is stable across processes
    # (unlike hash()) and independent streams per (seed, purpose, task, state).
    return random.Random("|".join(str(p) for p in parts))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _chunks(seq: Sequence[Any], size: int = _INSERT_CHUNK) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


# ---------------------------------------------------------------------------------------------


class ReplayBuffer:
    """Per-task-quota reservoir replay buffer stored in one SQLite file (":memory:" for tests)."""

    def __init__(self, path: str | Path, config: ReplayConfig | None = None):
        self.config = config or ReplayConfig()
        if self.config.capacity < 0:
            raise ReplayError(f"replay capacity must be >= 0, got {self.config.capacity}")
        self._check_fraction(self.config.fraction)
        self.path = str(path)
        self._lock = threading.RLock()
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        try:
            # isolation_level=None: no implicit transactions; we issue BEGIN IMMEDIATE/COMMIT.
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30.0)
        except sqlite3.Error as e:
            raise ReplayError(f"{self.path}: cannot open replay database: {e}") from e
        try:
            self._conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss; one fsync per add_task costs little.
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self._enforce_quotas_on_open()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise ReplayError(f"{self.path}: replay database unusable: {e}") from e
        except BaseException:
            self._conn.close()
            raise

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None  # type: ignore[assignment]

    def __enter__(self) -> "ReplayBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; BEGIN IMMEDIATE takes the write lock up front so a
        concurrent writer waits here rather than failing halfway through."""
        with self._lock:
            conn = self._live()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            else:
                conn.execute("COMMIT")

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction, so multi-query reads see one consistent snapshot."""
        with self._lock:
            conn = self._live()
            conn.execute("BEGIN")
            try:
                yield conn
            finally:
                conn.execute("COMMIT")

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ReplayError(f"{self.path}: replay buffer is closed")
        return self._conn

    @staticmethod
    def _schema_version(conn: sqlite3.Connection) -> int:
        if not conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone():
            return 0
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        # Up-to-date files are only read here, so opening a reader never waits on a writer.
        if self._schema_version(self._live()) == SCHEMA_VERSION:
            return
        with self._write() as conn:
            version = self._schema_version(conn)  # again under the write lock: another opener may have won
            if version > SCHEMA_VERSION:
                raise ReplayError(
                    f"{self.path}: replay schema_version {version} is newer than this edgekif supports ({SCHEMA_VERSION})"
                )
            if version == 0:
                for stmt in _SCHEMA_V1:
                    conn.execute(stmt)
                version = 1
                log.info("created replay buffer %s (schema %d)", self.path, version)
            while version < SCHEMA_VERSION:
                version += 1
                for stmt in _MIGRATIONS[version]:
                    conn.execute(stmt)
                log.info("migrated replay buffer %s to schema %d", self.path, version)
            conn.execute(
                "INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                "ON CONFLICT(key) DO UPDATE SET value=excluded.value",
                (str(version),),
            )

    def _enforce_quotas_on_open(self) -> None:
        # A smaller capacity in the config than the file was filled with: shrink now, so the
        # "total <= capacity" invariant holds for every reader from the start.
        if self._over_quota(self._task_rows(self._live())):
            with self._write() as conn:
                evicted = self._shrink_to_quotas(conn, self._task_rows(conn), self.config.seed)
            log.info("replay buffer %s: capacity %d, evicted %d", self.path, self.config.capacity, evicted)

    # -- internals -------------------------------------------------------------------------

    @staticmethod
    def _check_fraction(fraction: float) -> None:
        if not (0.0 < fraction <= 1.0):
            raise ReplayError(f"replay fraction must be in (0, 1], got {fraction}")

    @staticmethod
    def _task_rows(conn: sqlite3.Connection) -> list[tuple[str, int, int]]:
        """[(task_id, seen, stored)] in arrival order."""
        return conn.execute("SELECT task_id, seen, stored FROM tasks ORDER BY arrival").fetchall()

    def _over_quota(self, rows: list[tuple[str, int, int]]) -> bool:
        quotas = task_quotas(self.config.capacity, len(rows))
        return any(stored > q for (_t, _s, stored), q in zip(rows, quotas))

    def _shrink_to_quotas(self, conn: sqlite3.Connection, rows: list[tuple[str, int, int]], seed: int) -> int:
        """Uniformly evict from every task above its quota; keeps slots dense. Returns evicted."""
        evicted = 0
        for (task_id, seen, stored), quota in zip(rows, task_quotas(self.config.capacity, len(rows))):
            if stored <= quota:
                continue
            rng = _rng(seed, "shrink", task_id, seen, stored, quota)
            drop = set(rng.sample(range(stored), stored - quota))
            self._delete_slots(conn, task_id, sorted(drop))
            # Refill the holes below `quota` with the survivors above it, so slots stay 0..quota-1.
            holes = sorted(s for s in drop if s < quota)
            movers = [s for s in range(quota, stored) if s not in drop]
            conn.executemany(
                "UPDATE examples SET slot=? WHERE task_id=? AND slot=?",
                [(hole, task_id, mover) for hole, mover in zip(holes, movers)],
            )
            conn.execute("UPDATE tasks SET stored=?, updated_at=? WHERE task_id=?", (quota, _now(), task_id))
            evicted += len(drop)
            log.debug("replay: shrank task %s %d -> %d", task_id, stored, quota)
        return evicted

    @staticmethod
    def _delete_slots(conn: sqlite3.Connection, task_id: str, slots: Sequence[int]) -> None:
        for chunk in _chunks(slots):
            marks = ",".join("?" * len(chunk))
            conn.execute(f"DELETE FROM examples WHERE task_id=? AND slot IN ({marks})", (task_id, *chunk))

    def _write_examples(self, conn: sqlite3.Connection, rows: list[dict[str, Any]]) -> None:
        """Insert example rows (all with the same keys) inside the caller's transaction."""
        if not rows:
            return
        columns = list(rows[0])
        conn.executemany(f"INSERT INTO examples ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                         [tuple(row[c] for c in columns) for row in rows])

    # -- writes ----------------------------------------------------------------------------

    def add_task(
        self,
        task_id: str,
        records: Sequence[Record],
        *,
        source_file: str = "",
        source_sha256: str = "",
        fraction: float | None = None,
        seed: int | None = None,
    ) -> AddResult:
        """Offer a task's records (one source file) to the buffer, in one transaction.

        Without `source_sha256` the records' content hash identifies the source, so re-adding
        the same records is a no-op too.
        """
        if not isinstance(task_id, str) or not task_id:
            raise ReplayError(f"task_id must be a non-empty string, got {task_id!r}")
        if not records:
            raise ReplayError(f"task {task_id!r}: no records to add (source {source_file or '<records>'})")
        fraction = self.config.fraction if fraction is None else fraction
        self._check_fraction(fraction)
        seed = self.config.seed if seed is None else seed
        sha = source_sha256 or content_sha256(records)

        with self._write() as conn:
            owner = conn.execute("SELECT task_id FROM sources WHERE sha256=?", (sha,)).fetchone()
            if owner is not None:
                rows = self._task_rows(conn)
                ids = [t for t, _s, _n in rows]
                i = ids.index(owner[0])
                log.info("replay: source %s already in task %s; skipped", sha[:12], owner[0])
                return AddResult(
                    owner[0], 0, rows[i][2], 0, True,
                    quota=task_quotas(self.config.capacity, len(rows))[i], source_sha256=sha,
                )

            now = _now()
            task = conn.execute("SELECT seen, stored FROM tasks WHERE task_id=?", (task_id,)).fetchone()
            if task is None:
                arrival = conn.execute("SELECT COALESCE(MAX(arrival), -1) + 1 FROM tasks").fetchone()[0]
                conn.execute(
                    "INSERT INTO tasks(task_id, arrival, created_at, updated_at) VALUES (?, ?, ?, ?)",
                    (task_id, arrival, now, now),
                )

            # A new task lowers everyone's quota: make room first (uniform eviction).
            rows = self._task_rows(conn)
            evicted = self._shrink_to_quotas(conn, rows, seed)
            ids = [t for t, _s, _n in rows]
            quota = task_quotas(self.config.capacity, len(rows))[ids.index(task_id)]
            seen, stored = conn.execute("SELECT seen, stored FROM tasks WHERE task_id=?", (task_id,)).fetchone()

            rng = _rng(seed, "add", task_id, seen, sha)
            m = offered_count(len(records), fraction, self.config.min_per_task)
            offered = select_offered([r.label for r in records], m, rng, self.config.stratify_by_label)
            assign, new_stored = reservoir_assign(stored, seen, quota, len(offered), rng)
            replaced = sorted(s for s in assign if s < stored)

            seq = conn.execute("SELECT COALESCE(MAX(seq), -1) + 1 FROM sources").fetchone()[0]
            conn.execute(
                "INSERT INTO sources(sha256, task_id, source_file, records, offered, seq, added_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (sha, task_id, source_file, len(records), len(offered), seq, now),
            )
            self._delete_slots(conn, task_id, replaced)
            new_rows = []
            for slot in sorted(assign):
                index = offered[assign[slot]]
                record = records[index]
                new_rows.append(
                    {
                        "task_id": task_id,
                        "slot": slot,
                        "record_id": record.id,
                        "label": record.label,
                        "record_json": record.to_json(),
                        "source_file": source_file,
                        "source_sha256": sha,
                        "source_index": index,
                    }
                )
            self._write_examples(conn, new_rows)
            conn.execute(
                "UPDATE tasks SET seen=seen+?, records=records+?, stored=?, updated_at=? WHERE task_id=?",
                (len(offered), len(records), new_stored, now, task_id),
            )
        result = AddResult(
            task_id=task_id,
            offered=len(offered),
            stored=new_stored,
            evicted=evicted,
            duplicate=False,
            inserted=len(new_rows),
            replaced=len(replaced),
            quota=quota,
            source_sha256=sha,
        )
        log.info(
            "replay: task %s +%d offered, %d kept (quota %d, %d replaced, %d evicted from others)",
            task_id, result.offered, result.inserted, quota, result.replaced, evicted,
        )
        return result

    def remove_task(self, task_id: str) -> int:
        """Drop a task and its sources; returns examples removed (0 for an unknown task).
        Other tasks' quotas grow, but they only refill from new data of those tasks."""
        with self._write() as conn:
            removed = conn.execute("DELETE FROM examples WHERE task_id=?", (task_id,)).rowcount
            conn.execute("DELETE FROM sources WHERE task_id=?", (task_id,))
            conn.execute("DELETE FROM tasks WHERE task_id=?", (task_id,))
        if removed:
            log.info("replay: removed task %s (%d examples)", task_id, removed)
        return removed

    # -- reads -----------------------------------------------------------------------------

    def sample(self, n: int, seed: int, task_ids: Sequence[str] | None = None) -> list[Record]:
        """min(n, stored) examples drawn uniformly without replacement from the stored ones
        (of `task_ids` if given). Deterministic for a seed and buffer state."""
        with self._read() as conn:
            rows = self._task_rows(conn)
            if task_ids is not None:
                known = {t for t, _s, _n in rows}
                unknown = [t for t in task_ids if t not in known]
                if unknown:
                    raise ReplayError(f"replay: unknown task id(s) {unknown}")
                wanted = set(task_ids)
                rows = [r for r in rows if r[0] in wanted]
            starts, total = [], 0
            for _t, _s, stored in rows:
                starts.append(total)
                total += stored
            k = max(0, min(n, total))
            if k == 0:
                return []
            picks = _rng(seed, "sample").sample(range(total), k)
            # global position -> (task, slot) through the cumulative counts
            wanted_slots: dict[str, list[int]] = {}
            order: list[tuple[str, int]] = []
            for pos in picks:
                ti = bisect.bisect_right(starts, pos) - 1
                while rows[ti][2] == 0:  # empty tasks share a start with the next one
                    ti += 1
                task_id, slot = rows[ti][0], pos - starts[ti]
                wanted_slots.setdefault(task_id, []).append(slot)
                order.append((task_id, slot))
            found: dict[tuple[str, int], str] = {}
            for task_id, slots in wanted_slots.items():
                for chunk in _chunks(slots):
                    marks = ",".join("?" * len(chunk))
                    for slot, js in conn.execute(
                        f"SELECT slot, record_json FROM examples WHERE task_id=? AND slot IN ({marks})", (task_id, *chunk)
                    ):
                        found[(task_id, slot)] = js
        if len(found) != k:
            raise ReplayError(f"{self.path}: replay slots inconsistent ({len(found)} of {k} sampled slots found)")
        return [self._record(found[key], key[0]) for key in order]

    @staticmethod
    def _record(record_json: str, task_id: str) -> Record:
        r = Record.from_json(record_json)
        r.meta["task_id"] = task_id
        return r

    def records(self, task_id: str | None = None) -> list[Record]:
        """Stored examples, by task arrival then insertion order."""
        with self._read() as conn:
            sql = "SELECT e.record_json, e.task_id FROM examples e JOIN tasks t USING (task_id)"
            params: tuple[Any, ...] = ()
            if task_id is not None:
                sql += " WHERE e.task_id=?"
                params = (task_id,)
            rows = conn.execute(sql + " ORDER BY t.arrival, e.id", params).fetchall()
        return [self._record(js, t) for js, t in rows]

    def tasks(self) -> list[str]:
        with self._read() as conn:
            return [t for t, _s, _n in self._task_rows(conn)]

    def quota(self) -> dict[str, int]:
        ids = self.tasks()
        return dict(zip(ids, task_quotas(self.config.capacity, len(ids))))

    def has_source(self, sha256: str) -> bool:
        with self._read() as conn:
            return conn.execute("SELECT 1 FROM sources WHERE sha256=?", (sha256,)).fetchone() is not None

    def __len__(self) -> int:
        with self._read() as conn:
            return conn.execute("SELECT COALESCE(SUM(stored), 0) FROM tasks").fetchone()[0]

    def stats(self) -> dict[str, Any]:
        with self._read() as conn:
            rows = conn.execute("SELECT task_id, seen, records, stored FROM tasks ORDER BY arrival").fetchall()
            sources: dict[str, list[dict[str, Any]]] = {}
            for sha, task_id, source_file, n_records, offered, added_at in conn.execute(
                "SELECT sha256, task_id, source_file, records, offered, added_at FROM sources ORDER BY seq"
            ):
                sources.setdefault(task_id, []).append(
                    {"source_file": source_file, "source_sha256": sha, "records": n_records, "offered": offered, "added_at": added_at}
                )
            labels: dict[str, dict[str, int]] = {}
            for task_id, label, count in conn.execute(
                "SELECT task_id, label, COUNT(*) FROM examples GROUP BY task_id, label ORDER BY task_id, label"
            ):
                labels.setdefault(task_id, {})[label] = count
        quotas = task_quotas(self.config.capacity, len(rows))
        per_task = {}
        for (task_id, seen, n_records, stored), quota in zip(rows, quotas):
            srcs = sources.get(task_id, [])
            latest = srcs[-1] if srcs else {"source_file": "", "source_sha256": ""}
            per_task[task_id] = {
                "stored": stored,
                "quota": quota,
                "seen": seen,
                "records": n_records,
                "source_file": latest["source_file"],
                "source_sha256": latest["source_sha256"],
                "sources": srcs,
                "labels": labels.get(task_id, {}),
            }
        return {
            "total": sum(t["stored"] for t in per_task.values()),
            "capacity": self.config.capacity,
            "schema_version": SCHEMA_VERSION,
            "tasks": per_task,
        }

    def check_invariants(self) -> None:
        """Raise ReplayError unless cached counts match rows, slots are dense, quotas hold."""
        with self._read() as conn:
            rows = self._task_rows(conn)
            actual = dict(conn.execute("SELECT task_id, COUNT(*) FROM examples GROUP BY task_id").fetchall())
            slots = dict(conn.execute("SELECT task_id, MAX(slot) + 1 FROM examples GROUP BY task_id").fetchall())
            minimum = conn.execute("SELECT MIN(slot) FROM examples").fetchone()[0]
            orphans = conn.execute("PRAGMA foreign_key_check").fetchall()
        problems = []
        for (task_id, seen, stored), quota in zip(rows, task_quotas(self.config.capacity, len(rows))):
            if actual.get(task_id, 0) != stored or slots.get(task_id, 0) != stored:
                problems.append(f"{task_id}: stored={stored} rows={actual.get(task_id, 0)} slots={slots.get(task_id, 0)}")
            if stored > quota or stored > seen:
                problems.append(f"{task_id}: stored={stored} quota={quota} seen={seen}")
        if set(actual) - {t for t, _s, _n in rows}:
            problems.append(f"examples of unknown tasks {sorted(set(actual) - {t for t, _s, _n in rows})}")
        if minimum is not None and minimum < 0:
            problems.append("negative slot")
        if orphans:
            problems.append(f"foreign key violations {orphans[:5]}")
        if problems:
            raise ReplayError(f"{self.path}: replay invariants broken: " + "; ".join(problems))


__all__ = [
    "SCHEMA_VERSION",
    "AddResult",
    "ReplayBuffer",
    "allocate_per_label",
    "content_sha256",
    "offered_count",
    "reservoir_assign",
    "reservoir_sample",
    "select_offered",
    "task_quotas",
]
