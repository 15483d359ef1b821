#!/usr/bin/env python
"""Compute a base's answers to the rehearsal prompts into the package's shipped folder
(edgekif/rehearsal_answers/), so that installs of that base rehearse without generating them
first. The library does the work (edgekif.workflow.rehearsal_records); this script only points
its cache at the package folder. The file is keyed like the cache (base file's sha256, training
precision, chat template, prompt set, budget): a changed key is answered again on the machine.

    python tools/rehearsal_answers.py                       # the default base at the defaults
    python tools/rehearsal_answers.py --set model.base=...  # another instruction-tuned base
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edgekif.config import Config, apply_overrides  # noqa: E402
from edgekif.model import resolve_device, resolve_precision  # noqa: E402
from edgekif.rehearsal import SHIPPED_ANSWERS  # noqa: E402
from edgekif.workflow import open_learner, rehearsal_records  # noqa: E402

PACKAGE_DIR = Path(__file__).resolve().parents[1] / "edgekif" / SHIPPED_ANSWERS


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. model.base=NAME")
    ap.add_argument("--out", type=Path, default=PACKAGE_DIR, help="folder for the answers file (default: the package's)")
    args = ap.parse_args(argv)

    cfg = apply_overrides(Config(), args.set)
    learner, base = open_learner(cfg)
    precision = resolve_precision(cfg.model.precision, resolve_device(cfg.model.device), base.path)
    args.out.mkdir(parents=True, exist_ok=True)
    before = set(args.out.glob("*.json"))
    records = rehearsal_records(cfg, base, precision, learner, cache_dir=args.out)
    written = sorted(set(args.out.glob("*.json")) - before)
    print(f"{base.name} ({precision}): {len(records)} rehearsal records; "
          + (f"written {', '.join(p.name for p in written)}" if written else f"already in {args.out}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
