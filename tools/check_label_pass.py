#!/usr/bin/env python
"""Label scoring's packed pass against scoring each prompt + label in full, on a real base.

`edgekif.evaluate.label_logprobs` scores every label of a record in one packed pass on the
record's KV cache, with a 4-D attention mask (and, for Gemma 3, a second mask for the
sliding-window layers). The tests check it on tiny random models of each family; this checks
it on a real base: each label's summed log-probability is also computed the plain way, one
forward pass of prompt + label per pair, and the two are compared (largest difference, and
whether each record picks the same label).

    python tools/check_label_pass.py ../shared/data/cl-benchmark/dbpedia --records 12 --labels 50 --long 2
    python tools/check_label_pass.py ../shared/data/cl-benchmark/dbpedia --base gemma3-270m --labels 14 --long 2

`--labels N` pads the task's own labels with made-up multi-token ones up to N (a task may have
50); `--long K` adds K records whose text is stretched to about 600 and 1000 tokens, past
Gemma 3's 512-token sliding window. The plain way costs a forward pass per record and label:
minutes for 50 labels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm  # noqa: E402

WORDS = "river mountain castle engine violin satellite glacier harbour lantern orchard".split()


def made_up_labels(own: list[str], n: int) -> list[str]:
    """`own` padded to n labels with distinct two-word-and-number ones (several tokens each)."""
    return list(own) + [f"{WORDS[i % 10].title()} {WORDS[(3 * i + 1) % 10]} {i}" for i in range(n - len(own))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("task", type=Path, help="a task folder with train.jsonl (its labels) and test.jsonl (the records)")
    ap.add_argument("--base", default="", help="model.base (default: the configured default base)")
    ap.add_argument("--records", type=int, default=12, help="the first N test records")
    ap.add_argument("--labels", type=int, default=0, help="pad the task's labels with made-up ones up to N (never fewer than its own)")
    ap.add_argument("--long", type=int, default=2, choices=range(3), help="records stretched past 512 tokens (0-2)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args(argv)

    import torch

    from edgekif.config import Config
    from edgekif.evaluate import label_logprobs
    from edgekif.inputs import encode_prompt, encode_target
    from edgekif.model import load_model, load_tokenizer, resolve_base
    from edgekif.taskfile import read_task
    from edgekif.workflow import cache_root

    cfg = Config()
    if args.base:
        cfg.model.base = args.base
    base = resolve_base(cfg.model, cache_root(cfg))
    tok = load_tokenizer(base.path, chat_template=cfg.model.chat_template)
    model = load_model(base.path, "fp32").eval()
    train = read_task(args.task / "train.jsonl").records
    test = read_task(args.task / "test.jsonl").records
    own = sorted({r.label for r in train})
    labels = made_up_labels(own, args.labels) if args.labels > len(own) else own
    records = list(test[: args.records])
    if args.long:
        # the first record's instruction with many records' texts after it: ~600 and ~1000 tokens
        role, content = records[0].messages[-1]
        filler = " ".join(r.messages[-1][1] for r in test[args.records : args.records + 40])
        for chars in (2500, 4000)[: args.long]:
            records.append(dataclasses.replace(records[0], messages=((role, content.split("\n")[0] + "\n" + filler[:chars]),)))
    prompt_tokens = [len(encode_prompt(tok, r)) for r in records]

    t0 = time.perf_counter()
    packed = label_logprobs(model, tok, records, labels, batch_size=args.batch_size)
    packed_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    plain: list[list[float]] = []
    with torch.inference_mode():
        for r in tqdm(records, desc="prompt + label in full"):
            prompt, row = encode_prompt(tok, r), []
            for label in labels:
                target = encode_target(tok, dataclasses.replace(r, output=label))
                logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + target])).logits[0].float(), dim=-1)
                row.append(sum(logp[len(prompt) - 1 + j, t].item() for j, t in enumerate(target)))
            plain.append(row)
    plain_s = time.perf_counter() - t0

    def pick(row: list[float]) -> int:
        return max(range(len(row)), key=row.__getitem__)

    out = {
        "command": "python tools/check_label_pass.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "base": base.name, "model": type(model).__name__, "attention": model.config._attn_implementation,
        "sliding_window": getattr(model.config, "sliding_window", None), "labels": len(labels), "records": len(records),
        "prompt_tokens": prompt_tokens,
        "max_abs_difference": max(abs(a - b) for p, q in zip(packed, plain) for a, b in zip(p, q)),
        "same_picks": sum(pick(p) == pick(q) for p, q in zip(packed, plain)),
        "packed_seconds": round(packed_s, 1), "plain_seconds": round(plain_s, 1),
    }
    print(f"{out['base']} ({out['model']}, {out['attention']}, sliding window {out['sliding_window']}): {out['records']} records "
          f"({min(prompt_tokens)}-{max(prompt_tokens)} prompt tokens), {out['labels']} labels: largest difference "
          f"{out['max_abs_difference']:.1e} nats, same pick on {out['same_picks']}/{out['records']}; "
          f"packed {packed_s:.1f} s, in full {plain_s:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0 if out["same_picks"] == len(records) else 1


if __name__ == "__main__":
    sys.exit(main())
