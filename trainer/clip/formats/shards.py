"""The shard dir contract: what `clipforge shard` (and img2dataset) write, and what the trainer, the evaluator and
the indexer read. Every reader and writer of a shard dir goes through this module.

A shard dir is one of
  * clipforge shards: SHARDS_DIR/manifest.json =
        {"format": "clipforge.shards.v1", "num_samples": N, "missing": M,
         "shards": [{"tar": "shard-00000.tar", "parquet": "shard-00000.parquet", "num_samples": n}, ...], ...}
    plus the tars it lists (each with an optional per-sample parquet). The manifest is written last and readers
    trust only the shards it lists; a listed tar that is missing on disk is reported, not fatal. Writers may add
    keys (`clipforge shard` adds per shard "bytes", "sha256" of the tar and "keys_sha256", and "plan_id", "seed",
    "failed_shards", ...); readers ignore the keys they do not know.
  * img2dataset's webdataset output (trainer.clip.formats.crawl): {id:05d}.tar with {id:05d}_stats.json, whose
    "successes" is the tar's sample count;
  * a dir of *.tar with neither (sample counts are unknown until counted).

Members: a sample is the run of consecutive tar members that share a key. The key is the member path up to the
first dot of its file name, the extension is the rest, lower-cased (webdataset's rule): `split_member`.
Samples hold one image member (jpg / jpeg / png / webp) and usually `.txt` (caption) and `.json` (metadata).
Tars are written atomically (`write_tar`) with mtime 0, so a rerun writes the same bytes.
"""
from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator

import pyarrow as pa

from trainer.clip.formats.atomic import atomic_open, atomic_write_json, read_json
from trainer.clip.formats.crawl import stats_path
from trainer.clip.formats.tars import TarSink

SHARDS_FORMAT = "clipforge.shards.v1"
MANIFEST = "manifest.json"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# shard-XXXXX.parquet of clipforge shards: one row per sample (tar order), also the sample's KEY.json member;
# the crawl's carried input columns follow. language / clip_score come from the filter (null when not computed).
SAMPLE_SCHEMA = pa.schema([("key", pa.string()), ("url", pa.string()), ("caption", pa.string()),
                           ("width", pa.int32()), ("height", pa.int32()), ("sha256", pa.string()),
                           ("language", pa.string()), ("clip_score", pa.float32())])


class ShardFormatError(ValueError):
    """A shard dir is missing, or its manifest is unreadable or of an unknown format."""


# ----------------------------------------------------------------------------------------------- members
def split_member(name: str) -> tuple[str, str] | None:
    """'dir/000000012.jpg' -> ('dir/000000012', 'jpg'); 'a/b.seg.JSON' -> ('a/b', 'seg.json'); None when the file
    name has no extension or no stem (webdataset skips such members)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def image_ext(exts) -> str | None:
    """The first image extension among a sample's member extensions, in IMAGE_EXTS order."""
    return next((e for e in IMAGE_EXTS if e in exts), None)


@dataclass
class Member:
    name: str  # the member path in the tar
    offset: int  # byte offset of its data in the tar file
    size: int
    data: bytes | None = None  # read only when asked for (see iter_tar_samples)


@dataclass
class TarSample:
    key: str
    members: dict[str, Member] = field(default_factory=dict)  # extension -> member (the first one of each)


def iter_tar_samples(path: str | Path, read: Callable[[str], bool] = lambda ext: True) -> Iterator[TarSample]:
    """The samples of one tar, in tar order. read(ext) says which members' bytes to load (the others keep only
    their offset and size). Raises tarfile.TarError / OSError / EOFError where the tar is unreadable; the samples
    before that point have been yielded, the one being read is lost."""
    current: TarSample | None = None
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            split = split_member(info.name) if info.isfile() else None
            if split is None:
                continue
            key, ext = split
            if current is not None and key != current.key:
                yield current
                current = None
            if current is None:
                current = TarSample(key)
            if ext in current.members:
                continue
            member = Member(info.name, info.offset_data, info.size)
            if read(ext):
                f = tf.extractfile(info)
                member.data = f.read() if f is not None else b""
            current.members[ext] = member
        _check_end_of_archive(tf)
    if current is not None:
        yield current


def _check_end_of_archive(tf: tarfile.TarFile) -> None:
    """tarfile ends its iteration silently at a header cut off by a truncation; a complete tar ends with a zero
    block instead. Raises tarfile.ReadError when it does not (the sample being read is then lost)."""
    tf.fileobj.seek(tf.offset)
    if tf.fileobj.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
        raise tarfile.ReadError(f"truncated tar: no end-of-archive block at offset {tf.offset}")


def count_tar_samples(path: str | Path) -> int:
    """Samples with an image member (used where nothing records the count)."""
    return sum(1 for s in iter_tar_samples(path, read=lambda ext: False) if image_ext(s.members))


class _Digesting:
    """A write-only file that feeds every byte written through it to a hashlib object (what tarfile needs)."""

    def __init__(self, f: IO[bytes], digest):
        self.f, self.digest = f, digest

    def write(self, data) -> int:
        self.digest.update(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.f.tell()


def write_tar(path: str | Path, samples: Iterable[dict], durable: bool = True, digest=None) -> int:
    """Write samples ({"__key__": key, ext: bytes | str | dict (-> JSON)}) as one tar, atomically; -> count.
    `digest` (a hashlib object, e.g. hashlib.sha256()) is updated with every byte of the file as it is written."""
    with atomic_open(path, "wb", durable=durable) as f:
        sink = TarSink(f if digest is None else _Digesting(f, digest))  # mtime 0: same samples, same bytes
        for sample in samples:
            sink.write(sample)
        sink.close()  # closes the tar stream, not f
    return sink.count


# ----------------------------------------------------------------------------------------------- shard dirs
def shard_name(index: int) -> str:
    """'shard-00012': the stem of output shard `index` (tar and parquet)."""
    return f"shard-{index:05d}"


@dataclass
class ShardInfo:
    tar: Path  # absolute
    num_samples: int | None  # from the manifest or _stats.json; None: unknown (count_tar_samples)

    @property
    def exists(self) -> bool:
        return self.tar.is_file()


@dataclass
class ShardDir:
    root: Path
    shards: list[ShardInfo]  # manifest order (missing tars included), else sorted *.tar
    manifest: dict | None = None  # the parsed manifest.json of clipforge shards

    @property
    def missing(self) -> list[ShardInfo]:
        return [s for s in self.shards if not s.exists]

    @property
    def present(self) -> list[ShardInfo]:
        return [s for s in self.shards if s.exists]

    def relative(self, shard: ShardInfo) -> str:
        return shard.tar.relative_to(self.root).as_posix()


def read_manifest(root: str | Path) -> dict:
    """ROOT/manifest.json, checked: a known format and a list of {"tar", "num_samples"} entries."""
    path = Path(root) / MANIFEST
    try:
        m = read_json(path)
        fmt = m.get("format", SHARDS_FORMAT)
        if fmt != SHARDS_FORMAT:
            raise ValueError(f"unknown format {fmt!r} (this clipforge reads {SHARDS_FORMAT!r})")
        for s in m["shards"]:
            str(s["tar"]), int(s.get("num_samples", 1))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ShardFormatError(f"invalid manifest {path}: {e}") from e
    return m


def _stats_count(tar: Path) -> int | None:
    try:
        return int(read_json(stats_path(tar))["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def list_shards(root: str | Path) -> ShardDir:
    """The shards of a dir (see the module docstring). Raises ShardFormatError if it is not a directory or its
    manifest is invalid; an empty dir gives no shards (the caller decides whether that is an error)."""
    root = Path(root)
    if not root.is_dir():
        raise ShardFormatError(f"shard dir not found: {root}")
    if (root / MANIFEST).is_file():
        m = read_manifest(root)
        shards = [ShardInfo((root / s["tar"]).resolve(), int(s.get("num_samples", 1))) for s in m["shards"]]
        return ShardDir(root, shards, m)
    tars = sorted(p.resolve() for p in root.glob("*.tar"))
    return ShardDir(root, [ShardInfo(t, _stats_count(t)) for t in tars])


def is_shard_dir(root: str | Path) -> bool:
    root = Path(root)
    return (root / MANIFEST).is_file() or any(root.glob("*.tar"))


def write_manifest(root: str | Path, shards: list[dict], **extra) -> dict:
    """Write ROOT/manifest.json (atomically; the last file of a shard dir). `shards`: [{"tar", "num_samples",
    "parquet"?}] in order; num_samples is their sum; `extra` keys are recorded alongside. -> the manifest."""
    manifest = {"format": SHARDS_FORMAT, "num_samples": sum(int(s["num_samples"]) for s in shards),
                "missing": 0, **extra, "shards": list(shards)}
    atomic_write_json(Path(root) / MANIFEST, manifest)
    return manifest


def write_shard_dir(root: str | Path, shards: Iterable[Iterable[dict]], durable: bool = True, **extra) -> dict:
    """A complete clipforge shard dir from an iterable of shards (each an iterable of samples, see write_tar):
    ROOT/shard-00000.tar ..., then manifest.json. -> the manifest."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, samples in enumerate(shards):
        n = write_tar(root / f"{shard_name(i)}.tar", samples, durable=durable)
        entries.append({"tar": f"{shard_name(i)}.tar", "num_samples": n})
    return write_manifest(root, entries, **extra)
