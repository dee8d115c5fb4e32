"""pipeline.crawl_input: listing, counting, shard planning and bounded reading of every input format."""

from __future__ import annotations

import csv
import gzip
import io
import json
import uuid

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.crawl_input import (
    FORMATS,
    InputFile,
    ShardSpec,
    column_names,
    count_rows,
    input_fingerprint,
    list_input_files,
    plan_shards,
    read_rows,
)

N = 25
TRICKY = 'a, "quoted"\ncaption'  # comma, quote and embedded newline


def _rows(n: int = N) -> list[dict]:
    return [
        {
            "url": f"http://example.com/img/{i}.jpg",
            "caption": TRICKY if i == 5 else f"caption {i}",
            "uid": f"{i:03d}",
            "license": "cc-by" if i % 2 else "cc0",
        }
        for i in range(n)
    ]


ROWS = _rows()
COLS = ["url", "caption", "uid", "license"]


def _csv_text(rows: list[dict], delimiter: str = ",") -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLS, delimiter=delimiter, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _jsonl_lines(rows: list[dict]) -> list[str]:
    lines = [json.dumps(r) for r in rows]
    lines.insert(10, "{not json")  # becomes row 10: an error row
    lines.insert(3, "   ")  # blank: not a row
    return lines


JSONL_EXPECTED = ROWS[:10] + [None] + ROWS[10:]  # None marks the error row


@pytest.fixture()
def inputs(tmp_path):
    """The same 25 rows in every format; returns {name: path}."""
    paths = {name: tmp_path / name for name in ("t.parquet", "t.csv", "t.tsv", "t.jsonl", "t.txt", "t.csv.gz")}
    pq.write_table(pa.Table.from_pylist(ROWS), paths["t.parquet"], row_group_size=4)
    paths["t.csv"].write_text(_csv_text(ROWS))
    paths["t.tsv"].write_text(_csv_text(ROWS, "\t"))
    paths["t.jsonl"].write_text("\n".join(_jsonl_lines(ROWS)) + "\n\n")
    paths["t.txt"].write_text("\n".join(r["url"] for r in ROWS[:12]) + "\n\n" + "\n".join(r["url"] for r in ROWS[12:]))
    with gzip.open(paths["t.csv.gz"], "wt") as fh:
        fh.write(_csv_text(ROWS))
    return {k: str(v) for k, v in paths.items()}


def _read_all(f: InputFile, per_shard: int = 7, **kw) -> list[dict]:
    f = count_rows(f)
    out: list[dict] = []
    for shard in plan_shards([f], per_shard):
        out.extend(read_rows(shard, "url", "caption", **kw))
    return out


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "t.tsv", "t.csv.gz"])
def test_tabular_roundtrip(inputs, name):
    (f,) = list_input_files(inputs[name])
    assert f.format == ("csv" if name == "t.csv.gz" else name.split(".")[1])
    assert count_rows(f).rows == N
    got = _read_all(f)
    assert got == ROWS  # every row once, in order, extra columns carried
    assert got[7]["uid"] == "007" and got[5]["caption"] == TRICKY
    assert column_names(f) == COLS


def test_jsonl_roundtrip_with_bad_line(inputs):
    (f,) = list_input_files(inputs["t.jsonl"])
    assert count_rows(f).rows == N + 1
    got = _read_all(f)
    assert len(got) == N + 1
    for row, want in zip(got, JSONL_EXPECTED, strict=True):
        if want is None:
            assert row["url"] is None and "not json" in row["_input_error"]
        else:
            assert row == want
    assert column_names(f) == COLS


def test_txt_roundtrip(inputs):
    (f,) = list_input_files(inputs["t.txt"])
    assert count_rows(f).rows == N
    assert _read_all(f) == [{"url": r["url"], "caption": None} for r in ROWS]
    assert column_names(f) == ["url"]


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "t.jsonl"])
def test_extra_cols_selection(inputs, name):
    f = count_rows(list_input_files(inputs[name])[0])
    (shard,) = plan_shards([f], 100)
    assert all(set(r) == {"url", "caption"} for r in read_rows(shard, "url", "caption", extra_cols=[]) if r["url"])
    rows = [r for r in read_rows(shard, "url", None, extra_cols=["license"]) if r["url"]]
    assert rows[0] == {"url": ROWS[0]["url"], "caption": None, "license": "cc0"}


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "t.tsv", "t.jsonl"])
def test_missing_url_column(inputs, name):
    f = count_rows(list_input_files(inputs[name])[0])
    with pytest.raises(ValueError, match=r"'URL'.*t\."):
        read_rows(plan_shards([f], 7)[0], "URL", "caption")


def test_missing_explicit_extra_column_and_missing_caption(inputs):
    f = count_rows(list_input_files(inputs["t.parquet"])[0])
    shard = plan_shards([f], 7)[0]
    with pytest.raises(ValueError, match="nope"):
        read_rows(shard, "url", "caption", extra_cols=["nope"])
    assert next(read_rows(shard, "url", "no_such_caption", extra_cols=[]))["caption"] is None


class _ParquetSpy:
    """Wraps ParquetFile.iter_batches to record the requested row groups and the rows actually decoded."""

    def __init__(self, monkeypatch):
        self.row_groups: list[list[int]] = []
        self.rows_decoded = 0
        real = pq.ParquetFile.iter_batches
        spy = self

        def iter_batches(pf, *args, **kwargs):
            spy.row_groups.append(list(kwargs.get("row_groups") or range(pf.metadata.num_row_groups)))
            for batch in real(pf, *args, **kwargs):
                spy.rows_decoded += batch.num_rows
                yield batch

        def forbidden(*args, **kwargs):
            raise AssertionError("whole-file / whole-group read")

        monkeypatch.setattr(pq.ParquetFile, "iter_batches", iter_batches)
        for name in ("read", "read_row_groups", "read_row_group"):
            monkeypatch.setattr(pq.ParquetFile, name, forbidden)


def test_parquet_reads_only_overlapping_row_groups(inputs, monkeypatch):
    spy = _ParquetSpy(monkeypatch)
    f = count_rows(list_input_files(inputs["t.parquet"])[0])
    rows = list(read_rows(ShardSpec(0, f.url, "parquet", 9, 18), "url", "caption"))  # groups 2, 3, 4 (0-based)
    assert rows == ROWS[9:18]
    assert spy.row_groups == [[2, 3, 4]]


def test_parquet_large_file_range_reads_one_or_two_groups(tmp_path, monkeypatch):
    n = 200_000
    table = pa.table({"url": [f"http://x/{i}" for i in range(n)], "uid": [f"{i:06d}" for i in range(n)]})
    path = str(tmp_path / "big.parquet")
    pq.write_table(table, path, row_group_size=10_000)
    f = count_rows(InputFile(path, "parquet"))
    assert f.rows == n
    spy = _ParquetSpy(monkeypatch)
    inside = list(read_rows(ShardSpec(0, path, "parquet", 45_500, 46_500), "url", None, batch_rows=256))
    assert [r["uid"] for r in inside] == [f"{i:06d}" for i in range(45_500, 46_500)]
    straddle = list(read_rows(ShardSpec(1, path, "parquet", 49_500, 50_500), "url", None))
    assert [r["url"] for r in straddle] == [f"http://x/{i}" for i in range(49_500, 50_500)]
    assert spy.row_groups == [[4], [4, 5]]
    assert spy.rows_decoded <= 30_000


def test_plan_shards_boundaries(inputs, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("url,caption\n")
    files = [count_rows(f) for f in list_input_files([inputs["t.csv"], str(empty), str(header_only), inputs["t.txt"]])]
    assert [f.rows for f in files] == [0, 0, N, N]  # sorted: empty.txt, header.csv, t.csv, t.txt
    shards = plan_shards(files, 7)
    assert [s.id for s in shards] == list(range(8))
    assert [(s.start, s.stop) for s in shards] == [(0, 7), (7, 14), (14, 21), (21, 25)] * 2
    assert {s.file for s in shards} == {inputs["t.csv"], inputs["t.txt"]}
    with pytest.raises(ValueError):
        plan_shards([InputFile(inputs["t.csv"], "csv")], 7)  # not counted
    with pytest.raises(ValueError):
        plan_shards(files, 0)


def test_directory_of_mixed_files(inputs, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.json").write_text(json.dumps(ROWS[0]) + "\n")
    for hidden in (".hidden.csv", "_SUCCESS", "README.md"):
        (tmp_path / hidden).write_text("url\nhttp://nope\n")
    (tmp_path / "_tmp").mkdir()
    (tmp_path / "_tmp" / "part.csv").write_text("url\nhttp://nope\n")
    files = list_input_files(str(tmp_path))
    names = [f.url.rsplit("/", 1)[1] for f in files]
    assert names == ["more.json", "t.csv", "t.csv.gz", "t.jsonl", "t.parquet", "t.tsv", "t.txt"]
    assert [f.format for f in files] == ["jsonl", "csv", "csv", "jsonl", "parquet", "tsv", "txt"]
    assert all(f.format in FORMATS for f in files)
    assert sum(count_rows(f).rows for f in files) == 1 + 6 * N + 1
    # a list mixing the directory and one of its files is deduplicated
    assert list_input_files([str(tmp_path), inputs["t.csv"]]) == files


def test_glob(inputs, tmp_path):
    (tmp_path / ".hidden.csv").write_text("url\nhttp://nope\n")
    files = list_input_files(str(tmp_path / "*.csv*"))
    assert [f.url for f in files] == [inputs["t.csv"], inputs["t.csv.gz"]]


def test_input_format_override_and_unknown_extension(tmp_path):
    odd = tmp_path / "urls.list"
    odd.write_text("http://a\nhttp://b\n")
    with pytest.raises(ValueError, match="extension"):
        list_input_files(str(odd))
    with pytest.raises(ValueError, match="format"):
        list_input_files(str(odd), input_format="xml")
    (f,) = list_input_files(str(odd), input_format="txt")
    assert [r["url"] for r in _read_all(f)] == ["http://a", "http://b"]
    (tmp_path / "rows.data").write_text('{"url": "http://c"}\n')
    (j,) = list_input_files(str(tmp_path / "rows.data"), input_format="json")
    assert j.format == "jsonl" and _read_all(j)[0]["url"] == "http://c"


def test_nothing_matches(tmp_path):
    with pytest.raises(FileNotFoundError):
        list_input_files(str(tmp_path / "missing.csv"))
    with pytest.raises(FileNotFoundError):
        list_input_files(str(tmp_path / "*.parquet"))
    with pytest.raises(FileNotFoundError):
        list_input_files(str(tmp_path))  # empty directory
    with pytest.raises(FileNotFoundError):
        list_input_files([])


@pytest.fixture()
def memdir():
    fs = fsspec.filesystem("memory")
    root = f"/urls-{uuid.uuid4().hex}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_memory_urls(memdir):
    fs, root = memdir
    with fs.open(f"{root}/a.csv", "w") as fh:
        fh.write(_csv_text(ROWS[:10]))
    with fs.open(f"{root}/b.parquet", "wb") as fh:
        pq.write_table(pa.Table.from_pylist(ROWS[10:]), fh, row_group_size=4)
    with fs.open(f"{root}/c.txt", "w") as fh:
        fh.write("http://z\n")
    files = list_input_files(f"memory://{root}")
    assert [f.format for f in files] == ["csv", "parquet", "txt"]
    assert all(f.url.startswith("memory://") for f in files)
    assert [f.url for f in list_input_files(f"memory://{root}/*.csv")] == [files[0].url]
    got = []
    for f in files[:2]:
        got += _read_all(f, per_shard=4)
    assert got == ROWS
    assert len(input_fingerprint([count_rows(f) for f in files])) == 64


def test_file_url(inputs):
    (f,) = list_input_files("file://" + inputs["t.tsv"])
    assert f.url == "file://" + inputs["t.tsv"] and f.format == "tsv"
    assert _read_all(f, per_shard=10) == ROWS


def test_fingerprint(inputs, tmp_path):
    def fingerprint() -> str:
        return input_fingerprint([count_rows(f) for f in list_input_files(str(tmp_path))])

    first = fingerprint()
    assert fingerprint() == first
    (tmp_path / "t.csv").write_text(_csv_text(ROWS))  # rewritten, same bytes
    assert fingerprint() == first
    changed = [dict(r) for r in ROWS]
    changed[3]["url"] = "http://example.com/img/3-changed.jpg"  # same row count, different content
    (tmp_path / "t.csv").write_text(_csv_text(changed))
    second = fingerprint()
    assert second != first
    (tmp_path / "t.txt").write_text("http://only-one\n")
    assert fingerprint() != second


def test_malformed_rows_do_not_crash(tmp_path):
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("url,caption\nhttp://a,x\nhttp://b,y,extra\nhttp://c,z\n")
    f = count_rows(InputFile(str(bad_csv), "csv"))
    assert f.rows == 2
    assert [r["url"] for r in read_rows(plan_shards([f], 10)[0], "url", "caption")] == ["http://a", "http://c"]
    bad_jsonl = tmp_path / "bad.jsonl"
    bad_jsonl.write_bytes(b'[1, 2]\n{"url": "http://ok"}\n{"caption": "no url"}\n\xff\xfe\n')
    g = count_rows(InputFile(str(bad_jsonl), "jsonl"))
    rows = list(read_rows(plan_shards([g], 10)[0], "url", "caption"))
    assert [r["url"] for r in rows] == [None, "http://ok", None, None]
    assert "_input_error" not in rows[1]
    assert all(rows[i].get("_input_error") for i in (0, 2, 3))


def test_csv_quoted_newlines_across_blocks(tmp_path):
    rows = [{"url": f"http://x/{i}", "caption": f"line one {i}\nline, two \"{i}\"" + "x" * 80, "uid": f"{i:05d}",
             "license": ""} for i in range(30_000)]  # ~3.5 MB: several 1 MiB CSV blocks, values straddle their edges
    path = tmp_path / "multiline.csv"
    path.write_text(_csv_text(rows))
    f = count_rows(InputFile(str(path), "csv"))
    assert f.rows == len(rows)
    shard = ShardSpec(0, f.url, "csv", 12_345, 23_456)
    assert list(read_rows(shard, "url", "caption", batch_rows=1000)) == rows[12_345:23_456]


def test_values_are_plain_python(tmp_path):
    table = pa.table({
        "url": ["http://a", "http://b"],
        "n": pa.array([1, None], pa.int64()),
        "score": [0.5, 1.5],
        "raw": pa.array([b"\x00ab", None], pa.binary()),
        "tags": pa.array([[1, 2], []], pa.list_(pa.int32())),
        "when": pa.array([0, 1], pa.timestamp("s")),
        "cat": pa.array(["x", "y"]).dictionary_encode(),
    })
    path = str(tmp_path / "types.parquet")
    pq.write_table(table, path)
    rows = list(read_rows(ShardSpec(0, path, "parquet", 0, 2), "url", None))
    assert rows[0] == {"url": "http://a", "caption": None, "n": 1, "score": 0.5, "raw": "\x00ab", "tags": "[1, 2]",
                       "when": "1970-01-01 00:00:00", "cat": "x"}
    assert rows[1]["n"] is None and rows[1]["raw"] is None and rows[1]["tags"] == "[]"
    assert all(type(v) in (str, int, float, type(None)) for r in rows for v in r.values())
