"""Atomic file writes: the one way clipforge writes a file that another process, or a rerun, may read.

A write goes to a temp file in the target's directory (`.NAME.<random>.tmp`), is flushed and fsynced, renamed over
the target with os.replace (atomic within one POSIX filesystem), and then the directory is fsynced so the rename
itself survives a crash. A reader sees the old file or the new one, never part of one; a killed writer leaves at
most a `.NAME.*.tmp` file, which no reader looks at. `durable=False` skips both fsyncs (scratch files that a rerun
rewrites anyway), keeping the all-or-nothing rename.

Owns: atomic_write (any writer that takes a path: pyarrow, faiss, safetensors, torch.save), atomic_open (a file
object, for streaming writers such as a tar), atomic_write_bytes / _text / _json, move_into_place (files another
library wrote in a scratch dir, committed one by one), read_json.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

FILE_MODE = 0o644  # mkstemp creates 0600; written files are meant to be read by other users' jobs too


def _fsync_path(path: str | Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems (and directories on some platforms) refuse fsync: the rename still holds
        pass
    finally:
        os.close(fd)


def _temp_in(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def _commit(tmp: str, path: Path, durable: bool) -> None:
    if durable:
        _fsync_path(tmp)
    os.chmod(tmp, FILE_MODE)
    os.replace(tmp, path)
    if durable:
        _fsync_path(path.parent, directory=True)


def atomic_write(path: str | Path, write: Callable[[str], object], durable: bool = True) -> Path:
    """Call write(temp_path) to produce the file, then move it over `path` atomically. Returns `path`."""
    path = Path(path)
    tmp = _temp_in(path)
    try:
        write(tmp)
        _commit(tmp, path, durable)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", durable: bool = True, **kwargs) -> Iterator[IO]:
    """`with atomic_open(p) as f: ...` writes to a temp file that replaces `p` only if the block completes."""
    path = Path(path)
    tmp = _temp_in(path)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
        _commit(tmp, path, durable)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | Path, data: bytes, durable: bool = True) -> Path:
    with atomic_open(path, "wb", durable=durable) as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def atomic_write_json(path: str | Path, obj, durable: bool = True) -> Path:
    """Pretty-printed JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", durable=durable)


def move_into_place(pairs: list[tuple[str | Path, str | Path]], durable: bool = True,
                    between: Callable[[int], object] | None = None) -> None:
    """Commit finished files (src, dst): fsync each, os.replace into place, fsync the target dirs. Each file
    appears whole or not at all; callers write their completion marker after this returns. `between(i)` runs
    after the i-th move (a fault-injection hook for tests)."""
    for i, (src, dst) in enumerate(pairs):
        if durable:
            _fsync_path(src)
        os.chmod(src, FILE_MODE)
        os.replace(src, dst)
        if between is not None:
            between(i)
    if durable:
        for d in {Path(dst).parent for _, dst in pairs}:
            _fsync_path(d, directory=True)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_format_json(path: str | Path, fmt: str, error: type[Exception], missing: str, stale: str) -> dict:
    """A contract's JSON file, checked: `error(...)` when it is absent (message + `missing`), unreadable, not an
    object, or of another "format" than `fmt` (message + `stale`)."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path} does not exist: {missing}")
    try:
        obj = read_json(path)
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}") from e
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        found = obj.get("format") if isinstance(obj, dict) else None
        raise error(f"{path}: unknown format {found!r}, expected {fmt!r} ({stale})")
    return obj
