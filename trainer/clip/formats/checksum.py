"""File checksums and directory manifests: the one way clipforge records what a directory must hold and checks it.

A digest is `sha256c:<hex>`: SHA-256 over the SHA-256 digests of the file's consecutive 16 MiB chunks (a hash
list; an empty file hashes no chunks). The chunks are hashed on a thread pool (hashlib releases the GIL), so a
multi-GB checkpoint file is checked at several GB/s on a many-core node instead of one core's ~0.9 GB/s; any
changed, missing or added byte changes the digest.

manifest.json (MANIFEST):
    {"format": "clipforge.manifest.v1", "algorithm": "sha256c",
     "files": {"RELPATH": {"bytes": N, "digest": "sha256c:..."}, ...}, ...whatever the writer adds}
It lists every file of the directory except itself and is written last (atomically), so a directory with a
manifest is one whose writer finished; `verify` says what differs from it. No torch here.
"""
from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from trainer.clip.formats.atomic import atomic_write_json, read_format_json

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "clipforge.manifest.v1"
ALGORITHM = "sha256c"
CHUNK = 16 << 20
_POOL: ThreadPoolExecutor | None = None  # chunk hashing
_OUTER: ThreadPoolExecutor | None = None  # whole files (digest_later), each feeding chunks to _POOL


class ManifestError(ValueError):
    """A manifest that is missing or unreadable."""


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="checksum")
    return _POOL


def _sha256(chunk: bytes) -> bytes:
    return hashlib.sha256(chunk).digest()


def file_digest(path: str | Path) -> tuple[int, str]:
    """(size in bytes, digest) of one file: read in 16 MiB chunks, hashed in parallel, at most 2 chunks per thread
    in flight (bounded memory)."""
    pool, pending, digests, size = _pool(), [], [], 0
    limit = 2 * pool._max_workers
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            size += len(chunk)
            pending.append(pool.submit(_sha256, chunk))
            if len(pending) >= limit:
                digests.append(pending.pop(0).result())
    digests += [p.result() for p in pending]
    return size, f"{ALGORITHM}:{hashlib.sha256(b''.join(digests)).hexdigest()}"


def digest_later(path: str | Path) -> Future:
    """file_digest(path) on a background thread: a writer starts hashing a file it has just written while it
    writes the next one (the result is (size, digest))."""
    global _OUTER
    if _OUTER is None:
        _OUTER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checksum-file")
    return _OUTER.submit(file_digest, path)


def entries_for(root: str | Path, relpaths) -> dict[str, dict]:
    """{relpath: {"bytes", "digest"}} for files under root."""
    root = Path(root)
    out = {}
    for rel in relpaths:
        size, digest = file_digest(root / rel)
        out[str(rel)] = {"bytes": size, "digest": digest}
    return out


def unlisted(root: str | Path, listed) -> list[str]:
    """Files under root (recursively) that are neither in `listed` nor the manifest itself, sorted."""
    root, listed = Path(root), set(listed)
    found = (p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
    return sorted(rel for rel in found if rel not in listed and rel != MANIFEST)


def write_manifest(root: str | Path, files: dict[str, dict], **extra) -> Path:
    """Write root/manifest.json listing `files` (entries_for's shape) plus `extra` fields; atomic."""
    path = Path(root) / MANIFEST
    atomic_write_json(path, {"format": MANIFEST_FORMAT, "algorithm": ALGORITHM, **extra,
                             "files": dict(sorted(files.items()))})
    return path


def read_manifest(root: str | Path) -> dict:
    manifest = read_format_json(Path(root) / MANIFEST, MANIFEST_FORMAT, ManifestError, "no manifest",
                                "not a checkpoint manifest")
    if not isinstance(manifest.get("files"), dict):
        raise ManifestError(f"{Path(root) / MANIFEST} has no file list")
    return manifest


def check_file(root: str | Path, rel: str, entry: dict) -> str:
    """'' if root/rel matches its manifest entry, else what is wrong with it (one line)."""
    path = Path(root) / rel
    try:
        actual = path.stat().st_size
    except OSError:
        return f"{rel}: missing"
    if actual != entry.get("bytes"):
        return f"{rel}: {actual} bytes, the manifest says {entry.get('bytes')} (truncated or partly written)"
    try:
        _, digest = file_digest(path)
    except OSError as e:
        return f"{rel}: unreadable ({e})"
    if digest != entry.get("digest"):
        return f"{rel}: checksum mismatch (the bytes changed after the save)"
    return ""


def verify(root: str | Path, share: tuple[int, int] = (0, 1)) -> tuple[list[str], dict]:
    """Check the files the manifest of `root` lists. share=(i, n): only this caller's 1/n of them (by size,
    greedily balanced; n callers together check every file once). -> (problems, {"files", "bytes", "seconds"});
    ManifestError when there is no readable manifest."""
    t0 = time.perf_counter()
    files = read_manifest(root)["files"]
    mine = assign(files, share[1])[share[0]]
    problems = [p for p in (check_file(root, rel, files[rel]) for rel in mine) if p]
    return problems, {"files": len(mine), "bytes": sum(files[r].get("bytes", 0) for r in mine),
                      "seconds": time.perf_counter() - t0}


def assign(files: dict[str, dict], n: int) -> list[list[str]]:
    """Split the manifest's files over n workers, largest first to the least-loaded (deterministic)."""
    loads, parts = [0] * n, [[] for _ in range(n)]
    for rel in sorted(files, key=lambda r: (-int(files[r].get("bytes", 0)), r)):
        i = loads.index(min(loads))
        parts[i].append(rel)
        loads[i] += int(files[rel].get("bytes", 0))
    return parts
