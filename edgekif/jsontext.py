"""JSON for readers outside Python: `NaN` and `Infinity`, which Python's json writes and reads,
are not JSON, and strict parsers (JavaScript's, Go's, jq's newer ones) reject the whole
document. Outputs that leave edgekif (`--json` on the command line, the daemon's log lines)
write such a number as null. Files edgekif reads back itself keep Python's convention, so a
NaN figure still reads as NaN there (the general-ability gate holds a version on one)."""

from __future__ import annotations

import json
import math
from typing import Any


def finite(obj: Any) -> Any:
    """`obj` with every float that is not finite replaced by None, in dicts, lists and tuples."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """json.dumps of finite(obj), refusing anything else that is not JSON."""
    return json.dumps(finite(obj), allow_nan=False, **kwargs)
