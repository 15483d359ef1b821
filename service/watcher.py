"""The inbox: notice new files, wait until they are complete, take or reject them.

A file is taken only once it looks finished: regular file, acceptable name, size and mtime
unchanged across `service.quiet_seconds`, and no process we can see holds it open for writing
(open_writers(): /proc/*/fd). Writers that cannot guarantee that should write `name.tmp` (or a
dot-file) and rename it when done: those names are ignored.

What is taken is a copy: the file is hashed while it is copied into a temp file in accepted/,
and that copy (nobody else has it open) is renamed into place, so the recorded sha256 is the
hash of exactly the bytes later stages read. The inbox file is removed only if it is still
the inode that was copied, unchanged; otherwise the copy is dropped and the file waits again.

inotify (watchdog) only wakes the scanner up; the scan itself decides. A startup scan and a
periodic scan (`service.scan_interval`) catch anything inotify missed (overflow, files that
were there before the daemon started, file systems without inotify).

Nothing in the inbox is ever followed or opened unless it is a regular file with one link:
symlinks, directories, FIFOs, sockets, devices and hard links (a regular file with more than
one name, possibly outside the data dir) are moved to rejected/ as they are (os.rename moves
the link, not its target), with a NAME.error.json report beside them.

Sidecars (`NAME.task.toml`, edgekif.tasks) are not tasks: the scan never takes one on its
own. When it takes `NAME.<ext>`, a sidecar present beside it then is copied into accepted/
under the task file's accepted name (`<sha12>_NAME.task.toml`) before the job is queued, and
removed from the inbox with it. A sidecar without its file waits, listed as ignored (status),
until its file comes; one dropped after its file was taken stays there, ignored.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import stat
import threading
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from edgekif.atomic import atomic_write_bytes, atomic_write_json, fsync_dir, mkstemp_public, sha256_file
from edgekif.layout import DataLayout, is_sidecar_name, sidecar_of
from edgekif.tasks import MAX_SIDECAR_BYTES

from .jobs import DuplicateFile, JobStore, utc_now

if TYPE_CHECKING:
    from edgekif.config import Config

log = logging.getLogger(__name__)

IGNORED_SUFFIXES = (b".tmp", b".part", b".partial", b".swp", b"~")
NAME_MAX = 255  # bytes, ext4/xfs/btrfs
FAILED_ENTRY_RETRY_SECONDS = 60
_ERROR_SUFFIX = ".error.json"


def is_ignored(name: bytes) -> bool:
    """Dot-files, in-progress names and sidecars: not taken as tasks (yet, or ever)."""
    return name.startswith(b".") or name.endswith(IGNORED_SUFFIXES) or is_sidecar_name(name)


def ignored_inbox_entries(layout: DataLayout) -> list[str]:
    """Display names of inbox entries ignored as "in progress" (dot-files, .tmp/.part/...
    names) or as sidecars waiting for their task file, sorted. They wait, untouched; `status`
    shows them so a writer that forgot the rename (or the task file) is noticed."""
    try:
        with os.scandir(os.fsencode(layout.inbox)) as it:
            return sorted(display_name(e.name) for e in it if is_ignored(e.name))
    except FileNotFoundError:
        return []


def _user() -> str:
    """The daemon's user, for messages: name and uid."""
    import pwd

    uid = os.geteuid()
    try:
        return f"user {pwd.getpwuid(uid).pw_name}, uid {uid}"
    except KeyError:
        return f"uid {uid}"


def name_problem(name: bytes) -> str | None:
    """Why this name is refused, or None if it is acceptable."""
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return "file name is not valid UTF-8"
    if ".." in text:
        return "file name contains '..'"
    if "/" in text or "\\" in text:
        return "file name contains a path separator"
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in text):
        return "file name contains control characters"
    return None


def display_name(name: bytes) -> str:
    """The name as a printable string for reports (control chars and bad bytes escaped)."""
    text = name.decode("utf-8", "backslashreplace")
    return "".join(ch if unicodedata.category(ch) not in ("Cc", "Cf", "Zl", "Zp") else f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}" for ch in text)


def safe_name(name: bytes | str) -> str:
    """A harmless file name for rejected/: bad bytes, control chars and separators -> '_'."""
    text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
    text = "".join("_" if (unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs") or ch in "/\\") else ch for ch in text)
    text = text.lstrip(".") or "unnamed"
    return _fit(text, NAME_MAX - len(_ERROR_SUFFIX) - 8)


def _fit(name: str, max_bytes: int) -> str:
    """Shorten a name to max_bytes of UTF-8, keeping its extension."""
    if len(name.encode()) <= max_bytes:
        return name
    stem, dot, ext = name.rpartition(".")
    if not dot or len(ext.encode()) > 16:
        stem, ext = name, ""
    suffix = f".{ext}" if ext else ""
    budget = max_bytes - len(suffix.encode())
    return stem.encode()[:budget].decode("utf-8", "ignore") + suffix


def accepted_name(sha256: str, name: str) -> str:
    return _fit(f"{sha256[:12]}_{name}", NAME_MAX)


def unique_rejected_dest(folder: Path, base: str, display: str) -> Path:
    """folder/base, or base-1, base-2, ... A report whose file never arrived (a crash between
    writing the report and the rename) is reused for the same file name."""
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem:
        stem, ext = base, ""
    n = 0
    while True:
        name = base if n == 0 else f"{stem}-{n}" + (f".{ext}" if ext else "")
        dest = folder / name
        report = folder / (name + _ERROR_SUFFIX)
        if not os.path.lexists(dest):
            if not os.path.lexists(report):
                return dest
            try:
                if json.loads(report.read_text()).get("file") == display:
                    return dest
            except (OSError, ValueError):
                pass
        n += 1


def move_to_rejected(
    layout: DataLayout,
    src: str | bytes | os.PathLike,
    *,
    name: bytes | str,
    error: dict[str, Any],
    sha256: str | None = None,
    received_at: str | None = None,
    dest: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write rejected/NAME.error.json (atomically), then move src to rejected/NAME.

    The report goes first: after a crash in between, the next scan rejects the file again
    and unique_rejected_dest() reuses the orphaned report's name.
    """
    display = display_name(name) if isinstance(name, bytes) else name
    layout.rejected.mkdir(parents=True, exist_ok=True)
    if dest is None:
        dest = unique_rejected_dest(layout.rejected, safe_name(name), display)
    error = dict(error)
    if error.get("file") is not None and os.fsdecode(error["file"]) == os.fsdecode(src):
        error["file"] = str(dest)  # the report names where the file is now, not where it was read
    report = {
        "file": display,  # the name it was dropped with
        "path": str(dest),
        "sha256": sha256,
        "received_at": received_at or utc_now(),
        "error": error,
        **(extra or {}),
    }
    atomic_write_json(dest.with_name(dest.name + _ERROR_SUFFIX), report)
    os.rename(src, dest)
    fsync_dir(layout.rejected)
    src_parent = os.path.dirname(os.fsdecode(src)) or "."
    fsync_dir(src_parent)
    return dest


def _remove_if_taken(layout: DataLayout, path: Path, job_id: int, same: Callable[[os.stat_result], bool]) -> bool:
    """Remove an inbox file a finished take copied, if it is still the bytes taken (`same`).
    True when it is gone (removed now, or already); False when it stays (other bytes, not a
    plain file, or a sticky inbox where the daemon may not remove another user's file)."""
    try:
        st = os.lstat(path)
        if not (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and same(st)):
            return False
        os.unlink(path)
        fsync_dir(layout.inbox)
    except FileNotFoundError:
        return True
    except ValueError:
        return False
    except OSError as e:
        log.warning("could not remove %s from the inbox after taking it: %s", path.name, e.strerror, extra={"file": path.name, "job_id": job_id})
        return False
    return True


def reconcile_takes(layout: DataLayout, store: JobStore) -> list[int]:
    """Finish or forget takes that a crash, or an error after the row was written (a full
    disk, an inbox file that could not be removed), interrupted: files rows still 'taking'.
    Run at start-up and before each scan (only the scan writes such rows, so any it finds
    then are left over). Returns the ids of the jobs it queued."""
    queued: list[int] = []
    for f in store.files("taking"):
        if os.path.lexists(f.path):
            job_id = store.finish_take(f.id)
            queued.append(job_id)
            log.info("finished an interrupted take", extra={"file": f.name, "job_id": job_id})
            # The copy was renamed into accepted/ but the crash came before the inbox file was
            # removed: remove it now if it holds the same bytes (else it would come back as a
            # duplicate). Different bytes (written after the copy) stay and are taken anew.
            # Its sidecar too, if it is the one copied and its file went: left there, it would be
            # applied to the next file dropped under that name (a file rewritten meanwhile keeps
            # its sidecar, to be taken with it).
            left = layout.inbox / f.name
            if _remove_if_taken(layout, left, job_id, lambda st: st.st_size == f.size and sha256_file(left) == f.sha256):
                side, copied = Path(sidecar_of(left)), Path(sidecar_of(f.path))
                _remove_if_taken(layout, side, job_id, lambda st: copied.is_file() and side.read_bytes() == copied.read_bytes())
        else:
            # Never renamed: the file is still in inbox/ (the next scan takes it) or gone.
            store.forget_take(f.id)
            log.info("forgot an interrupted take", extra={"file": f.name, "still_in_inbox": (layout.inbox / f.name).exists()})
    return queued


def open_writers(st: os.stat_result, name: bytes, *, proc: str = "/proc") -> list[int] | None:
    """Pids that hold the file (st_dev, st_ino) open for writing, or None if /proc is unusable.

    Only processes whose /proc/PID/fd we may read are seen: all of them as root, else those
    of our own user (another user's fds need ptrace access). Unseen writers are left to the
    quiet period. Each fd is matched by readlink first (no call into the file's file system,
    so an fd on a hung NFS mount cannot block the scan), then by stat.
    """
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return None
    suffix = b"/" + name
    found: list[int] = []
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd".encode()
        try:
            fds = os.listdir(fd_dir)
        except OSError:  # exited, or not ours to inspect
            continue
        for fd in fds:
            link = fd_dir + b"/" + fd
            try:
                if not os.readlink(link).endswith(suffix):
                    continue
                s = os.stat(link)
                if (s.st_dev, s.st_ino) != (st.st_dev, st.st_ino):
                    continue
                with open(f"{proc}/{pid}/fdinfo/{fd.decode()}", "rb") as f:
                    flags = next(int(line.split()[1], 8) for line in f if line.startswith(b"flags:"))
            except (OSError, ValueError, StopIteration):
                continue
            if flags & os.O_ACCMODE in (os.O_WRONLY, os.O_RDWR):
                found.append(int(pid))
                break
    return found


def _kind_of(mode: int) -> str | None:
    """None for a regular file, else what it is (these are rejected without being opened)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    return "special"


def _unlink_quietly(path: str | None) -> None:
    if path is not None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def _drop_shutdown_race(record: logging.LogRecord) -> bool:
    return "called when the thread is inactive" not in record.getMessage()


def _quiet_watchdog_shutdown_race() -> None:
    """watchdog's inotify emitter logs an ERROR when an event races its own stop(); that is
    harmless, and an ERROR on every clean shutdown would send operators looking for a fault."""
    wd_log = logging.getLogger("watchdog.observers.inotify")
    if _drop_shutdown_race not in wd_log.filters:
        wd_log.addFilter(_drop_shutdown_race)


@dataclass
class _Seen:
    key: tuple[int, int, int]  # size, mtime_ns, inode
    since: float  # monotonic time the key was first seen


class InboxWatcher:
    """Scans inbox/ and takes complete files. `scan_once()` is the whole decision; `run()`
    repeats it on inotify wake-ups, when a waiting file may have become quiet, and every
    scan_interval. Uses its own JobStore (connections are per thread)."""

    def __init__(
        self,
        layout: DataLayout,
        config: "Config",
        *,
        on_new_job: Callable[[int], None] | None = None,
    ) -> None:
        self.layout = layout
        self.config = config  # replaced by the daemon on SIGHUP; read at each scan
        self.on_new_job = on_new_job
        self._store: JobStore | None = None
        self._store_thread: int | None = None
        self._seen: dict[bytes, _Seen] = {}
        self._wake = threading.Event()
        self._ignored: set[bytes] = set()  # ignored names already logged
        self._busy_logged: set[bytes] = set()  # names logged as open for writing
        self._failing: dict[bytes, float] = {}  # entries whose take raised: monotonic time of the next try
        self.last_scan: float | None = None  # monotonic; the daemon's health check reads it
        self.observer_running = False

    @property
    def store(self) -> JobStore:
        # sqlite connections belong to the thread that opened them; scan_once() may be
        # called from a test's thread or from run()'s thread.
        me = threading.get_ident()
        if self._store is None or self._store_thread != me:
            self._store = JobStore(self.layout.state_db)
            self._store_thread = me
        return self._store

    def close(self) -> None:
        if self._store is not None and self._store_thread == threading.get_ident():
            self._store.close()
        self._store = None

    def wake(self) -> None:
        self._wake.set()

    # ---- one scan ---------------------------------------------------------------------

    def scan_once(self) -> float | None:
        """Look at every inbox entry once. Returns seconds until a waiting file may be quiet
        (when to scan again), or None if nothing is waiting."""
        svc = self.config.service
        quiet = svc.quiet_seconds
        inbox = os.fsencode(self.layout.inbox)
        self.layout.inbox.mkdir(parents=True, exist_ok=True)
        for job_id in reconcile_takes(self.layout, self.store):  # a take an error cut short
            if self.on_new_job is not None:
                self.on_new_job(job_id)
        entries: list[tuple[int, bytes, os.stat_result]] = []
        ignored: set[bytes] = set()
        with os.scandir(inbox) as it:
            for entry in it:
                if is_ignored(entry.name):
                    ignored.add(entry.name)
                    continue
                try:
                    st = os.lstat(entry.path)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime_ns, entry.name, st))
        entries.sort()  # arrival order (mtime, then name) decides job order
        for name in sorted(ignored - self._ignored):  # once per name: it may wait for hours
            if is_sidecar_name(name) and not name.startswith(b"."):
                log.info("ignoring %s: a task's sidecar, taken only with its task file", display_name(name), extra={"file": display_name(name)})
            else:
                log.info("ignoring %s until it is renamed (in-progress name)", display_name(name), extra={"file": display_name(name)})
        self._ignored = ignored

        now = time.monotonic()
        due: float | None = None
        present: set[bytes] = set()
        for _mtime, name, st in entries:
            present.add(name)
            if now < self._failing.get(name, now):
                continue  # failed a moment ago: tried again after FAILED_ENTRY_RETRY_SECONDS
            try:
                wait = self._consider(os.path.join(inbox, name), name, st, now, quiet)
            except Exception as e:
                # One entry that cannot be taken or moved (EIO, a file another user owns in a
                # sticky inbox) must not stop the scan: the files after it go on being taken.
                if name not in self._failing:
                    log.warning("could not take or reject %s; trying again every %d s", display_name(name), FAILED_ENTRY_RETRY_SECONDS,
                                extra={"file": display_name(name), "error": f"{type(e).__name__}: {e}"}, exc_info=e)
                self._failing[name] = now + FAILED_ENTRY_RETRY_SECONDS
                self._seen.pop(name, None)
                continue
            self._failing.pop(name, None)
            if wait is not None:
                due = wait if due is None else min(due, wait)
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        self._failing = {n: t for n, t in self._failing.items() if n in present}
        self._busy_logged &= present
        self.last_scan = time.monotonic()
        return due

    def _consider(self, path: bytes, name: bytes, st: os.stat_result, now: float, quiet: float) -> float | None:
        """Reject, wait for or take one inbox entry. Returns seconds until it may be quiet,
        or None if it is not waiting."""
        svc = self.config.service
        kind = _kind_of(st.st_mode)
        if kind is not None:
            self._reject(path, name, {"kind": kind, "message": f"not a regular file ({kind}); not followed"})
            return None
        if st.st_nlink > 1:
            # Another name for the same inode, maybe outside the data dir (a file the
            # writer could read but should not hand over): never read through it.
            self._reject(
                path, name,
                {"kind": "hard_link", "message": f"{display_name(name)} is a hard link ({st.st_nlink} links to one file); not read"},
            )
            return None
        problem = name_problem(name)
        if problem is not None:
            self._reject(path, name, {"kind": "bad_name", "message": problem})
            return None
        if st.st_size > svc.max_file_bytes:
            self._reject(
                path, name,
                {"kind": "too_large", "message": f"{st.st_size} bytes > service.max_file_bytes = {svc.max_file_bytes}"},
            )
            return None
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        seen = self._seen.get(name)
        if seen is None or seen.key != key:
            self._seen[name] = seen = _Seen(key, now)
            if quiet > 0:
                return quiet
        waited = now - seen.since
        if waited < quiet:
            return quiet - waited
        self._seen.pop(name, None)
        self._take(path, name, st)
        return None

    def _reject(self, path: bytes, name: bytes, error: dict[str, Any], sha256: str | None = None) -> None:
        self._seen.pop(name, None)
        try:
            dest = move_to_rejected(self.layout, path, name=name, error=error, sha256=sha256)
        except FileNotFoundError:
            return  # gone meanwhile: nothing to reject
        self.store.log_event(None, "inbox_rejected", file=display_name(name), path=str(dest), **error)
        log.warning("rejected %s: %s", display_name(name), error["message"], extra={"file": display_name(name), "reason": error["kind"], "rejected_path": str(dest)})

    def _take(self, path: bytes, name: bytes, st: os.stat_result) -> int | None:
        """Copy (hashing) into accepted/, record as 'taking', rename the copy into place,
        remove the inbox file if unchanged, mark taken + queue the job.

        Returns None when the file must be observed again (changed, or open for writing)."""
        try:
            # O_NOFOLLOW/O_NONBLOCK: if the entry was swapped for a symlink or FIFO since the
            # lstat, fail (or at least never block) instead of following it.
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            if e.errno == errno.ELOOP:
                return None  # became a symlink: the next scan rejects it
            if e.errno in (errno.EACCES, errno.EPERM):
                # A file the daemon's user may not read (dropped with mode 600 into a shared
                # inbox): it can never be taken as it is, so it goes aside with a report.
                self._reject(path, name, {"kind": "unreadable", "message": (
                    f"the daemon ({_user()}) may not read {display_name(name)}: {e.strerror}; "
                    "make it readable (chmod a+r, or give it the daemon's group) and drop it again")})
                return None
            raise
        tmp: str | None = None
        try:
            before = os.fstat(fd)
            if (not stat.S_ISREG(before.st_mode) or before.st_ino != st.st_ino or before.st_nlink != 1
                    or before.st_size != st.st_size or before.st_mtime_ns != st.st_mtime_ns):
                return None  # changed since the quiet check: observe again
            writers = open_writers(before, name)
            if writers:
                # Quiet but still open for writing (a slow writer): wait for the close.
                if name not in self._busy_logged:
                    self._busy_logged.add(name)
                    log.info("waiting for %s: open for writing by pid %s", display_name(name), writers[0], extra={"file": display_name(name), "pids": writers})
                return None
            self.layout.accepted.mkdir(parents=True, exist_ok=True)
            tfd, tmp = mkstemp_public(self.layout.accepted, prefix=".take.", suffix=".tmp")
            h = hashlib.sha256()
            copied = 0
            with os.fdopen(tfd, "wb") as out:
                while block := os.read(fd, 1 << 20):
                    copied += len(block)
                    if copied > before.st_size:
                        break  # growing: observe again
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            after = os.fstat(fd)
        except BaseException:
            if tmp is not None:
                _unlink_quietly(tmp)
            raise
        finally:
            os.close(fd)
        if copied != before.st_size or after.st_size != before.st_size or after.st_mtime_ns != before.st_mtime_ns:
            _unlink_quietly(tmp)
            return None  # still being written after all
        sha = h.hexdigest()
        text = name.decode("utf-8")
        received_at = utc_now()
        dest = self.layout.accepted / accepted_name(sha, text)
        n = 1
        while os.path.lexists(dest):  # only a stray file put there by hand can collide
            dest = self.layout.accepted / accepted_name(sha, f"{n}_{text}")
            n += 1
        try:
            file_id = self.store.begin_take(text, sha, before.st_size, received_at, str(dest))
        except DuplicateFile as dup:
            _unlink_quietly(tmp)
            error = {
                "kind": "duplicate",
                "message": f"same content as {dup.name!r}"
                + (f" (job {dup.job.id}, {dup.job.state})" if dup.job else "")
                + "; a file is never trained twice",
            }
            try:
                rejected = move_to_rejected(self.layout, path, name=name, error=error, sha256=sha, received_at=received_at)
            except FileNotFoundError:
                return None
            job_id = self.store.record_duplicate(text, sha, dup, str(rejected))
            log.warning("duplicate %s: %s", text, error["message"], extra={"file": text, "job_id": job_id, "sha256": sha})
            return None
        except BaseException:
            _unlink_quietly(tmp)
            raise
        try:  # the sidecar first: once the task's copy is in accepted/, its sidecar is too
            sidecar = self._copy_sidecar(name, sidecar_of(dest))
        except BaseException:
            _unlink_quietly(tmp)
            self.store.forget_take(file_id)
            raise
        os.rename(tmp, dest)  # the accepted file appears complete, with the recorded bytes
        fsync_dir(self.layout.accepted)
        return self._finish_take(path, text, sha, before, dest, file_id, sidecar)

    def _finish_take(self, path: bytes, text: str, sha: str, before: os.stat_result, dest: Path, file_id: int,
                     sidecar: tuple[bytes, Path] | None) -> int | None:
        """The copy is in accepted/: finish the take (job queued), or undo it if the inbox file
        changed meanwhile."""
        # Remove the inbox file only if it is still what was copied. A write that landed after
        # the copy (a writer we could not see) undoes the take: the file waits again, whole.
        try:
            now = os.lstat(path)
            unchanged = (now.st_ino, now.st_size, now.st_mtime_ns, now.st_nlink) == (before.st_ino, before.st_size, before.st_mtime_ns, 1)
        except FileNotFoundError:
            now, unchanged = None, False
        if not unchanged:
            os.unlink(dest)
            if sidecar is not None:
                _unlink_quietly(str(sidecar[1]))
            fsync_dir(self.layout.accepted)
            self.store.forget_take(file_id)
            log.info("%s changed while it was being taken; waiting again", text, extra={"file": text})
            return None
        os.unlink(path)
        if sidecar is not None:
            _unlink_quietly(sidecar[0])  # it went with its file (a copy is in accepted/)
        fsync_dir(self.layout.inbox)
        job_id = self.store.finish_take(file_id)
        log.info("file taken", extra={"file": text, "job_id": job_id, "sha256": sha, "size": before.st_size})
        if self.on_new_job is not None:
            self.on_new_job(job_id)
        return job_id

    def _copy_sidecar(self, name: bytes, dest: Path) -> tuple[bytes, Path] | None:
        """Copy the sidecar of task file `name` (inbox/NAME.task.toml), if one is there now,
        to `dest`; returns (its inbox path, dest), or None. Only a regular file with one link
        is read (as for task files); any other entry of that name is left where it is (the
        next scan does not take it, and validate judges the task without it). Of a sidecar
        larger than MAX_SIDECAR_BYTES only that much and one byte is copied: validate rejects
        it as too large, naming it (edgekif.tasks.read_sidecar)."""
        src = os.fsencode(sidecar_of(os.fsdecode(os.path.join(os.fsencode(self.layout.inbox), name))))
        try:
            fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # none there (or a symlink: never followed)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
                return None
            data = os.read(fd, MAX_SIDECAR_BYTES + 1)
        finally:
            os.close(fd)
        atomic_write_bytes(dest, data)
        log.info("sidecar taken with its task file", extra={"file": display_name(os.path.basename(src)), "path": str(dest)})
        return src, dest

    # ---- the loop -----------------------------------------------------------------------

    def _start_observer(self) -> Any:
        _quiet_watchdog_shutdown_race()
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer
        except ImportError:  # pragma: no cover
            log.warning("watchdog not installed; polling the inbox every scan_interval")
            return None

        watcher = self

        class _Wake(FileSystemEventHandler):
            def on_any_event(self, event: Any) -> None:
                if event.event_type in ("created", "moved", "modified", "closed"):
                    watcher.wake()

        observer = Observer()
        try:
            observer.schedule(_Wake(), str(self.layout.inbox), recursive=False)
            observer.daemon = True
            observer.start()
        except Exception as e:  # inotify limits, unsupported file system
            log.warning("inotify unavailable (%s); polling the inbox every scan_interval", e)
            return None
        self.observer_running = True
        return observer

    def run(self, stop: threading.Event) -> None:
        observer = self._start_observer()
        try:
            while not stop.is_set():
                self._wake.clear()
                try:
                    due = self.scan_once()
                except Exception:
                    log.exception("inbox scan failed")
                    due = None
                    self.last_scan = time.monotonic()
                interval = self.config.service.scan_interval
                timeout = interval if due is None else min(interval, max(due, 0.05))
                self._wake.wait(timeout)
                # Many inotify events arrive per write burst: coalesce them.
                if not stop.is_set():
                    time.sleep(0.02)
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.observer_running = False
            self.close()
