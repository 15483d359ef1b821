#!/usr/bin/env python
"""Validation sweep (issue 11): tools/bench_cl.py for a list of named configurations, evaluated
on a validation slice of train (never the test split), one subprocess per configuration and
strategy, one thread, one seed. Collects OP / BWT / plasticity (exact match) into
OUT/sweep.json and a markdown table into OUT/sweep.md.

    python tools/sweep_cl.py                         # every configuration, in the order listed
    python tools/sweep_cl.py --only base all_lr2e-3  # some of them
    python tools/sweep_cl.py --stop-after-min 60     # launch no new run after 60 minutes
    python tools/sweep_cl.py --dry-run               # print the commands
    python tools/sweep_cl.py --table-only            # re-render the table from what has run

Resumes: a (configuration, strategy) whose OUT/<config>/<strategy>/result.json is complete
(has wall_seconds) is not run again, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from edgekif.config import ALL_LINEAR as _ALL_LINEAR  # noqa: E402  (no torch: config only)

ALL_LINEAR = ",".join(_ALL_LINEAR)  # as a --set value
POLICY = ["replay", "recurrent_kif"]

# name -> bench_cl arguments (--lr sets train.lr and kif.outer_lr together, as bench_cl always
# has; --set overrides are applied after it) and the strategies to run
CONFIGS: dict[str, dict] = {
    # (a) training policy, continual setting
    "qv_lr1e-3": {"args": ["--lr", "1e-3", "--set", "lora.target_modules=q_proj,v_proj"], "strategies": POLICY, "about": "baseline: LoRA q,v r=8, lr 1e-3 (the defaults until 2026-12-06)"},
    "all_lr1e-3": {"args": ["--lr", "1e-3", "--set", f"lora.target_modules={ALL_LINEAR}"], "strategies": POLICY, "about": "LoRA on all linear layers, lr 1e-3"},
    "all_lr2e-3": {"args": ["--lr", "2e-3", "--set", f"lora.target_modules={ALL_LINEAR}"], "strategies": POLICY, "about": "LoRA on all linear layers, lr 2e-3"},
    "qv_lr2e-3": {"args": ["--lr", "2e-3", "--set", "lora.target_modules=q_proj,v_proj"], "strategies": POLICY, "about": "LoRA q,v, lr 2e-3"},
    # (b) Recurrent-KIF ablation on the policy chosen from (a) (--kif-base names it); [kif]
    # configures recurrent_kif only (replay has [experience_replay]), so these run it alone
    "kif_q0.9": {"kif": ["--set", "kif.mask_quantile=0.9"], "strategies": ["recurrent_kif"], "about": "mask top 10%"},
    "kif_q0.6": {"kif": ["--set", "kif.mask_quantile=0.6"], "strategies": ["recurrent_kif"], "about": "mask top 40%"},
    "kif_reset": {"kif": ["--set", "kif.reset_importance=true"], "strategies": ["recurrent_kif"], "about": "importance EMAs reset per task"},
    "kif_outer_half": {"kif": ["--set", "kif.outer_lr=HALF"], "strategies": ["recurrent_kif"], "about": "outer lr halved"},
    # the fusion damps tau_in and tau_out by 0.5 wherever neither mask is set (~64% of the
    # elements at top 20%): with these weights KIF differs from replay only inside the masks
    "kif_neither_full": {"kif": ["--set", "kif.w_neither_in=1", "--set", "kif.w_neither_out=1"], "strategies": ["recurrent_kif"],
                         "about": "fusion weight 1/1 where neither mask is set (no damping outside the masks)"},
    # more fusions per task at the same gradient steps (Q:M stays 2:1)
    "kif_rounds4": {"kif": ["--set", "kif.inner_steps=2", "--set", "kif.outer_steps=1"], "strategies": ["recurrent_kif"],
                    "about": "Q=2, M=1: 4 rounds (fusions) per task at 8 task steps, instead of 1"},
}


def config_args(name: str, kif_base: str) -> list[str]:
    """bench_cl arguments of a configuration; an ablation (kif) is applied on top of kif_base."""
    c = CONFIGS[name]
    if "kif" not in c:
        return list(c["args"])
    base = list(CONFIGS[kif_base]["args"])
    lr = float(base[base.index("--lr") + 1]) if "--lr" in base else 1e-3
    return base + [a.replace("HALF", f"{lr / 2:g}") for a in c["kif"]]


def _complete(path: Path) -> dict | None:
    try:
        res = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return res if "wall_seconds" in res else None


def collect(out: Path, names: list[str], kif_base: str) -> dict:
    rows = []
    for name in names:
        for strategy in CONFIGS[name]["strategies"]:
            res = _complete(out / name / strategy / "result.json")
            row = {"config": name, "about": CONFIGS[name]["about"], "strategy": strategy, "args": config_args(name, kif_base), "done": res is not None}
            if res:
                st = res["strategies"][strategy]
                run = st["runs"][0]
                row.update(op=st["op_mean"], bwt=st["bwt_mean"], plasticity=st.get("plasticity_mean"), label_op=st.get("label_op_mean"),
                           matrix=run["matrix"], seconds=run["seconds"], command=res["command"], eval_split=res["settings"].get("eval_split"))
            rows.append(row)
    return {"kif_base": kif_base, "rows": rows}


def _pct(x):
    return "—" if x is None else f"{100 * x:.1f}"


def to_markdown(sweep: dict) -> str:
    tasks = next((r["matrix"]["tasks"] for r in sweep["rows"] if r["done"]), [])
    head = " / ".join(t[:2] for t in tasks)
    lines = [f"| config | strategy | OP | BWT | plasticity | final {head} | label OP | wall (min) |", "|---|---|---|---|---|---|---|---|"]
    for r in sweep["rows"]:
        if not r["done"]:
            lines.append(f"| {r['config']} | {r['strategy']} | not run | | | | | |")
            continue
        lines.append(f"| {r['config']} | {r['strategy']} | {_pct(r['op'])} | {_pct(r['bwt'])} | {_pct(r['plasticity'])} | {' / '.join(f'{100 * a:.0f}' for a in r['matrix']['a'][-1])} | {_pct(r['label_op'])} | {r['seconds'] / 60:.1f} |")
    lines += ["", "Configurations:", ""]
    seen = set()
    for r in sweep["rows"]:
        if r["config"] not in seen:
            seen.add(r["config"])
            lines.append(f"- `{r['config']}`: {r['about']} (`{shlex.join(r['args']) or 'defaults'}`)")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=list(CONFIGS), help="these configurations (default: all, in the order listed)")
    ap.add_argument("--kif-base", default="qv_lr1e-3", choices=[n for n, c in CONFIGS.items() if "kif" not in c],
                    help="the training policy the Recurrent-KIF ablation runs on")
    ap.add_argument("--out", type=Path, default=REPO / "bench_out" / "sweep")
    ap.add_argument("--validation", type=int, default=60)
    ap.add_argument("--train-per-task", type=int, default=64)
    ap.add_argument("--task-steps", type=int, default=8)
    ap.add_argument("--profile", default="standard")
    ap.add_argument("--order", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="passed to every bench_cl run (last)")
    ap.add_argument("--stop-after-min", type=float, default=0, help="launch no new run after this many minutes (0 = no limit)")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args(argv)

    names = args.only or list(CONFIGS)
    common = ["--profile", args.profile, "--order", str(args.order), "--seeds", str(args.seed), "--threads", "1",
              "--validation", str(args.validation), "--train-per-task", str(args.train_per_task), "--task-steps", str(args.task_steps),
              "--no-label-scoring", "--no-zero-shot", "--set", "train.deterministic=true"]  # tuning compares OP/BWT/plasticity
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    for name in [] if args.table_only else names:
        for strategy in CONFIGS[name]["strategies"]:
            run_dir = args.out / name / strategy
            if _complete(run_dir / "result.json"):
                print(f"[sweep] {name}/{strategy}: done, skipped", flush=True)
                continue
            if args.stop_after_min and (time.monotonic() - t0) / 60 > args.stop_after_min:
                print(f"[sweep] {name}/{strategy}: not launched (past {args.stop_after_min:g} min)", flush=True)
                continue
            cmd = [sys.executable, str(REPO / "tools" / "bench_cl.py"), *common, "--strategies", strategy,
                   *config_args(name, args.kif_base), *args.extra, "--out", str(run_dir)]
            print(f"[sweep] {name}/{strategy}: {shlex.join(cmd)}", flush=True)
            if args.dry_run:
                continue
            run_dir.mkdir(parents=True, exist_ok=True)
            t = time.monotonic()
            with open(run_dir / "log.txt", "w") as log:
                rc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
            print(f"[sweep] {name}/{strategy}: rc {rc} in {(time.monotonic() - t) / 60:.1f} min", flush=True)
            sweep = collect(args.out, names, args.kif_base)  # the table so far, after every run
            (args.out / "sweep.json").write_text(json.dumps(sweep, indent=1))
            (args.out / "sweep.md").write_text(to_markdown(sweep))
    sweep = collect(args.out, names, args.kif_base)
    sweep["settings"] = {"common": common, "extra": args.extra}
    (args.out / "sweep.json").write_text(json.dumps(sweep, indent=1))
    md = to_markdown(sweep)
    (args.out / "sweep.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
