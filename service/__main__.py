"""`python -m service`: run the edgekif daemon in the foreground (systemd runs it this way
or through `edgekif serve`)."""

from __future__ import annotations

import argparse
import sys

from edgekif.config import load_config
from edgekif.errors import ConfigError

from .daemon import run_daemon


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service", description="Run the edgekif daemon in the foreground.")
    p.add_argument("--config", help="TOML config file (SIGHUP re-reads it)")
    p.add_argument("--data-dir", help="data directory (default: $EDGEKIF_DATA_DIR or ~/.local/share/edgekif)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config option (repeatable)")
    # Tests only: stages that sleep and write small files instead of training.
    p.add_argument("--fake-stages", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    overrides = list(args.overrides) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    try:
        config = load_config(args.config, overrides)
    except ConfigError as e:
        print(f"edgekif: {e}", file=sys.stderr)
        return 2
    return run_daemon(config, fake_stages=args.fake_stages, config_path=args.config, overrides=overrides)


if __name__ == "__main__":
    sys.exit(main())
