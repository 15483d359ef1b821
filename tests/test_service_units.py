"""The systemd unit files and drop-ins: required keys present, `systemd-analyze verify` clean and
`systemd-analyze security` no worse than docs/daemon.md says, where systemd-analyze exists."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SYSTEMD = Path(__file__).resolve().parents[1] / "systemd"


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """{section: {key: [values...]}}; keys may repeat (Environment=), comments are skipped."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if m := re.fullmatch(r"\[(\w+)\]", line):
            current = sections.setdefault(m.group(1), {})
            continue
        assert current is not None, f"{path}: key outside a section: {line}"
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not key=value: {line}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_system_unit_has_the_required_settings():
    unit = parse_unit(SYSTEMD / "edgekif.service")
    svc = unit["Service"]
    expected = {
        "Type": "notify",
        "User": "edgekif",
        "DynamicUser": "no",
        "StateDirectory": "edgekif",
        "WatchdogSec": "120",
        "Restart": "on-failure",
        "TimeoutStopSec": "60",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ReadWritePaths": "/var/lib/edgekif",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_UNIX",
        "SystemCallFilter": "@system-service",
        "Nice": "10",
    }
    for key, value in expected.items():
        assert svc.get(key) == [value], key
    assert "EDGEKIF_DATA_DIR=/var/lib/edgekif" in svc["Environment"]
    assert "EDGEKIF_CACHE_DIR=/var/lib/edgekif/cache" in svc["Environment"]  # never the service user's HOME
    assert svc["SyslogLevelPrefix"] == ["yes"] and svc["PrivateDevices"] == ["yes"]
    assert svc["ExecStart"][0].startswith("/opt/edgekif/.venv/bin/edgekif serve --config /etc/edgekif/edgekif.toml")
    assert "MemoryMax" not in svc and "#MemoryMax=" in (SYSTEMD / "edgekif.service").read_text()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_user_unit_uses_the_home_data_dir_without_root_only_options():
    unit = parse_unit(SYSTEMD / "edgekif-user.service")
    svc = unit["Service"]
    assert svc["Type"] == ["notify"] and svc["WatchdogSec"] == ["120"] and svc["Restart"] == ["on-failure"]
    assert "EDGEKIF_DATA_DIR=%h/.local/share/edgekif" in svc["Environment"]
    assert "%h/.local/share/edgekif" in svc["ExecStart"][0]
    # Namespace-based options would stop the unit where unprivileged user namespaces are off:
    # they live in the opt-in sandbox drop-in. PrivateDevices would hide GPUs.
    for not_here in ("User", "ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateUsers", "PrivateDevices",
                     "CapabilityBoundingSet", "StateDirectory", "MemoryDenyWriteExecute"):
        assert not_here not in svc, not_here
    for key in ("NoNewPrivileges", "RestrictNamespaces", "LockPersonality", "RestrictSUIDSGID", "SyslogLevelPrefix"):
        assert svc[key] == ["yes"], key
    assert svc["RestrictAddressFamilies"] == ["AF_UNIX"] and svc["SystemCallFilter"] == ["@system-service"]
    assert unit["Install"]["WantedBy"] == ["default.target"]


def test_api_unit_reads_the_models_folder_only():
    unit = parse_unit(SYSTEMD / "edgekif-api.service")
    svc = unit["Service"]
    assert svc["ExecStart"][0].startswith("/opt/edgekif/.venv/bin/edgekif api --data-dir /var/lib/edgekif ")
    assert "--host 127.0.0.1" in svc["ExecStart"][0]
    expected = {
        "User": "edgekif",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "TemporaryFileSystem": "/var/lib:ro",
        "BindReadOnlyPaths": "/var/lib/edgekif/models",
        "IPAddressDeny": "any",
        "IPAddressAllow": "localhost",
        "NoNewPrivileges": "yes",
        "CapabilityBoundingSet": "",
        "SystemCallFilter": "@system-service",
    }
    for key, value in expected.items():
        assert svc.get(key) == [value], key
    # nothing writable, no state of its own: the daemon keeps the data dir to itself
    for writable in ("ReadWritePaths", "StateDirectory", "CacheDirectory", "LogsDirectory"):
        assert writable not in svc, writable
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_gpu_drop_in_opens_the_nvidia_and_jetson_devices_only():
    svc = parse_unit(SYSTEMD / "edgekif.service.d" / "gpu.conf")["Service"]
    assert svc["PrivateDevices"] == ["no"] and svc["DevicePolicy"] == ["closed"]
    allowed = svc["DeviceAllow"]
    for spec in ("char-nvidia* rw", "/dev/nvidiactl rw", "/dev/nvidia-uvm rw", "char-nvhost* rw", "/dev/nvmap rw"):
        assert spec in allowed, spec
    assert all(a.split()[1] == "rw" and a.split()[0].startswith(("char-nv", "char-host1x", "/dev/nv")) for a in allowed), allowed


def test_user_sandbox_drop_in_keeps_the_data_and_cache_dirs_writable():
    svc = parse_unit(SYSTEMD / "edgekif-user.service.d" / "sandbox.conf")["Service"]
    assert svc["PrivateUsers"] == ["yes"] and svc["ProtectSystem"] == ["strict"] and svc["ProtectHome"] == ["read-only"]
    assert svc["ReadWritePaths"] == ["%h/.local/share/edgekif"]  # the user unit's EDGEKIF_DATA_DIR
    assert svc["CacheDirectory"] == ["edgekif"]  # ~/.cache/edgekif: edgekif.workflow.cache_root's XDG default
    assert "PrivateDevices" not in svc


def unit_cases() -> list[tuple[str, str | None]]:
    """Every unit alone, and with each of its drop-ins (a unit added to systemd/ is picked up)."""
    cases: list[tuple[str, str | None]] = []
    for unit in sorted(SYSTEMD.glob("*.service")):
        cases.append((unit.name, None))
        cases += [(unit.name, d.name) for d in sorted((SYSTEMD / f"{unit.name}.d").glob("*.conf"))]
    return cases


def install_copy(tmp_path: Path, name: str, drop_in: str | None) -> Path:
    """The unit (ExecStart pointed at /bin/true: the real binary is not on a build box) and the
    drop-in in NAME.d/ beside it, where systemd-analyze looks for drop-ins."""
    text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", (SYSTEMD / name).read_text())
    unit = tmp_path / name
    unit.write_text(text)
    if drop_in:
        (tmp_path / f"{name}.d").mkdir()
        shutil.copy(SYSTEMD / f"{name}.d" / drop_in, tmp_path / f"{name}.d" / drop_in)
    return unit


def _analyze(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})


def test_unit_cases_cover_the_shipped_drop_ins():
    cases = unit_cases()
    assert ("edgekif.service", "gpu.conf") in cases and ("edgekif-user.service", "sandbox.conf") in cases
    assert ("edgekif.service", None) in cases and ("edgekif-user.service", None) in cases
    assert ("edgekif-api.service", None) in cases


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name,drop_in", unit_cases())
def test_systemd_analyze_verify(tmp_path, name, drop_in):
    # An unknown key or a bad value in a drop-in is reported on stderr too (exit code still 0).
    proc = _analyze("verify", str(install_copy(tmp_path, name, drop_in)))
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


# The exposure docs/daemon.md quotes (systemd 252, --offline=yes; lower is better). A change that
# weakens a unit fails here; a newer systemd that scores differently gets 0.3 of slack.
SECURITY = {
    ("edgekif.service", None): 1.6,
    ("edgekif.service", "gpu.conf"): 1.8,
    ("edgekif-user.service", None): 6.1,
    ("edgekif-user.service", "sandbox.conf"): 1.5,
    ("edgekif-api.service", None): 1.5,
}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("case", list(SECURITY), ids=lambda c: "+".join(x for x in c if x))
def test_systemd_analyze_security_is_no_worse_than_documented(tmp_path, case):
    unit = install_copy(tmp_path, *case)
    proc = _analyze("security", "--offline=yes", "--no-pager", str(unit))
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("systemd-analyze security has no --offline here (systemd < 250)")
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout[-500:] + proc.stderr
    assert float(m.group(1)) <= SECURITY[case] + 0.3, f"{case}: {m.group(1)} > {SECURITY[case]}"


