"""pipeline/shard.py on synthetic filter dirs: crawl tars of small JPEGs, ledger parts pointing into them (offsets
from iter_tar_samples), a filter manifest. Every kept sample exactly once with the crawl's bytes, a seeded global
shuffle, equal shard sizes, a manifest that matches the files, no stale shard reused after a re-filter, missing
images counted, failed shards reported, and a kill -9 then rerun giving the same bytes."""
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import shard
from trainer.clip.formats.ledger import (ledger_part, ledger_schema, part_name, write_filter_manifest,
                                         write_ledger_part)
from trainer.clip.formats.shards import MANIFEST, iter_tar_samples, read_manifest, write_tar

REPO = Path(__file__).resolve().parents[1]
QUIET = ["--progress-interval-s", "0", "--retry-backoff-s", "0"]
CARRIED = [pa.field("license", pa.string()), pa.field("score", pa.float64())]


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12 + i % 7, 10 + i % 5), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(buf, "JPEG")
    return buf.getvalue()


def _write_crawl(crawl: Path, n_tars: int, per_tar: int) -> dict:
    """Crawl tars NNNNN.tar; -> {key: {"shard", "offset", "size", "bytes", "i"}}."""
    info = {}
    for t in range(n_tars):
        samples = []
        for j in range(per_tar):
            i = t * per_tar + j
            key = f"{t:05d}{j:04d}"
            samples.append({"__key__": key, "jpg": _jpeg(i), "txt": f"caption {i}", "json": {"key": key}})
            info[key] = {"shard": f"{t:05d}.tar", "bytes": samples[-1]["jpg"], "i": i}
        write_tar(crawl / f"{t:05d}.tar", samples, durable=False)
        for s in iter_tar_samples(crawl / f"{t:05d}.tar", read=lambda ext: False):
            info[s.key].update(offset=s.members["jpg"].offset, size=s.members["jpg"].size)
    return info


def _write_filter(fdir: Path, crawl: Path, info: dict, keep, fingerprint: str) -> set[str]:
    """Ledger parts (one per crawl tar) + filter manifest; keep(i) decides. -> the kept keys."""
    schema, parts, kept = ledger_schema(CARRIED), [], set()
    by_tar: dict[str, list] = {}
    for key, r in sorted(info.items()):
        by_tar.setdefault(r["shard"], []).append((key, r))
    for t, (tar, rows) in enumerate(sorted(by_tar.items())):
        table = []
        for row_i, (key, r) in enumerate(rows):
            k = keep(r["i"])
            kept |= {key} if k else set()
            table.append({"key": key, "url": f"http://x/{key}.jpg", "caption": f"a caption for {key}", "shard": tar,
                          "part_row": row_i, "status": "success", "width": 12, "height": 10, "sha256": "0" * 64,
                          "image_ext": "jpg", "image_offset": r["offset"], "image_size": r["size"],
                          "language": "en", "clip_score": 0.25 + r["i"] / 1000, "keep": k,
                          "reason": None if k else "clip_score", "license": f"cc-by-{r['i']}", "score": r["i"] / 8})
        write_ledger_part(ledger_part(fdir, t), pa.Table.from_pylist(table, schema=schema))
        parts.append({"part": part_name(t), "rows": len(rows), "kept": sum(r["keep"] for r in table)})
    write_filter_manifest(fdir, {"parts": parts, "crawl_dir": str(crawl), "fingerprint": fingerprint})
    return kept


@pytest.fixture
def dirs(tmp_path):
    """(filter dir, crawl dir, crawl info, kept keys): 3 crawl tars x 20 samples, two thirds kept."""
    crawl, fdir = tmp_path / "crawl", tmp_path / "filter"
    info = _write_crawl(crawl, 3, 20)
    kept = _write_filter(fdir, crawl, info, lambda i: i % 3 != 0, "fp-1")
    return fdir, crawl, info, kept


def _read(out: Path) -> tuple[dict, list[list[dict]]]:
    """(manifest, per shard the samples in tar order: key, ext -> bytes)."""
    m = read_manifest(out)
    shards = []
    for s in m["shards"]:
        samples: dict[str, dict] = {}
        with tarfile.open(out / s["tar"]) as tf:
            for member in tf:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {"key": key})[ext] = tf.extractfile(member).read()
        shards.append(list(samples.values()))
    return m, shards


def _tar_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("shard-*.tar"))}


def _order(shards) -> list[str]:
    return [s["key"] for sh in shards for s in sh]


def test_every_kept_sample_once_with_the_crawl_bytes_in_equal_shards(dirs, tmp_path, ray_local):
    fdir, _, info, kept = dirs
    out = tmp_path / "shards"
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "7", *QUIET]) == 0
    m, shards = _read(out)
    keys = _order(shards)
    assert sorted(keys) == sorted(kept) and len(keys) == len(set(keys)) == m["num_samples"] == 40
    assert len(shards) == m["expected_shards"] == -(-40 // 7)
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == [s["num_samples"] for s in m["shards"]]
    assert keys != sorted(keys)  # a shuffle, not key order
    assert m["missing"] == 0 and m["complete"] and m["failed_shards"] == [] and m["seed"] == 0
    for sh in shards:
        for s in sh:
            assert s["jpg"] == info[s["key"]]["bytes"]  # copied, never re-encoded
            assert s["txt"].decode() == f"a caption for {s['key']}"
            meta = json.loads(s["json"])
            assert meta["license"] == f"cc-by-{info[s['key']]['i']}" and meta["language"] == "en"
    for entry, sh in zip(m["shards"], shards):
        data = (out / entry["tar"]).read_bytes()
        assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
        side = pq.read_table(out / entry["parquet"])
        assert side.column("key").to_pylist() == [s["key"] for s in sh]  # sidecar rows = tar members, in order
        assert {"language", "clip_score", "license", "score", "sha256"} <= set(side.column_names)
        assert side.column("license").to_pylist() == [f"cc-by-{info[s['key']]['i']}" for s in sh]
        assert entry["keys_sha256"] == shard.keys_digest(s["key"] for s in sh)


def test_the_order_follows_the_seed(dirs, tmp_path, ray_local):
    fdir = dirs[0]
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert shard.main([str(fdir), str(tmp_path / name), "--samples-per-shard", "16", "--seed", str(seed),
                           *QUIET]) == 0
        runs[name] = _read(tmp_path / name)
    assert _tar_bytes(tmp_path / "a") == _tar_bytes(tmp_path / "b")  # same seed: the same bytes
    assert runs["a"][0]["plan_id"] == runs["b"][0]["plan_id"] != runs["c"][0]["plan_id"]
    a, c = _order(runs["a"][1]), _order(runs["c"][1])
    assert sorted(a) == sorted(c) and a != c


def test_shard_sizes_differ_by_at_most_one():
    for n in range(1, 60):
        for per in (1, 4, 7, 64):
            sizes = shard.shard_sizes(n, per)
            assert len(sizes) == -(-n // per) and sum(sizes) == n and max(sizes) - min(sizes) <= 1
            assert max(sizes) <= per


def test_a_refilter_never_reuses_a_stale_shard(dirs, tmp_path, ray_local):
    fdir, crawl, info, _ = dirs
    out = tmp_path / "shards"
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET]) == 0
    first = read_manifest(out)
    # rerun, same plan: everything reused, nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")}
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET]) == 0
    again = read_manifest(out)
    assert again["resumed_shards"] == len(again["shards"]) and again["shards"] == first["shards"]
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*")} == mtimes
    # re-filter: as many kept (same shard sizes, the old bug's trap), then fewer; each reshard exact
    for keep, fp in ((lambda i: i % 3 != 1, "fp-2"), (lambda i: i % 4 == 0, "fp-3")):
        kept = _write_filter(fdir, crawl, info, keep, fp)
        assert shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET]) == 0
        m, shards = _read(out)
        keys = _order(shards)
        assert sorted(keys) == sorted(kept) and len(keys) == len(set(keys))
        assert all(s["jpg"] == info[s["key"]]["bytes"] for sh in shards for s in sh)
        assert m["resumed_shards"] == 0 and m["source"]["filter_fingerprint"] == fp
        on_disk = sorted(p.name for p in out.glob("shard-*"))
        assert on_disk == sorted([s["tar"] for s in m["shards"]] + [s["parquet"] for s in m["shards"]])
        assert not list(out.glob(".*.tmp"))


def test_the_old_manifest_is_withdrawn_when_a_run_starts(dirs, tmp_path, ray_local, monkeypatch):
    fdir = dirs[0]
    out = tmp_path / "shards"
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET]) == 0
    assert (out / MANIFEST).exists()

    def lost(*args, **kwargs):
        raise RuntimeError("the driver lost its cluster")

    monkeypatch.setattr(shard, "run_tasks", lost)
    with pytest.raises(RuntimeError, match="lost its cluster"):
        shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET])
    assert not (out / MANIFEST).exists()  # a half-done reshard is never mistaken for a complete one
    monkeypatch.undo()
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET]) == 0
    assert read_manifest(out)["num_samples"] == len(dirs[3])


def test_a_missing_crawl_tar_and_a_truncated_image_are_counted(dirs, tmp_path, ray_local):
    fdir, crawl, info, kept = dirs
    (crawl / "00001.tar").unlink()
    last = max((k for k in kept if info[k]["shard"] == "00002.tar"), key=lambda k: info[k]["offset"])
    with open(crawl / "00002.tar", "r+b") as f:  # cut inside the last kept image of tar 2
        f.truncate(info[last]["offset"] + info[last]["size"] // 2)
    out = tmp_path / "shards"
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "8", *QUIET]) == 0
    m, shards = _read(out)
    lost = {k for k in kept if info[k]["shard"] == "00001.tar"}
    assert m["missing_by_reason"] == {"source_missing": len(lost), "truncated": 1}
    assert m["missing"] == len(lost) + 1 == sum(s["missing"] for s in m["shards"])
    keys = _order(shards)
    assert sorted(keys) == sorted(kept - lost - {last})
    assert all(s["jpg"] == info[s["key"]]["bytes"] for sh in shards for s in sh)
    assert m["num_samples"] + m["missing"] == m["planned_samples"] == len(kept)


def test_a_shard_that_fails_every_retry_is_listed_and_exits_1(dirs, tmp_path, ray_local, monkeypatch):
    fdir = dirs[0]
    out = tmp_path / "shards"
    monkeypatch.setenv(shard.FAULT_ENV, "raise:1")
    rc = shard.main([str(fdir), str(out), "--samples-per-shard", "10", "--max-shard-retry", "1", *QUIET])
    assert rc == 1
    m = read_manifest(out)
    assert not m["complete"] and [s["tar"] for s in m["shards"]] == ["shard-00000.tar", "shard-00002.tar",
                                                                      "shard-00003.tar"]
    (f,) = m["failed_shards"]
    assert f["index"] == 1 and f["attempts"] == 2 and f["type"] == "RuntimeError" and "injected" in f["error"]
    monkeypatch.delenv(shard.FAULT_ENV)
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "10", *QUIET]) == 0
    m = read_manifest(out)
    assert m["complete"] and m["resumed_shards"] == 3 and sorted(_order(_read(out)[1])) == sorted(dirs[3])


def test_user_errors_exit_2(dirs, tmp_path, capsys):
    assert shard.main([str(tmp_path / "nothing"), str(tmp_path / "s")]) == 2
    assert "filter_manifest.json does not exist" in capsys.readouterr().err
    assert shard.main([str(dirs[0]), str(tmp_path / "s"), "--memory-limit", "lots"]) == 2
    assert shard.main([str(dirs[0]), str(dirs[0])]) == 2  # would write into the filter dir
    assert shard.main([str(dirs[0]), str(tmp_path / "s"), "--crawl-dir", str(tmp_path / "nope")]) == 2
    assert not (tmp_path / "s" / MANIFEST).exists()


def test_a_ledger_that_keeps_a_key_twice_is_refused(dirs, tmp_path, capsys):
    fdir, crawl, info, _ = dirs
    t = pq.read_table(ledger_part(fdir, 0))
    write_ledger_part(ledger_part(fdir, 1), pa.concat_tables([t, t]))
    assert shard.main([str(fdir), str(tmp_path / "s"), *QUIET]) == 2
    assert "more than once" in capsys.readouterr().err


def _shard_cmd(fdir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.shard", str(fdir), str(out), "--samples-per-shard", "3",
            "--max-in-flight", "1", *QUIET]


@pytest.mark.slow
def test_kill_9_then_rerun_gives_the_same_bytes(dirs, tmp_path, ray_local):
    fdir, _, _, kept = dirs
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert shard.main([str(fdir), str(ref), "--samples-per-shard", "3", *QUIET]) == 0
    env = {**os.environ, shard.FAULT_ENV: "sleep:0.4"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(_shard_cmd(fdir, out), cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not list(out.glob("shard-*.parquet")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before a shard was committed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the Ray it started, mid-run
        proc.wait()
    assert not (out / MANIFEST).exists() and len(list(out.glob("shard-*.parquet"))) < len(read_manifest(ref)["shards"])
    assert shard.main([str(fdir), str(out), "--samples-per-shard", "3", *QUIET]) == 0
    m, m_ref = read_manifest(out), read_manifest(ref)
    assert m["resumed_shards"] >= 1
    run_only = ("resumed_shards", "nodes")  # what this run did, not what it wrote
    assert {k: v for k, v in m.items() if k not in run_only} == {k: v for k, v in m_ref.items() if k not in run_only}
    assert _tar_bytes(out) == _tar_bytes(ref)
    assert sorted(_order(_read(out)[1])) == sorted(kept)
