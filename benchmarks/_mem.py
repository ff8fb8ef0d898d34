"""Memory probes for benchmarks: peak RSS and peak anonymous memory of this process (Linux)."""

from __future__ import annotations


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss() -> int:
    return _status("VmRSS")


def anon() -> int:
    """Anonymous resident memory (heap, tensors): excludes pages of memory-mapped files."""
    return _status("RssAnon")


def peak_rss() -> int:
    """Peak RSS of this process image. VmHWM, not ru_maxrss: ru_maxrss survives fork+exec,
    so a child would report its parent's peak."""
    return _status("VmHWM")


class AnonPeak:
    """Tracks the peak of RssAnon over explicit sample() calls."""

    def __init__(self) -> None:
        self.start = anon()
        self.peak = self.start

    def sample(self) -> None:
        self.peak = max(self.peak, anon())
