"""One writer per run dir: an exclusive lock on RUN_DIR/.lock, held for the whole life of the run.

Who holds it: the process that starts the run. Under clipforge's own --nproc launch (and a one-process run) that
is the launcher, before any rank starts, so a second trainer on the same run dir is refused at once; the ranks it
starts see HELD_ENV and do not lock again. Under torchrun, the deepspeed launcher, srun or Ray Train, rank 0
takes it right after the process group is up and the other ranks learn the verdict from it (trainer.loop).

The lock is flock(2) on an open file, so the kernel releases it when its holder dies, however it dies: a requeue
after a kill -9 is never blocked by a stale lock file (the file stays, the lock does not). The holder writes who it
is (host, pid, start time, command) into the file; a refused trainer names that holder and exits 2.

Shared filesystems: on one machine, and on NFSv4 (Linux emulates flock with NFS byte-range locks), the lock holds
across processes and clients; an NFS client that dies keeps it until the server's lease expires (90 s by default),
so a requeue on another node may be refused for that long. Lustre needs the `flock` mount option (with
`localflock` the lock is per node only), GPFS and CephFS support it. An object-store FUSE mount either refuses
flock (the trainer then exits 2 with the error) or keeps the lock on one node only (two jobs on different nodes
are then not kept apart: give each job its own --out).
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"
HELD_ENV = "CLIPFORGE_RUN_LOCK_HELD"  # set for the ranks of a launcher that holds the lock: "PID:RUN_DIR"


class RunLocked(ValueError):
    """Another live trainer holds the run dir (exit 2)."""


class RunLock:
    """RunLock(run_dir).acquire() -> self, or RunLocked naming the holder; release() (or process exit) frees it."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLocked(f"run dir {self.run_dir} is in use by another trainer ({holder}); two trainers on one "
                            f"run dir would overwrite each other's checkpoints: wait for it, stop it, or pass "
                            f"another --out") from None
        except OSError as e:  # e.g. ENOLCK / ENOSYS: a filesystem without locks
            os.close(fd)
            raise RunLocked(f"cannot lock {self.path} ({e}): this filesystem offers no file locks (Lustre without "
                            f"the flock mount option?); see trainer.runlock") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor of the open file releases the flock
            self.fd = None

    def child_env(self) -> dict[str, str]:
        """Environment for processes started under this lock (they must not lock again)."""
        return {HELD_ENV: f"{os.getpid()}:{self.run_dir.resolve()}"}

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def held_above(run_dir: str | Path) -> bool:
    """True in a rank whose launcher holds the lock of this very run dir."""
    value = os.environ.get(HELD_ENV, "")
    pid, _, path = value.partition(":")
    return pid.isdigit() and path == str(Path(run_dir).resolve())


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return (f"pid {info.get('pid')} on host {info.get('host')}, started {info.get('started')}: "
                f"{' '.join(info.get('argv') or [])}")
    except (OSError, ValueError):
        return "holder unknown"
