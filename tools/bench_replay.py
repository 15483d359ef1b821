"""Benchmark the SQLite replay buffer at its intended scale.

Fills a buffer (default capacity 100k) with 20 tasks x 5k records (fraction 1.0), timing each
add_task to show inserts do not slow down as the file grows; then adds one more task, which
forces uniform eviction from every older task; then times sampling (n=8 and n=256).
Prints a Markdown table and writes JSON to --out.

    .venv/bin/python tools/bench_replay.py [--tasks 20 --per-task 5000 --capacity 100000]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekif.atomic import atomic_write_json  # noqa: E402
from edgekif.config import ReplayConfig  # noqa: E402
from edgekif.records import Record  # noqa: E402
from edgekif.replay import ReplayBuffer  # noqa: E402

LABELS = ["World", "Sports", "Business", "Sci/Tech", "Company", "Artist", "Film", "Village"]


def make_task(task: int, n: int) -> list[Record]:
    # ~300-character prompts, like the classification benchmarks' instruction + input
    return [
        Record.from_prompt(
            f"Classify the topic of this text. Task {task}, example {i}: " + ("lorem ipsum dolor sit amet " * 9),
            LABELS[(i * 7 + task) % len(LABELS)],
            id=f"t{task}-{i}",
        )
        for i in range(n)
    ]


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def time_sampling(buf: ReplayBuffer, n: int, batches: int) -> dict:
    from edgekif.continual import replay_sampler  # what the outer loop draws through

    sample = replay_sampler(buf, buf.tasks())
    start = time.perf_counter()
    for seed in range(batches):
        got = sample(n, seed)
        assert len(got) == n
    elapsed = time.perf_counter() - start
    return {"n": n, "batches": batches, "seconds": elapsed, "batches_per_s": batches / elapsed, "samples_per_s": batches * n / elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", type=int, default=20)
    ap.add_argument("--per-task", type=int, default=5000)
    ap.add_argument("--capacity", type=int, default=100_000)
    ap.add_argument("--sample-batches", type=int, default=500, help="batches timed for n=8 (n=256 uses a fifth)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the database (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path("bench_out/replay.json"))
    args = ap.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench_replay_", dir=args.dir))
    path = workdir / "replay.db"
    config = ReplayConfig(capacity=args.capacity, fraction=1.0, min_per_task=0, seed=0)
    tasks = [make_task(t, args.per_task) for t in range(args.tasks + 1)]

    per_task = []
    with ReplayBuffer(path, config) as buf:
        for t in tqdm(range(args.tasks), desc="fill", unit="task"):
            start = time.perf_counter()
            res = buf.add_task(f"task{t:02d}", tasks[t], source_file=f"task{t:02d}.jsonl")
            elapsed = time.perf_counter() - start
            per_task.append(
                {"task": t, "seconds": elapsed, "records_per_s": len(tasks[t]) / elapsed, "stored": res.stored,
                 "evicted": res.evicted, "total_after": len(buf)}
            )
        filled_total = len(buf)
        size_filled = db_bytes(path)

        # One more task: every older task shrinks to the new quota.
        start = time.perf_counter()
        res = buf.add_task("arrival", tasks[args.tasks], source_file="arrival.jsonl")
        arrival = {"seconds": time.perf_counter() - start, "records": args.per_task, "stored": res.stored,
                   "evicted_from_older": res.evicted, "total_after": len(buf)}
        arrival["records_per_s"] = args.per_task / arrival["seconds"]
        buf.check_invariants()

        sampling = [time_sampling(buf, 8, args.sample_batches), time_sampling(buf, 256, max(1, args.sample_batches // 5))]
        stats = buf.stats()
    size_closed = db_bytes(path)  # after close: WAL checkpointed into the main file

    rates = [p["records_per_s"] for p in per_task]
    head, tail = rates[: max(1, len(rates) // 4)], rates[-max(1, len(rates) // 4) :]
    result = {
        "config": {"tasks": args.tasks, "per_task": args.per_task, "capacity": args.capacity, "fraction": 1.0},
        "platform": {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count()},
        "per_task": per_task,
        "insert_rate_first_task": rates[0],
        "insert_rate_last_task": rates[-1],
        "insert_rate_first_quarter_median": statistics.median(head),
        "insert_rate_last_quarter_median": statistics.median(tail),
        "filled_total": filled_total,
        "arrival_with_eviction": arrival,
        "sampling": sampling,
        "db_bytes_filled_with_wal": size_filled,
        "db_bytes_after_close": size_closed,
        "final_total": stats["total"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    for p in workdir.glob("*"):
        p.unlink()
    workdir.rmdir()

    mib = 1024 * 1024
    print(f"\n### Replay buffer benchmark ({args.tasks} tasks x {args.per_task} records, capacity {args.capacity})\n")
    print("| metric | value |")
    print("|---|---|")
    print(f"| insert rate, first task | {rates[0]:,.0f} records/s |")
    print(f"| insert rate, last task (buffer at {filled_total:,}) | {rates[-1]:,.0f} records/s |")
    print(f"| insert rate, median first/last quarter of tasks | {statistics.median(head):,.0f} / {statistics.median(tail):,.0f} records/s |")
    print(f"| new task arrival with eviction ({arrival['evicted_from_older']:,} evicted) | {arrival['seconds']:.2f} s ({arrival['records_per_s']:,.0f} records/s) |")
    for s in sampling:
        print(f"| sample n={s['n']} | {s['batches_per_s']:,.0f} batches/s ({s['samples_per_s']:,.0f} samples/s) |")
    print(f"| DB size filled (db+wal) / after close | {size_filled / mib:.1f} MiB / {size_closed / mib:.1f} MiB |")
    print(f"\nJSON written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
