"""`python -m service`: run the edgekif daemon in the foreground (systemd runs it this way
or through `edgekif serve`)."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from edgekif.config import Config, load_config
from edgekif.errors import ConfigError

from .daemon import run_daemon
from .stages import Stages


def main(argv: list[str] | None = None, *, stages_factory: Callable[[Config], Stages] | None = None) -> int:
    """stages_factory(config) builds the pipeline (default: the library's); service.fake_stages
    passes its fakes here."""
    p = argparse.ArgumentParser(prog="python -m service", description="Run the edgekif daemon in the foreground.")
    p.add_argument("--config", help="TOML config file (SIGHUP re-reads it)")
    p.add_argument("--data-dir", help="data directory (default: $EDGEKIF_DATA_DIR or ~/.local/share/edgekif)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config option (repeatable)")
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"edgekif: {e}", file=sys.stderr)
        return 2
    stages = stages_factory(config) if stages_factory is not None else None
    return run_daemon(config, stages=stages, config_path=args.config, overrides=overrides)


if __name__ == "__main__":
    sys.exit(main())
