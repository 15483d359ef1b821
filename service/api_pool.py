"""`edgekif api`'s loaded versions: the live one (what `current` names) and any kept version a
request pins by name, opened on demand.

  acquire(name) -> Slot    a lease on the version `name` asks for (None or "edgekif": the live one)
  release(slot)            end of the lease
  sweep()                  unload versions idle longer than keep_alive (a timer calls it)

A request holds its lease until its last token, so a request in flight finishes on the version
it started on. The live version stays loaded; another version is unloaded once it has been
idle for `keep_alive` seconds (at once if no request ever pinned it: it was live and was
replaced), or to make room when `max_loaded` versions are loaded. acquire() may open a version
(blocking): call it from a worker thread; release() and sweep() take a short lock only.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edgekif.errors import EdgekifError
from edgekif.layout import DataLayout
from edgekif.publish import VERSION_RE, ModelStore

from .api_params import ApiError

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Slot:
    """One opened version and the number of requests using it."""

    version: str
    runner: Any
    refs: int = 0
    last_used: float = 0.0
    pinned: bool = False  # some request asked for it by name: kept keep_alive seconds after use


class RunnerPool:
    def __init__(self, data_dir: str | os.PathLike, opener: Callable[[Path], Any] | None = None, *,
                 version_opener: Callable[[Path, str], Any] | None = None, keep_alive: float = 300.0, max_loaded: int = 3,
                 clock: Callable[[], float] = time.monotonic) -> None:
        from edgekif.publish import open_current, open_version

        self.data_dir = Path(data_dir)
        self.store = ModelStore(self.data_dir)
        self.link = DataLayout(self.data_dir).current
        self._open = opener or open_current  # opens the live version (resolves `current` itself)
        self._open_version = version_opener or open_version
        self.keep_alive, self.max_loaded, self._clock = keep_alive, max(1, max_loaded), clock
        self._load_lock = threading.Lock()  # one version opens at a time
        self._lock = threading.Lock()  # guards the slots, refs and _live; held only briefly
        self._slots: dict[str, Slot] = {}  # every loaded version (live, pinned, draining)
        self._live: str | None = None  # the version "edgekif" is served from
        # (version, link identity) that failed to open: not retried while an older one serves, until
        # the link changes (a rollback away and back is a change: every switch makes a new link)
        self._failed: tuple[str, tuple[int, int] | None] | None = None

    # ----------------------------------------------------------------- names

    def live_name(self) -> str | None:
        """The version `current` names now (one readlink), or None if nothing is published."""
        try:
            name = os.path.basename(os.readlink(self.link).rstrip("/"))
        except OSError:
            return None
        return name if VERSION_RE.match(name) else None

    def _link_id(self) -> tuple[int, int] | None:
        """The `current` link's identity: publish and rollback replace the link with a new one."""
        try:
            st = os.lstat(self.link)
        except OSError:
            return None
        return st.st_ino, st.st_ctime_ns

    def _still_failed(self, live: str | None) -> bool:
        """`live` failed to open and the link is the one it failed from (an lstat only then)."""
        failed = self._failed
        return failed is not None and live == failed[0] and self._link_id() == failed[1]

    def serving(self) -> str | None:
        """The version "edgekif" answers from now (None before the first request)."""
        with self._lock:
            return self._live

    def open_versions(self) -> list[str]:
        with self._lock:
            return sorted(self._slots)

    def loaded(self) -> list[dict[str, Any]]:
        with self._lock:
            return [{"version": s.version, "live": s.version == self._live, "in_use": s.refs} for s in sorted(self._slots.values(), key=lambda s: s.version)]

    def _check_kept(self, name: str) -> None:
        if (self.store.models / name).is_dir():
            return
        kept = self.store.versions()
        newest = max((int(VERSION_RE.match(v).group(1)) for v in kept), default=0)  # type: ignore[union-attr]
        number = int(VERSION_RE.match(name).group(1))  # type: ignore[union-attr]
        why = "was removed" if number < newest else "has not been published"
        raise ApiError(404, f"The model `edgekif:{name}` does not exist: version {name} {why} (kept: {', '.join(kept) or 'none'})",
                       param="model", code="model_not_found")

    # ----------------------------------------------------------------- leases

    def acquire(self, version: str | None = None) -> Slot:
        """A lease on `version` (a "vNNNN" name), or on the live version when None."""
        live = self.live_name()
        if version is not None and version != live:
            return self._acquire_pinned(version)
        if self._failed is not None and live != self._failed[0]:
            # the link moved off the failed version: moving back to it is a new publish, retried
            # even if its new link happened to reuse the old one's inode and timestamp
            self._failed = None
        failed = self._still_failed(live)
        with self._lock:  # fast path: the live version is loaded and still live
            slot = self._slots.get(self._live) if self._live else None
            if slot is not None and (live is None or live == self._live or failed):
                return self._lease(slot, pinned=version is not None)
        with self._load_lock:
            if live is not None and not self._still_failed(live) and live != self.serving():
                self._switch(live)
            with self._lock:
                slot = self._slots.get(self._live) if self._live else None
                if slot is None:
                    raise ApiError(503, f"{self.link}: no model version is published yet", type="server_error", code="model_not_available")
                return self._lease(slot, pinned=version is not None)

    def _acquire_pinned(self, name: str) -> Slot:
        self._check_kept(name)
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None:
                return self._lease(slot, pinned=True)
        with self._load_lock:
            with self._lock:
                slot = self._slots.get(name)
                if slot is not None:
                    return self._lease(slot, pinned=True)
                self._make_room(for_live=False)
            t0 = time.perf_counter()
            try:
                runner = self._open_version(self.data_dir, name)
            except (EdgekifError, OSError) as e:
                self._check_kept(name)  # removed meanwhile: 404
                log.error("cannot open a pinned version", extra={"version": name, "error": str(e)})
                raise ApiError(500, f"cannot open version {name}: {e}", type="server_error", code="model_not_available") from e
            with self._lock:
                slot = self._slots[name] = Slot(version=name, runner=runner)
                log.info("loaded model version", extra={"version": name, "open_s": round(time.perf_counter() - t0, 3), "live": False})
                return self._lease(slot, pinned=True)

    def _lease(self, slot: Slot, *, pinned: bool) -> Slot:
        """(caller holds _lock)"""
        slot.refs += 1
        slot.pinned = slot.pinned or pinned
        slot.last_used = self._clock()
        return slot

    def release(self, slot: Slot) -> None:
        with self._lock:
            slot.refs -= 1
            slot.last_used = self._clock()
            if self._idle_expired(slot, self._clock()):
                self._close(slot)

    def sweep(self) -> list[str]:
        """Unload the versions idle past keep_alive, and those whose folder was removed."""
        now = self._clock()
        with self._lock:
            gone = [s for s in self._slots.values() if self._idle_expired(s, now)
                    or (s.refs == 0 and s.version != self._live and not (self.store.models / s.version).is_dir())]
            for s in gone:
                self._close(s)
        return [s.version for s in gone]

    def close(self) -> None:
        with self._lock:
            for slot in list(self._slots.values()):
                self._close(slot)
            self._live = None

    # ----------------------------------------------------------------- loading and unloading

    def _idle_expired(self, slot: Slot, now: float) -> bool:
        if slot.refs > 0 or slot.version == self._live:
            return False
        return not slot.pinned or now - slot.last_used >= self.keep_alive

    def _make_room(self, *, for_live: bool) -> None:
        """Unload idle versions, least recently used first, until one more fits (caller holds _lock).
        A pinned version that finds every slot busy is refused (503); the live one always loads."""
        while len(self._slots) >= self.max_loaded:
            idle = [s for s in self._slots.values() if s.refs == 0 and s.version != self._live]
            if not idle:
                if for_live:
                    return
                raise ApiError(503, f"{len(self._slots)} versions are loaded and in use (the bound is {self.max_loaded}); retry shortly",
                               type="server_error", code="model_busy", headers={"Retry-After": "1"})
            self._close(min(idle, key=lambda s: s.last_used))

    def _switch(self, target: str) -> None:
        """Make `target` the live version (caller holds _load_lock)."""
        with self._lock:
            if target in self._slots:  # already loaded (pinned earlier): no second copy
                self._set_live(target)
                return
            self._make_room(for_live=True)
        t0 = time.perf_counter()
        link_id = self._link_id()  # before the open: a link replaced meanwhile is tried again
        try:
            runner = self._open(self.data_dir)  # resolves the link again: may be newer than target
        except (EdgekifError, OSError) as e:
            self._failed = (target, link_id)
            log.error("cannot open the published version; serving the previous one", extra={"version": target, "error": str(e),
                      "serving": self.serving()})
            return
        self._failed = None
        name = str(runner.version)
        with self._lock:
            if name in self._slots:  # the link moved to a loaded version meanwhile
                close = getattr(runner, "close", None)
                if callable(close):
                    close()
            else:
                self._slots[name] = Slot(version=name, runner=runner, last_used=self._clock())
            previous = self._set_live(name)
        log.info("serving model version", extra={"version": name, "previous": previous, "open_s": round(time.perf_counter() - t0, 3)})

    def _set_live(self, name: str) -> str | None:
        """(caller holds _lock) The old live version is unloaded now if nothing uses or pinned it."""
        previous, self._live = self._live, name
        old = self._slots.get(previous) if previous else None
        if old is not None and self._idle_expired(old, self._clock()):
            self._close(old)
        return previous

    def _close(self, slot: Slot) -> None:
        """Drop a runner no request uses (caller holds _lock); onnxruntime frees it with the last reference."""
        if self._slots.get(slot.version) is not slot:
            return
        del self._slots[slot.version]
        close = getattr(slot.runner, "close", None)
        if callable(close):
            close()
        slot.runner = None
        log.info("closed model version", extra={"version": slot.version})
