"""This process's memory as the kernel reports it in /proc/self/status, for the benches' measurements."""

from __future__ import annotations

from pathlib import Path


def status_bytes(key: str) -> int:
    """A /proc/self/status field in bytes: "VmRSS" (resident now), "VmHWM" (resident high-water mark, unlike
    ru_maxrss not inherited from the parent process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak() -> None:
    """Reset VmHWM to the current resident size (Linux clear_refs "5"), so a later VmHWM read is the peak of
    what ran in between, without a sampling thread taking CPU from the measured work."""
    Path("/proc/self/clear_refs").write_text("5")
