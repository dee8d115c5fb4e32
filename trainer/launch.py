"""Launching: the self-relaunch on local ranks (torch.distributed.run), preemption signals, the rank environment.

`python -m trainer.train --nproc N` re-runs the same command on N local ranks. The ranks get their argv through
the environment (ARGV_ENV): torchrun's own parser would otherwise claim abbreviations of its options (e.g.
--nproc) from the script's arguments. SIGTERM / SIGUSR1 (preemption: SLURM --signal, Kubernetes, or by hand) are
forwarded to torchrun, which passes them to the ranks; they save a checkpoint and exit with EXIT_PREEMPTED.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading

from trainer.clip.ports import free_port

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a signal after saving a checkpoint
ARGV_ENV = "CLIPFORGE_TRAIN_ARGV"


def launch(nproc: int, argv: list[str]) -> int:
    """Run `python -m trainer.train argv` on nproc local ranks via torch.distributed.run; -> its exit code."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", ARGV_ENV: json.dumps(argv)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "trainer.train",
    ]
    print(f"[trainer] launching {nproc} ranks: {' '.join(cmd[1:])}", flush=True)
    child = subprocess.Popen(cmd, env=env)
    with on_signals(lambda signum, frame: child.send_signal(signum)):  # preemption reaches torchrun and the ranks
        return child.wait()


@contextlib.contextmanager
def on_signals(handler):
    """Install `handler` for STOP_SIGNALS while inside (main thread only: elsewhere, e.g. a Ray Train worker
    thread, Python cannot install handlers and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def in_launched_rank() -> bool:
    """True inside a rank started by torchrun, the deepspeed launcher, srun + torchrun or Ray Train."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_argv() -> list[str] | None:
    """The argv a self-relaunch handed its ranks (None outside one)."""
    return json.loads(os.environ[ARGV_ENV]) if in_launched_rank() and ARGV_ENV in os.environ else None


@contextlib.contextmanager
def single_process_env():
    """A plain single process gets a 1-rank torch.distributed env, restored afterwards (tests call main())."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
