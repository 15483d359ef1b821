"""Which export variants to stop trying: the outcomes of past export checks.

The automatic precision policy tries the fastest variant first (k-quant int4 on CPU), and
on SmolLM2-135M-Instruct the answer check rejects it job after job (62%, 80%, 33% identical
answers in three jobs): about a minute of building and answering each time, for nothing. So
each check's outcome is kept per *setting*, and a variant is skipped once it has been
rejected on `skip_after` checks in a row under that same setting:

  setting = SHA-256 of (base model's SHA-256, target, execution provider, the check's rules)

so a new base, another target, or a changed check rule (the parity settings, the rule for
free text) starts from a clean slate. Because each job's model differs from the last, a
skipped variant is tried again after `retry_after` skips: if it passes then, it is used
again at once; if not, it is skipped for another `retry_after` jobs.

The history is one small JSON file (written atomically); a missing or damaged file is an
empty history (everything is tried, as on the first job).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..atomic import atomic_write_json

log = logging.getLogger(__name__)

FORMAT = 1
KEEP = 8  # outcomes kept per variant and setting (only the last few decide)


@dataclass(frozen=True)
class SkipPolicy:
    skip_after: int = 2  # rejections in a row that make a variant skipped
    retry_after: int = 10  # skips before it is tried again

    def __post_init__(self) -> None:
        if self.skip_after < 1 or self.retry_after < 1:
            raise ValueError(f"bad SkipPolicy {self}: skip_after and retry_after must be >= 1")


def setting_key(base_sha256: str, target: str, execution_provider: str, rules: dict[str, Any]) -> str:
    """What a variant's past outcomes are valid for (see the module docstring)."""
    canon = json.dumps([base_sha256, target, execution_provider, rules], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


class VariantHistory:
    """`VariantHistory(path, setting)`: `skip(names)` says which variants to skip now,
    `record(name, passed)` and `note_skipped(name)` update the file."""

    def __init__(self, path: str | os.PathLike, setting: str, policy: SkipPolicy | None = None) -> None:
        self.path, self.setting, self.policy = Path(path), setting, policy or SkipPolicy()

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {"format": FORMAT, "settings": {}}
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("settings"), dict):
            log.warning("export history unreadable; starting afresh", extra={"path": str(self.path)})
            return {"format": FORMAT, "settings": {}}
        return data

    def _entry(self, data: dict[str, Any], name: str) -> dict[str, Any]:
        entry = data["settings"].setdefault(self.setting, {}).setdefault(name, {})
        if not isinstance(entry.get("outcomes"), list) or not isinstance(entry.get("skips"), int):
            entry.update(outcomes=[], skips=0)
        return entry

    def skip(self, names: Sequence[str]) -> set[str]:
        """The variants among `names` to skip on this job. The last of `names` is never
        skipped: it is the fallback that must be tried."""
        data, out = self._read(), set()
        for name in names[:-1]:
            entry = self._entry(data, name)
            recent = entry["outcomes"][-self.policy.skip_after :]
            if len(recent) == self.policy.skip_after and not any(recent) and entry["skips"] < self.policy.retry_after:
                out.add(name)
        return out

    def record(self, name: str, passed: bool) -> None:
        data = self._read()
        entry = self._entry(data, name)
        entry["outcomes"] = (entry["outcomes"] + [bool(passed)])[-KEEP:]
        entry["skips"] = 0
        atomic_write_json(self.path, data)

    def note_skipped(self, name: str) -> None:
        data = self._read()
        entry = self._entry(data, name)
        entry["skips"] += 1
        atomic_write_json(self.path, data)
