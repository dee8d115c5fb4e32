"""Periodic training checkpoints and exact resume.

Layout (RUN_DIR/checkpoints/, which must be on storage every rank sees):

    step_00000400/                       one checkpoint, complete once it has this name
        mp_rank_00_model_states.pt       DeepSpeed: module weights, lr scheduler, engine counters
        *_optim_states.pt                DeepSpeed: each rank's ZeRO partition of the fp32 master weights + AdamW
        rank_00000.pt ...                clipforge: each rank's data position and RNG states (torch, python)
        meta.json                        step, world size, time
    latest                               the name of the newest complete checkpoint (written last, atomically)

A checkpoint is written under a temporary name by all ranks, then renamed by rank 0 after a barrier, and only
then does `latest` move: a run killed mid-save leaves at most a stale temporary directory (removed by the next
save), never a half checkpoint that resume would pick. `keep_last` complete checkpoints are kept.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.clip.formats.atomic import atomic_write_text

LATEST = "latest"
TMP_PREFIX = ".tmp-"


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return {"torch": torch.get_rng_state(), "cuda": cuda, "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    random.setstate(_tuples(state["python"]))


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, root: str | Path, step: int, rank: int, rank_state: dict, keep_last: int) -> Path:
    """Collective (every rank calls it): write checkpoint `step` under root, move `latest`, prune old ones."""
    root = Path(root)
    final, tmp = root / step_name(step), root / f"{TMP_PREFIX}{step_name(step)}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a run killed while saving
    _barrier()
    engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)  # collective; DeepSpeed's own files
    tmp.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it only on ranks that hold a partition (stage 0: rank 0)
    torch.save(rank_state, tmp / f"rank_{rank:05d}.pt")
    _barrier()
    if rank == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        (tmp / "meta.json").write_text(json.dumps({"step": step, "world_size": world, "time": time.time()}))
        shutil.rmtree(final, ignore_errors=True)  # the same step saved by an earlier, killed attempt
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name)
        for old in complete(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / "meta.json").is_file())


def find(root: str | Path, spec: str) -> Path | None:
    """`latest` -> the newest complete checkpoint under root (None if there is none yet); else a path to one."""
    if spec != LATEST:
        path = Path(spec)
        if not (path / "meta.json").is_file():
            raise FileNotFoundError(f"not a complete clipforge training checkpoint: {path}")
        return path
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip() / "meta.json").is_file():
        return root / pointer.read_text().strip()
    found = complete(root)  # pointer missing or stale: fall back to the newest complete directory
    return found[-1] if found else None


def load(engine, path: Path, rank: int) -> tuple[int, dict]:
    """Collective: restore weights, optimizer, scheduler (DeepSpeed) and this rank's state. -> (step, rank_state)."""
    meta = json.loads((path / "meta.json").read_text())
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load the checkpoint in {path}")
    mine = path / f"rank_{rank:05d}.pt"
    rank_state = torch.load(mine, weights_only=True) if mine.is_file() else {}
    return int(meta["step"]), rank_state
