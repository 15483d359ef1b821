"""Structured logs: one JSON object per line, to stdout (journald) and a rotating file in logs/.

    log.info("file taken", extra={"file": name, "job_id": 7})
    -> {"ts": "2025-...Z", "level": "INFO", "logger": "service.watcher", "msg": "file taken", "file": "a.jsonl", "job_id": 7}

When stdout is the journal (systemd sets $JOURNAL_STREAM to its device:inode), each stdout
line starts with a syslog priority, sd-daemon(3) style: `<3>{"ts": ...}`. journald strips it
(SyslogLevelPrefix=yes, the default, set explicitly in the units) and stores the priority, so
`journalctl -u edgekif -p err` shows errors only. The rotating file always gets plain JSON.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

from edgekif.jsontext import dumps

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

_HANDLER_TAG = "_edgekif_service_handler"


def syslog_priority(levelno: int) -> int:
    """Python level -> syslog priority: CRITICAL 2 (crit), ERROR 3 (err), WARNING 4, INFO 6, DEBUG 7."""
    if levelno >= logging.CRITICAL:
        return 2
    if levelno >= logging.ERROR:
        return 3
    if levelno >= logging.WARNING:
        return 4
    if levelno >= logging.INFO:
        return 6
    return 7


def stream_is_journal(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd connected (systemd.exec(5), $JOURNAL_STREAM:
    "DEV:INODE" of that socket). Comparing the inode, not just checking the variable, keeps the
    prefix off when the variable was inherited by a process whose stdout is a pipe or a file."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    try:
        st = os.fstat(stream.fileno())
        return bool(value) and (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (AttributeError, OSError, ValueError):  # StringIO, closed streams, a malformed variable
        return False


class JsonFormatter(logging.Formatter):
    """One JSON object per record; with `syslog_prefix`, preceded by `<N>` (syslog_priority)."""

    def __init__(self, *, syslog_prefix: bool = False) -> None:
        super().__init__()
        self.syslog_prefix = syslog_prefix

    def format(self, record: logging.LogRecord) -> str:
        line = self.format_json(record)
        # json.dumps escapes newlines, so the prefix always covers the whole record.
        return f"<{syslog_priority(record.levelno)}>{line}" if self.syslog_prefix else line

    def format_json(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in obj:
                obj[key] = value
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        return dumps(obj, default=str, ensure_ascii=False)  # a NaN figure as null: log shippers parse strictly


# Libraries whose routine messages would read as the daemon's problems. bitsandbytes' CPU backend
# warns in every model stage that it cannot fetch an optimised 4-bit kernel from the Hugging Face
# hub ("Failed to load CPU gemm_4bit_forward from kernels-community"); the daemon is offline by
# design and trains on CPU in fp32, where that kernel is never used. Its errors still come through.
QUIET_LOGGERS = {"bitsandbytes.backends.cpu.ops": logging.ERROR}


def setup_logging(
    log_file: str | Path | None,
    *,
    max_bytes: int = 10 * 1024 * 1024,
    backups: int = 3,
    level: int = logging.INFO,
    stream: TextIO | None = None,
    syslog_prefix: bool | None = None,
) -> list[logging.Handler]:
    """Install the JSON handlers on the root logger (replacing ones installed before, so a
    SIGHUP reload can change rotation sizes). Returns the handlers [stream, file].

    syslog_prefix: `<N>` priority prefixes on the stream handler's lines; None (the default)
    = only when that stream is the journal (stream_is_journal). The file never gets them."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_TAG, False):
            root.removeHandler(h)
            h.close()
    fmt = JsonFormatter()
    handlers: list[logging.Handler] = []
    out_stream = stream if stream is not None else sys.stdout
    if syslog_prefix is None:
        syslog_prefix = stream_is_journal(out_stream)
    out = logging.StreamHandler(out_stream)
    out.setFormatter(JsonFormatter(syslog_prefix=syslog_prefix))
    handlers.append(out)
    if log_file is not None:  # DATA_DIR/logs/edgekif.log for the daemon (edgekif.layout)
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.handlers.RotatingFileHandler(log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"))
    for h in handlers:
        if h.formatter is None:
            h.setFormatter(fmt)
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    root.setLevel(level)
    for name, quiet_level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(quiet_level)
    return handlers
