"""Structured logs: one JSON object per line, to stdout (journald) and a rotating file in logs/.

    log.info("file taken", extra={"file": name, "job_id": 7})
    -> {"ts": "2025-...Z", "level": "INFO", "logger": "service.watcher", "msg": "file taken", "file": "a.jsonl", "job_id": 7}
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TextIO

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}

_HANDLER_TAG = "_edgekif_service_handler"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
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
        return json.dumps(obj, default=str, ensure_ascii=False)


def setup_logging(
    log_dir: str | Path | None,
    *,
    max_bytes: int = 10 * 1024 * 1024,
    backups: int = 3,
    level: int = logging.INFO,
    stream: TextIO | None = None,
) -> list[logging.Handler]:
    """Install the JSON handlers on the root logger (replacing ones installed before, so a
    SIGHUP reload can change rotation sizes). Returns the handlers."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, _HANDLER_TAG, False):
            root.removeHandler(h)
            h.close()
    fmt = JsonFormatter()
    handlers: list[logging.Handler] = []
    out = logging.StreamHandler(stream if stream is not None else sys.stdout)
    handlers.append(out)
    if log_dir is not None:
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                Path(log_dir) / "edgekif.log", maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
        )
    for h in handlers:
        h.setFormatter(fmt)
        setattr(h, _HANDLER_TAG, True)
        root.addHandler(h)
    root.setLevel(level)
    return handlers
