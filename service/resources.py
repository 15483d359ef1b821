"""What the machine has left for a job: available memory (the check before a model stage) and a
process's resident memory (the stage process's, for `edgekif status`). Linux /proc, psutil when
installed."""

from __future__ import annotations

from pathlib import Path

from edgekif.errors import ResourceError


def available_memory_mb() -> float | None:
    try:
        import psutil  # optional: only the bench/dev extras install it

        return psutil.virtual_memory().available / 2**20
    except ImportError:
        pass
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def check_memory(ceiling_mb: int) -> None:
    """ResourceError when less than `ceiling_mb` MiB is available (0 = no check)."""
    if ceiling_mb <= 0:
        return
    available = available_memory_mb()
    if available is not None and available < ceiling_mb:
        raise ResourceError(f"only {available:.0f} MiB memory available, service.memory_ceiling_mb needs {ceiling_mb}")


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process (Linux /proc): the daemon's stage process, for `status`."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        return None
    return None
