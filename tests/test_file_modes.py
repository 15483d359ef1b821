"""Files edgekif publishes get umask-derived modes (not mkstemp/mkdtemp's 0600/0700), so a
client in the service's group (UMask=0027) or any user (0022) can read them."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from edgekif.atomic import atomic_dir, atomic_write_json, atomic_write_text, dir_mode, file_mode, process_umask
from edgekif.publish import ModelStore
from edgekif.layout import DataLayout
from service.metrics import replace_json, replace_text
from service.watcher import move_to_rejected

from test_publish import fake_export

NOBODY = 65534


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture()
def open_dir():
    """A data dir whose parents another user can traverse (pytest's tmp_path is 0700)."""
    d = Path(tempfile.mkdtemp(prefix="edgekif-modes-"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("mask,fmode,dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_atomic_files_and_dirs_follow_the_umask(tmp_path, mask, fmode, dmode):
    with umask(mask):
        assert process_umask() == mask
        assert (file_mode(), dir_mode()) == (fmode, dmode)
        atomic_write_text(tmp_path / "a.txt", "x")
        atomic_write_json(tmp_path / "manifest.json", {"a": 1})
        with atomic_dir(tmp_path / "v0001") as d:
            atomic_write_json(d / "inner.json", {})
        replace_text(tmp_path / "metrics.prom", "m 1\n")
        replace_json(tmp_path / "daemon.json", {"pid": 1})
        layout = DataLayout(tmp_path / "data")
        layout.create()
        (layout.inbox / "bad.jsonl").write_text("x")
        dest = move_to_rejected(layout, layout.inbox / "bad.jsonl", name="bad.jsonl", error={"kind": "bad_name", "message": "m"})
    for f in ("a.txt", "manifest.json", "v0001/inner.json", "metrics.prom", "daemon.json"):
        assert mode(tmp_path / f) == fmode, f
    assert mode(tmp_path / "v0001") == dmode
    assert mode(dest.with_name(dest.name + ".error.json")) == fmode


@pytest.mark.parametrize("mask,fmode,dmode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_published_version_gets_umask_modes_even_from_a_private_export(tmp_path, mask, fmode, dmode):
    export = fake_export(tmp_path / "export", seed=1)
    # An export built before this fix (or copied in by hand) may be private.
    for p in [export, *export.rglob("*")]:
        os.chmod(p, 0o700 if p.is_dir() else 0o600)
    with umask(mask):
        name = ModelStore(tmp_path / "data").publish(export)
    folder = tmp_path / "data" / "models" / name
    assert mode(folder) == dmode
    for p in folder.rglob("*"):
        assert mode(p) == (dmode if p.is_dir() else fmode), p


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to run a reader as another uid")
@pytest.mark.parametrize("mask,reader_gid", [(0o022, NOBODY), (0o027, 0)])
def test_another_user_reads_a_published_version_and_the_metrics(open_dir, mask, reader_gid):
    """0022: any user reads; 0027: a user in the files' group (gid 0 here) reads."""
    export = fake_export(open_dir / "export", seed=3)
    data = open_dir / "data"
    with umask(mask):
        data.mkdir()
        name = ModelStore(data).publish(export)
        replace_text(data / "metrics.prom", "edgekif_queue_length 0\n")
        atomic_write_json(data / "daemon.json", {"pid": 1})
    version = data / "models" / name
    script = f'ls "{version}" >/dev/null && cat "{data}/models/current/manifest.json" "{version}/model.onnx" "{data}/metrics.prom" "{data}/daemon.json" >/dev/null'
    res = subprocess.run(["/bin/sh", "-c", script], user=NOBODY, group=reader_gid, extra_groups=[], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    if mask == 0o027:  # and a user outside the group is refused, as the umask says
        res = subprocess.run(["/bin/sh", "-c", script], user=NOBODY, group=NOBODY, extra_groups=[], capture_output=True, text=True, timeout=60)
        assert res.returncode != 0 and "Permission denied" in res.stderr
