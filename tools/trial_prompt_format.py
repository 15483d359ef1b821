"""One-off development trial (issue 11): does SmolLM2's default system prompt help or hurt?

SmolLM2's chat template inserts "You are a helpful AI assistant named SmolLM, trained by
Hugging Face" (~21 tokens) when a conversation has no system message. At max_length 128 those
tokens are taken from the task's input text. This trains the same LoRA, on the same examples,
seeds and fitted prompts, once with the template as shipped ("default_system") and once with
the default removed ("no_system", edgekif.inputs.without_default_system), and scores both on the
same test examples, with test prompts fitted like training prompts and rendered in the format
each model was trained on.

    python tools/trial_prompt_format.py                  # dbpedia, 128 train, 16 steps x 8, 100 test
    python tools/trial_prompt_format.py --seeds 0 1 --out /tmp/trial.json

Prints a markdown table (and writes JSON with --out). Not part of the product; the figures and
the command are in docs/benchmarks.md ("Prompt format trials (issue 11)").
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cl-benchmark"
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="dbpedia")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--train", type=int, default=128, help="train examples (a seeded sample of train.jsonl)")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--test", type=int, default=100, help="test examples (the first N of test.jsonl)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="+", default=["default_system", "no_system"], choices=["default_system", "no_system"])
    ap.add_argument("--zero-shot", action="store_true", help="also score the untrained base in each format")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import torch

    from edgekif.config import Config, ModelConfig
    from edgekif.taskfile import read_task
    from edgekif.inputs import encode_example, without_default_system
    from edgekif.evaluate import evaluate_task
    from edgekif.model import add_lora, load_model, load_tokenizer, resolve_base
    from edgekif.trainer import Learner

    torch.set_num_threads(max(1, torch.get_num_threads()))
    base = resolve_base(ModelConfig(), Path.home() / ".cache" / "edgekif")
    train_task = read_task(args.data / args.task / "train.jsonl")
    test = read_task(args.data / args.task / "test.jsonl").records[: args.test]
    labels = train_task.labels
    answer_tokens = 8  # room left for the generated answer when test prompts are fitted

    def tokenizer(variant: str):
        tok = load_tokenizer(base.path, keep_default_system=True)  # the template as shipped
        if variant == "no_system":
            plain = without_default_system(tok)
            if plain is None:
                raise SystemExit("this tokenizer's template adds no default system prompt")
            tok.chat_template = plain
        return tok

    def score(model, tok) -> dict:
        ev = evaluate_task(model, tok, test, labels=labels, max_new_tokens=answer_tokens, batch_size=16, label_scoring=True,
                           max_prompt_tokens=args.max_length - answer_tokens)
        return {"exact_match": ev.exact_match, "label_accuracy": ev.label_accuracy, "eval_seconds": round(ev.seconds, 1)}

    rows = []
    for seed in args.seeds:
        train = random.Random(seed).sample(train_task.records, args.train)
        for variant in args.variants:
            tok = tokenizer(variant)
            enc = [encode_example(tok, r, args.max_length) for r in train]
            row = {"seed": seed, "variant": variant, "truncated": sum(e.truncated for e in enc), "n_train": len(train),
                   "mean_tokens": round(sum(len(e.input_ids) for e in enc) / len(enc), 1)}
            cfg = Config()
            cfg.train.strategy, cfg.train.max_steps, cfg.train.batch_size = "seq_lora", args.steps, args.batch
            cfg.train.seed, cfg.train.deterministic, cfg.train.checkpoint_every = seed, True, 0
            cfg.data.max_length = args.max_length
            torch.manual_seed(seed)  # LoRA A's init
            model = add_lora(load_model(base.path, "fp32"), cfg.lora)
            if args.zero_shot:
                with model.disable_adapter():
                    row["zero_shot"] = score(model, tok)
            learner = Learner.create(cfg, model, tok)
            t0 = time.perf_counter()
            res = learner.train_task(args.task, train)
            row.update(train_seconds=round(time.perf_counter() - t0, 1), last_loss=round(res.last_loss, 4), mean_loss=round(res.mean_loss, 4))
            row.update(score(learner.model, tok))
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(f"{args.task}: {args.train} train examples, {args.steps} steps x batch {args.batch}, max_length {args.max_length}, "
          f"{len(test)} test examples (prompts fitted to {args.max_length - answer_tokens} tokens), seq_lora fp32, LoRA r=8 q,v, lr 1e-3")
    print()
    print("| seed | format | train prompts cut | mean tokens | last loss | exact match | label scoring |" + (" zero-shot EM / LS |" if args.zero_shot else ""))
    print("|---|---|---:|---:|---:|---:|---:|" + ("---:|" if args.zero_shot else ""))
    for r in rows:
        z = f" {100 * r['zero_shot']['exact_match']:.1f} / {100 * r['zero_shot']['label_accuracy']:.1f} |" if args.zero_shot else ""
        print(f"| {r['seed']} | {r['variant']} | {r['truncated']}/{r['n_train']} | {r['mean_tokens']} | {r['last_loss']} | "
              f"{100 * r['exact_match']:.1f} | {100 * r['label_accuracy']:.1f} |{z}")
    if args.out:
        args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
