"""What a process knows about its own memory, without torch: current and peak resident set size."""
from __future__ import annotations

import os
import resource
import sys


def peak_rss_bytes() -> int:
    """The process's peak RSS so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def rss_bytes() -> int:
    """The process's RSS now (/proc/self/statm; the peak where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss_bytes()
