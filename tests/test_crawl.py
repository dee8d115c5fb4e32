"""clipforge crawl end to end on loopback: the hostile web, kills at every stage of a shard's life, many input
formats with their extra columns, refusal of a foreign crawl dir, and a shard that fails every attempt."""

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from hostile_web import HostileWeb

from pipeline import crawl
from trainer.clip.formats.crawl import CRAWL_MANIFEST, CRAWL_PLAN, CRAWL_TMP, complete_shards, read_marker

ROOT = Path(__file__).resolve().parents[1]
LOCAL = ["--allow-private-addresses"]  # the test servers listen on 127.0.0.1


def run_crawl(args: list[str], env: dict | None = None, timeout: float = 240) -> tuple[int, float, str]:
    """`python -m pipeline.crawl ARGS` in its own process (its own in-process Ray). -> (rc, wall s, stderr)."""
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "pipeline.crawl", *args, "--progress-interval-s", "0"], cwd=ROOT,
                       env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    return p.returncode, time.monotonic() - t0, p.stdout + p.stderr


def crawled_rows(out: Path) -> list[dict]:
    return [r for s in complete_shards(out) for r in pq.read_table(s.parquet).to_pylist()]


def tar_keys(out: Path) -> list[str]:
    keys = []
    for s in complete_shards(out):
        with tarfile.open(s.tar) as t:
            keys += [n.split(".")[0] for n in t.getnames() if n.endswith(".jpg")]
    return keys


def assert_exactly_once(out: Path, urls: list[str]) -> None:
    rows = crawled_rows(out)
    assert sorted(r["url"] for r in rows) == sorted(urls)  # every input row once, none twice
    keys = [r["key"] for r in rows]
    assert len(set(keys)) == len(keys)
    assert sorted(tar_keys(out)) == sorted(r["key"] for r in rows if r["status"] == "success")
    assert not list((out / CRAWL_TMP).glob("*")) and not list(out.glob(".*.tmp"))
    assert not list((out / "_clipforge").glob(".*.tmp"))
    marked = {s.id for s in complete_shards(out)}
    assert {int(p.name[:5]) for p in out.glob("[0-9]*") if p.suffix in (".tar", ".parquet")} == marked
    m = json.loads((out / CRAWL_MANIFEST).read_text())
    assert m["complete"] and m["totals"]["rows"] == len(urls)


@pytest.fixture(scope="module")
def web():
    with HostileWeb(drip_seconds=40) as w:
        yield w


def test_hostile_web_every_row_classified_within_deadline_and_memory(web, tmp_path):
    cases = web.cases() + [{"url": web.url(f"ok.jpg?i={i}"), "caption": f"ok {i}", "expect": "success"}
                           for i in range(20)]
    pq.write_table(pa.Table.from_pylist(cases), tmp_path / "urls.parquet")
    rc, wall, log = run_crawl([str(tmp_path / "urls.parquet"), str(tmp_path / "out"), "--samples-per-shard", "10",
                               "--timeout", "3", "--max-body-bytes", str(8 * 2**20), "--thread-count", "8", *LOCAL])
    assert rc == 0, log
    assert wall < 35  # the 40 s drip was cut at its 3 s deadline, not waited for
    rows = {r["url"]: r for r in crawled_rows(tmp_path / "out")}
    wrong = {c["url"]: (c["expect"], rows[c["url"]]["error_class"]) for c in cases
             if (rows[c["url"]]["error_class"] or "success") != c["expect"]}
    assert not wrong
    assert all(r["status"] == ("success" if r["error_class"] is None else r["status"]) for r in rows.values())
    assert rows[web.url("cmyk.jpg")]["width"] and rows[web.url("gray.jpg")]["width"]  # kept, resized
    markers = [read_marker(s.stats) for s in complete_shards(tmp_path / "out")]
    assert max(m["duration"] for m in markers) < 3 + 8
    # 200 MB bodies were streamed at this crawl: its workers' peak RSS grew by far less than one of them
    assert max(m["peak_rss_mb"] - m["rss_start_mb"] for m in markers) < 64, markers
    m = json.loads((tmp_path / "out" / CRAWL_MANIFEST).read_text())
    assert m["errors"]["too_large"] == 2 and m["errors"]["timeout"] == 1 and m["complete"]


def _ok_list(web, tmp_path: Path, n: int = 60) -> list[str]:
    urls = [web.url(f"ok.jpg?row={i}") for i in range(n)]
    pq.write_table(pa.table({"url": urls, "caption": [f"row {i}" for i in range(n)]}), tmp_path / "urls.parquet")
    return urls


@pytest.mark.slow
@pytest.mark.parametrize("point", ["download:7", "commit", "manifest"])
def test_kill_minus_nine_then_rerun_gives_every_row_exactly_once(web, tmp_path, point):
    urls = _ok_list(web, tmp_path)
    args = [str(tmp_path / "urls.parquet"), str(tmp_path / "out"), "--samples-per-shard", "10", "--thread-count", "4",
            *LOCAL]
    rc, _, log = run_crawl(args, env={"CLIPFORGE_CRAWL_FAULT": point})
    assert rc in (-9, 137), log  # the driver was killed
    if point != "manifest":
        assert len(complete_shards(tmp_path / "out")) < 6  # it died mid-crawl
    rc, _, log = run_crawl(args)
    assert rc == 0, log
    assert_exactly_once(tmp_path / "out", urls)


def test_inputs_dir_of_every_format_with_extra_columns(web, tmp_path, ray_local):
    d = tmp_path / "lists"
    d.mkdir()
    rows = [{"url": web.url(f"ok.jpg?f={i}"), "caption": f"cap {i}", "uid": f"{i:03d}", "sha256": "input-hash"}
            for i in range(12)]
    pq.write_table(pa.Table.from_pylist(rows[:3]), d / "a.parquet")
    pcsv.write_csv(pa.Table.from_pylist(rows[3:6]), d / "b.csv")
    (d / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[6:9]))
    pcsv.write_csv(pa.Table.from_pylist(rows[9:12]), d / "d.tsv", pcsv.WriteOptions(delimiter="\t"))
    (d / "e.txt").write_text(web.url("ok.png") + "\n")
    out = tmp_path / "out"
    assert crawl.main([f"file://{d}", str(out), "--samples-per-shard", "2", "--progress-interval-s", "0",
                       *LOCAL]) == 0
    got = {r["url"]: r for r in crawled_rows(out)}
    assert len(got) == 13 and all(r["status"] == "success" for r in got.values())
    for r in rows:  # carried as strings ("007" stays "007"), a clashing name gets the input_ prefix
        assert got[r["url"]]["uid"] == r["uid"] and got[r["url"]]["input_sha256"] == "input-hash"
        assert got[r["url"]]["sha256"] != "input-hash"
    with tarfile.open(complete_shards(out)[0].tar) as t:
        meta = json.loads(t.extractfile(next(n for n in t.getnames() if n.endswith(".json"))).read())
    assert meta["uid"] == got[meta["url"]]["uid"] and meta["caption"] == got[meta["url"]]["caption"]
    plan = json.loads((out / CRAWL_PLAN).read_text())
    assert [f["format"] for f in plan["files"]] == ["parquet", "csv", "jsonl", "tsv", "txt"]
    # a rerun resumes (nothing to do); another input list in the same dir is refused with a clear error
    assert crawl.main([f"file://{d}", str(out), "--samples-per-shard", "2", *LOCAL]) == 0
    (d / "e.txt").write_text(web.url("ok.png") + "\n" + web.url("ok.jpg") + "\n")
    assert crawl.main([f"file://{d}", str(out), "--samples-per-shard", "2", *LOCAL]) == 2
    assert crawl.main([str(d / "a.parquet"), str(out), "--samples-per-shard", "2", *LOCAL]) == 2
    assert crawl.main([str(d / "a.parquet"), str(tmp_path / "out"), "--samples-per-shard", "3", *LOCAL]) == 2


def test_a_foreign_crawl_dir_is_refused(tmp_path, capsys):
    (tmp_path / "urls.txt").write_text("http://127.0.0.1:9/x.jpg\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "00000.tar").write_bytes(b"")  # e.g. an img2dataset crawl
    assert crawl.main([str(tmp_path / "urls.txt"), str(tmp_path / "out")]) == 2
    assert "no _clipforge/crawl_plan.json" in capsys.readouterr().err
    assert crawl.main([str(tmp_path / "missing.parquet"), str(tmp_path / "out2")]) == 2


def test_a_shard_that_fails_every_attempt_is_reported_with_its_cause(web, tmp_path, monkeypatch, ray_local):
    urls = _ok_list(web, tmp_path, 30)
    monkeypatch.setenv("CLIPFORGE_CRAWL_FAULT", "raise:1")
    out = tmp_path / "out"
    rc = crawl.main([str(tmp_path / "urls.parquet"), str(out), "--samples-per-shard", "10", "--max-shard-retry", "1",
                     "--retry-backoff-s", "0.1", "--progress-interval-s", "0", *LOCAL])
    assert rc == 1
    m = json.loads((out / CRAWL_MANIFEST).read_text())
    assert not m["complete"] and [s["id"] for s in m["shards"]] == [0, 2]
    (f,) = m["failed_shards"]
    assert f["id"] == 1 and f["rows"] == [10, 20] and f["attempts"] == 2
    assert f["type"] == "RuntimeError" and "injected failure" in f["error"]
    monkeypatch.delenv("CLIPFORGE_CRAWL_FAULT")
    assert crawl.main([str(tmp_path / "urls.parquet"), str(out), "--samples-per-shard", "10", *LOCAL]) == 0
    assert_exactly_once(out, urls)


def test_extra_columns_reach_the_training_shards(web, tmp_path, ray_local):
    from pipeline import filter as filt
    from pipeline import shard

    rows = [{"url": web.url(f"ok.jpg?x={i}"), "caption": f"a photo number {i}", "license": f"cc-by-{i}",
             "score": i / 10} for i in range(6)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    assert crawl.main([str(tmp_path / "urls.parquet"), str(tmp_path / "c"), "--samples-per-shard", "3", *LOCAL]) == 0
    assert filt.main([str(tmp_path / "c"), str(tmp_path / "f"), "--preset", "none"]) == 0
    assert shard.main([str(tmp_path / "f"), str(tmp_path / "s")]) == 0
    decisions = pq.read_table(tmp_path / "f" / "ledger").to_pylist()
    assert {(d["url"], d["license"], d["score"]) for d in decisions} == {(r["url"], r["license"], r["score"])
                                                                          for r in rows}
    samples = pq.read_table(tmp_path / "s" / "shard-00000.parquet").to_pylist()
    assert {(s["url"], s["license"]) for s in samples} == {(r["url"], r["license"]) for r in rows}
    with tarfile.open(tmp_path / "s" / "shard-00000.tar") as t:
        meta = json.loads(t.extractfile(next(n for n in t.getnames() if n.endswith(".json"))).read())
    assert meta["license"].startswith("cc-by-") and isinstance(meta["score"], float)


def test_the_manifest_is_written_when_the_run_raises(web, tmp_path, monkeypatch, ray_local):
    urls = _ok_list(web, tmp_path, 10)

    def boom(jobs, cfg, rows):
        raise RuntimeError("the driver lost its cluster")

    monkeypatch.setattr(crawl, "distribute", boom)
    with pytest.raises(RuntimeError):
        crawl.main([str(tmp_path / "urls.parquet"), str(tmp_path / "out"), *LOCAL])
    m = json.loads((tmp_path / "out" / CRAWL_MANIFEST).read_text())
    assert not m["complete"] and "lost its cluster" in m["error"] and m["failed_shards"][0]["type"] == "NotRun"
    monkeypatch.undo()
    assert crawl.main([str(tmp_path / "urls.parquet"), str(tmp_path / "out"), *LOCAL]) == 0
    assert_exactly_once(tmp_path / "out", urls)
