"""edgekif: on-device continual adaptation of small language models."""

__version__ = "0.1.0"  # keep equal to pyproject.toml [project] version (edgekif --version falls back to it)
