"""Periodic training checkpoints, verified, and exact resume with fallback.

Layout (RUN_DIR/checkpoints/, which must be on storage every rank sees):

    step_00000400/                       one checkpoint, complete once it has this name
        mp_rank_00_model_states.pt       DeepSpeed: module weights, lr scheduler, engine counters
        *_optim_states.pt                DeepSpeed: each rank's ZeRO partition of the fp32 master weights + AdamW
        rank_00000.pt ...                clipforge: each rank's data position and RNG states (torch, python)
        meta.json                        step, world size, time
        manifest.json                    every other file's size and checksum (trainer.clip.formats.checksum),
                                         the save's seconds and bytes, the checksums' seconds
    latest                               the name of the newest complete checkpoint (written last, atomically)

Saving (collective): every rank writes its files under a temporary name and checksums each one it wrote (read
back from the page cache, hashed on a thread pool, while it writes the next); rank 0 gathers the entries, writes
meta.json and the manifest, renames the directory and only then moves `latest`. A run killed mid-save leaves at
most a stale temporary directory (removed by the next save), never a half checkpoint that resume would pick. An
OSError on any rank (no space, an I/O error) fails the save on every rank together: the temporary directory is
removed, `latest` stays, and the caller decides to go on or stop (SaveResult.errors). `keep_last` complete
checkpoints are kept.

Resuming: `select` checks the candidate's files against its manifest (each rank checks a share, by size) and
takes the newest checkpoint that verifies, from the one `latest` names down to older ones, reporting each it
skipped and why. An explicit checkpoint dir that does not verify, or checkpoints that all fail, raise
CheckpointDamaged (exit 2). A checkpoint without a manifest (written before manifests existed) is used as is.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.clip.formats import checksum
from trainer.clip.formats.atomic import atomic_write_text

LATEST = "latest"
TMP_PREFIX = ".tmp-"
META = "meta.json"


class CheckpointDamaged(ValueError):
    """A checkpoint whose files do not match its manifest (or none usable): exit 2, with what is wrong."""


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _gather(obj) -> list:
    """Every rank's `obj`, on every rank (one rank: [obj])."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj):
    if not _distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------------------------------------------------- saving
@dataclass
class SaveResult:
    """What one save did, the same on every rank."""
    path: Path | None  # the complete checkpoint, None if the save failed
    errors: list[str] = field(default_factory=list)  # one line per failed write, every rank's
    seconds: float = 0.0
    bytes: int = 0
    checksum_seconds: float = 0.0  # what the checksums added to the save: the slowest rank's wait for its digests
    #                                after its last write (each file is hashed while the next is written)


class _ErrorKeepingFile:
    """A binary file for torch.save that keeps the OSError of a failed write: torch turns it into a RuntimeError
    without the errno ('unexpected pos ...' for ENOSPC), and save_torch re-raises the real one."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_torch(obj, path: str | Path, **kwargs) -> None:
    """torch.save(obj, path) whose write failures raise the OSError that caused them (no space, an I/O error)."""
    with open(path, "wb") as f:
        out = _ErrorKeepingFile(f)
        try:
            torch.save(obj, out, **kwargs)
        except RuntimeError as e:
            if out.error is not None:
                raise out.error from e
            raise


class _Recorder:
    """For one save: DeepSpeed's file writes (its checkpoint engine's save / makedirs, the ZeRO recovery script)
    are recorded, and an OSError in them is recorded instead of raised, so the failing rank still reaches every
    barrier of DeepSpeed's save_checkpoint and the ranks fail the save together."""

    def __init__(self, engine):
        self.engine, self.ce = engine, engine.checkpoint_engine
        self.written: dict[str, Future] = {}  # path -> its digest, computed while the next file is written
        self.errors: list[str] = []

    def _guard(self, what: str, fn, path: str | None = None):
        try:
            fn()
            if path is not None:
                self.written[path] = checksum.digest_later(path)
        except OSError as e:
            self.errors.append(f"{what}: {e}")
            if path is not None:
                Path(path).unlink(missing_ok=True)

    def __enter__(self) -> "_Recorder":
        ce, engine = self.ce, self.engine
        save, makedirs, script = ce.save, ce.makedirs, getattr(engine, "_copy_recovery_script", None)
        def guarded_save(state_dict, path, *args, **kwargs):
            if hasattr(ce, "zipfile_serialization"):  # DeepSpeed's TorchCheckpointEngine.save, with real errors
                write = lambda: save_torch(state_dict, path, _use_new_zipfile_serialization=ce.zipfile_serialization)  # noqa: E731
            else:
                write = lambda: save(state_dict, path, *args, **kwargs)  # noqa: E731
            self._guard(f"writing {path}", write, str(path))

        def guarded_makedirs(path, *args, **kwargs):
            self._guard(f"creating {path}", lambda: makedirs(path, *args, **kwargs))

        def guarded_script(save_path, *args, **kwargs):
            self._guard(f"copying DeepSpeed's recovery script to {save_path}", lambda: script(save_path, *args,
                                                                                             **kwargs))
        ce.save, ce.makedirs = guarded_save, guarded_makedirs
        if script is not None:
            engine._copy_recovery_script = guarded_script
        return self

    def __exit__(self, *exc) -> None:
        for obj, name in ((self.ce, "save"), (self.ce, "makedirs"), (self.engine, "_copy_recovery_script")):
            obj.__dict__.pop(name, None)  # back to the class's method


def _try(what: str, fn) -> list[str]:
    try:
        fn()
        return []
    except OSError as e:
        return [f"{what}: {e}"]


def _write_rank_state(tmp: Path, rank: int, state: dict, written: dict) -> None:
    tmp.mkdir(parents=True, exist_ok=True)  # DeepSpeed creates it only on ranks that hold a partition
    path = tmp / f"rank_{rank:05d}.pt"
    save_torch(state, path)
    written[str(path)] = checksum.digest_later(path)


def _entries(tmp: Path, written: dict) -> dict:
    """{relpath: {"bytes", "digest"}} of this rank's files, from their background digests."""
    out = {}
    for path, future in written.items():
        size, digest = future.result()
        out[Path(path).relative_to(tmp).as_posix()] = {"bytes": size, "digest": digest}
    return out


def save(engine, root: str | Path, step: int, rank: int, rank_state: dict, keep_last: int) -> SaveResult:
    """Collective (every rank calls it): write checkpoint `step` under root, verify-ready (manifest), move
    `latest`, prune old ones. Never raises for an OSError: the result says what failed."""
    t0, root = time.perf_counter(), Path(root)
    final, tmp = root / step_name(step), root / f"{TMP_PREFIX}{step_name(step)}"
    errors = _try(f"preparing {root}", lambda: (root.mkdir(parents=True, exist_ok=True),
                                                shutil.rmtree(tmp, ignore_errors=True))) if rank == 0 else []
    _barrier()
    with _Recorder(engine) as rec:
        engine.save_checkpoint(str(root), tag=tmp.name, save_latest=False)  # collective; DeepSpeed's own files
    errors += rec.errors
    written = dict(rec.written)
    errors += _try(f"writing rank {rank}'s state", lambda: _write_rank_state(tmp, rank, rank_state, written))
    h0 = time.perf_counter()  # from here on, the checksums' cost: the part not overlapped with writing
    entries: dict = {}
    errors += _try(f"checksumming rank {rank}'s files", lambda: entries.update(_entries(tmp, written)))
    reports = _gather({"errors": errors, "files": entries, "hash_s": time.perf_counter() - h0})
    errors = [e for r in reports for e in r["errors"]]
    files = {k: v for r in reports for k, v in r["files"].items()}
    hash_s = max(r["hash_s"] for r in reports)
    if rank == 0:
        if not errors:
            errors = _try(f"committing {final}", lambda: _commit(tmp, final, step, files, hash_s, t0))
        if errors:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            for old in complete(root)[:-keep_last] if keep_last > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
    errors = _from_rank0(errors)
    total = sum(int(v["bytes"]) for v in files.values())
    return SaveResult(None if errors else final, errors, time.perf_counter() - t0, total, hash_s)


def _commit(tmp: Path, final: Path, step: int, files: dict, hash_s: float, t0: float) -> None:
    """Rank 0: meta.json, the manifest (files no rank recorded, e.g. meta.json, are checksummed here), rename,
    `latest`."""
    world = dist.get_world_size() if _distributed() else 1
    (tmp / META).write_text(json.dumps({"step": step, "world_size": world, "time": time.time()}))
    files = {**files, **checksum.entries_for(tmp, checksum.unlisted(tmp, files))}
    checksum.write_manifest(tmp, files, step=step, save_seconds=round(time.perf_counter() - t0, 4),
                            checksum_seconds=round(hash_s, 4), bytes=sum(int(v["bytes"]) for v in files.values()))
    shutil.rmtree(final, ignore_errors=True)  # the same step saved by an earlier, killed attempt
    os.replace(tmp, final)
    atomic_write_text(final.parent / LATEST, final.name)


# ------------------------------------------------------------------------------------------------- finding
def complete(root: str | Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / META).is_file())


def find(root: str | Path, spec: str) -> Path | None:
    """`latest` -> the newest complete checkpoint under root (None if there is none yet); else a path to one.
    Completeness only; `select` also verifies the files."""
    if spec != LATEST:
        path = Path(spec)
        if not (path / META).is_file():
            raise FileNotFoundError(f"not a complete clipforge training checkpoint: {path}")
        return path
    found = candidates(root)
    return found[0] if found else None


def candidates(root: str | Path) -> list[Path]:
    """Complete checkpoints to resume from, best first: the one `latest` names, then the older ones, newest first
    (ones newer than `latest` belong to an abandoned attempt). Without a valid pointer: all, newest first."""
    root = Path(root)
    found = complete(root)
    pointer = root / LATEST
    name = pointer.read_text().strip() if pointer.is_file() else ""
    named = [p for p in found if p.name == name]
    if named:
        return named + [p for p in reversed(found) if p.name < name]
    return list(reversed(found))


def verify(path: Path, share: tuple[int, int] = (0, 1)) -> tuple[list[str], dict]:
    """This caller's share of the checks of one checkpoint. -> (problems, stats); no manifest -> ([], {"legacy"})."""
    if not (path / checksum.MANIFEST).exists():
        return [], {"legacy": True, "files": 0, "bytes": 0, "seconds": 0.0}
    try:
        return checksum.verify(path, share)
    except checksum.ManifestError as e:
        return [str(e)], {"files": 0, "bytes": 0, "seconds": 0.0}


def verify_everywhere(path: Path, rank: int, world: int) -> tuple[list[str], dict]:
    """Collective: every rank checks its share; -> (all problems, summed stats with the slowest rank's seconds)."""
    reports = _gather(verify(path, (rank, world)))
    problems = sorted({p for probs, _ in reports for p in probs})
    stats = {"files": sum(s["files"] for _, s in reports), "bytes": sum(s["bytes"] for _, s in reports),
             "seconds": max(s["seconds"] for _, s in reports), "legacy": any(s.get("legacy") for _, s in reports)}
    return problems, stats


def _damage(path: Path, problems: list[str]) -> str:
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return f"{path}: " + "; ".join(problems[:3]) + more


def select(root: str | Path, spec: str, rank: int = 0, world: int = 1) -> tuple[Path | None, dict, list[str]]:
    """Collective: the checkpoint to resume from for --resume `spec`, verified. -> (path or None for a fresh
    start, its verification stats, one line per damaged checkpoint skipped). CheckpointDamaged if `spec` is a
    dir that does not verify, or if every checkpoint under root fails."""
    if spec != LATEST:
        path = find(root, spec)
        problems, stats = verify_everywhere(path, rank, world)
        if problems:
            raise CheckpointDamaged(f"checkpoint {_damage(path, problems)}; pick an older one, or pass "
                                    f"--resume latest to fall back automatically")
        return path, stats, []
    skipped = []
    for path in map(Path, _from_rank0([str(p) for p in candidates(root)])):  # one list: rank 0's view of root
        problems, stats = verify_everywhere(path, rank, world)
        if not problems:
            return path, stats, skipped
        skipped.append(_damage(path, problems))
    if skipped:
        raise CheckpointDamaged("no checkpoint under " f"{root} verifies: " + " | ".join(skipped)
                                + "; remove them to start afresh")
    return None, {}, []


def load(engine, path: Path, rank: int) -> tuple[int, dict]:
    """Collective: restore weights, optimizer, scheduler (DeepSpeed) and this rank's state. -> (step, rank_state)."""
    meta = json.loads((path / META).read_text())
    try:
        load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name)
        mine = path / f"rank_{rank:05d}.pt"
        rank_state = torch.load(mine, weights_only=True) if mine.is_file() else {}
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # e.g. a damaged file of a manifest-less checkpoint
        raise CheckpointDamaged(f"cannot load checkpoint {path}: {str(e).splitlines()[0]}") from e
    if load_path is None:
        raise CheckpointDamaged(f"DeepSpeed could not load the checkpoint in {path}")
    return int(meta["step"]), rank_state
