"""Facts about the machine that the benchmark scripts record next to their figures."""

from __future__ import annotations


def cpu_model() -> str | None:
    """Return the CPU model name from /proc/cpuinfo, or None where that file does not exist."""
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        return None
    return names[0] if names else None
