"""service/api_pool.py with fake runners: pinned versions load on demand, unload after keep_alive
idle seconds or to respect max_loaded, never disturb the live one; a removed version is a 404."""

from __future__ import annotations

import os
import shutil

import pytest

from service.api_params import ApiError
from service.api_pool import RunnerPool


class FakeRunner:
    def __init__(self, version: str) -> None:
        self.version, self.closed = version, False

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture()
def root(tmp_path):
    models = tmp_path / "models"
    for v in ("v0001", "v0002", "v0003", "v0004"):
        (models / v).mkdir(parents=True)
    os.symlink("v0004", models / "current")
    return tmp_path


def make_pool(root, clock, **kw) -> tuple[RunnerPool, list[str]]:
    opened: list[str] = []

    def live(data_dir):
        name = os.readlink(data_dir / "models" / "current")
        opened.append(name)
        return FakeRunner(name)

    def pinned(data_dir, name):
        opened.append(name)
        return FakeRunner(name)

    return RunnerPool(root, live, version_opener=pinned, clock=clock, **kw), opened


def test_pinned_versions_load_on_demand_and_unload_after_keep_alive(root):
    clock = Clock()
    pool, opened = make_pool(root, clock, keep_alive=10, max_loaded=3)
    live = pool.acquire()
    assert live.version == "v0004"
    old = pool.acquire("v0001")
    assert old.version == "v0001" and pool.serving() == "v0004"  # the live version is unchanged
    pool.release(old)
    pool.release(live)
    again = pool.acquire("v0001")
    assert again is old and opened == ["v0004", "v0001"]  # still loaded: not opened twice
    pool.release(again)
    clock.t = 9
    assert pool.sweep() == [] and pool.open_versions() == ["v0001", "v0004"]
    clock.t = 11
    runner = old.runner
    assert pool.sweep() == ["v0001"] and runner.closed and pool.open_versions() == ["v0004"]  # the live one stays


def test_max_loaded_unloads_the_least_recently_used_idle_version_or_refuses(root):
    clock = Clock()
    pool, _ = make_pool(root, clock, keep_alive=1000, max_loaded=3)
    pool.release(pool.acquire())
    for t, v in enumerate(("v0001", "v0002"), 1):
        clock.t = t
        pool.release(pool.acquire(v))
    clock.t = 5
    busy = pool.acquire("v0003")  # v0001 (least recently used, idle) makes room
    assert pool.open_versions() == ["v0002", "v0003", "v0004"]
    held = pool.acquire("v0002")
    with pytest.raises(ApiError) as e:  # every other loaded version is in use
        pool.acquire("v0001")
    assert e.value.status == 503 and e.value.code == "model_busy"
    pool.release(busy)
    pool.release(held)
    assert pool.acquire("v0001").version == "v0001"


def test_a_removed_version_is_404_and_a_replaced_live_one_unloads_when_idle(root):
    clock = Clock()
    pool, _ = make_pool(root, clock, keep_alive=1000)
    shutil.rmtree(root / "models" / "v0002")
    with pytest.raises(ApiError) as e:
        pool.acquire("v0002")
    assert e.value.status == 404 and "v0002 was removed" in e.value.message and "kept: v0001, v0003, v0004" in e.value.message
    with pytest.raises(ApiError) as e:
        pool.acquire("v0009")
    assert e.value.status == 404 and "has not been published" in e.value.message
    pool.release(pool.acquire())
    os.unlink(root / "models" / "current")
    os.symlink("v0003", root / "models" / "current")
    assert pool.acquire().version == "v0003"
    assert pool.open_versions() == ["v0003"]  # v0004 was live, never pinned, unused: closed at once


def _point(root, name: str) -> None:
    """Re-point `current` as publish and rollback do: a new link renamed over the old one."""
    tmp = root / "models" / "current.tmp"
    os.symlink(name, tmp)
    os.replace(tmp, root / "models" / "current")


def test_a_version_that_failed_to_open_is_retried_once_current_changes_again(root):
    import time

    from edgekif.errors import ModelError

    opened: list[str] = []
    failing = {"v0003", "v0002"}  # each fails its first open only (a transient error)

    def live(data_dir):
        name = os.readlink(data_dir / "models" / "current")
        opened.append(name)
        if name in failing:
            failing.discard(name)
            raise ModelError(f"{name}: cannot allocate memory (simulated)")
        return FakeRunner(name)

    pool = RunnerPool(root, live, clock=Clock())
    pool.release(pool.acquire())
    _point(root, "v0003")
    for _ in range(2):  # v0004 keeps serving; v0003 is tried once, not on every request
        pool.release(pool.acquire())
        assert pool.serving() == "v0004"
    assert opened == ["v0004", "v0003"]
    # rolled back to v0004 (a request sees it), then v0003 is made current again: retried
    _point(root, "v0004")
    pool.release(pool.acquire())
    _point(root, "v0003")
    slot = pool.acquire()
    assert slot.version == "v0003" and opened == ["v0004", "v0003", "v0003"]
    pool.release(slot)
    # away and back with no request in between: the link is a new one all the same
    _point(root, "v0002")
    pool.release(pool.acquire())
    assert pool.serving() == "v0003" and opened[-1] == "v0002"
    _point(root, "v0003")
    time.sleep(0.05)  # the kernel's coarse clock: the new link's ctime differs from the failed one's
    _point(root, "v0002")
    slot = pool.acquire()
    assert slot.version == "v0002" and opened == ["v0004", "v0003", "v0003", "v0002", "v0002"]
    pool.release(slot)
