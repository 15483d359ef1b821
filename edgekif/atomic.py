"""Crash-safe file writes: write to a temp file in the same directory, fsync, rename.

Clients and restarts depend on these files, so a reader sees either the old or the new
content, never a torn write.

Modes: mkstemp/mkdtemp create 0600/0700 whatever the umask, which would leave published
versions, manifests, metrics and reports unreadable to a client in the service's group.
Everything made here gets the mode an ordinary open()/mkdir() would get: 0666 & ~umask for
files, 0777 & ~umask for directories (0640/0750 under systemd's UMask=0027, 0644/0755 under
0022). See process_umask() for how the umask is read without a race.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

_UMASK_LOCK = threading.Lock()


def _umask_by_syscall() -> int:
    # os.umask() can only be read by setting it; the lock keeps two of our readers apart, but
    # a file created by another thread in between would get 0o022. Used only where
    # /proc/self/status has no Umask line (non-Linux, kernels < 4.7), once, at import.
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


_UMASK_AT_IMPORT = _umask_by_syscall()


def process_umask() -> int:
    """The process umask now. Linux: read from /proc/self/status (no race with threads that
    create files, and sees umask changes made later); elsewhere: the umask at import."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def file_mode() -> int:
    """Mode an ordinary new file gets: 0666 & ~umask."""
    return 0o666 & ~process_umask()


def dir_mode() -> int:
    """Mode an ordinary new directory gets: 0777 & ~umask."""
    return 0o777 & ~process_umask()


def mkstemp_public(dir: str | os.PathLike, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """tempfile.mkstemp, then the umask-derived mode instead of 0600 (the file is renamed into
    a place clients read)."""
    fd, tmp = tempfile.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    try:
        os.fchmod(fd, file_mode())
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return fd, tmp


def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory so a rename inside it survives power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = mkstemp_public(path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def apply_default_modes(root: str | os.PathLike) -> None:
    """Give root and everything under it the umask-derived modes (symlinks untouched).

    For trees copied from elsewhere (copytree keeps the source's modes, e.g. an export built
    by an older version with 0700/0600), before they are published to clients."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for name in filenames:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                os.chmod(p, fmode)


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file and directory under root (before renaming the tree into place)."""
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            p = os.path.join(dirpath, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a directory in a temp sibling `.NAME.PID.RAND.tmp`, then fsync it and rename it
    to `final`.

    On error the temp directory is removed and `final` is untouched. A process killed inside
    (SIGKILL, power cut) leaves the temp behind: remove_dead_temps clears it.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # The pid in the name lets a later process tell a crashed build from one running now
    # (remove_dead_temps): caches are shared by processes that hold no common lock.
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.{os.getpid()}.", suffix=".tmp"))
    try:
        os.chmod(tmp, dir_mode())  # mkdtemp's 0700 would survive the rename
        yield tmp
        fsync_tree(tmp)
        if final.exists():
            if not overwrite:
                raise FileExistsError(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# The names this module's temps take, for whoever cleans up after a crash (remove_dead_temps
# here, service.housekeeping for the data dir). RAND is tempfile's 8 of [a-z0-9_].
# Any temp: ".NAME.RAND.tmp" (atomic_write_*, and any mkstemp(prefix=".NAME.", suffix=".tmp")),
# or atomic_dir's ".NAME.PID.RAND.tmp" (".NAME.RAND.tmp" before the pid was added).
TEMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
_DIR_TMP = re.compile(r"^\..+\.(\d+)\.[a-z0-9_]{8}\.tmp$")  # atomic_dir's, with its pid
# The old folder atomic_dir(overwrite=True) parks while swapping: ".NAME.old-PID".
PARKED_NAME = re.compile(r"^\..+\.old-(\d+)$")
STALE_AFTER = 24 * 3600.0  # no build here takes a day: a temp this old is stale whatever its pid says


def remove_dead_temps(folder: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """Remove the temp folders and files atomic_dir left in `folder` when its process died
    mid-build (a conversion killed with the preparation, a power cut): those whose pid is not
    running, or is this process's own (the caller is not building here: it is about to), or
    that are older than STALE_AFTER; temps named before the pid was added only by age. A temp
    of a live process is left alone, so a shared cache can be cleaned while another process
    builds in it (pids are this machine's: containers with pid namespaces of their own must not
    share a cache). Returns what was removed."""
    import time

    from .children import pid_alive

    now = time.time() if now is None else now
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _DIR_TMP.match(entry.name) or PARKED_NAME.match(entry.name)
        if m is None and not TEMP_NAME.match(entry.name):
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        pid = int(m.group(1)) if m is not None else None
        if age < STALE_AFTER and (pid is None or (pid != os.getpid() and pid_alive(pid))):
            continue
        path = Path(entry.path)
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path)
            else:
                path.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            continue  # not ours to remove (another user's): left for its owner
        removed.append(path)
    return removed
