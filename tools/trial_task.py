"""How much one task learns under a few training settings, over seeds, judged as the daemon's
base gate judges it: the task's metric on its holdout, paired against the untrained base.

A trial, not the daemon: PyTorch fp32 answers (no export), one task, no replay. For choosing a
setting (learning rate, LoRA targets, steps) with a measurement before changing a default.

    python tools/trial_task.py --train DATA/jobs/1/train.jsonl --holdout DATA/holdout/headlines.jsonl \
        --setting qv "" --setting lr3e-3 "train.lr=3e-3;kif.outer_lr=3e-3" --seeds 0 1 2 --out trial.json

DATA is a daemon's data dir after the task's file was buffered (jobs/N/train.jsonl is the
training part of the split, holdout/TASK.jsonl the held-out part; holdout/TASK.spec.json gives
the metric and answer budget). Every setting starts from the same config (`--set` applies to all).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

from edgekif.config import Config, apply_overrides  # noqa: E402
from edgekif.continual import StreamTask, run_stream  # noqa: E402
from edgekif.evaluate import generate_answers  # noqa: E402
from edgekif.holdouts import read_holdout  # noqa: E402
from edgekif.metrics import score  # noqa: E402
from edgekif.model import resolve_base  # noqa: E402
from edgekif.records import Record  # noqa: E402
from edgekif.replay import ReplayBuffer  # noqa: E402
from edgekif.stats import paired_difference  # noqa: E402
from edgekif.workflow import cache_root, open_learner  # noqa: E402


def _records(path: Path) -> list[Record]:
    return read_holdout(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, required=True)
    ap.add_argument("--holdout", type=Path, required=True)
    ap.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), default=[],
                    help="a name and ;-separated config overrides ('' = the config as it is; lists are comma-separated: lora.target_modules=q_proj,v_proj)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--set", action="append", default=[], help="an override for every setting (e.g. data.max_length=128)")
    ap.add_argument("--metric", help="default: the holdout's spec (holdout/TASK.spec.json)")
    ap.add_argument("--max-new-tokens", type=int, help="default: the holdout's spec")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)

    spec_file = args.holdout.with_name(args.holdout.name.replace(".jsonl", ".spec.json"))
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    metric = args.metric or spec.get("metric", "normalized_exact_match")
    budget = args.max_new_tokens or int(spec.get("max_new_tokens", 8))
    train, hold = _records(args.train), _records(args.holdout)
    refs = [r.label for r in hold]

    def config(overrides: str, seed: int) -> Config:
        cfg = apply_overrides(Config(), [*args.set, *[o for o in overrides.split(";") if o.strip()]])
        cfg.train.seed = seed
        return cfg

    base = resolve_base(config("", 0).model, cache_root(config("", 0)))
    out: dict = {"command": " ".join(["python", "tools/trial_task.py", *(argv if argv is not None else sys.argv[1:])]),
                 "metric": metric, "max_new_tokens": budget, "train": len(train), "holdout": len(hold), "runs": {}}

    def scores(learner) -> list[float]:
        answers = generate_answers(learner.model, learner.tokenizer, hold, max_new_tokens=budget, batch_size=16)
        return score(metric, answers, refs).scores

    learner, _ = open_learner(config("", 0), base=base)
    base_scores = scores(learner)
    del learner
    out["base"] = {"mean": sum(base_scores) / len(base_scores), "scores": base_scores}
    tqdm.write(f"base: {metric} {100 * out['base']['mean']:.1f} on {len(hold)} records")
    for name, overrides in args.setting:
        for seed in args.seeds:
            t0 = time.time()
            cfg = config(overrides, seed)
            learner, _ = open_learner(cfg, base=base)
            with tempfile.TemporaryDirectory() as tmp, ReplayBuffer(Path(tmp) / "replay.db", cfg.replay) as buf:
                res = run_stream(learner, buf, [StreamTask("task", train, kind=spec.get("kind"))])
            s = scores(learner)
            del learner
            d = paired_difference(s, base_scores, confidence=0.95, seed=0)
            out["runs"][f"{name}/seed{seed}"] = {"setting": name, "overrides": overrides, "seed": seed, "steps": res.results[0].steps,
                                                 "mean": sum(s) / len(s), "gain": d.mean_diff, "interval": [d.low, d.high],
                                                 "p_value": d.p_value, "seconds": round(time.time() - t0, 1), "scores": s}
            tqdm.write(f"{name} seed {seed}: {metric} {100 * sum(s) / len(s):.1f}, gain {100 * d.mean_diff:+.1f} "
                       f"[{100 * d.low:+.1f}, {100 * d.high:+.1f}] p={d.p_value:.3g} ({res.results[0].steps} steps, {time.time() - t0:.0f} s)")
            args.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
