"""The CLI conventions people expect: --version, and a closed pipe ends output quietly."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGEKIF_DATA_DIR=str(tmp_path / "data"))
    env.pop("EDGEKIF_CACHE_DIR", None)
    return env


LIBRARY_CLI = ["-m", "edgekif"]  # the library's commands alone
INSTALLED_CLI = ["-c", "import sys; from service.cli import main; sys.exit(main())"]  # the `edgekif` script


@pytest.mark.parametrize("cli", [LIBRARY_CLI, INSTALLED_CLI], ids=["library", "installed"])
def test_version_prints_the_package_version(tmp_path, cli):
    import edgekif
    from edgekif.cli import package_version

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert edgekif.__version__ == declared, "edgekif/__init__.py __version__ must follow pyproject.toml"
    assert package_version() == declared
    res = subprocess.run([sys.executable, *cli, "--version"], capture_output=True, text=True, env=_env(tmp_path), cwd=REPO, timeout=60)
    assert (res.returncode, res.stdout, res.stderr) == (0, f"edgekif {declared}\n", "")


def test_package_version_falls_back_to_the_source_tree(monkeypatch):
    import importlib.metadata

    import edgekif
    from edgekif.cli import package_version

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    monkeypatch.setattr(edgekif, "__version__", "9.9.9")
    assert package_version() == "9.9.9"


@pytest.mark.parametrize(
    "argv", [[*LIBRARY_CLI, "config", "--default"], [*INSTALLED_CLI, "status", "--json"]], ids=["config", "status"]
)
def test_closed_pipe_ends_output_quietly(tmp_path, argv):
    """`edgekif status --json | head -1` where the reader is gone before edgekif writes."""
    (tmp_path / "data").mkdir()  # status on a missing data dir is an error, not output
    read_end, write_end = os.pipe()
    os.close(read_end)  # like `head` after its first line: every write now fails with EPIPE
    try:
        proc = subprocess.run([sys.executable, *argv], stdout=write_end, stderr=subprocess.PIPE, text=True,
                              env=_env(tmp_path), cwd=REPO, timeout=60)
    finally:
        os.close(write_end)
    assert proc.stderr == ""  # no BrokenPipeError traceback, no "Exception ignored in <stdout>"
    assert proc.returncode == 141  # 128 + SIGPIPE, as a shell reports a tool stopped by a closed pipe


def test_head_closes_the_pipe_midway_and_edgekif_exits_quietly(tmp_path):
    """Through a shell: far more output than a pipe buffer (64 KiB), `head -1` reads one line."""
    script = tmp_path / "many.py"
    script.write_text(
        "import sys\n"
        "from edgekif.cli import build_parser, run\n"
        "args = build_parser().parse_args(['config', '--default'])\n"
        "once = args.fn\n"
        "args.fn = lambda a: [once(a) for _ in range(2000)] and 0  # ~4 MB of TOML\n"
        "sys.exit(run(args))\n"
    )
    cmd = f"{sys.executable} {script} | head -1; echo \"rc=${{PIPESTATUS[0]}}\""
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=_env(tmp_path), cwd=REPO, timeout=120)
    assert res.stdout.splitlines() == ["# edgekif configuration. Every option can also be set with --set section.key=value.", "rc=141"]
    assert res.stderr == ""


def test_ingest_refuses_a_daemon_s_data_dir(tmp_path, capsys):
    """The daemon buffers only a file's training split under the file's hash: `ingest` of the
    same bytes into its replay buffer would leave the held-out records there for good."""
    from edgekif.cli import main
    from edgekif.replay import ReplayBuffer
    from edgekif.config import load_config

    data = tmp_path / "data"
    task = tmp_path / "colors.jsonl"
    task.write_text("".join(f'{{"instruction": "Color of item {i}?", "output": "{"red" if i % 2 else "blue"}"}}\n' for i in range(20)))
    assert main(["ingest", str(task), "--data-dir", str(data)]) == 0  # no daemon here: added
    with ReplayBuffer(data / "replay.db", load_config(None, [f"data_dir={data}"]).replay) as buf:
        assert buf.stats()["tasks"]["colors"]["records"] == 20
    (data / "state.db").write_bytes(b"")  # a daemon ran here
    assert main(["ingest", str(task), "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err
    assert "is a daemon's data dir" in err and str(data / "inbox") in err
