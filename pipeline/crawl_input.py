"""Crawl input: list, count, shard and read a URL list (Parquet, CSV, TSV, JSONL, TXT) with bounded memory.

Reads  anything fsspec opens (local paths, file://, memory://, s3://, ...): a file, a directory (recursive; names
       starting with '.' or '_' skipped), a glob, or a list of these; text formats may end in .gz/.bz2/.zst/.xz.
Does   count rows (Parquet: footer only; text: one streaming pass), plan shards as (file, row range), and read a
       shard's rows as plain-Python dicts {'url', 'caption', <extras>}, holding about one batch at a time.

Rows are numbered per file from 0. Blank lines of JSONL/TXT are not rows, nor is the CSV/TSV header; CSV/TSV cells
are read as strings ('007' stays '007'). A JSONL line that does not parse is a row with url None and
'_input_error'; a CSV/TSV row with the wrong field count is skipped with a warning (in counting and reading alike).
Parquet shards read only the row groups overlapping their range; text shards re-scan their file from its start.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import posixpath
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

FORMATS = ("parquet", "csv", "tsv", "jsonl", "txt")

_EXTENSIONS = {".parquet": "parquet", ".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".txt": "txt"}
_COMPRESSIONS = (".gz", ".bz2", ".zst", ".xz")
_RESERVED = ("url", "caption", "_input_error")  # output keys an extra column may not shadow
_LINE_CHUNK = 1 << 20  # bytes per read when scanning JSONL / TXT
_CSV_MIN_BLOCK = 1 << 20  # bytes; must exceed the longest CSV row


@dataclass(frozen=True)
class InputFile:
    url: str  # fsspec URL or local path, exactly as fsspec.open accepts it
    format: str  # one of FORMATS
    rows: int = -1  # row count once counted
    size: int = -1  # bytes, once counted


@dataclass(frozen=True)
class ShardSpec:
    id: int
    file: str  # InputFile.url
    format: str
    start: int  # first row (0-based, within the file)
    stop: int  # one past the last row


@dataclass(frozen=True)
class _Columns:
    """Which source column feeds which output key, resolved once per shard."""

    url: str
    caption: str | None  # None: not requested or not in the file
    extras: tuple[str, ...]
    names: tuple[str, ...]  # every column of the file

    @property
    def sources(self) -> list[str]:
        """The file columns to read, each once."""
        return list(dict.fromkeys(c for c in (self.url, self.caption, *self.extras) if c is not None))


def list_input_files(spec: str | list[str], input_format: str = "") -> list[InputFile]:
    """Expand spec (file, directory, glob, or a list of these) to InputFiles, sorted by url and deduplicated.

    Every entry must match at least one file (FileNotFoundError otherwise). With input_format, every non-hidden
    file of a directory is taken in that format; without it, only files with a known extension."""
    fmt = _normalize_format(input_format)
    specs = [spec] if isinstance(spec, str) else list(spec)
    found: dict[str, InputFile] = {}
    for entry in specs:
        for f in _expand(entry, fmt):
            found.setdefault(f.url, f)
    if not found:
        raise FileNotFoundError(f"no input files match {spec!r}")
    return sorted(found.values(), key=lambda f: f.url)


def _normalize_format(input_format: str) -> str:
    fmt = input_format.strip().lower()
    fmt = "jsonl" if fmt == "json" else fmt
    if fmt and fmt not in FORMATS:
        raise ValueError(f"unknown input format {input_format!r}; expected one of {FORMATS} (or 'json')")
    return fmt


def _format_from_name(name: str) -> str | None:
    lower = posixpath.basename(name).lower()
    compressed = lower.endswith(_COMPRESSIONS)
    if compressed:
        lower = posixpath.splitext(lower)[0]
    fmt = _EXTENSIONS.get(posixpath.splitext(lower)[1])
    return None if compressed and fmt == "parquet" else fmt


def _expand(entry: str, fmt: str) -> list[InputFile]:
    fs, path = fsspec.core.url_to_fs(entry)
    paths, explicit = _matching_paths(fs, path)
    files = []
    for p in paths:
        kind = fmt or _format_from_name(p)
        if kind is None and explicit:
            raise ValueError(f"unknown input file extension: {entry!r} (give input_format, one of {FORMATS})")
        if kind is not None:
            files.append(InputFile(url=fs.unstrip_protocol(p) if "://" in entry else p, format=kind))
    if not files:
        raise FileNotFoundError(f"no input files match {entry!r}")
    return files


def _matching_paths(fs: fsspec.AbstractFileSystem, path: str) -> tuple[list[str], bool]:
    """The files a glob / directory / file path names (hidden ones skipped), and whether it named one file."""
    if any(c in path for c in "*?["):
        keep_hidden = _is_hidden(posixpath.basename(path))
        found = [p for p, info in fs.glob(path, detail=True).items() if info.get("type") == "file"]
        return [p for p in found if keep_hidden or not _is_hidden(posixpath.basename(p))], False
    if fs.isdir(path):
        n = len(path.rstrip("/")) + 1
        return [p for p in fs.find(path) if not any(map(_is_hidden, p[n:].split("/")))], False
    return ([path], True) if fs.isfile(path) else ([], False)


def _is_hidden(name: str) -> bool:
    return name.startswith((".", "_"))


def count_rows(f: InputFile) -> InputFile:
    """Return f with rows (and size) set: Parquet from the footer; CSV/TSV streamed, header excluded; JSONL/TXT
    lines."""
    if f.format == "parquet":
        with fsspec.open(f.url, "rb") as fh:
            rows = pq.ParquetFile(fh).metadata.num_rows
    elif f.format in ("csv", "tsv"):
        rows = _count_csv(f)
    else:
        rows = sum(len(lines) for lines in _line_chunks(f.url))
    return replace(f, rows=rows, size=file_size(f.url))


def _count_csv(f: InputFile) -> int:
    names = _csv_names(f.url, f.format)
    if not names:
        return 0
    first = names[0]  # parse every row, but convert only one column
    convert = pacsv.ConvertOptions(include_columns=[first], column_types={first: pa.string()})
    with _open_text(f.url) as fh:
        return sum(batch.num_rows for batch in _csv_reader(fh, f.format, convert, warn=False))


def column_names(f: InputFile) -> list[str]:
    """The file's columns: Parquet schema, CSV/TSV header, keys of the first parseable JSONL line, TXT ['url']."""
    if f.format == "parquet":
        with fsspec.open(f.url, "rb") as fh:
            return list(pq.ParquetFile(fh).schema_arrow.names)
    if f.format in ("csv", "tsv"):
        return _csv_names(f.url, f.format)
    if f.format == "jsonl":
        objects = (_parse_json(line) for lines in _line_chunks(f.url) for line in lines)
        return next((list(obj) for obj in objects if isinstance(obj, dict)), [])
    return ["url"]


def plan_shards(files: list[InputFile], samples_per_shard: int) -> list[ShardSpec]:
    """Split every counted file into consecutive row ranges of samples_per_shard; ids 0..N-1 in file order."""
    if samples_per_shard <= 0:
        raise ValueError(f"samples_per_shard must be positive, got {samples_per_shard}")
    shards: list[ShardSpec] = []
    for f in files:
        if f.rows < 0:
            raise ValueError(f"{f.url}: rows not counted (call count_rows first)")
        for start in range(0, f.rows, samples_per_shard):
            stop = min(start + samples_per_shard, f.rows)
            shards.append(ShardSpec(id=len(shards), file=f.url, format=f.format, start=start, stop=stop))
    return shards


def file_size(url: str) -> int:
    """The size in bytes of a file, local or behind any fsspec URL."""
    fs, path = fsspec.core.url_to_fs(url)
    return int(fs.info(path)["size"])


def input_fingerprint(files: list[InputFile]) -> str:
    """sha256 hex of the sorted (url, format, rows, size in bytes) of every file (counted files: no I/O)."""
    entries = [[f.url, f.format, f.rows, f.size if f.size >= 0 else file_size(f.url)] for f in files]
    entries.sort()
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def read_rows(shard: ShardSpec, url_col: str, caption_col: str | None, extra_cols: list[str] | None = None,
              batch_rows: int = 4096) -> Iterator[dict]:
    """Yield the shard's rows [start, stop) as {'url', 'caption', <extra columns>} dicts of plain Python values.

    extra_cols=None: every column but url_col / caption_col; []: none. A caption_col missing from the file gives
    caption None. url_col missing from the file (JSONL: from its first parseable line; later lines without it give
    an '_input_error' row), an explicit extra column missing, or one named like an output key raises ValueError
    here, before the first row. TXT ignores url_col: each line is the url."""
    if batch_rows <= 0:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    names = column_names(InputFile(shard.file, shard.format))
    cols = _resolve_columns(shard, names, url_col, caption_col, extra_cols)
    if shard.stop <= shard.start:
        return iter(())
    if shard.format == "parquet":
        return _parquet_rows(shard, cols, batch_rows)
    if shard.format in ("csv", "tsv"):
        return _csv_rows(shard, cols, batch_rows)
    lines = _window(_line_chunks(shard.file), shard.start, shard.stop)
    if shard.format == "jsonl":
        return (_jsonl_row(line, cols) for line in lines)
    return ({"url": line.strip().decode("utf-8-sig", errors="replace"), "caption": None} for line in lines)


def _resolve_columns(
    shard: ShardSpec, names: list[str], url_col: str, caption_col: str | None, extra_cols: list[str] | None
) -> _Columns:
    if shard.format == "txt":
        url_col, caption_col = "url", None
    lenient = shard.format == "jsonl"  # keys may vary per line; only the first parseable line is checked
    if url_col not in names and not (lenient and not names):
        raise ValueError(f"url column {url_col!r} not found in {shard.file} (columns: {names})")
    caption = caption_col if caption_col is not None and (caption_col in names or lenient) else None
    if extra_cols is None:
        extras = [n for n in names if n not in (url_col, caption_col) and n not in _RESERVED]
    else:
        extras = list(dict.fromkeys(extra_cols))
        bad = [c for c in extras if c in _RESERVED or (c not in names and not lenient)]
        if bad:
            raise ValueError(f"extra columns {bad} not found in {shard.file} or named like an output key")
    return _Columns(url=url_col, caption=caption, extras=tuple(extras), names=tuple(names))


def _window(chunks: Iterable[Any], start: int, stop: int, pos: int = 0) -> Iterator[Any]:
    """From consecutive sized chunks (lists, record batches) whose first row is number pos, yield the rows (for
    lists) or sliced chunks (for batches) covering [start, stop)."""
    for chunk in chunks:
        n = len(chunk)
        lo, hi = max(start - pos, 0), min(stop - pos, n)
        pos += n
        if lo < hi:
            part = chunk if (lo, hi) == (0, n) else chunk[lo:hi]
            if isinstance(part, list):
                yield from part
            else:
                yield part
        if pos >= stop:
            return


def _parquet_rows(shard: ShardSpec, cols: _Columns, batch_rows: int) -> Iterator[dict]:
    with fsspec.open(shard.file, "rb") as fh:
        pf = pq.ParquetFile(fh)
        groups, first = _row_groups_for(pf.metadata, shard.start, shard.stop)
        if not groups:
            return
        batches = pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=cols.sources)
        for batch in _window(batches, shard.start, shard.stop, pos=first):
            yield from _batch_rows(batch, cols, batch_rows)


def _row_groups_for(md: pq.FileMetaData, start: int, stop: int) -> tuple[list[int], int]:
    """Indices of the row groups overlapping [start, stop) and the file row number of the first one."""
    offsets = [0, *itertools.accumulate(md.row_group(i).num_rows for i in range(md.num_row_groups))]
    groups = [i for i in range(md.num_row_groups) if offsets[i] < stop and offsets[i + 1] > start]
    return groups, (offsets[groups[0]] if groups else 0)


def _csv_rows(shard: ShardSpec, cols: _Columns, batch_rows: int) -> Iterator[dict]:
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in cols.names}, include_columns=cols.sources)
    with _open_text(shard.file) as fh:
        for batch in _window(_csv_reader(fh, shard.format, convert, batch_rows), shard.start, shard.stop):
            yield from _batch_rows(batch, cols, batch_rows)


def _jsonl_row(line: bytes, cols: _Columns) -> dict:
    row: dict[str, Any] = {"url": None, "caption": None, **dict.fromkeys(cols.extras)}
    try:
        obj = json.loads(line)
        error = "" if isinstance(obj, dict) else f"JSON line is a {type(obj).__name__}, not an object"
    except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        error = f"invalid JSON line ({e})"
    if error:
        return {**row, "_input_error": f"{error}: {line[:200]!r}"}
    row["url"] = _plain(obj.get(cols.url))
    row["caption"] = _plain(obj.get(cols.caption)) if cols.caption is not None else None
    for col in cols.extras:
        row[col] = _plain(obj.get(col))
    if row["url"] is None:
        row["_input_error"] = f"JSON line has no {cols.url!r}"
    return row


def _batch_rows(batch: pa.RecordBatch, cols: _Columns, batch_rows: int) -> Iterator[dict]:
    keys = ["url", "caption", *cols.extras]
    sources = [cols.url, cols.caption, *cols.extras]
    for offset in range(0, batch.num_rows, batch_rows):
        part = batch.slice(offset, batch_rows)
        values = [_pylist(part.column(s)) if s is not None else [None] * part.num_rows for s in sources]
        for row in zip(*values, strict=True):
            yield dict(zip(keys, row, strict=True))


def _open_text(url: str) -> Any:
    return fsspec.open(url, "rb", compression="infer")


def _line_chunks(url: str) -> Iterator[list[bytes]]:
    """The file's non-empty (not whitespace-only) lines, a list per ~1 MiB read; trailing newline optional."""
    with _open_text(url) as fh:
        tail = b""
        while chunk := fh.read(_LINE_CHUNK):
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            yield [line for line in lines if line.strip()]
        if tail.strip():
            yield [tail]


def _parse_json(line: bytes) -> Any:
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return None


def _csv_reader(fh: Any, fmt: str, convert: pacsv.ConvertOptions, batch_rows: int = 4096,
                warn: bool = True) -> pacsv.CSVStreamingReader:
    def skip_invalid(row: Any) -> str:
        if warn:
            log.warning("skipping malformed %s row (%s fields, %s expected): %.200s", fmt, row.actual_columns,
                        row.expected_columns, row.text)
        return "skip"

    parse = pacsv.ParseOptions(delimiter="\t" if fmt == "tsv" else ",", newlines_in_values=True,
                               invalid_row_handler=skip_invalid)
    read = pacsv.ReadOptions(block_size=max(_CSV_MIN_BLOCK, batch_rows * 512))
    return pacsv.open_csv(fh, read_options=read, parse_options=parse, convert_options=convert)


def _csv_names(url: str, fmt: str) -> list[str]:
    with _open_text(url) as fh:
        try:
            reader = _csv_reader(fh, fmt, pacsv.ConvertOptions(), warn=False)
        except pa.ArrowInvalid as e:
            if "Empty CSV" in str(e):
                return []
            raise
        return list(reader.schema.names)


_BASIC_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_integer, pa.types.is_floating,
                pa.types.is_boolean, pa.types.is_null)


def _pylist(arr: pa.Array) -> list:
    values = arr.to_pylist()
    if any(check(arr.type) for check in _BASIC_TYPES):
        return values
    return [_plain(v) for v in values]


def _plain(v: Any) -> Any:
    """A plain Python value: str/int/float/bool/None kept, bytes decoded, containers as JSON, the rest str()."""
    if v is None or isinstance(v, (str, int, float)):
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)
