"""What the bench scripts share: timing a command with the peak RSS of its whole process tree."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(cmd: list[str], env: dict, log: Path | None = None) -> tuple[float, float, int]:
    """Run cmd from the project root; -> (wall s, peak RSS MB of its whole process tree, rc). Output goes to `log`
    (or nowhere)."""
    import psutil

    out = open(log, "w") if log else subprocess.DEVNULL
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT if log else out)
    peak, proc = 0.0, psutil.Process(p.pid)
    while p.poll() is None:
        try:
            tree = [proc, *proc.children(recursive=True)]
            peak = max(peak, sum(x.memory_info().rss for x in tree if x.is_running()) / 2**20)
        except psutil.Error:
            pass
        time.sleep(0.2)
    if log:
        out.close()
    return time.perf_counter() - t0, peak, p.returncode
