"""The installed `edgekif` command: the library's commands (edgekif.cli) plus the daemon's,
which live here so that the library knows nothing of the daemon."""

from __future__ import annotations

import sys

from edgekif.cli import CommandAdder, _config, _print_json, build_parser, run
from edgekif.config import find_config
from edgekif.errors import EdgekifError


def cmd_serve(args) -> int:
    from .daemon import run_daemon

    overrides = list(args.set) + ([f"data_dir={args.data_dir}"] if args.data_dir else [])
    # SIGHUP re-reads the file _config found, named or not (find_config: data dir, then XDG).
    path = args.config if args.config is not None else find_config(overrides)
    return run_daemon(_config(args), config_path=path, overrides=overrides)


def cmd_status(args) -> int:
    from .status import format_status, status

    st = status(_config(args))
    _print_json(st) if args.json else print(format_status(st))
    return 0


def cmd_publish(args) -> int:
    from .control import force_publish

    if not args.force:
        raise EdgekifError("publish needs --force JOB (publishes a job the forgetting gate held)")
    print(f"published: {force_publish(_config(args), int(args.force))}")
    return 0


def cmd_jobs(args) -> int:
    from .status import format_jobs, list_jobs

    rows = list_jobs(_config(args), limit=args.limit or None)
    _print_json(rows) if args.json else print(format_jobs(rows))
    return 0


def cmd_retry(args) -> int:
    from .control import retry_job

    print(retry_job(_config(args), int(args.job)))
    return 0


def add_daemon_commands(add: CommandAdder) -> None:
    add("serve", cmd_serve, "run the daemon on the data dir (watch inbox/, train, export, publish)")
    sp = add("status", cmd_status, "queue, current job, published version and buffer stats")
    sp.add_argument("--json", action="store_true")
    sp = add("publish", cmd_publish, "publish a job held by the forgetting gate")
    sp.add_argument("--force", metavar="JOB", help="job id to publish anyway")
    sp = add("jobs", cmd_jobs, "every job, newest first: file, task, state, tries, version, last error")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=0, help="at most this many (0 = all)")
    sp = add("retry", cmd_retry, "queue a failed job again from the state it failed in")
    sp.add_argument("job", metavar="JOB", help="job id (see `edgekif status`)")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(add_daemon_commands).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
