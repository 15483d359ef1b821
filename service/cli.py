"""The installed `edgekif` command: the library's commands (edgekif.cli) plus the daemon's,
which live here so that the library knows nothing of the daemon."""

from __future__ import annotations

import sys
from pathlib import Path

from edgekif.cli import CommandAdder, _config, _print_json, build_parser, config_source, run
from edgekif.errors import EdgekifError


def cmd_serve(args) -> int:
    from .daemon import run_daemon

    # SIGHUP re-reads the file _config found, named or not (find_config: data dir, then XDG).
    path, overrides = config_source(args)
    return run_daemon(_config(args), config_path=path, overrides=overrides)


def cmd_status(args) -> int:
    from .status import format_status, status

    st = status(_config(args))
    _print_json(st) if args.json else print(format_status(st))
    return 0


def cmd_publish(args) -> int:
    from .control import force_publish

    if args.force is None:
        raise EdgekifError("publish needs --force JOB (publishes a job the forgetting gate held)")
    print(f"published: {force_publish(_config(args), args.force)}")
    return 0


def cmd_jobs(args) -> int:
    from .status import format_jobs, list_jobs

    rows = list_jobs(_config(args), limit=args.limit or None)
    _print_json(rows) if args.json else print(format_jobs(rows))
    return 0


def cmd_retry(args) -> int:
    from .control import retry_job

    print(retry_job(_config(args), args.job))
    return 0


def _drop_color_message(record) -> bool:
    """uvicorn puts an ANSI-coloured copy of its message on its records; not for the journal."""
    record.__dict__.pop("color_message", None)
    return True


def cmd_api(args) -> int:
    import logging

    from .api import ApiSettings, serve
    from .logs import setup_logging

    data_path = _config(args).data_path
    if not data_path.is_dir():  # before logging is taken over: a typo fails at once, plainly
        raise EdgekifError(f"{data_path}: no such data directory (give the daemon's --data-dir)")
    # The daemon's JSON lines on stdout (journald priorities under systemd), uvicorn's own lines
    # included; no log file: the API's unit can write nowhere. Replaces the CLI's plain handler.
    logging.getLogger().handlers.clear()
    for handler in setup_logging(None, level=logging.DEBUG if args.verbose else logging.INFO):
        handler.addFilter(_drop_color_message)
    settings = ApiSettings(max_body_bytes=args.max_body_bytes, max_tokens=args.max_tokens, concurrency=args.concurrency, queue=args.queue,
                           keep_alive=args.keep_alive, max_loaded=args.max_loaded, warmup=args.warmup)
    if settings.keep_alive < 0:
        raise EdgekifError("--keep-alive must be 0 or more seconds")
    for name in ("max_body_bytes", "max_tokens", "concurrency", "max_loaded"):
        if getattr(settings, name) < 1:
            raise EdgekifError(f"--{name.replace('_', '-')} must be at least 1")
    if settings.queue < 0:
        raise EdgekifError("--queue must be 0 or more")
    return serve(data_path, settings, host=args.host, port=args.port, socket_path=args.socket)


def cmd_check(args) -> int:
    from edgekif.errors import ValidationError

    from .preflight import describe_task_file, format_description

    cfg = _config(args)
    results, refused = [], 0
    for name in args.files:
        try:
            d = describe_task_file(cfg, Path(name))
        except ValidationError as e:
            d = {"file": name, "rejected": e.to_dict()}
            text = f"{name}: would be rejected\n  " + str(e).replace("\n", "\n  ")
        else:
            text = format_description(d)
        refused += "rejected" in d or d["duplicate_of"] is not None
        if not args.json:
            print(text)
        results.append(d)
    if args.json:
        _print_json(results)
    return 1 if refused else 0  # 2 is the CLI's own errors (usage, config)


def add_daemon_commands(add: CommandAdder) -> None:
    add("serve", cmd_serve, "run the daemon on the data dir (watch inbox/, train, export, publish)")
    sp = add("check", cmd_check, "what the daemon would do with task files, changing nothing: every problem that would reject "
             "one, or its kind, metric, answer budget and holdout/train split")
    sp.add_argument("files", nargs="+", metavar="TASK_FILE")
    sp.add_argument("--json", action="store_true")
    sp = add("status", cmd_status, "queue, current job, published version and buffer stats")
    sp.add_argument("--json", action="store_true")
    sp = add("publish", cmd_publish, "publish a job held by the forgetting gate")
    sp.add_argument("--force", metavar="JOB", type=int, help="job id to publish anyway")
    sp = add("jobs", cmd_jobs, "every job, newest first: file, task, state, tries, version, last error")
    sp.add_argument("--json", action="store_true")
    sp.add_argument("--limit", type=int, default=0, help="at most this many (0 = all)")
    sp = add("retry", cmd_retry, "queue a failed job again from the state it failed in")
    sp.add_argument("job", metavar="JOB", type=int, help="job id (see `edgekif status`)")
    from .api import DEFAULT_PORT, ApiSettings

    d = ApiSettings()
    sp = add("api", cmd_api, "OpenAI-compatible HTTP API on every kept version (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    sp.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"TCP port (default {DEFAULT_PORT}: next to Ollama's 11434)")
    sp.add_argument("--socket", metavar="PATH", help="listen on this Unix socket instead of TCP")
    sp.add_argument("--concurrency", type=int, default=d.concurrency, help=f"generations at once (default {d.concurrency})")
    sp.add_argument("--queue", type=int, default=d.queue, help=f"requests that may wait for a slot; beyond that 429 (default {d.queue})")
    sp.add_argument("--max-tokens", type=int, default=d.max_tokens, help=f"largest max_tokens a request may ask for, and the default (default {d.max_tokens})")
    sp.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes, help=f"largest request body; beyond that 413 (default {d.max_body_bytes})")
    sp.add_argument("--keep-alive", type=float, default=d.keep_alive, metavar="SECONDS",
                    help=f"how long a version a request pinned by name stays loaded after its last request (default {d.keep_alive:g})")
    sp.add_argument("--max-loaded", type=int, default=d.max_loaded, help=f"versions held in memory at once, the live one included (default {d.max_loaded})")
    sp.add_argument("--warmup", action="store_true", help="load the live version and run one token at start (default: on the first request)")


def main(argv: list[str] | None = None) -> int:
    return run(build_parser(add_daemon_commands).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
