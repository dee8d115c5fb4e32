"""clipforge index (indexing.build / choose / tune / grow) on hand-built EMBED_DIRs: the chooser's families and
reasons, exact known answers, tie-aware recall, streamed ground truth, tuning to a target on held-out queries,
on-disk merges, incremental adds and the CLI's errors. CPU only, small clustered vectors."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from indexing import build as ibuild
from indexing import faissio
from indexing.choose import Choice, choose, parse_bytes
from indexing.tune import Collection, Truth, ground_truth, load_query_file, recall_at, recall_margin, sample_queries, \
    tune
from trainer.clip.formats.embeddings import part_paths, write_embed_manifest, write_npy, write_part_meta
from trainer.clip.formats.index import IndexFormatError, open_index_set

D = 32
SHA = "a" * 64


def make_embed_dir(root: Path, rows: list[int], d: int = D, seed: int = 0, sha: str = SHA, start: int = 0,
                   dtype: str = "float16", first_part: int = 0, dup_every: int = 0,
                   shards_dir: Path | None = None) -> Path:
    """An EMBED_DIR in the embeddings contract: clustered unit image vectors, text = image + noise, every 17th
    row not embedded (zero rows), every 11th caption empty; keys k{global row}. dup_every: every such row
    repeats the previous row's image vector (exact ties)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((24, d)).astype(np.float32)
    parts, g = [], start
    for j, n in enumerate(rows):
        pid = first_part + j
        x = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
        if dup_every:
            x[dup_every::dup_every] = x[dup_every - 1:-1:dup_every][: len(x[dup_every::dup_every])]
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        t = x + 0.25 * rng.standard_normal((n, d)).astype(np.float32)
        t /= np.linalg.norm(t, axis=1, keepdims=True)
        gid = np.arange(g, g + n)
        embedded = gid % 17 != 5
        x[~embedded] = 0
        t[~embedded] = 0
        img, txt, meta = part_paths(root, pid)
        img.parent.mkdir(parents=True, exist_ok=True)
        meta.parent.mkdir(parents=True, exist_ok=True)
        write_npy(img, x.astype(dtype))
        write_npy(txt, t.astype(dtype))
        table = pa.table({
            "key": [f"k{i}" for i in gid], "shard": [f"shard-{pid:05d}.tar"] * n,
            "member": [f"k{i}.jpg" for i in gid], "offset": (gid * 512).astype(np.int64),
            "size": np.full(n, 100, np.int64),
            "caption": ["" if i % 11 == 3 else f"a photo of thing {i}" for i in gid],
            "url": [f"http://example.com/{i}.jpg" for i in gid], "embedded": embedded,
            "clip_score": rng.random(n).astype(np.float32)})
        write_part_meta(meta, table, {"weights_sha256": sha, "dim": d, "rows": n, "embedded": int(embedded.sum()),
                                      "fingerprint": f"fp-{pid}-{seed}"})
        parts.append({"id": pid, "shard": f"shard-{pid:05d}.tar", "rows": n, "embedded": int(embedded.sum())})
        g += n
    write_embed_manifest(root, {"checkpoint": "/ckpt", "weights_sha256": sha, "dim": d, "dtype": dtype,
                                "shards_dir": str(shards_dir or root.parent / "shards"), "num_rows": sum(rows),
                                "num_embedded": sum(p["embedded"] for p in parts), "parts": parts, "failed": {}})
    return root


def all_vectors(embed_dir: Path) -> np.ndarray:
    return np.concatenate([x for _, x in Collection.from_embed_dir(embed_dir).iter_batches(10_000)])


def run_build(embed: Path, out: Path, *extra: str) -> dict:
    assert ibuild.main([str(embed), "--out", str(out), "--tiny", *extra]) == 0
    return json.loads((out / "index.json").read_text())


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """faiss's OpenMP threads spin-wait: on a small shared box (2 cores, other jobs) two threads per tiny call
    are many times slower than one."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return make_embed_dir(tmp_path_factory.mktemp("emb") / "embed", [700, 500, 800])


# ------------------------------------------------------------------------------------------------ the chooser
def test_parse_bytes():
    assert parse_bytes("4GB") == 4 * 10 ** 9 and parse_bytes("512MB") == 512 * 10 ** 6
    assert parse_bytes("1.5GiB") == 3 * 2 ** 29 and parse_bytes("2g") == 2 ** 31 and parse_bytes("100") == 100
    for bad in ("4XB", "", "-1GB", "0", "GB"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def test_chooser_families_and_reasons():
    g = 10 ** 9
    c = choose(50_000, 512, 4 * g)
    assert c.factory == "Flat" and not c.needs_training and not c.params_to_tune and "exact" in " ".join(c.reasons)
    c = choose(500_000, 512, 4 * g)
    assert c.factory == "HNSW32" and c.params_to_tune == ["efSearch"] and not c.needs_training
    c = choose(500_000, 512, 600 * 10 ** 6)  # HNSW (1.16 GB) does not fit, IVF-Flat (1.04 GB) neither
    assert c.factory == "IVF2048,PQ256x4fs,Refine(SQfp16)" and c.nlist == 2048  # fast-scan: K ~ 4·sqrt(N)
    assert "4·sqrt(N)" in " ".join(c.reasons) and c.estimated_bytes <= 600 * 10 ** 6
    assert set(c.params_to_tune) == {"nprobe", "k_factor_rf"} and "over budget" in " ".join(c.reasons)
    c = choose(500_000, 512, 1100 * 10 ** 6)
    assert c.factory == "IVF4096,Flat" and c.nlist == 4096 and c.needs_training
    assert 10_000 <= c.train_size <= 1_000_000 and "4-16" in " ".join(c.reasons)
    c = choose(5_000_000, 512, 25 * g)  # HNSW over --hnsw-max: IVF with an HNSW coarse quantizer
    assert c.factory == "IVF65536_HNSW32,Flat"
    assert c.params_to_tune == ["nprobe", "quantizer_efSearch"] and "--hnsw-max" in " ".join(c.reasons)
    c = choose(5_000_000, 512, 3 * g)  # fast-scan codes: 8192 lists, a scanned (exact) coarse quantizer
    assert c.factory.startswith("IVF8192,PQ") and "x4fs" in c.factory and "Refine(SQ8)" in c.factory
    assert c.estimated_bytes <= 3 * g and c.params_to_tune == ["nprobe", "k_factor_rf"]
    c = choose(1_200_000, 512, 2.6 * g)  # IVF-Flat, its K capped: 1.2M / 39 < 32768, so 16384, scanned
    assert c.factory == "IVF16384,Flat" and c.params_to_tune == ["nprobe"]
    c = choose(40_000_000, 512, 25 * g)  # fast-scan at 4·sqrt(N) = 32768 lists: an HNSW quantizer from there
    assert c.factory.startswith("IVF32768_HNSW32,PQ") and "x4fs" in c.factory
    c = choose(50_000_000, 512, 8 * g)
    assert c.factory.startswith("OPQ") and "IVF262144_HNSW32,PQ" in c.factory and "Refine" not in c.factory
    assert not c.on_disk and c.estimated_bytes <= 8 * g
    c = choose(400_000_000, 512, 4 * g)  # nothing fits in RAM: inverted lists on disk
    assert c.on_disk and "IVF1048576_HNSW32" in c.factory and c.disk_bytes > 4 * g
    assert "on disk" in " ".join(c.reasons)
    c = choose(3000, 32, 4 * g, on_disk=True)
    assert c.on_disk and c.factory.startswith("IVF") and c.factory.endswith(",Flat") and c.nlist <= 3000 // 39
    c = choose(3000, 32, 10 ** 9, factory="IVF16,PQ8x4fs,RFlat")
    assert c.factory == "IVF16,PQ8x4fs,RFlat" and c.params_to_tune == ["nprobe", "k_factor_rf"]
    assert "--factory" in c.reasons[0] and c.needs_training
    assert Choice.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="invalid faiss factory"):
        choose(3000, 32, 10 ** 9, factory="IVF16,Bogus")


# ------------------------------------------------------------------------------------------------ recall, ground truth
def test_recall_counts_ties():
    truth = Truth(np.array([[0.9, 0.8, 0.8, 0.8, 0.1]], np.float32), np.array([[7, 3, 4, 5, 9]]))
    assert recall_at(np.array([[7, 5]]), truth, 2) == 1.0     # 5 ties with the 2nd exact score
    assert recall_at(np.array([[7, 9]]), truth, 2) == 0.5
    assert recall_at(np.array([[4, 3]]), truth, 2) == 1.0     # both score >= the 2nd exact score: counted
    assert recall_at(np.array([[9, 3, 5]]), truth, 3) == 2 / 3
    assert recall_at(np.array([[7, -1]]), truth, 2) == 0.5
    # a tie run reaching the end of the list: an id outside it counts when the index's score qualifies
    end = Truth(np.array([[0.9, 0.8, 0.8]], np.float32), np.array([[7, 3, 4]]))
    assert recall_at(np.array([[7, 11]]), end, 2, np.array([[0.9, 0.8]], np.float32)) == 1.0
    assert recall_at(np.array([[7, 11]]), end, 2, np.array([[0.9, 0.5]], np.float32)) == 0.5
    assert recall_at(np.array([[7, 11]]), end, 2) == 0.5


def test_streamed_ground_truth_equals_faiss_knn(small):
    coll = Collection.from_embed_dir(small)
    qs = sample_queries(coll, 50, seed=1)
    truth = ground_truth(coll, qs.x, depth=37, batch=256)  # batches cut across parts
    scores, ids = faiss.knn(qs.x, all_vectors(small), 37, metric=faiss.METRIC_INNER_PRODUCT)
    assert np.array_equal(truth.ids, ids) and np.allclose(truth.scores, scores, atol=1e-5)
    assert len(qs.x) == 50 and len(set(qs.captions)) == 50 and all(qs.captions)


def test_duplicates_do_not_lower_recall(tmp_path):
    embed = make_embed_dir(tmp_path / "dup", [1200], dup_every=2)  # every vector has an identical twin
    x, coll = all_vectors(embed), Collection.from_embed_dir(embed)
    q = x[:40]
    truth = ground_truth(coll, q, 20, batch=300)
    index = faiss.IndexFlatIP(D)
    index.add(x[::-1].copy())  # same vectors, reversed order: ties come back with the other twin's id
    s, i = index.search(q, 10)
    i = np.where(i >= 0, len(x) - 1 - i, -1)
    assert not np.array_equal(i, truth.ids[:, :10])
    assert recall_at(i, truth, 10, s) == 1.0


# ------------------------------------------------------------------------------------------------ builds
def test_flat_known_answer(small, tmp_path):
    out = tmp_path / "index"
    info = run_build(small, out)
    s = open_index_set(out)
    assert info["factory"] == "Flat" and info["metric"] == "inner_product" and info["build_id"] == s.build_id
    assert info["weights_sha256"] == SHA and info["checkpoint"] == "/ckpt" and info["dim"] == D
    assert info["embeddings"] == str(small.resolve()) and info["shards_dir"].endswith("shards")
    assert [p["id"] for p in info["parts"]] == [0, 1, 2] and info["choice"]["reasons"]
    x = all_vectors(small)
    meta = pq.read_table(s.meta_path)
    assert info["num_vectors"] == len(x) == meta.num_rows == 2000 - sum(1 for i in range(2000) if i % 17 == 5)
    assert meta.column_names[:7] == ["key", "caption", "url", "shard", "member", "offset", "size"]
    assert "clip_score" in meta.column_names and all(meta.column("embedded").to_pylist())
    index = faiss.read_index(str(s.index_path))
    keys = meta.column("key").to_pylist()
    _, ids = index.search(x[[0, 500, 1500]], 1)
    for row, vid in zip([0, 500, 1500], ids[:, 0]):
        assert vid == row and keys[vid] == f"k{_global_row(row)}"
    held = s.report["held_out"]
    assert held["recall@1"] == held["recall@10"] == held["recall@100"] == 1.0
    assert held["queries"] == 64 and held["qps_batched"] > 0 and held["latency_ms_p99"] >= held["latency_ms_p50"]
    assert s.report["tuning"]["reached"] and s.report["index_bytes"] == (s.root / "image.index").stat().st_size


def _global_row(vector_id: int) -> int:
    """The embedded rows skip every 17th (i % 17 == 5)."""
    kept = [i for i in range(vector_id + vector_id // 16 + 2) if i % 17 != 5]
    return kept[vector_id]


@pytest.mark.parametrize("extra,family,params", [
    (["--flat-max", "100"], "HNSW32", {"efSearch"}),
    (["--flat-max", "100", "--hnsw-max", "100"], "IVF", {"nprobe"}),
    (["--flat-max", "100", "--memory-budget", "200KB"], "Refine", {"nprobe", "k_factor_rf"}),
    (["--factory", "IVF32_HNSW32,Flat"], "IVF32_HNSW32", {"nprobe", "quantizer_efSearch"}),
])
def test_families_reach_the_target_on_held_out_queries(small, tmp_path, extra, family, params):
    info = run_build(small, tmp_path / "index", "--target-recall", "0.9", *extra)
    report = open_index_set(tmp_path / "index").report
    assert family in info["factory"] and set(info["search_params"]) == params
    assert report["tuning"]["reached"], report["tuning"]["note"]
    assert report["tuning"][f"recall@{10}"] >= 0.9
    assert report["held_out"]["recall@10"] >= 0.8  # held-out queries were not tuned on
    index = faiss.read_index(str(tmp_path / "index" / info["build"] / "image.index"))
    assert index.ntotal == info["num_vectors"]


def test_tuning_picks_the_cheapest_setting_reaching_the_target(small):
    coll = Collection.from_embed_dir(small)
    x = all_vectors(small)
    index = faiss.index_factory(D, "IVF32_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    qs = sample_queries(coll, 200, seed=3)
    truth = ground_truth(coll, qs.x, 20)
    result = tune(index, ["nprobe", "quantizer_efSearch"], qs.x, truth, 10, 0.97, nlist=32)
    assert result.reached and result.recall >= 0.97 and set(result.params) == {"nprobe", "quantizer_efSearch"}
    assert result.params["quantizer_efSearch"] >= 16
    # it aims above the target by the tune sample's standard error, so other queries reach the target too
    aim = 0.97 + recall_margin(0.97, len(qs.x), 10)
    assert 0.97 < aim < 0.98 and result.recall >= aim and "margin for the tune sample" in result.note
    assert recall_margin(0.97, 2000, 10) < recall_margin(0.97, 200, 10)  # more queries, a smaller margin
    ok = [t for t in result.trials if t["recall"] >= aim]
    assert min(t["ms_per_query"] for t in ok) == next(t for t in ok if t["params"] == result.params)["ms_per_query"]
    coarse = faiss.index_factory(D, "IVF32,PQ4x4fs", faiss.METRIC_INNER_PRODUCT)  # 2-byte codes: a plateau
    coarse.train(x)
    coarse.add(x)
    r = tune(coarse, ["nprobe"], qs.x, truth, 10, 0.999, nlist=32)
    best = max(t["recall"] for t in r.trials)
    assert not r.reached and "not reached" in r.note and best < 0.999
    assert r.recall >= 0.99 * best and r.params["nprobe"] < 32  # the plateau's cheapest, not the exhaustive one
    flat = tune(faiss.IndexFlatIP(D), [], qs.x[:0], truth.head(0), 10, 0.9)
    assert flat.params == {} and "no tuning queries" not in flat.note


def test_on_disk_matches_in_ram_ivf_and_opens_elsewhere(small, tmp_path, monkeypatch):
    out = tmp_path / "disk"
    info = run_build(small, out, "--on-disk", "--slice-vectors", "500", "--factory", "IVF16,Flat")
    root = out / info["build"]
    assert info["on_disk"] and set(info["files"]) == {"image.index", "image.ivfdata"}
    assert not (root / ".slices").exists() and (root / "trained.index").is_file()
    x = all_vectors(small)
    ram = faiss.read_index(str(root / "trained.index"))  # the same quantizer, all vectors in RAM
    ram.add(x)
    ram.nprobe = 4
    monkeypatch.chdir(tmp_path)  # opened from another cwd, with a relative path
    disk = faissio.read_index(os.path.relpath(root / "image.index", tmp_path))
    disk.nprobe = 4
    q = x[::97]
    d_ram, i_ram = ram.search(q, 10)
    d_disk, i_disk = disk.search(q, 10)
    assert np.array_equal(i_ram, i_disk) and np.allclose(d_ram, d_disk)
    assert i_disk[:, 0].tolist() == list(range(0, len(x), 97))  # ids == rows of metadata.parquet
    assert open_index_set(out).report["held_out"]["recall@10"] > 0.5
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    shutil.rmtree(out)
    again = faissio.read_index(moved / info["build"] / "image.index")
    again.nprobe = 4
    assert np.array_equal(again.search(q, 10)[1], i_ram)


def test_incremental_add(tmp_path):
    embed = make_embed_dir(tmp_path / "embed", [600, 500], dtype="float32")
    out = tmp_path / "index"
    first = run_build(embed, out, "--factory", "IVF16,Flat")
    old_ids = faiss.read_index(str(out / first["build"] / "image.index"))
    old_x = all_vectors(embed)
    make_embed_dir(tmp_path / "more", [400], seed=5, start=1100, first_part=2)
    shutil.copy(tmp_path / "more" / "emb" / "img-00002.npy", embed / "emb")
    shutil.copy(tmp_path / "more" / "emb" / "txt-00002.npy", embed / "emb")
    shutil.copy(tmp_path / "more" / "meta" / "00002.parquet", embed / "meta")
    manifest = json.loads((embed / "embed.json").read_text())
    more = json.loads((tmp_path / "more" / "embed.json").read_text())
    manifest["parts"] += more["parts"]
    (embed / "embed.json").write_text(json.dumps(manifest))
    second = run_build(embed, out, "--add")
    assert second["build_id"] != first["build_id"] and second["factory"] == "IVF16,Flat"
    assert second["num_vectors"] == first["num_vectors"] + more["num_embedded"]
    assert [p["id"] for p in second["parts"]] == [0, 1, 2]
    s = open_index_set(out)
    index = faiss.read_index(str(s.index_path))
    index.nprobe = 16
    new_x = all_vectors(embed)
    assert np.array_equal(new_x[:len(old_x)], old_x)
    _, ids = index.search(new_x[[5, 700, len(new_x) - 1]], 1)
    assert ids[:, 0].tolist() == [5, 700, len(new_x) - 1]  # old ids unchanged, the new rows searchable
    keys = pq.read_table(s.meta_path).column("key").to_pylist()
    assert keys[:len(old_x)] == pq.read_table(out / first["build"] / "metadata.parquet").column("key").to_pylist()
    assert keys[-1] == "k1499"
    assert old_ids.ntotal == first["num_vectors"] and (out / first["build"] / "build.json").is_file()
    again = ibuild.build(ibuild.IndexConfig.tiny(embeddings=str(embed), out=str(out), add=True))
    assert again["added"] == 0 and again["build_id"] == second["build_id"]
    # parts from another embed dir over another shard dir: `shard` stays relative to the index's shards_dir
    elsewhere = make_embed_dir(tmp_path / "far" / "embed", [200], seed=7, start=1500,
                               shards_dir=tmp_path / "far-shards")
    third = run_build(elsewhere, out, "--add")
    assert third["num_vectors"] == second["num_vectors"] + json.loads((elsewhere / "embed.json").read_text())[
        "num_embedded"] and third["parts"][-1]["embeddings"] == str(elsewhere.resolve())
    last = pq.read_table(open_index_set(out).meta_path).to_pylist()[-1]
    assert last["key"] == "k1699" and os.path.normpath(os.path.join(third["shards_dir"], last["shard"])) == \
        str(tmp_path / "far-shards" / "shard-00000.tar")


def test_add_refuses_other_weights_and_changed_parts(small, tmp_path, capsys):
    out = tmp_path / "index"
    run_build(small, out)
    other = make_embed_dir(tmp_path / "other", [300], sha="b" * 64)
    assert ibuild.main([str(other), "--out", str(out), "--add"]) == 2
    assert "other weights" in capsys.readouterr().err
    wide = make_embed_dir(tmp_path / "wide", [300], d=16)
    assert ibuild.main([str(wide), "--out", str(out), "--add"]) == 2
    assert "dim 16, the index has 32" in capsys.readouterr().err


def test_on_disk_incremental_add(tmp_path):
    embed = make_embed_dir(tmp_path / "embed", [900])
    out = tmp_path / "index"
    first = run_build(embed, out, "--on-disk", "--factory", "IVF8,Flat")
    make_embed_dir(tmp_path / "more", [300], seed=9, start=900, first_part=1)
    for name in ("emb/img-00001.npy", "emb/txt-00001.npy", "meta/00001.parquet"):
        shutil.copy(tmp_path / "more" / name, embed / name)
    manifest = json.loads((embed / "embed.json").read_text())
    manifest["parts"] += json.loads((tmp_path / "more" / "embed.json").read_text())["parts"]
    (embed / "embed.json").write_text(json.dumps(manifest))
    second = run_build(embed, out, "--add")
    assert second["on_disk"] and second["num_vectors"] > first["num_vectors"]
    index = faissio.read_index(out / second["build"] / "image.index")
    index.nprobe = 8
    x = all_vectors(embed)
    _, ids = index.search(x[[3, len(x) - 2]], 1)
    assert ids[:, 0].tolist() == [3, len(x) - 2]
    old = faissio.read_index(out / first["build"] / "image.index")  # the previous build still opens
    assert old.ntotal == first["num_vectors"]


def test_mismatched_index_set_is_refused(small, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    ia, ib = run_build(small, a), run_build(small, b)
    shutil.copy(b / ib["build"] / "metadata.parquet", a / ia["build"] / "metadata.parquet")
    with pytest.raises(IndexFormatError, match="mismatched index set"):
        open_index_set(a)


def test_cli_errors_exit_2(small, tmp_path, capsys):
    out = str(tmp_path / "o")
    assert ibuild.main([str(tmp_path / "nope"), "--out", out]) == 2
    assert "embeddings dir not found" in capsys.readouterr().err
    assert ibuild.main([str(small), "--out", out, "--memory-budget", "4XB"]) == 2
    assert "--memory-budget bad size" in capsys.readouterr().err
    assert ibuild.main([str(small), "--out", out, "--factory", "IVF16,Bogus"]) == 2
    err = capsys.readouterr().err
    assert "invalid faiss factory string" in err and "Error in" not in err
    assert ibuild.main([str(small), "--out", out, "--factory", "IVF5000,Flat"]) == 2
    assert "needs at least 5000 vectors" in capsys.readouterr().err
    assert ibuild.main([str(small), "--out", out, "--add"]) == 2
    assert "index not found" in capsys.readouterr().err
    assert not (tmp_path / "o" / "index.json").exists()
    assert ibuild.main([str(small), "--out", out, "--target-recall", "1.5"]) == 2
    proc = subprocess.run([sys.executable, "-m", "indexing.build", str(tmp_path / "nope"), "--out", out],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "embeddings dir not found" in proc.stderr and "Traceback" not in proc.stderr


def test_rebuild_swaps_in_a_new_build_and_keeps_the_previous_one(small, tmp_path):
    import time

    out = tmp_path / "index"
    first = run_build(small, out)
    time.sleep(1.1)  # build ids sort by the second they were made in (then a random suffix): keep them in order
    second = run_build(small, out)
    assert first["build_id"] != second["build_id"] and open_index_set(out).build_id == second["build_id"]
    a, b = (pq.read_table(out / i["build"] / "metadata.parquet") for i in (first, second))
    assert a.to_pylist() == b.to_pylist()
    assert (out / first["build"] / "image.index").is_file()  # a reader of the old index.json still opens it
    time.sleep(1.1)
    third = run_build(small, out)
    assert not (out / first["build"]).exists() and (out / second["build"]).is_dir()
    assert sorted(p.name for p in (out / "builds").iterdir()) == sorted([second["build_id"], third["build_id"]])


def test_indexes_what_clipforge_embed_wrote(tmp_path):
    """The real embed stage (local executor, a random-init tiny CLIP) -> index: metadata locates each image."""
    import tarfile

    import torch

    from helpers import write_shards
    from indexing import embed
    from trainer.clip.checkpoint import save_model
    from trainer.clip.configs import get_config
    from trainer.clip.model import CLIP

    write_shards(tmp_path / "shards", n_shards=2, per_shard=12, corrupt_keys=(3,))
    torch.manual_seed(0)
    ckpt = save_model(CLIP(get_config("tiny")), tmp_path / "ckpt")
    assert embed.main([str(tmp_path / "shards"), "--checkpoint", str(ckpt), "--out", str(tmp_path / "emb"),
                       "--executor", "local", "--batch-size", "8"]) == 0
    info = run_build(tmp_path / "emb", tmp_path / "index")
    s = open_index_set(tmp_path / "index")
    meta = pq.read_table(s.meta_path).to_pylist()
    assert info["num_vectors"] == len(meta) == 23 and "000000003" not in {m["key"] for m in meta}
    assert info["checkpoint"] and info["weights_sha256"] == json.loads((tmp_path / "emb" / "embed.json")
                                                                       .read_text())["weights_sha256"]
    with tarfile.open(tmp_path / "shards" / meta[5]["shard"]) as tar:
        want = tar.extractfile(meta[5]["member"]).read()
    with open(tmp_path / "shards" / meta[5]["shard"], "rb") as f:
        f.seek(meta[5]["offset"])
        assert f.read(meta[5]["size"]) == want
    x = all_vectors(tmp_path / "emb")
    assert faiss.read_index(str(s.index_path)).search(x[5:6], 1)[1][0, 0] == 5
    assert s.report["held_out"]["recall@10"] == 1.0


def test_gpu_path_with_a_stand_in_gpu(small, tmp_path, monkeypatch, capsys):
    """No GPU here: --device cuda is a clear error; with faiss's GPU calls stood in by CPU clones, the GPU path
    trains and adds through them, and falls back to GPU k-means assignment where the index cannot be cloned."""
    import torch

    assert ibuild.main([str(small), "--out", str(tmp_path / "x"), "--device", "cuda"]) == 2
    assert "faiss sees no GPU" in capsys.readouterr().err
    calls = []

    def to_gpu(res, device, index):
        ivf = faiss.extract_index_ivf(index) if not isinstance(index, faiss.IndexFlat) else None
        if ivf is not None and not isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexFlat):
            raise RuntimeError("Error in ToGpuCloner: not implemented for this quantizer")
        calls.append(("to_gpu", type(faiss.downcast_index(index)).__name__, index.is_trained))
        return faiss.clone_index(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "res", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    monkeypatch.setattr(faiss, "index_gpu_to_cpu", lambda g: faiss.clone_index(g), raising=False)
    monkeypatch.setattr(faiss, "knn_gpu", lambda res, xq, xb, k, metric: faiss.knn(xq, xb, k, metric=metric),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=0: (10 ** 10, 10 ** 10))
    info = run_build(small, tmp_path / "ivf", "--device", "cuda", "--factory", "IVF16,Flat")
    assert ("to_gpu", "IndexIVFFlat", False) in calls and ("to_gpu", "IndexIVFFlat", True) in calls
    assert open_index_set(tmp_path / "ivf").report["held_out"]["recall@10"] > 0.8
    calls.clear()
    info = run_build(small, tmp_path / "hnsw", "--device", "auto", "--factory", "IVF16_HNSW32,Flat")
    assert calls == [("to_gpu", "IndexFlat", True)]  # the k-means assigner only
    assert "GPU k-means assignment" in capsys.readouterr().err
    assert info["num_vectors"] == open_index_set(tmp_path / "hnsw").info["num_vectors"]
    assert open_index_set(tmp_path / "hnsw").report["held_out"]["recall@10"] > 0.8


def _shifted_queries(embed: Path, n: int, seed: int = 5) -> np.ndarray:
    """Queries off the collection's caption distribution: image vectors pushed along one direction plus noise."""
    rng = np.random.default_rng(seed)
    x = all_vectors(embed)
    x = x[np.linalg.norm(x, axis=1) > 0][rng.integers(0, 1500, n)]
    q = x + 0.5 * rng.standard_normal(x.shape).astype(np.float32) + 0.6 * np.eye(D, dtype=np.float32)[0]
    return (3.0 * q).astype(np.float32)  # not unit: the loader normalises


def test_query_file_is_what_tuning_and_the_report_use(small, tmp_path):
    qfile = tmp_path / "queries.npy"
    q = _shifted_queries(small, 300)
    q[7] = 0
    q[11, 3] = np.nan
    np.save(qfile, q)
    info = run_build(small, tmp_path / "index", "--flat-max", "100", "--target-recall", "0.9",
                     "--query-file", str(qfile))
    report = open_index_set(tmp_path / "index").report
    assert report["tuning"]["query_source"] == "query-file" and report["tuning"]["queries"] == 64
    assert report["tuning"]["reached"] and report["held_out"]["queries"] == 64
    sample = load_query_file(qfile, D, 128, 0)  # the build's seed: its tune rows, then its held-out rows
    assert np.allclose(np.linalg.norm(sample.x, axis=1), 1, atol=1e-5) and np.isfinite(sample.x).all()
    held = sample.x[64:]
    x = all_vectors(small)
    truth = Truth(*faiss.knn(held, x, 100, metric=faiss.METRIC_INNER_PRODUCT))
    index = faiss.read_index(str(tmp_path / "index" / info["build"] / "image.index"))
    index.hnsw.efSearch = info["search_params"]["efSearch"]
    scores, ids = index.search(held, 10)
    assert recall_at(ids, truth, 10, scores) == pytest.approx(report["held_out"]["recall@10"])
    run_build(small, tmp_path / "index2", "--flat-max", "100", "--target-recall", "0.9")
    assert open_index_set(tmp_path / "index2").report["tuning"]["query_source"] == "caption"


def test_query_file_loader_and_errors(small, tmp_path, capsys):
    q = _shifted_queries(small, 50)
    q[:10] = 0
    np.save(tmp_path / "q.npy", q)
    a, b = load_query_file(tmp_path / "q.npy", D, 30, 1), load_query_file(tmp_path / "q.npy", D, 30, 1)
    assert len(a.x) == 30 and np.array_equal(a.x, b.x) and (np.linalg.norm(a.x, axis=1) > 0.99).all()
    assert len(load_query_file(tmp_path / "q.npy", D, 1000, 1).x) == 40  # the 10 zero rows dropped
    out = str(tmp_path / "o")
    np.save(tmp_path / "wrong.npy", np.ones((5, D + 1), np.float32))
    np.save(tmp_path / "zero.npy", np.zeros((5, D), np.float32))
    (tmp_path / "text.npy").write_text("not an array")
    for name, message in [("wrong.npy", f"expected float rows of dimension {D}"), ("zero.npy", "no finite, non-zero"),
                          ("text.npy", "cannot read a .npy array"), ("missing.npy", "cannot read")]:
        assert ibuild.main([str(small), "--out", out, "--query-file", str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert message in err and "training" not in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_cpu_kmeans_assigns_through_hnsw_from_many_lists(small, tmp_path, monkeypatch, capsys):
    """From HNSW_ASSIGN_FROM lists on, CPU training assigns through an HNSW graph of the centroids (lowered here to
    16): the build says so, the assigner is detached afterwards and the index is as good as one trained exactly."""
    from indexing import builder

    exact = run_build(small, tmp_path / "exact", "--factory", "IVF16_HNSW32,Flat", "--target-recall", "0.9")
    assert "HNSW32 graph of the centroids" not in capsys.readouterr().err
    monkeypatch.setattr(builder, "HNSW_ASSIGN_FROM", 16)
    info = run_build(small, tmp_path / "hnsw", "--factory", "IVF16_HNSW32,Flat", "--target-recall", "0.9")
    assert "k-means over K=16 lists assigns through an HNSW32 graph of the centroids" in capsys.readouterr().err
    index = faiss.read_index(str(tmp_path / "hnsw" / info["build"] / "image.index"))
    assert faiss.extract_index_ivf(index).clustering_index is None and index.ntotal == info["num_vectors"]
    got, ref = (open_index_set(tmp_path / d).report["held_out"]["recall@10"] for d in ("hnsw", "exact"))
    assert got >= 0.9 * ref and open_index_set(tmp_path / "hnsw").report["tuning"]["reached"]
    assert exact["num_vectors"] == info["num_vectors"]
    x = all_vectors(small)[:1500]
    for threshold in (10 ** 9, 16):
        monkeypatch.setattr(builder, "HNSW_ASSIGN_FROM", threshold)
        index = faiss.index_factory(D, "IVF16_HNSW32,Flat", faiss.METRIC_INNER_PRODUCT)
        faiss.cvar.hnsw_stats.reset()
        builder.train_on_cpu(index, x)
        searched = faiss.cvar.hnsw_stats.n1  # graph searches: whole assignment passes over x, or none
        assert index.is_trained and (searched == 0 if threshold > 16 else searched >= len(x) and not searched % len(x))


def test_tuning_never_scans_every_list_when_less_reaches(small):
    """The search up nprobe is exponential from below and stops on a plateau or where a trial costs more than a
    setting that already reaches: no trial is the full scan nprobe = nlist (hours at 100M vectors)."""
    coll = Collection.from_embed_dir(small)
    x = all_vectors(small)
    index = faiss.index_factory(D, "IVF64,PQ8x4fs,Refine(Flat)", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    qs = sample_queries(coll, 200, seed=3)
    truth = ground_truth(coll, qs.x, 20)
    r = tune(index, ["nprobe", "k_factor_rf"], qs.x, truth, 10, 0.95, nlist=64)
    assert r.reached and r.params["nprobe"] < 32
    assert max(t["params"]["nprobe"] for t in r.trials) < 64
    low = [t for t in r.trials if t["params"]["k_factor_rf"] == 1]  # 4-bit codes alone: a plateau below 0.95
    assert low and max(t["recall"] for t in low) < 0.95 and max(t["params"]["nprobe"] for t in low) < 64
