"""indexing/: build -> search -> image_bytes -> report on tiny synthetic shards and a random-init tiny CLIP (CPU)."""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from indexing import build as ibuild
from indexing import search as isearch
from indexing.report import write_html
from trainer.clip.checkpoint import load_pretrained, save_model
from trainer.clip.formats.shards import read_manifest, write_manifest, write_shard_dir
from trainer.clip.model import CLIP, get_config

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "brown"]
THINGS = ["apple", "car", "dog", "house", "boat"]
N_PER_SHARD, N_SHARDS = 50, 2          # 100 valid samples
N_CORRUPT = 2                          # one garbage "jpg", one truncated jpg


def _jpeg(i: int, rng: np.random.Generator) -> bytes:
    """A small distinct image: a coloured background with noise."""
    base = rng.integers(0, 256, size=3)
    arr = np.clip(base + rng.normal(0, 25, size=(48 + i % 5 * 8, 56, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path) -> dict[str, bytes]:
    """Write SHARDS_DIR in the shard contract format; returns {key: jpg bytes} of the valid samples."""
    rng = np.random.default_rng(0)
    originals, n = {}, 0

    def shard(s):
        nonlocal n
        for j in range(N_PER_SHARD + (N_CORRUPT if s == 1 else 0)):
            key = f"{n:09d}"
            caption = f"a {COLORS[n % len(COLORS)]} {THINGS[n % len(THINGS)]} number {n}"
            jpg = _jpeg(n, rng)
            if s == 1 and j == 10:
                jpg = b"\xff\xd8\xff\xe0 definitely not a jpeg"
            elif s == 1 and j == 20:
                jpg = jpg[: len(jpg) // 2]          # truncated
            else:
                originals[key] = jpg
            meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption,
                    "width": 56, "height": 48, "sha256": "0" * 64}
            n += 1
            yield {"__key__": key, "jpg": jpg, "txt": caption, "json": meta}

    write_shard_dir(root, (shard(s) for s in range(N_SHARDS)), durable=False)
    return originals


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("idx")
    originals = make_shards(root / "shards")
    torch.manual_seed(0)
    ckpt = save_model(CLIP(get_config("tiny")), root / "ckpt")
    out = root / "index"
    rc = ibuild.main(["--shards", str(root / "shards"), "--checkpoint", str(ckpt), "--out", str(out),
                      "--batch-size", "16"])
    assert rc == 0
    return {"root": root, "shards": root / "shards", "ckpt": Path(ckpt), "out": out, "originals": originals}


@pytest.fixture(scope="module")
def searcher(env):
    return isearch.Searcher(env["out"])


def test_build_outputs(env):
    out, n_valid = env["out"], len(env["originals"])
    index = faiss.read_index(str(out / "image.index"))
    meta = pq.read_table(out / "metadata.parquet")
    assert index.ntotal == meta.num_rows == n_valid == N_PER_SHARD * N_SHARDS
    assert {"key", "caption", "url", "shard", "offset", "size"} <= set(meta.column_names)
    info = json.loads((out / "index.json").read_text())
    assert info["format"] == "clipforge.index.v1"
    assert info["checkpoint"] == str(env["ckpt"].resolve())
    assert info["shards_dir"] == str(env["shards"].resolve())
    assert info["dim"] == get_config("tiny").embed_dim == index.d
    assert info["num_vectors"] == n_valid
    assert info["factory"] == "Flat"  # auto below 50k vectors
    assert info["metric"] == "inner_product" and index.metric_type == faiss.METRIC_INNER_PRODUCT
    assert info["skipped"] == N_CORRUPT
    assert sorted(meta.column("key").to_pylist()) == sorted(env["originals"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left behind
    # vectors are L2-normalised
    x = index.reconstruct_n(0, index.ntotal)
    assert np.allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)


def test_image_bytes_roundtrip(env, searcher):
    meta = pq.read_table(env["out"] / "metadata.parquet").to_pylist()
    for i, row in enumerate(meta):
        hit = isearch.Hit(rank=1, score=0.0, key=row["key"], caption=row["caption"], url=row["url"],
                          image="", id=i, shard=row["shard"], offset=row["offset"], size=row["size"])
        assert searcher.image_bytes(hit) == env["originals"][row["key"]]
    hit = searcher.search(["a red apple"], k=1)[0][0]
    assert searcher.image_bytes(hit) == env["originals"][hit.key]
    assert re.fullmatch(r"shard-\d{5}\.tar#\d{9}\.jpg", hit.image)


def test_search_sorted_and_exact_cosine(env, searcher):
    queries = ["a red apple", "a blue boat number 7"]
    k = 5
    results = searcher.search(queries, k=k)
    assert len(results) == len(queries)
    model, preprocess, tokenizer = load_pretrained(env["ckpt"])
    for q, hits in zip(queries, results):
        assert len(hits) == k
        assert [h.rank for h in hits] == list(range(1, k + 1))
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        # top-1 score == cosine computed directly with the model
        img = Image.open(io.BytesIO(env["originals"][hits[0].key]))
        with torch.no_grad():
            ie = model.encode_image(preprocess(img)[None], normalize=True)
            te = model.encode_text(tokenizer([q]), normalize=True)
        assert abs(float((ie * te).sum()) - hits[0].score) < 1e-4
    # exact search: the top-1 is the best over the whole collection
    with torch.no_grad():
        te = model.encode_text(tokenizer([queries[0]]), normalize=True)[0].numpy()
    x = searcher.index.reconstruct_n(0, searcher.num_vectors)
    assert int(np.argmax(x @ te)) == results[0][0].id
    # k is capped at the number of vectors
    assert len(searcher.search(["anything"], k=10_000)[0]) == searcher.num_vectors


def test_search_cli(env, capsys):
    assert isearch.main(["a red apple", "a dog", "--index", str(env["out"]), "--k", "3"]) == 0
    out = capsys.readouterr().out
    ranked = [l for l in out.splitlines() if re.match(r"^\s+\d+\. -?\d\.\d{4}  .+  /.+/shard-\d{5}\.tar#\d{9}\.jpg$", l)]
    assert len(ranked) == 6
    assert "a red apple" in out.splitlines()[0]

    assert isearch.main(["a red apple", "--index", str(env["out"]), "--k", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data, list) and len(data) == 1 and data[0]["query"] == "a red apple"
    hits = data[0]["hits"]
    assert len(hits) == 4 and {"rank", "score", "key", "caption", "url", "image"} <= set(hits[0])
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)


def test_report_html(env, searcher, tmp_path):
    queries, k = ["a red apple", "a green car <b>&"], 4
    path = write_html(searcher, queries, k, tmp_path / "r" / "search.html")
    html = path.read_text()
    assert html.startswith("<!doctype html>") and "a green car &lt;b&gt;&amp;" in html
    sections = html.split("<section")[1:]
    assert len(sections) == len(queries)
    for sec in sections:
        assert sec.count("<img ") == k
        assert sec.count("data:image/jpeg;base64,") == k
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_ivf_factory(env, tmp_path):
    out = tmp_path / "ivf"
    rc = ibuild.main(["--shards", str(env["shards"]), "--checkpoint", str(env["ckpt"]), "--out", str(out),
                      "--factory", "IVF4,Flat"])
    assert rc == 0
    info = json.loads((out / "index.json").read_text())
    assert info["factory"] == "IVF4,Flat" and info["num_vectors"] == len(env["originals"])
    assert 1 <= info["search_params"]["nprobe"] <= 4
    assert info["tuned_recall_at_10"] >= 0.95 or info["search_params"]["nprobe"] == 4
    s = isearch.Searcher(out)
    assert faiss.extract_index_ivf(s.index).nlist == 4
    hits = s.search(["a purple house"], k=5)[0]
    assert len(hits) == 5 and [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # probing every list is exact: same top-1 as the flat index
    exact = isearch.Searcher(out, search_params={"nprobe": 4}).search(["a purple house"], k=1)[0][0]
    flat = isearch.Searcher(env["out"]).search(["a purple house"], k=1)[0][0]
    assert exact.key == flat.key and abs(exact.score - flat.score) < 1e-5


def test_rebuild_is_idempotent(env, tmp_path):
    out = tmp_path / "again"
    args = ["--shards", str(env["shards"]), "--checkpoint", str(env["ckpt"]), "--out", str(out)]
    assert ibuild.main(args) == 0
    first = pq.read_table(out / "metadata.parquet")
    assert ibuild.main(args) == 0
    assert pq.read_table(out / "metadata.parquet").equals(first)
    assert sorted(p.name for p in out.iterdir()) == ["image.index", "index.json", "metadata.parquet"]


def test_missing_paths_fail_clearly(env, tmp_path, capsys):
    rc = ibuild.main(["--shards", str(tmp_path / "nope"), "--checkpoint", str(env["ckpt"]), "--out", str(tmp_path / "o")])
    assert rc != 0 and "shards dir not found" in capsys.readouterr().err
    rc = ibuild.main(["--shards", str(env["shards"]), "--checkpoint", str(tmp_path / "nockpt"), "--out", str(tmp_path / "o")])
    assert rc != 0 and "checkpoint not found" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    rc = ibuild.main(["--shards", str(env["shards"]), "--checkpoint", str(env["ckpt"]), "--out", str(tmp_path / "o"),
                      "--factory", "IVF1000,Flat"])
    assert rc != 0 and "needs at least 1000 vectors" in capsys.readouterr().err
    assert isearch.main(["q", "--index", str(tmp_path / "noindex")]) != 0
    assert "index not found" in capsys.readouterr().err


def test_cli_entry_point_subprocess(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "indexing.search", "q", "--index", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "index not found" in proc.stderr


def test_truncated_and_missing_tars_are_counted(env, tmp_path, capsys):
    """A truncated tar keeps the samples read before the damage; the rest (and a missing tar) count as skipped."""
    import shutil

    shards = tmp_path / "shards"
    shutil.copytree(env["shards"], shards)
    tar = shards / "shard-00001.tar"
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2 + 100])
    listed = read_manifest(shards)["shards"]
    write_manifest(shards, listed + [{"tar": "shard-00002.tar", "parquet": "shard-00002.parquet", "num_samples": 7}])
    out = tmp_path / "index"
    assert ibuild.main(["--shards", str(shards), "--checkpoint", str(env["ckpt"]), "--out", str(out)]) == 0
    assert "truncated" in capsys.readouterr().err
    info = json.loads((out / "index.json").read_text())
    assert N_PER_SHARD < info["num_vectors"] < N_PER_SHARD * N_SHARDS
    assert info["num_vectors"] + info["skipped"] == N_PER_SHARD * N_SHARDS + N_CORRUPT + 7
    s = isearch.Searcher(out)
    for hit in s.search(["a red apple"], k=info["num_vectors"])[0]:
        assert s.image_bytes(hit) == env["originals"][hit.key]
