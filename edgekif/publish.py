"""Versioned, atomic publishing of verified exports under ROOT/models/.

Layout:
  models/v0001/, models/v0002/, ...   immutable version folders (an export + manifest.json)
  models/current -> v0002             relative symlink; swapped with one rename()

A reader resolves `current` once (os.path.realpath) and reads from that version folder, so it
sees one complete version even if `current` is switched meanwhile. A version folder appears
only complete (built as .v000N.tmp, fsynced, renamed), and `current` only ever points at a
version whose manifest was verified. One process publishes (an flock on models/.publish.lock
guards against a second one); any number of processes may read. Version folders and their
files get the umask-derived modes (0750/0640 under UMask=0027), whatever the export had.

gc(keep) deletes versions that are neither among the newest `keep` nor current; remove(name)
deletes one version that is not current (version numbers still only grow). A reader that
holds an old version across more than `keep` publishes may lose it: resolve `current` again.
open_current(root) does that and opens the version with the runner its target needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from .atomic import apply_default_modes, atomic_write_text, fsync_dir, fsync_tree
from .errors import IntegrityError, PublishError
from .export.files import MANIFEST
from .layout import CURRENT, DataLayout
from .export.manifest import read_manifest, record_published, verify_manifest

if TYPE_CHECKING:
    from .infer import Runner

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"^v(\d{4,})$")
LOCK_FILE = ".publish.lock"
LAST_VERSION_FILE = ".last-version"  # highest number ever published, kept when `remove` deletes the newest


def version_name(number: int) -> str:
    return f"v{number:04d}"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    created: str | None  # manifest "created" (UTC ISO)
    summary: dict[str, Any] = field(default_factory=dict)  # tasks, accuracies, export settings
    is_current: bool = False
    path: Path | None = None
    published: str | None = None  # Manifest.published_at: the time every listing shows

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "created": self.created, "published": self.published, "is_current": self.is_current, "path": str(self.path),
                **self.summary}


class ModelStore:
    """Published model versions under root/models/."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.models = DataLayout(self.root).models

    # ----------------------------------------------------------------- queries

    def versions(self) -> list[str]:
        """Complete version folder names, oldest first."""
        if not self.models.is_dir():
            return []
        found = []
        for entry in os.scandir(self.models):
            m = VERSION_RE.match(entry.name)
            if m and entry.is_dir(follow_symlinks=False):
                found.append((int(m.group(1)), entry.name))
        return [name for _, name in sorted(found)]

    def current(self) -> str | None:
        """Name of the version `current` points to, or None if nothing is published."""
        try:
            target = os.readlink(self.models / CURRENT)
        except (FileNotFoundError, OSError):
            return None
        name = os.path.basename(target.rstrip("/"))
        return name if VERSION_RE.match(name) and (self.models / name).is_dir() else None

    def path(self, version: str | None = None) -> Path:
        """Folder of `version` (default: current). Raises PublishError if it does not exist."""
        name = version or self.current()
        if name is None:
            raise PublishError(f"{self.models}: no version is published yet")
        if not VERSION_RE.match(name) or not (self.models / name).is_dir():
            raise PublishError(f"{self.models}: no version {name!r} (have {', '.join(self.versions()) or 'none'})")
        return self.models / name

    def list(self) -> list[VersionInfo]:
        cur = self.current()
        out = []
        for name in self.versions():
            try:
                manifest = read_manifest(self.models / name)
                created, published, summary = manifest.created, manifest.published_at, manifest.summary()
            except IntegrityError as e:
                created, published, summary = None, None, {"error": str(e)}
            out.append(VersionInfo(name=name, created=created, summary=summary, is_current=name == cur, path=self.models / name, published=published))
        return out

    # ----------------------------------------------------------------- changes

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        try:
            self.models.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.models / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise PublishError(f"{self.models}: cannot take the publish lock ({e.strerror}): run this as the daemon's user") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PublishError(f"{self.models}: another process is publishing (lock {LOCK_FILE} held)") from None
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def publish(self, export_dir: str | os.PathLike, *, keep: int | None = None, move: bool = False) -> str:
        """Copy (or move) a verified export in as the next version and make it current.

        The export's manifest is verified before anything is copied and again on the copy, so
        a corrupt export is refused with IntegrityError and `current` is left as it was.
        """
        export_dir = Path(export_dir)
        verify_manifest(export_dir)
        with self._lock():
            # A crash between the version's rename and the switch of `current` left this
            # export complete under its name already: finish the switch, never copy it twice.
            same = self._holding(export_dir)
            if same is not None:
                if self.current() != same:
                    self._switch(same)
                log.info("export already published; finished the switch", extra={"version": same, "source": str(export_dir)})
                return same
            existing = [int(VERSION_RE.match(n).group(1)) for n in self.versions()]  # type: ignore[union-attr]
            name = version_name(max(existing + [self._last_removed()], default=0) + 1)
            staging = self.models / f".{name}.tmp"
            shutil.rmtree(staging, ignore_errors=True)  # leftover of a crashed publish
            try:
                if move:
                    os.rename(export_dir, staging)  # same filesystem only; OSError otherwise
                else:
                    shutil.copytree(export_dir, staging, symlinks=False)
                # the publish time in the version's own manifest (not hashed: the files'
                # hashes stay valid), so every listing shows this one time; before the modes below
                record_published(staging)
                # copytree/rename keep the export's modes (0700/0600 from mkdtemp/mkstemp in
                # older exports); clients in the service's group must be able to read it.
                apply_default_modes(staging)
                fsync_tree(staging)
                verify_manifest(staging)  # the copy itself could be bad (disk full, I/O error)
                os.rename(staging, self.models / name)
                fsync_dir(self.models)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._switch(name)
            log.info("published model version", extra={"version": name, "source": str(export_dir)})
            if keep is not None:
                self._gc(keep)
        return name

    def rollback(self, version: str) -> str:
        """Point `current` at an existing version after verifying its files."""
        with self._lock():
            folder = self.path(version)
            verify_manifest(folder)
            self._switch(version)
        log.info("rolled back model version", extra={"version": version})
        return version

    def gc(self, keep: int) -> list[str]:
        """Delete versions beyond the newest `keep`, never the current one. Returns deleted names."""
        with self._lock():
            return self._gc(keep)

    def remove(self, version: str) -> None:
        """Delete one version folder; never the current one (roll back first).

        Only a `vNNNN` folder directly under models/ can go. It is renamed aside first, so a
        half-deleted folder never looks like a version. Version numbers keep growing after the
        newest one is removed (recorded in models/.last-version).
        """
        if not VERSION_RE.match(version or ""):
            raise PublishError(f"{version!r} is not a version name (vNNNN; see `edgekif models list`)")
        with self._lock():
            folder = self.path(version)
            if version == self.current():
                raise PublishError(f"{version} is the live version (models/current); roll back to another version before removing it")
            number = int(VERSION_RE.match(version).group(1))  # type: ignore[union-attr]
            if number > max(self._last_removed(), *(int(VERSION_RE.match(n).group(1)) for n in self.versions() if n != version), 0):  # type: ignore[union-attr]
                atomic_write_text(self.models / LAST_VERSION_FILE, f"{number}\n")
            trash = self.models / f".{version}.del-{os.getpid()}"
            os.rename(folder, trash)
            fsync_dir(self.models)
            shutil.rmtree(trash, ignore_errors=True)
        log.info("removed model version", extra={"version": version})

    def _holding(self, export_dir: Path) -> str | None:
        """The newest version whose manifest.json is the export's but for the publish time: the
        manifest hashes every file and records the job and its creation time, so equal content
        means this very export was published already (publish copies it unchanged, adds
        `published` and verifies the copy)."""
        want = self._manifest_json(export_dir)
        if want is None:
            return None
        want.pop("published", None)
        for name in reversed(self.versions()):
            have = self._manifest_json(self.models / name)
            if have is not None:
                have.pop("published", None)
                if have == want:
                    return name
        return None

    @staticmethod
    def _manifest_json(folder: Path) -> dict[str, Any] | None:
        import json

        try:
            d = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
        return d if isinstance(d, dict) else None

    def _last_removed(self) -> int:
        try:
            return int((self.models / LAST_VERSION_FILE).read_text().strip() or 0)
        except (FileNotFoundError, ValueError):
            return 0

    def _gc(self, keep: int) -> list[str]:
        if keep < 1:
            raise PublishError(f"gc keep={keep}: must keep at least one version")
        names = self.versions()
        cur = self.current()
        doomed = [n for n in names[: max(0, len(names) - keep)] if n != cur]
        for name in doomed:
            # Rename first so a half-deleted folder never looks like a version.
            trash = self.models / f".{name}.del-{os.getpid()}"
            os.rename(self.models / name, trash)
            shutil.rmtree(trash, ignore_errors=True)
        self._remove_stale()
        if doomed:
            fsync_dir(self.models)
            log.info("deleted old model versions", extra={"versions": doomed})
        return doomed

    def cleanup(self) -> list[str]:
        """Remove what crashed publishes left (staging, trash, `current.tmp-*` links); the
        daemon calls it at start-up. Skipped when another process is publishing now."""
        if not self.models.is_dir():
            return []
        try:
            with self._lock():
                return self._remove_stale()
        except PublishError:
            return []

    def _remove_stale(self) -> list[str]:
        """Under the lock: every temp name here is a crashed run's."""
        removed = []
        for entry in os.scandir(self.models):
            if entry.name.startswith(".v") and (entry.name.endswith(".tmp") or ".del-" in entry.name):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(entry.name)
            elif entry.name.startswith(f"{CURRENT}.tmp-") and entry.is_symlink():
                os.unlink(entry.path)
                removed.append(entry.name)
        if removed:
            fsync_dir(self.models)
            log.info("removed what crashed publishes left", extra={"names": removed})
        return removed

    def _switch(self, name: str) -> None:
        """Atomically repoint `current` (relative link, so the data dir can move)."""
        link = self.models / CURRENT
        tmp = self.models / f"{CURRENT}.tmp-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        os.symlink(name, tmp)
        os.replace(tmp, link)
        fsync_dir(self.models)


def resolve_current(root: str | os.PathLike) -> Path:
    """The real folder `root/models/current` points to now (resolve once, then read from it)."""
    link = DataLayout(Path(root)).current
    if not os.path.lexists(link):
        raise PublishError(f"{link}: no model published yet")
    real = Path(os.path.realpath(link))
    if not (real / MANIFEST).is_file():
        raise PublishError(f"{link} -> {real}: not a published version (no {MANIFEST})")
    return real


def open_current(root: str | os.PathLike, *, execution_provider: str | None = None) -> "Runner":
    """Open the version ROOT/models/current points to *now*.

    The link is resolved once, so the runner keeps reading one consistent version even if a
    publish switches `current` meanwhile. `runner.version` names it; reopen to pick up a new one.
    """
    from .infer import open_model

    folder = resolve_current(root)
    try:
        runner = open_model(folder, execution_provider=execution_provider)
    except FileNotFoundError as e:  # removed by gc between resolve and load: caller may retry
        raise PublishError(f"{folder}: version disappeared while opening it: {e}") from e
    runner.version = folder.name
    return runner


def open_version(root: str | os.PathLike, version: str, *, execution_provider: str | None = None) -> "Runner":
    """Open one kept version by name ("v0003"), live or not. PublishError if it is not kept."""
    from .infer import open_model

    folder = ModelStore(root).path(version)
    try:
        runner = open_model(folder, execution_provider=execution_provider)
    except FileNotFoundError as e:  # removed meanwhile
        raise PublishError(f"{folder}: version disappeared while opening it: {e}") from e
    runner.version = folder.name
    return runner
