"""pipeline/: sample web, crawl (img2dataset + Ray against a local HTTP server), filter, shard — on disk, for real."""

import json
import tarfile
import urllib.error
import urllib.request

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline import cli, crawl, filter as filt, sampleweb, shard
from trainer.clip.formats.crawl import CRAWL_MANIFEST
from trainer.clip.formats.ledger import read_filter_manifest
from trainer.clip.formats.shards import read_manifest


@pytest.fixture(scope="module")
def web(tmp_path_factory, free_port):
    out = tmp_path_factory.mktemp("web")
    cfg = sampleweb.SampleWebConfig.tiny()
    cfg.port = free_port()
    summary = sampleweb.build(out, cfg)
    server = sampleweb.serve(out, cfg.port)
    yield out, cfg, summary
    server.shutdown()


@pytest.fixture(scope="module")
def crawled(web, tmp_path_factory, ray_local):
    out, cfg, summary = web
    crawl_dir = tmp_path_factory.mktemp("crawl")
    rc = crawl.main([str(out / "urls.parquet"), str(crawl_dir), "--samples-per-shard", "100", "--timeout", "5",
                     "--allow-private-addresses"])
    assert rc == 0
    return crawl_dir


def test_sample_web_rows_and_server(web):
    out, cfg, summary = web
    table = pq.read_table(out / "urls.parquet")
    assert table.column_names == ["url", "caption", "kind"]
    kinds = summary["kinds"]
    assert kinds["ok"] == cfg.max_emoji * cfg.variants
    assert {"http_404", "not_image", "truncated", "opt_out", "tiny", "duplicate", "short_caption"} <= set(kinds)
    rows = table.to_pylist()
    assert all(r["url"].startswith(f"http://127.0.0.1:{cfg.port}/") for r in rows)
    ok = next(r for r in rows if r["kind"] == "ok")
    with urllib.request.urlopen(ok["url"], timeout=5) as resp:
        assert resp.read(8)[:4] in (b"\x89PNG", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff\xdb")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(next(r["url"] for r in rows if r["kind"] == "http_404"), timeout=5)
    assert e.value.code == 404
    with urllib.request.urlopen(next(r["url"] for r in rows if r["kind"] == "opt_out"), timeout=5) as resp:
        assert "noai" in resp.headers["X-Robots-Tag"]


def test_crawl_records_every_row(web, crawled):
    out, cfg, summary = web
    m = json.loads((crawled / CRAWL_MANIFEST).read_text())
    assert m["complete"] and m["input_rows"] == summary["rows"]
    assert m["expected_shards"] == len(m["shards"]) == -(-summary["rows"] // 100)
    t = m["totals"]
    n_bad = sum(summary["kinds"][k] for k in ("http_404", "not_image", "truncated", "opt_out"))
    assert t["rows"] == summary["rows"]
    assert t["success"] == summary["rows"] - n_bad
    assert t["failed_to_download"] + t["failed_to_resize"] == n_bad
    assert m["errors"]["http_error"] == summary["kinds"]["http_404"]
    assert m["errors"]["opt_out"] == summary["kinds"]["opt_out"]
    # every input row is in some shard parquet with a status; tars hold exactly the successes
    statuses = [s for sh in m["shards"] for s in pq.read_table(crawled / sh["parquet"]).column("status").to_pylist()]
    assert len(statuses) == summary["rows"] and statuses.count("success") == t["success"]
    n_tar = sum(sum(1 for n in tarfile.open(crawled / sh["tar"]).getnames() if n.endswith(".jpg")) for sh in m["shards"])
    assert n_tar == t["success"]


def test_crawl_resumes_a_dropped_shard(web, crawled):
    out, cfg, _ = web
    before = {p.name: p.stat().st_mtime_ns for p in crawled.glob("0000[02].tar")}
    (crawled / "00001_stats.json").unlink()  # as if the shard's task died before its commit
    assert crawl.main([str(out / "urls.parquet"), str(crawled), "--samples-per-shard", "100",
                       "--allow-private-addresses"]) == 0
    m = json.loads((crawled / CRAWL_MANIFEST).read_text())
    assert m["complete"] and (crawled / "00001_stats.json").exists()
    assert [s["id"] for s in m["shards"] if s["id"] == 1] == [1]
    assert before == {p.name: p.stat().st_mtime_ns for p in crawled.glob("0000[02].tar")}  # others untouched


def test_crawl_bad_input_is_a_clear_error(tmp_path, capsys):
    assert crawl.main([str(tmp_path / "nope.parquet"), str(tmp_path / "out")]) == 2
    assert "no input files match" in capsys.readouterr().err


@pytest.fixture(scope="module")
def filtered(crawled, tmp_path_factory):
    out = tmp_path_factory.mktemp("filter")
    assert filt.main([str(crawled), str(out), "--preset", "demo"]) == 0
    return out


def _ledger(filter_dir):
    return duckdb.sql(f"select * from '{filter_dir}/ledger/*.parquet'").to_arrow_table().to_pylist()


def test_filter_decides_every_row_with_a_reason(web, crawled, filtered):
    _, cfg, summary = web
    d = _ledger(filtered)
    m = read_filter_manifest(filtered)
    assert len(d) == summary["rows"] == m["input_rows"]
    assert all(r["keep"] == (r["reason"] is None) for r in d)
    assert m["kept"] == sum(r["keep"] for r in d)
    assert m["dropped"]["crawl_failed"] == 4
    assert m["dropped"]["image_too_small"] == cfg.n_tiny
    assert m["dropped"]["duplicate_image"] == cfg.n_duplicates
    assert all(r["duplicate_of"] for r in d if r["reason"] == "duplicate_image")
    assert m["dropped"]["caption_too_short"] >= cfg.n_short_captions
    assert (filtered / "terms.parquet").exists() and m["steps"]["balanced_out"]["dropped"] >= 0
    kept_hashes = [r["sha256"] for r in d if r["keep"]]
    assert len(kept_hashes) == len(set(kept_hashes))


def test_shard_copies_kept_samples_and_resumes(crawled, filtered, tmp_path, ray_local):
    kept = {r["key"]: r for r in _ledger(filtered) if r["keep"]}
    assert shard.main([str(filtered), str(tmp_path), "--samples-per-shard", "64"]) == 0
    m = read_manifest(tmp_path)
    assert m["format"] == "clipforge.shards.v1" and m["missing"] == 0
    assert m["num_samples"] == len(kept) == sum(s["num_samples"] for s in m["shards"])
    assert len(m["shards"]) == -(-len(kept) // 64)
    # byte-for-byte copies of the crawled JPEGs, with caption and json
    src = {}
    for t in crawled.glob("*.tar"):
        with tarfile.open(t) as tf:
            src.update({mm.name[:-4]: tf.extractfile(mm).read() for mm in tf if mm.name.endswith(".jpg")})
    seen = 0
    for s in m["shards"]:
        with tarfile.open(tmp_path / s["tar"]) as tf:
            names = tf.getnames()
            for n in names:
                if n.endswith(".jpg"):
                    key = n[:-4]
                    assert tf.extractfile(n).read() == src[key]
                    assert tf.extractfile(f"{key}.txt").read().decode() == kept[key]["caption"]
                    assert json.loads(tf.extractfile(f"{key}.json").read())["sha256"] == kept[key]["sha256"]
                    seen += 1
        assert pq.ParquetFile(tmp_path / s["parquet"]).metadata.num_rows == s["num_samples"]
    assert seen == len(kept)
    # rerun: idempotent, nothing rewritten; a shard whose marker is gone (killed job) is redone alone
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.tar")}
    (tmp_path / "shard-00001.parquet").unlink()
    assert shard.main([str(filtered), str(tmp_path), "--samples-per-shard", "64"]) == 0
    m2 = read_manifest(tmp_path)
    assert m2["resumed_shards"] == len(m["shards"]) - 1 and m2["shards"] == m["shards"]
    after = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("shard-*.tar")}
    assert {k for k in after if after[k] != mtimes[k]} == {"shard-00001.tar"}


def test_cli_dispatch(capsys):
    assert cli.main([]) == 0
    assert "crawl" in capsys.readouterr().out
    assert cli.main(["nope"]) == 2
    assert cli.main(["filter", "/nonexistent", "/tmp/x"]) == 2
