"""Launching: the self-relaunch on local ranks (torch.distributed.run), preemption signals, the rank environment.

`python -m trainer.train --nproc N` re-runs the same command on N local ranks. The ranks get their argv through
the environment (ARGV_ENV): torchrun's own parser would otherwise claim abbreviations of its options (e.g.
--nproc) from the script's arguments. SIGTERM / SIGUSR1 (preemption: SLURM --signal, Kubernetes, or by hand) are
forwarded to torchrun, which passes them to the ranks; they save a checkpoint and exit with EXIT_PREEMPTED.
torchrun and the ranks die with the launcher (trainer.lifeline); a rank's own exit code reaches the launcher through
a file (record_exit), since torchrun reports every failed rank as 1.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading

from trainer.clip.formats.atomic import atomic_write_json
from trainer.clip.ports import free_port
from trainer.lifeline import LAUNCHER_ENV

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a signal after saving a checkpoint
ARGV_ENV = "CLIPFORGE_TRAIN_ARGV"
EXIT_FILE_ENV = "CLIPFORGE_EXIT_FILE"


def launch(nproc: int, argv: list[str], env_extra: dict[str, str] | None = None) -> int:
    """Run `python -m trainer.train argv` on nproc local ranks via torch.distributed.run; -> the ranks' exit code.

    torchrun runs under trainer.lifeline (it dies if this process dies) and the ranks arm it too, so nothing of
    the run outlives a kill -9 of this process. A rank that stops for a reason it printed (exit 2, 3, 4) records
    its code in EXIT_FILE_ENV's file: torchrun itself only says 1 for any failed rank."""
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with tempfile.TemporaryDirectory(prefix="clipforge-launch-") as tmp:
        exit_file = os.path.join(tmp, "exit.json")
        env = {**os.environ, **(env_extra or {}), "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
               ARGV_ENV: json.dumps(argv), LAUNCHER_ENV: str(os.getpid()), EXIT_FILE_ENV: exit_file}
        cmd = [
            sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--nnodes=1",
            "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "trainer.train",
        ]
        print(f"[trainer] launching {nproc} ranks: {' '.join(cmd[1:])}", flush=True)
        child = subprocess.Popen([sys.executable, "-m", "trainer.lifeline", str(os.getpid()), "--", *cmd], env=env)
        with on_signals(lambda signum, frame: child.send_signal(signum)):  # preemption reaches torchrun, the ranks
            code = child.wait()
        if os.path.isfile(exit_file):
            with open(exit_file) as f:
                code = int(json.load(f).get("code", code))
        return code


def record_exit(code: int) -> int:
    """A rank stopping with `code` for a reason it printed. Under launch(): leave the code for the launcher (first
    writer wins; the ranks stop together and agree) and return 0, the code the rank process exits with, because
    torchrun answers any non-zero rank exit with a ChildFailedError traceback of its own. Elsewhere -> code."""
    path = os.environ.get(EXIT_FILE_ENV)
    if not (path and code and in_launched_rank()):
        return code
    if not os.path.exists(path):
        atomic_write_json(path, {"code": code, "rank": os.environ.get("RANK")}, durable=False)
    return 0


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
def single_process_env(extra: dict[str, str] | None = None):
    """A plain single process gets a 1-rank torch.distributed env (+ `extra`), restored afterwards (tests call
    main())."""
    extra = extra or {}
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", *extra)
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                      **extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
