"""The systemd unit files: required keys present, and `systemd-analyze verify` clean where available."""

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
    assert svc["ExecStart"][0].startswith("/opt/edgekif/.venv/bin/edgekif serve --config /etc/edgekif/edgekif.toml")
    assert "MemoryMax" not in svc and "#MemoryMax=" in (SYSTEMD / "edgekif.service").read_text()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_user_unit_uses_the_home_data_dir_without_root_only_options():
    unit = parse_unit(SYSTEMD / "edgekif-user.service")
    svc = unit["Service"]
    assert svc["Type"] == ["notify"] and svc["WatchdogSec"] == ["120"] and svc["Restart"] == ["on-failure"]
    assert "EDGEKIF_DATA_DIR=%h/.local/share/edgekif" in svc["Environment"]
    assert "%h/.local/share/edgekif" in svc["ExecStart"][0]
    for root_only in ("User", "ProtectSystem", "ProtectHome", "PrivateTmp", "CapabilityBoundingSet", "StateDirectory"):
        assert root_only not in svc, root_only
    assert unit["Install"]["WantedBy"] == ["default.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("name", ["edgekif.service", "edgekif-user.service"])
def test_systemd_analyze_verify(tmp_path, name):
    # The ExecStart binary does not exist on a build box: point it at /bin/true for the check.
    text = re.sub(r"(?m)^ExecStart=.*$", "ExecStart=/bin/true", (SYSTEMD / name).read_text())
    unit = tmp_path / name
    unit.write_text(text)
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
