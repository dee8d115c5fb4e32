"""The index dir contract: what `clipforge index` writes and `clipforge search` / `clipforge serve` read.

An index dir is one versioned unit. Each build lives in its own folder; `index.json` names the current one and is
the commit marker (replaced atomically, so a rebuild swaps the whole set at once):

    INDEX_DIR/index.json                      {"format": INDEX_FORMAT, "build_id", "build": "builds/<build_id>",
                                               "weights_sha256", "checkpoint", "embeddings", "shards_dir", "dim",
                                               "num_vectors", "factory", "metric", "search_params",
                                               "files": {name: bytes}, ...}: written last
    INDEX_DIR/builds/<build_id>/image.index   the FAISS index over L2-normalised image embeddings, inner product
                                              (= cosine); vector id i is row i of metadata.parquet. An index merged
                                              on disk also has image.ivfdata (its inverted lists, memory-mapped)
    INDEX_DIR/builds/<build_id>/metadata.parquet
                                              one row per vector: METADATA_SCHEMA's columns first (key, caption,
                                              url, shard = tar path relative to shards_dir, member, offset and
                                              size of the image bytes in the tar), then the pipeline's columns;
                                              schema metadata {"build_id", "weights_sha256"}
    INDEX_DIR/builds/<build_id>/metadata.arrow
                                              the same rows and schema as an uncompressed Arrow IPC file, written
                                              with it: memory-mapped by search for row lookups by id (a row costs
                                              a page read, not the decoding of its parquet row group). Optional
                                              for readers: builds from before it exist
    INDEX_DIR/builds/<build_id>/report.json   {"build_id", "weights_sha256", the choice and its reasons, recall@k,
                                              QPS, latency, bytes, build time}
    INDEX_DIR/builds/<build_id>/build.json    a copy of index.json (a build folder describes itself)

A reader (open_index_set) refuses a set whose metadata, report or index files do not carry / match the build id,
the weights hash, the vector count or the recorded sizes. commit_build keeps the previous build (a reader that
read the old index.json can still open it) and removes older ones. No faiss here: the caller writes the index.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from trainer.clip.formats.atomic import atomic_write, atomic_write_json, read_format_json, read_json

INDEX_FORMAT = "clipforge.index.v2"
INDEX_FILE, IVFDATA_FILE, META_FILE, REPORT_FILE, BUILD_FILE = (
    "image.index", "image.ivfdata", "metadata.parquet", "report.json", "build.json")
ROWS_FILE = "metadata.arrow"
META_ROW_GROUP = 64_000
INFO_FILE, BUILDS_DIR = "index.json", "builds"
METADATA_SCHEMA = pa.schema([("key", pa.string()), ("caption", pa.string()), ("url", pa.string()),
                             ("shard", pa.string()), ("member", pa.string()), ("offset", pa.int64()),
                             ("size", pa.int64())])
METADATA_COLUMNS = tuple(METADATA_SCHEMA.names)
KEEP_BUILDS = 2  # the current build and the one before it


class IndexFormatError(ValueError):
    """An index dir is missing, of an unknown format, or a mismatched set."""


def new_build_id() -> str:
    """Sortable and unique: UTC time to the millisecond + random suffix, e.g. 20261201T183000.123Z-3f9a1c."""
    now = time.time()
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now))}.{int(now * 1000) % 1000:03d}Z-{secrets.token_hex(3)}"


def build_dir(index_dir: str | Path, build_id: str) -> Path:
    return Path(index_dir) / BUILDS_DIR / build_id


def write_metadata(path: str | Path, table: pa.Table, build_id: str, weights_sha256: str) -> None:
    """metadata.parquet (and metadata.arrow) of a build, atomically: METADATA_SCHEMA's columns first (cast), the
    others after."""
    own = table.select(list(METADATA_COLUMNS)).cast(METADATA_SCHEMA)
    extra = [c for c in table.column_names if c not in METADATA_COLUMNS]
    schema = pa.schema([*METADATA_SCHEMA, *(table.schema.field(c) for c in extra)]).with_metadata(
        {"build_id": build_id, "weights_sha256": weights_sha256})
    out = pa.Table.from_arrays([*own.columns, *(table.column(c) for c in extra)], schema=schema)
    write_metadata_files(path, schema, [out])


def write_metadata_files(path: str | Path, tagged: pa.Schema, tables) -> int:
    """metadata.parquet at `path` and metadata.arrow next to it, both atomically, from the same stream of tables
    (schema `tagged`, from metadata_writer_schema): -> rows written."""
    import pyarrow.parquet as pq

    path, count = Path(path), 0

    def both(tmp_parquet: str) -> None:
        def rows(tmp_arrow: str) -> None:
            nonlocal count
            with pq.ParquetWriter(tmp_parquet, tagged) as w, pa.OSFile(tmp_arrow, "wb") as sink, \
                    pa.ipc.new_file(sink, tagged) as r:
                for t in tables:
                    t = t.replace_schema_metadata(tagged.metadata)
                    w.write_table(t, row_group_size=META_ROW_GROUP)
                    r.write_table(t, max_chunksize=META_ROW_GROUP)
                    count += len(t)

        atomic_write(path.with_name(ROWS_FILE), rows)

    atomic_write(path, both)
    return count


def metadata_writer_schema(schema: pa.Schema, build_id: str, weights_sha256: str) -> pa.Schema:
    """The schema (with the build's tags) for writing metadata.parquet in batches with a ParquetWriter: the
    caller's columns must start with METADATA_COLUMNS."""
    if tuple(schema.names[:len(METADATA_COLUMNS)]) != METADATA_COLUMNS:
        raise ValueError(f"metadata columns must start with {', '.join(METADATA_COLUMNS)}")
    return schema.with_metadata({"build_id": build_id, "weights_sha256": weights_sha256})


def write_report(path: str | Path, report: dict, build_id: str, weights_sha256: str) -> None:
    atomic_write_json(path, {**report, "build_id": build_id, "weights_sha256": weights_sha256})


def commit_build(index_dir: str | Path, build_id: str, info: dict) -> dict:
    """Make build `build_id` (its index, metadata and report already written) the current one: records the file
    sizes, writes build.json, then index.json (the swap), then prunes builds older than the previous one."""
    index_dir = Path(index_dir)
    root = build_dir(index_dir, build_id)
    for name in (INDEX_FILE, META_FILE, REPORT_FILE):
        if not (root / name).is_file():
            raise IndexFormatError(f"cannot commit build {build_id}: {root / name} is missing")
    files = {p.name: p.stat().st_size for p in sorted(root.iterdir()) if p.name in (INDEX_FILE, IVFDATA_FILE)}
    info = {"format": INDEX_FORMAT, **info, "build_id": build_id, "build": f"{BUILDS_DIR}/{build_id}",
            "files": files}
    atomic_write_json(root / BUILD_FILE, info)
    atomic_write_json(index_dir / INFO_FILE, info)
    _prune(index_dir, keep={build_id})
    return info


def _prune(index_dir: Path, keep: set[str]) -> None:
    builds = index_dir / BUILDS_DIR
    done = sorted((p for p in builds.iterdir() if p.is_dir() and (p / BUILD_FILE).is_file()),
                  key=lambda p: ((p / BUILD_FILE).stat().st_mtime_ns, p.name))  # commit order
    keep = keep | {p.name for p in [p for p in done if p.name not in keep][-(KEEP_BUILDS - 1):]}
    for p in builds.iterdir():
        if p.name not in keep and (p / BUILD_FILE).is_file():
            shutil.rmtree(p, ignore_errors=True)


def read_index_info(index_dir: str | Path) -> dict:
    """INDEX_DIR/index.json, checked for format. Raises IndexFormatError."""
    return read_format_json(Path(index_dir) / INFO_FILE, INDEX_FORMAT, IndexFormatError,
                            "index not found (build one with `clipforge index`)",
                            "rebuild the index with `clipforge index`")


@dataclass(frozen=True)
class IndexSet:
    """A verified build: where its files are and what index.json says about them."""
    info: dict
    root: Path  # INDEX_DIR/builds/<build_id>
    report: dict

    @property
    def index_path(self) -> Path:
        return self.root / INDEX_FILE

    @property
    def meta_path(self) -> Path:
        return self.root / META_FILE

    @property
    def build_id(self) -> str:
        return self.info["build_id"]


def open_index_set(index_dir: str | Path) -> IndexSet:
    """The current build of INDEX_DIR, with every file checked against index.json. Raises IndexFormatError."""
    import pyarrow.parquet as pq

    info = read_index_info(index_dir)
    root = Path(index_dir) / info.get("build", "")
    bid, sha = info.get("build_id"), info.get("weights_sha256")
    for name, size in (info.get("files") or {INDEX_FILE: None}).items():
        path = root / name
        if not path.is_file() or (size is not None and os.path.getsize(path) != size):
            raise IndexFormatError(f"mismatched index set in {index_dir}: {path} is missing or not the file build "
                                   f"{bid} wrote")
    try:
        schema = pq.read_schema(root / META_FILE)
        rows = pq.ParquetFile(root / META_FILE).metadata.num_rows
        report = read_json(root / REPORT_FILE)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise IndexFormatError(f"mismatched index set in {index_dir}: {e}") from e
    tags = {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()}
    checks = [("metadata build_id", tags.get("build_id"), bid), ("metadata weights_sha256",
              tags.get("weights_sha256"), sha), ("metadata rows", rows, info.get("num_vectors")),
              ("report build_id", report.get("build_id"), bid),
              ("report weights_sha256", report.get("weights_sha256"), sha), *_rows_file_checks(root, bid, rows)]
    for what, found, want in checks:
        if found != want:
            raise IndexFormatError(f"mismatched index set in {index_dir}: {what} is {found!r}, index.json says "
                                   f"{want!r} (rebuild with `clipforge index`)")
    return IndexSet(info, root, report)


def _rows_file_checks(root: Path, bid, rows: int) -> list[tuple]:
    """metadata.arrow, when the build has one, must carry the build id and the parquet's row count."""
    path = root / ROWS_FILE
    if not path.is_file():
        return []
    try:
        with pa.memory_map(str(path)) as f:
            r = pa.ipc.open_file(f)
            tags = {k.decode(): v.decode() for k, v in (r.schema.metadata or {}).items()}
            n = sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
    except (OSError, pa.ArrowException) as e:
        raise IndexFormatError(f"mismatched index set in {root.parent.parent}: {path}: {e}") from e
    return [("metadata.arrow build_id", tags.get("build_id"), bid), ("metadata.arrow rows", n, rows)]


def describe(info: dict) -> str:
    """One line for logs: build id, vectors, factory, parameters."""
    return (f"build {info.get('build_id')}: {info.get('num_vectors')} vectors, {info.get('factory')} "
            f"{json.dumps(info.get('search_params', {}), sort_keys=True)}")
