"""The one normalised example type every input shape becomes.

A Record is a conversation prompt (list of role/content messages ending with a user turn)
and the assistant's target answer. Alpaca, prompt/completion and chat `messages` inputs
all map onto it, so the replay buffer, trainer and evaluator see a single shape.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence


@dataclass(frozen=True)
class Record:
    messages: tuple[tuple[str, str], ...]  # ((role, content), ...), last role is "user"
    output: str
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Alpaca records: length (chars) of the instruction that starts the last user message,
    # before "\n" + input. Prompt fitting cuts the input's middle and keeps this part (it
    # holds the task and its answer options). 0 = unknown: the whole message may be cut.
    instruction_chars: int = field(default=0, compare=False)

    @property
    def label(self) -> str:
        """The answer as compared by exact match (whitespace stripped)."""
        return self.output.strip()

    def chat(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.messages]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "messages": [list(m) for m in self.messages], "output": self.output}
        if self.instruction_chars:  # only when set, so other records serialise as before
            d["instruction_chars"] = self.instruction_chars
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Record":
        return cls(
            messages=tuple((str(r), str(c)) for r, c in d["messages"]),
            output=str(d["output"]),
            id=str(d.get("id", "")),
            instruction_chars=int(d.get("instruction_chars") or 0),
        )

    @classmethod
    def from_json(cls, s: str) -> "Record":
        return cls.from_dict(json.loads(s))

    @classmethod
    def from_prompt(cls, prompt: str, output: str, id: str = "", system: str | None = None) -> "Record":
        msgs: tuple[tuple[str, str], ...] = ((("system", system),) if system else ()) + (("user", prompt),)
        return cls(messages=msgs, output=output, id=id)


def records_sha256(records: Sequence[Record]) -> str:
    """What a per-record score vector was measured on: two vectors pair only when this matches."""
    return hashlib.sha256("".join(r.to_json() + "\n" for r in records).encode()).hexdigest()
