"""Ranks never outlive their launcher: a process that calls die_with_parent() is SIGKILLed when its parent dies.

Why: torch's launcher starts every rank in a session of its own, so a `kill -9` of the launcher's process group (a
scheduler, the OOM killer, a lost container runtime) used to leave the ranks training on and writing the run dir
beside the requeued job. Two mechanisms, both here:

- Linux's parent-death signal (prctl PR_SET_PDEATHSIG = SIGKILL): the kernel kills this process the moment the
  thread that forked it exits. It survives exec, so `python -m trainer.lifeline PID -- CMD...` sets it and then
  execs CMD (how clipforge's --nproc launch starts torchrun: torchrun dies with the launcher, the ranks with
  torchrun). SIGKILL, not SIGTERM: with its parent gone a rank cannot finish a collective save anyway, and the
  last complete checkpoint is what the requeued run resumes from.
- A watchdog thread (every platform, and the race where the parent died before prctl ran): once a second it checks
  that the parent is still the one it started with, and that the process named in LAUNCHER_ENV (clipforge's
  launcher, set for its ranks) is alive; if not, the process SIGKILLs itself.

Data-loader workers call it from their worker_init_fn (their parent is the rank). Under Ray Train a rank's parent
is the node's raylet, and Ray kills the workers of a dead driver itself (fate sharing). No torch here.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

LAUNCHER_ENV = "CLIPFORGE_LAUNCHER_PID"
NO_LIFELINE_ENV = "CLIPFORGE_NO_LIFELINE"  # set by trainer.ray_launch's workers: Ray manages their lifetime
PR_SET_PDEATHSIG = 1
POLL_S = 1.0
_armed_pid = 0  # the process that armed (a forked child inherits the variable but not the signal or thread)


def _prctl_pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _watch(parent: int, launcher: int | None) -> None:
    while True:
        if os.getppid() != parent or (launcher is not None and not _alive(launcher)):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(POLL_S)


def die_with_parent(parent: int | None = None) -> None:
    """Arm both mechanisms for this process (idempotent). `parent`: the pid the caller expects as its parent (the
    current one if None); a process whose parent is already gone is killed at once."""
    global _armed_pid
    if _armed_pid == os.getpid():
        return
    _armed_pid = os.getpid()
    _prctl_pdeathsig(signal.SIGKILL)
    expected = os.getppid() if parent is None else parent
    if os.getppid() != expected:  # the parent died between our fork and prctl
        os.kill(os.getpid(), signal.SIGKILL)
    launcher = int(os.environ[LAUNCHER_ENV]) if os.environ.get(LAUNCHER_ENV, "").isdigit() else None
    threading.Thread(target=_watch, args=(expected, launcher), name="lifeline", daemon=True).start()


def worker_init(_worker_id: int) -> None:
    """DataLoader worker_init_fn: the worker dies with its rank."""
    die_with_parent()


def main(argv: list[str] | None = None) -> int:
    """`python -m trainer.lifeline PARENT_PID -- CMD ARGS...`: exec CMD with the parent-death signal armed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) < 3 or argv[1] != "--" or not argv[0].isdigit():
        print("usage: python -m trainer.lifeline PARENT_PID -- CMD [ARGS...]", file=sys.stderr)
        return 2
    _prctl_pdeathsig(signal.SIGKILL)
    if os.getppid() != int(argv[0]):
        return 1  # the parent is already gone: start nothing
    os.execvp(argv[2], argv[2:])
    return 1  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
