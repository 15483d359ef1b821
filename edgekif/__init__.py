"""edgekif: on-device continual adaptation of small language models."""

__version__ = "0.1.0"  # keep equal to pyproject.toml [project] version (edgekif --version falls back to it)

# The strategies register themselves and their config sections ([kif], [experience_replay])
# with edgekif.config, peft-style; importing them here makes that happen before any config loads.
from . import strategies  # noqa: E402, F401
