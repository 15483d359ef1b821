"""Start-up housekeeping: remove the temp files and folders that crashed runs left behind.

A crash (power cut, OOM kill, kill -9) between creating a temp sibling and renaming it into
place leaves it there for good: `jobs/<id>/.export.*.tmp` (a half-built export, hundreds of
MB), `jobs/<id>/.checkpoint.*.tmp`, `.NAME.*.tmp` files of edgekif.atomic and the metrics
writer, `accepted/.take.*.tmp` (a half-copied inbox file), and in the system temp dir the
onnxruntime-genai builder's `edgekif-genai-cache-<pid>-*` folders.

cleanup_stale_temp() runs once at daemon start, after the data-dir lock is taken: from then
on this daemon is the only writer of the places it cleans, so every temp name there is stale.
It does not touch `inbox/` (a user's `.name` is work in progress, not ours) or `models/`
(`edgekif export --publish` may be publishing there right now; ModelStore removes its own
stale staging under its publish lock), and it does not descend into `rejected/` entries
(a rejected directory is kept as it was dropped).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from edgekif.atomic import PARKED_NAME, TEMP_NAME
from edgekif.children import pid_alive
from edgekif.export.build import GENAI_CACHE_PREFIX
from edgekif.layout import DataLayout

log = logging.getLogger(__name__)

# Temp names (edgekif.atomic.TEMP_NAME): ".NAME.<rand>.tmp" as edgekif.atomic, service.metrics
# and the inbox name theirs; atomic_dir's also carry its pid. PARKED_NAME: ".NAME.old-<pid>".
_GENAI_CACHE = re.compile(re.escape(GENAI_CACHE_PREFIX) + r"(?:(\d+)-)?[a-z0-9_]{8}$")
# Caches named before the pid was added cannot be matched to a process: removed once this old.
LEGACY_CACHE_MAX_AGE = 24 * 3600.0


def remove_path(path: Path) -> bool:
    """Remove a file or folder (a link itself, never what it points to); False, with a logged
    warning, when it cannot be removed (already gone: False, quietly). Never raises."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError as e:
        log.warning("could not remove stale temp %s: %s", path, e, extra={"path": str(path)})
        return False
    return True


def _stale_in(folder: Path, *, recursive: bool) -> list[Path]:
    """Temp names of crashed atomic writes in folder (and below it, if recursive)."""
    found: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        name = entry.name
        old = PARKED_NAME.match(name)
        if TEMP_NAME.match(name) or (old and int(old.group(1)) != os.getpid()):
            found.append(Path(entry.path))
        elif recursive and entry.is_dir(follow_symlinks=False):
            found.extend(_stale_in(Path(entry.path), recursive=True))
    return found


def cleanup_stale_temp(layout: DataLayout, *, tmp_dir: str | os.PathLike | None = None, now: float | None = None) -> list[Path]:
    """Remove stale temp files/folders under the data dir and stale genai builder caches in
    the system temp dir (tmp_dir, default tempfile.gettempdir()). Returns what was removed.

    Call it once at daemon start, after the data-dir lock is taken and before the watcher
    and worker start."""
    doomed: list[Path] = []
    doomed += _stale_in(layout.root, recursive=False)  # metrics.prom, daemon.json, ...
    doomed += _stale_in(layout.accepted, recursive=False)  # half-copied takes
    doomed += _stale_in(layout.rejected, recursive=False)  # reports; never inside rejected dirs
    doomed += _stale_in(layout.logs, recursive=False)
    doomed += _stale_in(layout.jobs, recursive=True)  # exports, checkpoints, fused, holdouts
    doomed += _dead_genai_caches(tmp_dir, now)

    removed = [p for p in doomed if remove_path(p)]
    if removed:
        log.info("removed %d stale temp file(s) left by an earlier run", len(removed), extra={"paths": [str(p) for p in removed]})
    return removed


def remove_dead_genai_caches(tmp_dir: str | os.PathLike | None = None) -> list[Path]:
    """Remove the genai builder caches of processes that are gone (a killed base preparation's
    export) from the system temp dir (tmp_dir); those of running processes stay."""
    return [p for p in _dead_genai_caches(tmp_dir, None) if remove_path(p)]


def _dead_genai_caches(tmp_dir: str | os.PathLike | None, now: float | None) -> list[Path]:
    doomed: list[Path] = []
    tmp_root = Path(tmp_dir if tmp_dir is not None else tempfile.gettempdir())
    now = time.time() if now is None else now
    try:
        entries = list(os.scandir(tmp_root))
    except OSError:
        entries = []
    for entry in entries:
        m = _GENAI_CACHE.match(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False):
            continue
        if m.group(1) is not None:
            if pid_alive(int(m.group(1))):
                continue  # an export running now (or a reused pid: left for a later start)
        else:
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < LEGACY_CACHE_MAX_AGE:
                    continue
            except FileNotFoundError:
                continue
        doomed.append(Path(entry.path))
    return doomed
