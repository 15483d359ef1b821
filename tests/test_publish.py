"""Versioned atomic publishing: current/rollback/gc, refusing corrupt exports, concurrent readers.

Exports here are fake (random files + a valid manifest): publishing does not care what the
files are, and this keeps the tests fast."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from edgekif.errors import IntegrityError, PublishError
from edgekif.export.manifest import write_manifest
from edgekif.publish import ModelStore, resolve_current


def fake_export(folder: Path, seed: int, *, size: int = 64 * 1024) -> Path:
    folder.mkdir(parents=True)
    rnd = __import__("random").Random(seed)
    (folder / "model.onnx").write_bytes(rnd.randbytes(size))
    (folder / "model.onnx.data").write_bytes(rnd.randbytes(size * 2))
    (folder / "genai_config.json").write_text(json.dumps({"seed": seed}))
    write_manifest(folder, target="genai", precision="int4", execution_provider="cpu", tasks=[{"id": f"t{seed}", "name": f"task {seed}", "examples": seed}])
    return folder


@pytest.fixture()
def exports(tmp_path):
    return [fake_export(tmp_path / "exports" / f"e{i}", seed=i) for i in range(1, 5)]


@pytest.fixture()
def store(tmp_path):
    return ModelStore(tmp_path / "data")


def _seed_of(folder: Path) -> int:
    return json.loads((folder / "genai_config.json").read_text())["seed"]


def test_publish_makes_newest_current_through_a_relative_link(store, exports):
    assert store.current() is None and store.list() == []
    assert store.publish(exports[0]) == "v0001"
    assert store.publish(exports[1]) == "v0002"
    assert store.current() == "v0002"
    link = store.models / "current"
    assert os.readlink(link) == "v0002"  # relative: the data folder can be moved
    assert resolve_current(store.root) == (store.models / "v0002").resolve()
    assert _seed_of(resolve_current(store.root)) == 2
    listed = store.list()
    assert [(v.name, v.is_current) for v in listed] == [("v0001", False), ("v0002", True)]
    assert listed[1].summary["tasks"] == [{"id": "t2", "name": "task 2", "examples": 2}]
    assert listed[1].summary["export"]["precision"] == "int4" and listed[1].created
    assert store.path("v0001") == store.models / "v0001" and store.path() == store.models / "v0002"
    assert exports[0].is_dir(), "publish copies by default"
    leftovers = [n for n in os.listdir(store.models) if n not in ("v0001", "v0002", "current", ".publish.lock")]
    assert leftovers == []


def test_publish_can_move_the_export(store, exports):
    store.publish(exports[0], move=True)
    assert not exports[0].exists() and _seed_of(store.path("v0001")) == 1


def test_rollback_switches_current_and_rejects_unknown_versions(store, exports):
    store.publish(exports[0])
    store.publish(exports[1])
    assert store.rollback("v0001") == "v0001"
    assert store.current() == "v0001" and _seed_of(resolve_current(store.root)) == 1
    with pytest.raises(PublishError, match="v0009"):
        store.rollback("v0009")
    with pytest.raises(PublishError):
        store.rollback("../v0001")
    assert store.current() == "v0001"
    # The next publish numbers after the newest version, not after current.
    assert store.publish(exports[2]) == "v0003"


def test_gc_keeps_newest_and_current(store, exports):
    for e in exports[:3]:
        store.publish(e)
    store.rollback("v0001")
    assert store.gc(keep=1) == ["v0002"]
    assert store.versions() == ["v0001", "v0003"] and store.current() == "v0001"
    store.publish(exports[3], keep=1)  # v0004 becomes current; v0001 and v0003 go
    assert store.versions() == ["v0004"] and store.current() == "v0004"
    with pytest.raises(PublishError):
        store.gc(keep=0)


@pytest.mark.parametrize("damage", ["truncate", "edit_hash", "delete"])
def test_corrupt_export_is_refused_and_current_unchanged(store, exports, damage):
    store.publish(exports[0])
    bad = exports[1]
    if damage == "truncate":
        with open(bad / "model.onnx.data", "r+b") as f:
            f.truncate(100)
    elif damage == "edit_hash":
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["files"]["model.onnx"] = "f" * 64
        (bad / "manifest.json").write_text(json.dumps(manifest))
    else:
        (bad / "model.onnx").unlink()
    with pytest.raises(IntegrityError, match="model.onnx"):
        store.publish(bad)
    assert store.current() == "v0001" and store.versions() == ["v0001"]
    assert sorted(os.listdir(store.models)) == [".publish.lock", "current", "v0001"]


def test_rollback_to_a_damaged_version_is_refused(store, exports):
    store.publish(exports[0])
    store.publish(exports[1])
    with open(store.path("v0001") / "model.onnx", "r+b") as f:
        f.write(b"\0\0\0\0")
    with pytest.raises(IntegrityError, match="model.onnx"):
        store.rollback("v0001")
    assert store.current() == "v0002"


def test_second_publisher_is_refused_while_one_holds_the_lock(store, exports):
    store.publish(exports[0])
    other = ModelStore(store.root)
    with store._lock():
        with pytest.raises(PublishError, match="another process"):
            other.publish(exports[1])
    assert other.publish(exports[1]) == "v0002"


def test_resolve_current_without_a_model(tmp_path):
    with pytest.raises(PublishError, match="no model published"):
        resolve_current(tmp_path)


READER = textwrap.dedent(
    """
    import hashlib, json, os, sys, time
    link = os.path.join(sys.argv[1], "models", "current")
    end = time.monotonic() + float(sys.argv[2])
    seen, reads = set(), 0
    print("ready", flush=True)
    while time.monotonic() < end:
        folder = os.path.realpath(link)  # resolve once per read, as clients must
        with open(os.path.join(folder, "manifest.json"), "rb") as f:
            manifest = json.loads(f.read())
        for rel, digest in manifest["files"].items():
            with open(os.path.join(folder, rel), "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() != digest:
                    print("MISMATCH", folder, rel, flush=True)
                    sys.exit(1)
        seen.add(os.path.basename(folder))
        reads += 1
    print(json.dumps({"seen": sorted(seen), "reads": reads}), flush=True)
    """
)


def test_concurrent_reader_always_sees_one_complete_version(store, tmp_path):
    exports = [fake_export(tmp_path / "many" / f"e{i}", seed=i, size=256 * 1024) for i in range(8)]
    store.publish(exports[0])
    script = tmp_path / "reader.py"
    script.write_text(READER)
    reader = subprocess.Popen([sys.executable, str(script), str(store.root), "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert reader.stdout.readline().strip() == "ready"
        for e in exports[1:]:
            store.publish(e)
            time.sleep(0.15)
        out, err = reader.communicate(timeout=60)
    finally:
        if reader.poll() is None:
            reader.kill()
            reader.wait()
    assert reader.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["reads"] > 0
    assert len(result["seen"]) >= 2, result
    assert store.current() == "v0008"


def test_remove_deletes_a_version_atomically_and_refuses_the_live_one(store, exports):
    for e in exports[:3]:
        store.publish(e)
    assert store.current() == "v0003"
    with pytest.raises(PublishError, match="live version"):
        store.remove("v0003")
    assert store.versions() == ["v0001", "v0002", "v0003"]
    store.remove("v0001")
    assert store.versions() == ["v0002", "v0003"] and store.current() == "v0003"
    assert not any(n.startswith(".v") for n in os.listdir(store.models)), "no trash left behind"
    with pytest.raises(PublishError, match="no version 'v0001'"):
        store.remove("v0001")
    # only version folders under models/: no paths, no other names
    for bad in ("../data", "current", "v1", "/tmp", ".publish.lock"):
        with pytest.raises(PublishError):
            store.remove(bad)
    assert store.versions() == ["v0002", "v0003"]


def test_numbers_keep_growing_after_the_newest_version_is_removed(store, exports):
    for e in exports[:3]:
        store.publish(e)
    store.rollback("v0002")
    store.remove("v0003")
    assert store.versions() == ["v0001", "v0002"]
    # a client that saw v0003 must never see a different model under that name
    assert store.publish(exports[3]) == "v0004"
    store.remove("v0001")
    assert store.publish(exports[0]) == "v0005"


def test_cli_models_show_and_rm(store, exports, capsys):
    from edgekif.cli import main

    store.publish(exports[0])
    store.publish(exports[1])
    data = ["--data-dir", str(store.root)]
    assert main(["models", "show", "v0001", "--json", *data]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["name"] == "v0001" and shown["is_current"] is False
    assert shown["manifest"]["tasks"] == [{"id": "t1", "name": "task 1", "examples": 1}]
    assert main(["models", "show", *data]) == 0  # default: the current version
    text = capsys.readouterr().out.splitlines()
    assert text[0] == "version:     v0002  (current)"
    assert "export:      genai/int4 on cpu" in text
    assert text[-1] == "files:       3, 196.6 KB"  # 64 + 128 KiB of fake weights + a small config
    assert main(["models", "rm", "v0002", *data]) == 2
    err = capsys.readouterr().err
    assert "v0002 is the live version" in err and "Traceback" not in err
    assert main(["models", "rm", "v0001", *data]) == 0
    assert capsys.readouterr().out.strip() == "removed: v0001"
    assert store.versions() == ["v0002"]


# ---- a kill at every write of publish: one version per export, no stray names ------------------

_KILL_AT = """
import os, sys, shutil
from pathlib import Path
import edgekif.publish as publish

counter = {"n": 0}
kill_at = int(sys.argv[3])

def killing(fn):
    def wrapped(*a, **k):
        counter["n"] += 1
        if counter["n"] == kill_at:
            os._exit(137)  # as SIGKILL: no finally, no cleanup
        return fn(*a, **k)
    return wrapped

# every step of ModelStore.publish that changes the disk
for mod, name in ((publish.os, "rename"), (publish.os, "symlink"), (publish.os, "replace"), (publish.os, "unlink"),
                  (publish.shutil, "copytree"), (publish.shutil, "rmtree")):
    setattr(mod, name, killing(getattr(mod, name)))
publish.fsync_dir = killing(publish.fsync_dir)
publish.fsync_tree = killing(publish.fsync_tree)
publish.apply_default_modes = killing(publish.apply_default_modes)
print(publish.ModelStore(sys.argv[1]).publish(Path(sys.argv[2])))
"""


def test_a_kill_at_any_write_of_publish_then_a_rerun_gives_one_version(tmp_path, exports):
    """Kill the publishing process at its k-th disk-changing call, for every k, restart
    (start-up cleanup, then the job's publish again): exactly one version holds the export,
    `current` points at it, and models/ holds no stray names."""
    script = tmp_path / "kill_at.py"
    script.write_text(_KILL_AT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    k, completed = 0, False
    while not completed:
        k += 1
        assert k < 40, "publish never completed"
        root = tmp_path / f"data{k}"
        store = ModelStore(root)
        store.publish(exports[0])  # v0001 is live before the new one comes
        run = subprocess.run([sys.executable, str(script), str(root), str(exports[1]), str(k)], env=env, capture_output=True, text=True)
        completed = run.returncode == 0
        assert run.returncode in (0, 137), run.stderr
        restarted = ModelStore(root)
        restarted.cleanup()
        assert restarted.publish(exports[1]) == "v0002", f"kill at call {k}"
        assert restarted.versions() == ["v0001", "v0002"], f"kill at call {k}"
        assert restarted.current() == "v0002" and _seed_of(resolve_current(root)) == 2
        assert sorted(os.listdir(restarted.models)) == [".publish.lock", "current", "v0001", "v0002"], f"kill at call {k}"
    assert k > 5  # the kills landed at many points, the last run went through untouched


def test_publishing_the_same_export_again_only_switches(store, exports):
    assert store.publish(exports[0]) == "v0001"
    assert store.publish(exports[1]) == "v0002"
    store.rollback("v0001")
    assert store.publish(exports[1]) == "v0002"  # the same bytes: no v0003
    assert store.versions() == ["v0001", "v0002"] and store.current() == "v0002"


def test_cleanup_removes_a_crashed_switch_link(store, exports):
    store.publish(exports[0])
    os.symlink("v0001", store.models / "current.tmp-99999")
    (store.models / ".v0002.tmp").mkdir()
    assert sorted(store.cleanup()) == [".v0002.tmp", "current.tmp-99999"]
    assert sorted(os.listdir(store.models)) == [".publish.lock", "current", "v0001"]


def test_models_show_names_each_tasks_metric_the_general_drift_and_the_gate(tmp_path):
    import dataclasses

    from edgekif.cli import format_manifest
    from edgekif.export.manifest import Manifest

    m = Manifest(
        files={}, tasks=[{"id": "headlines", "name": "headlines"}, {"id": "agnews", "name": "agnews", "train_examples": 144}],
        accuracies={"headlines": 0.0, "agnews": 0.75},
        task_specs={"headlines": {"kind": "generation", "metric": "rouge_l", "max_new_tokens": 24, "source": "detected"},
                    "agnews": {"kind": "classification", "metric": "normalized_exact_match", "max_new_tokens": 4, "source": "detected"}},
        scores={"headlines": 0.2468, "agnews": 0.7917},
        general_ability={"n": 63, "rouge_l": 0.412, "loglik_drop": 0.087, "held": False, "min_rouge_l": 0.2, "max_loglik_drop": 0.5},
        parity_skipped=[{"variant": "int4-k_quant_mixed", "reason": "rejected on the last 2 checks"}, {"variant": "int4-rtn"}],
        parity_rejected=[{"variant": "int8", "precision": "int8", "reasons": ["exact match 69.8 vs fp32 70.8 (-1.0 points > 1 allowed)"]},
                         {"precision": "int8"}],
        gate={"decisions": {"headlines vs base": {"reason": "headlines: rouge_l 24.7 vs base 12.1, +12.6 points [...]"}}},
    )
    text = format_manifest("v0001", m, is_current=True, folder=tmp_path).splitlines()
    # the score column is each task's own metric (a free-text task's exact match, 0, is not shown)
    assert "  headlines                  24.7  (rouge_l, generation, 24 new tokens)" in text
    assert "  agnews                     79.2  (normalized_exact_match, classification, 4 new tokens; strict exact match 75.0; train 144)" in text
    assert ("general:     ok: answers ROUGE-L 0.412 to the base's own on 63 prompts, log-likelihood drop 0.087 nats/token "
            "(held if ROUGE-L < 0.2 or the drop > 0.5)") in text
    # each variant built, checked and not shipped, with the check's reasons (why the version is the precision it is)
    assert "rejected:    int8 (exact match 69.8 vs fp32 70.8 (-1.0 points > 1 allowed))" in text
    assert "rejected:    int8 (failed the answer check)" in text
    # each skip with its own reason (older manifests have none: the history's)
    assert "skipped:     int4-k_quant_mixed (rejected on the last 2 checks); int4-rtn (rejected on recent jobs of this base)" in text
    assert "gate:        headlines: rouge_l 24.7 vs base 12.1, +12.6 points [...]" in text
    # a base that does not follow instructions (pretrained Gemma): its drift is far outside the
    # bounds and decided nothing, so it is not shown as judged against them
    m = dataclasses.replace(m, general_ability={**m.general_ability, "rouge_l": 0.001, "loglik_drop": 6.608, "instruct_base": False})
    text = format_manifest("v0001", m, is_current=True, folder=tmp_path).splitlines()
    assert ("general:     not gated: answers ROUGE-L 0.001 to the base's own on 63 prompts, log-likelihood drop 6.608 nats/token "
            "(the base does not follow instructions: recorded, not judged)") in text
