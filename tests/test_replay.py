"""Replay buffer: per-task quotas, uniform reservoir sampling, idempotence, crash safety."""

from __future__ import annotations

import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from edgekif.config import ReplayConfig
from edgekif.errors import ReplayError
from edgekif.records import Record
from edgekif.replay import (
    SCHEMA_VERSION,
    ReplayBuffer,
    allocate_per_label,
    offered_count,
    reservoir_assign,
    reservoir_sample,
    select_offered,
    task_quotas,
)

REPO = Path(__file__).resolve().parents[1]


def recs(task: str, n: int, labels: int = 3, start: int = 0) -> list[Record]:
    return [Record.from_prompt(f"{task} question {i}", f"label{i % labels}", id=f"{task}-{i}") for i in range(start, start + n)]


def cfg(capacity: int, **kw) -> ReplayConfig:
    kw.setdefault("fraction", 1.0)
    kw.setdefault("min_per_task", 0)
    return ReplayConfig(capacity=capacity, **kw)


def ids(records: list[Record]) -> list[str]:
    return [r.id for r in records]


# -- chi-square helpers (no scipy) ----------------------------------------------------------

Z_999 = 3.090232306167813  # standard normal quantile for p = 0.001 (one-sided)


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Wilson-Hilferty approximation of the chi-square upper quantile (within ~0.1% for df>=20)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def inclusion_chi2(counts: list[int], runs: int, k: int) -> float:
    """Chi-square statistic for the inclusion counts of n items over `runs` draws of k
    without replacement. Counts of a fixed-size sample are negatively correlated, so the plain
    sum (O-E)^2/E is rescaled by (1-p)*n/(n-1) to follow chi2(n-1) under uniformity."""
    n = len(counts)
    p = k / n
    expected = runs * p
    return sum((c - expected) ** 2 for c in counts) / (expected * (1 - p) * n / (n - 1))


def test_chi2_critical_matches_table():
    # Table values: chi2.ppf(0.999, 49) = 85.351, chi2.ppf(0.999, 19) = 43.820
    assert chi2_critical(49) == pytest.approx(85.351, rel=2e-3)
    assert chi2_critical(19) == pytest.approx(43.820, rel=5e-3)


# -- pure Algorithm R -----------------------------------------------------------------------


def test_reservoir_inclusion_is_uniform():
    n, k, runs = 50, 10, 2000
    counts = [0] * n
    for run in range(runs):
        kept = reservoir_sample(list(range(n)), k, random.Random(run))
        assert len(kept) == k and len(set(kept)) == k
        for item in kept:
            counts[item] += 1
    assert sum(counts) == runs * k
    stat = inclusion_chi2(counts, runs, k)
    assert stat < chi2_critical(n - 1), (stat, counts)


def test_inclusion_chi2_rejects_biased_samplers():
    """The uniformity check has power: samplers that favour early or late items fail it."""
    n, k, runs = 50, 10, 2000
    rng = random.Random(0)
    never_last_ten = [0] * n
    for _ in range(runs):
        for item in rng.sample(range(40), k):
            never_last_ten[item] += 1
    assert inclusion_chi2(never_last_ten, runs, k) > chi2_critical(n - 1)

    def always_replace(items, k, rng):
        # the classic bug: replace with probability 1 instead of k/i (favours the newest items)
        res = list(items[:k])
        for item in items[k:]:
            res[rng.randrange(k)] = item
        return res

    biased = [0] * n
    for run in range(runs):
        for item in always_replace(list(range(n)), k, random.Random(run)):
            biased[item] += 1
    assert inclusion_chi2(biased, runs, k) > chi2_critical(n - 1)


def test_reservoir_assign_continues_across_calls():
    # 30 items in one call or as 10 + 20 must give inclusion probability k/30 for all.
    n, k, runs = 30, 6, 2000
    counts = [0] * n
    for run in range(runs):
        rng = random.Random(run)
        slots: dict[int, int] = {}
        a1, stored = reservoir_assign(0, 0, k, 10, rng)
        slots.update(a1)
        a2, stored = reservoir_assign(stored, 10, k, 20, rng)
        slots.update({s: 10 + t for s, t in a2.items()})
        assert stored == k and sorted(slots) == list(range(k))
        for item in slots.values():
            counts[item] += 1
    assert inclusion_chi2(counts, runs, k) < chi2_critical(n - 1)


def test_reservoir_assign_does_not_regrow_after_loss():
    # Shrunk from 10 to 4 after seeing 20: more data keeps 4 (growing would bias to new data).
    assign, stored = reservoir_assign(4, 20, 10, 50, random.Random(1))
    assert stored == 4 and all(s < 4 for s in assign)
    # Never dropped anything (3 seen, 3 stored): fills up to the quota first.
    assign, stored = reservoir_assign(3, 3, 10, 5, random.Random(1))
    assert stored == 8 and assign == {3: 0, 4: 1, 5: 2, 6: 3, 7: 4}


def test_task_quotas_and_offered_count():
    assert task_quotas(100, 3) == [34, 33, 33]
    assert task_quotas(7, 3) == [3, 2, 2]
    assert task_quotas(2, 3) == [1, 1, 0]
    assert task_quotas(10, 0) == []
    assert offered_count(1000, 0.02, 16) == 20
    assert offered_count(100, 0.02, 16) == 16
    assert offered_count(10, 0.02, 16) == 10
    assert offered_count(500, 1.0, 16) == 500


# -- stratification ------------------------------------------------------------------------


def test_allocate_per_label_proportional_with_floor_of_one():
    counts = {"a": 1000, "b": 50, "c": 5, "d": 2}
    alloc = allocate_per_label(counts, 21, random.Random(0))
    assert sum(alloc.values()) == 21
    assert all(alloc[l] >= 1 for l in counts)
    assert alloc == {"a": 18, "b": 1, "c": 1, "d": 1}
    # large m: close to proportional, capped by what each label has
    alloc = allocate_per_label({"x": 600, "y": 300, "z": 100}, 100, random.Random(0))
    assert alloc == {"x": 60, "y": 30, "z": 10}
    alloc = allocate_per_label({"x": 3, "y": 97}, 50, random.Random(0))
    assert sum(alloc.values()) == 50 and alloc["x"] <= 3 and alloc["x"] >= 1
    # fewer picks than labels: m distinct labels, one each
    alloc = allocate_per_label({str(i): 2 for i in range(10)}, 4, random.Random(0))
    assert len(alloc) == 4 and set(alloc.values()) == {1}


def test_select_offered_stratified_keeps_every_label():
    labels = ["a"] * 1000 + ["b"] * 50 + ["c"] * 5 + ["d"] * 2
    random.Random(3).shuffle(labels)
    for seed in range(20):
        picked = select_offered(labels, 21, random.Random(seed), stratify=True)
        assert len(picked) == 21 and len(set(picked)) == 21 and picked == sorted(picked)
        assert {labels[i] for i in picked} == {"a", "b", "c", "d"}
    # without stratification rare labels are usually missed
    missing = sum(
        {labels[i] for i in select_offered(labels, 21, random.Random(seed), stratify=False)} != {"a", "b", "c", "d"}
        for seed in range(20)
    )
    assert missing >= 15


def test_add_task_stratified_fraction_stores_every_label(tmp_path):
    records = (
        [Record.from_prompt(f"q{i}", "common", id=f"c{i}") for i in range(1000)]
        + [Record.from_prompt(f"r{i}", "rare", id=f"r{i}") for i in range(5)]
        + [Record.from_prompt(f"s{i}", "scarce", id=f"s{i}") for i in range(2)]
    )
    with ReplayBuffer(tmp_path / "r.db", ReplayConfig(capacity=1000, fraction=0.02, min_per_task=16)) as buf:
        res = buf.add_task("t", records)
        assert res.offered == 20 and res.stored == 20
        labels = buf.stats()["tasks"]["t"]["labels"]
        assert set(labels) == {"common", "rare", "scarce"}
        assert labels == {"common": 18, "rare": 1, "scarce": 1}


# -- quotas and eviction through SQLite ----------------------------------------------------


def test_quota_shares_after_each_new_task(tmp_path):
    capacity = 100
    with ReplayBuffer(tmp_path / "r.db", cfg(capacity)) as buf:
        for n in range(1, 6):
            buf.add_task(f"t{n}", recs(f"t{n}", 200))
            quota = buf.quota()
            stats = buf.stats()
            assert list(quota) == [f"t{i}" for i in range(1, n + 1)] == buf.tasks()
            assert sum(quota.values()) == capacity
            assert all(abs(q - capacity / n) <= 1 for q in quota.values())
            assert list(quota.values()) == sorted(quota.values(), reverse=True)  # remainder to earliest
            assert {t: s["stored"] for t, s in stats["tasks"].items()} == quota
            assert stats["total"] == capacity
            buf.check_invariants()


def test_eviction_keeps_older_tasks_at_new_quota(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(30)) as buf:
        a = buf.add_task("A", recs("A", 30))
        assert (a.stored, a.evicted) == (30, 0)
        before_a = set(ids(buf.records("A")))
        b = buf.add_task("B", recs("B", 30))
        assert (b.stored, b.evicted, b.quota) == (15, 15, 15)
        after_a = set(ids(buf.records("A")))
        assert len(after_a) == 15 and after_a < before_a  # shrinking only removes
        c = buf.add_task("C", recs("C", 30))
        assert (c.stored, c.evicted) == (10, 10)
        assert {t: s["stored"] for t, s in buf.stats()["tasks"].items()} == {"A": 10, "B": 10, "C": 10}
        assert set(ids(buf.records("A"))) < after_a
        buf.check_invariants()


def test_small_task_keeps_everything_and_total_never_exceeds_capacity(tmp_path):
    rng = random.Random(7)
    capacity = 37
    with ReplayBuffer(tmp_path / "r.db", cfg(capacity, fraction=0.5, min_per_task=4)) as buf:
        small = buf.add_task("small", recs("small", 3))
        assert (small.offered, small.stored) == (3, 3)
        for step in range(40):
            tasks = buf.tasks()
            action = rng.random()
            if action < 0.15 and len(tasks) > 1:
                buf.remove_task(rng.choice(tasks))
            else:
                task = rng.choice(tasks) if (tasks and action < 0.5) else f"t{step}"
                res = buf.add_task(task, recs(f"{task}-{step}", rng.randint(1, 60)))
                assert res.stored <= res.quota
            stats = buf.stats()
            assert stats["total"] <= capacity
            assert stats["total"] == len(buf.records()) == len(buf)
            buf.check_invariants()


def test_same_task_more_data_continues_reservoir(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(10)) as buf:
        first = buf.add_task("A", recs("A", 25), source_file="a1.jsonl")
        second = buf.add_task("A", recs("A", 25, start=25), source_file="a2.jsonl")
        assert (first.stored, second.stored) == (10, 10)
        assert second.inserted == second.replaced  # every kept new record replaced an old one
        stats = buf.stats()["tasks"]["A"]
        assert stats["seen"] == 50 and stats["records"] == 50
        assert [s["source_file"] for s in stats["sources"]] == ["a1.jsonl", "a2.jsonl"]
        assert stats["source_file"] == "a2.jsonl"
        buf.check_invariants()


# -- uniformity end to end (in-memory SQLite) -------------------------------------------------


def _inclusion_counts(runs: int, fill) -> list[int]:
    counts = Counter()
    for run in range(runs):
        for rid in fill(run):
            counts[rid] += 1
    return [counts[f"A-{i}"] for i in range(50)]


@pytest.mark.parametrize("scenario", ["one_add", "two_adds", "shrunk_by_new_task"])
def test_stored_set_is_uniform_through_sqlite(scenario):
    runs, k = 300, 10

    def fill(run: int) -> list[str]:
        capacity = 20 if scenario == "shrunk_by_new_task" else 10
        with ReplayBuffer(":memory:", cfg(capacity, seed=run)) as buf:
            if scenario == "two_adds":
                buf.add_task("A", recs("A", 25))
                buf.add_task("A", recs("A", 25, start=25))
            else:
                buf.add_task("A", recs("A", 50))
            if scenario == "shrunk_by_new_task":
                buf.add_task("B", recs("B", 5))
            kept = ids(buf.records("A"))
            assert len(kept) == k
            return kept

    counts = _inclusion_counts(runs, fill)
    assert inclusion_chi2(counts, runs, k) < chi2_critical(49), counts


def test_add_is_deterministic_for_a_seed():
    def stored(seed: int) -> list[str]:
        with ReplayBuffer(":memory:", cfg(20, seed=seed)) as buf:
            buf.add_task("A", recs("A", 200))
            buf.add_task("B", recs("B", 200))
            return ids(buf.records())

    assert stored(5) == stored(5)
    assert stored(5) != stored(6)


# -- sampling --------------------------------------------------------------------------------


def test_sample_deterministic_without_replacement_and_restricted(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(60)) as buf:
        for t in "ABC":
            buf.add_task(t, recs(t, 20))
        s1 = buf.sample(16, seed=3)
        assert ids(s1) == ids(buf.sample(16, seed=3))
        assert ids(s1) != ids(buf.sample(16, seed=4))
        assert len(set(ids(s1))) == 16
        everything = buf.sample(1000, seed=1)
        assert len(everything) == 60 and set(ids(everything)) == set(ids(buf.records()))
        only = buf.sample(100, seed=2, task_ids=["A", "C"])
        assert len(only) == 40 and {r.meta["task_id"] for r in only} == {"A", "C"}
        assert {r.id.split("-")[0] for r in only} == {"A", "C"}
        assert buf.sample(0, seed=1) == [] and buf.sample(5, seed=1, task_ids=[]) == []
        with pytest.raises(ReplayError, match="unknown task"):
            buf.sample(4, seed=1, task_ids=["nope"])
        # sampled records round-trip exactly
        by_id = {r.id: r for r in recs("A", 20) + recs("B", 20) + recs("C", 20)}
        assert all(r == by_id[r.id] for r in everything)


def test_sample_is_uniform_over_stored_examples():
    with ReplayBuffer(":memory:", cfg(40)) as buf:
        buf.add_task("A", recs("A", 10))
        buf.add_task("B", recs("B", 3))  # stored counts differ per task: 10 and 3
        buf.add_task("C", recs("C", 7))
        n, k, runs = 20, 5, 2000
        all_ids = sorted(ids(buf.records()))
        assert len(all_ids) == n
        counts = Counter()
        for seed in range(runs):
            counts.update(ids(buf.sample(k, seed=seed)))
        stat = inclusion_chi2([counts[i] for i in all_ids], runs, k)
        assert stat < chi2_critical(n - 1), counts


def test_sample_with_empty_task_in_the_middle():
    with ReplayBuffer(":memory:", cfg(2)) as buf:
        buf.add_task("A", recs("A", 5))
        buf.add_task("B", recs("B", 5))
        buf.add_task("C", recs("C", 5))  # quotas 1, 1, 0: C holds nothing
        assert buf.quota() == {"A": 1, "B": 1, "C": 0}
        got = {r.id.split("-")[0] for seed in range(30) for r in buf.sample(1, seed=seed)}
        assert got == {"A", "B"}
        assert buf.sample(3, seed=0, task_ids=["C"]) == []


# -- idempotence, provenance, removal ----------------------------------------------------------


def test_re_adding_same_source_is_a_noop(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(50, fraction=0.5)) as buf:
        first = buf.add_task("A", recs("A", 40), source_file="a.jsonl", source_sha256="f" * 64)
        assert not first.duplicate and buf.has_source("f" * 64)
        stats, rows = buf.stats(), ids(buf.records())
        again = buf.add_task("A", recs("A", 40), source_file="a.jsonl", source_sha256="f" * 64)
        assert again.duplicate and (again.offered, again.evicted, again.inserted) == (0, 0, 0)
        assert again.stored == first.stored
        # same file dropped under another task name: still recognised, nothing changes
        other = buf.add_task("B", recs("A", 40), source_file="copy.jsonl", source_sha256="f" * 64)
        assert other.duplicate and other.task_id == "A"
        assert buf.stats() == stats and ids(buf.records()) == rows and buf.tasks() == ["A"]
        # without a file hash the records' content identifies the source
        c1 = buf.add_task("C", recs("C", 10))
        c2 = buf.add_task("C", recs("C", 10))
        assert not c1.duplicate and c2.duplicate and c2.source_sha256 == c1.source_sha256
        assert buf.stats()["tasks"]["C"]["seen"] == c1.offered


def _query(buf: ReplayBuffer, sql: str) -> list[dict]:
    """Rows as dicts, read on the buffer's own connection (its transaction view)."""
    cur = buf._conn.execute(sql)
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def test_provenance_columns(tmp_path):
    records = recs("A", 12, labels=4)
    with ReplayBuffer(tmp_path / "r.db", cfg(100)) as buf:
        buf.add_task("A", records, source_file="/in/a.jsonl", source_sha256="a" * 64)
        rows = _query(buf, "SELECT * FROM examples ORDER BY id")
    assert [r["source_index"] for r in rows] == list(range(12))  # file order, insertion order
    for row in rows:
        rec = records[row["source_index"]]
        assert row["task_id"] == "A" and row["source_file"] == "/in/a.jsonl" and row["source_sha256"] == "a" * 64
        assert row["record_id"] == rec.id and row["label"] == rec.label
        assert Record.from_json(row["record_json"]) == rec


def test_remove_task(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(30)) as buf:
        buf.add_task("A", recs("A", 30), source_sha256="a" * 64)
        buf.add_task("B", recs("B", 30), source_sha256="b" * 64)
        assert buf.remove_task("A") == 15
        assert buf.remove_task("A") == 0
        assert buf.tasks() == ["B"] and buf.quota() == {"B": 30}
        assert not buf.has_source("a" * 64) and buf.has_source("b" * 64)
        assert buf.stats()["total"] == 15  # B does not regrow without new data
        buf.check_invariants()
        # the same file can come back after its task was removed
        assert not buf.add_task("A", recs("A", 30), source_sha256="a" * 64).duplicate


def test_validation_errors(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(10)) as buf:
        with pytest.raises(ReplayError, match="no records"):
            buf.add_task("A", [])
        with pytest.raises(ReplayError, match="task_id"):
            buf.add_task("", recs("A", 3))
        with pytest.raises(ReplayError, match="fraction"):
            buf.add_task("A", recs("A", 3), fraction=0.0)
        assert buf.tasks() == []  # failed calls left nothing behind
    with pytest.raises(ReplayError, match="fraction"):
        ReplayBuffer(tmp_path / "x.db", ReplayConfig(fraction=1.5))
    buf = ReplayBuffer(tmp_path / "r.db", cfg(10))
    buf.close()
    with pytest.raises(ReplayError, match="closed"):
        buf.tasks()


# -- storage: WAL, schema, reopen ---------------------------------------------------------------


def test_wal_foreign_keys_and_schema_version(tmp_path):
    with ReplayBuffer(tmp_path / "r.db", cfg(10)) as buf:
        assert buf._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert buf._conn.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert buf._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert _query(buf, "SELECT value FROM meta WHERE key = 'schema_version'")[0]["value"] == str(SCHEMA_VERSION)
        with pytest.raises(sqlite3.IntegrityError):  # an example of no known task is refused
            buf._conn.execute(
                "INSERT INTO examples(task_id, slot, record_id, label, record_json, source_file, source_sha256, source_index)"
                " VALUES ('ghost', 0, '', '', '{}', '', 'x', 0)"
            )


def test_reopen_preserves_state_and_newer_schema_is_refused(tmp_path):
    path = tmp_path / "r.db"
    with ReplayBuffer(path, cfg(40)) as buf:
        buf.add_task("A", recs("A", 50))
        buf.add_task("B", recs("B", 50))
        stats, rows = buf.stats(), ids(buf.records())
    with ReplayBuffer(path, cfg(40)) as buf:
        assert buf.stats() == stats and ids(buf.records()) == rows
    # a smaller configured capacity shrinks the file on open
    with ReplayBuffer(path, cfg(10)) as buf:
        assert buf.quota() == {"A": 5, "B": 5} and buf.stats()["total"] == 10
        assert set(ids(buf.records())) < set(rows)
        buf.check_invariants()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.close()
    with pytest.raises(ReplayError, match="schema_version 99"):
        ReplayBuffer(path, cfg(10))


# -- crash safety -------------------------------------------------------------------------------

CRASH_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from edgekif.config import ReplayConfig
    from edgekif.records import Record
    from edgekif.replay import ReplayBuffer

    path, capacity = sys.argv[1], int(sys.argv[2])
    original = ReplayBuffer._write_examples

    def write_then_die(self, conn, rows):
        original(self, conn, rows)
        # rows are written (and, with a tiny page cache, spilled into the WAL) but not committed
        assert conn.in_transaction
        n = conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        print(f"inserted {len(rows)} rows; {n} visible inside the transaction", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    ReplayBuffer._write_examples = write_then_die
    buf = ReplayBuffer(path, ReplayConfig(capacity=capacity, fraction=1.0, min_per_task=0))
    buf._conn.execute("PRAGMA cache_size=5")
    records = [Record.from_prompt("B question %d " % i + "x" * 200, "label%d" % (i % 3), id="B-%d" % i) for i in range(3000)]
    buf.add_task("B", records, source_file="b.jsonl", source_sha256="b" * 64)
    print("add_task returned: the crash hook did not run", flush=True)
    """
)


def test_kill_9_before_commit_leaves_buffer_unchanged(tmp_path):
    path = tmp_path / "r.db"
    capacity = 4000
    with ReplayBuffer(path, cfg(capacity)) as buf:
        buf.add_task("A", recs("A", 3000), source_file="a.jsonl", source_sha256="a" * 64)
        stats, rows = buf.stats(), [r.to_json() for r in buf.records()]
    assert stats["tasks"]["A"]["stored"] == 3000

    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD, str(path), str(capacity)], capture_output=True, text=True, env=env, timeout=120
    )
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr)
    # the new task's rows were inserted (task A evicted down to 2000 too) before the kill
    assert "inserted 2000 rows; 4000 visible" in proc.stdout, proc.stdout + proc.stderr
    wal = Path(str(path) + "-wal")
    assert wal.exists() and wal.stat().st_size > 0  # uncommitted pages really reached the WAL

    with ReplayBuffer(path, cfg(capacity)) as buf:
        assert buf._conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert buf.stats() == stats
        assert [r.to_json() for r in buf.records()] == rows
        assert not buf.has_source("b" * 64) and buf.tasks() == ["A"]
        buf.check_invariants()
        # and the interrupted add simply works on retry
        res = buf.add_task("B", recs("B", 3000), source_sha256="b" * 64)
        assert (res.stored, res.evicted) == (2000, 1000)
        buf.check_invariants()


def test_second_handle_opens_and_reads_during_a_write(tmp_path):
    path = tmp_path / "r.db"
    with ReplayBuffer(path, cfg(20)) as writer:
        writer.add_task("A", recs("A", 10))
        with writer._write() as conn:  # hold the write lock with an uncommitted change
            conn.execute("DELETE FROM examples WHERE task_id='A' AND slot=0")
            with ReplayBuffer(path, cfg(20)) as reader:  # must not wait for the writer
                assert len(reader.records("A")) == 10 and len(reader.sample(20, seed=0)) == 10
            conn.execute("ROLLBACK")
            conn.execute("BEGIN")  # _write commits on exit; give it an (empty) transaction
        assert len(writer.records("A")) == 10
