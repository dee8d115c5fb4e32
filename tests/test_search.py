"""indexing/search.py on its own: the Python API and the CLI over v2 index dirs (tests/index_data.make_index_dir:
synthetic shards with sidecars, a random-init tiny CLIP, the real embed and index stages, CPU). Every result is
compared with exact search over the vectors."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import faiss
from faiss.contrib.ondisk import merge_ondisk
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from index_data import add_sidecars, exhaustive_params, make_index_dir
from indexing import search as isearch
from indexing.report import write_html
from indexing.search import MetadataReader, QueryError, Searcher, SearchError, SearchOptions
from trainer.clip.checkpoint import save_model
from trainer.clip.formats.atomic import atomic_write_json, read_json
from trainer.clip.formats.index import (INDEX_FILE, IVFDATA_FILE, META_FILE, REPORT_FILE, ROWS_FILE, build_dir,
                                        commit_build, new_build_id, open_index_set, write_metadata, write_report)
from trainer.clip.formats.shards import write_shard_dir
from trainer.clip.model import CLIP, get_config

COLORS = ["red", "green", "blue", "yellow", "purple"]
N_PER_SHARD, N_SHARDS = 20, 2
DUP_A, DUP_B = 4, 27      # the very same jpg bytes


def _jpeg(rng: np.random.Generator, n: int) -> bytes:
    arr = np.clip(rng.integers(0, 256, size=3) + rng.normal(0, 30, size=(40 + n % 3 * 8, 48, 3)), 0, 255)
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path) -> list[bytes]:
    rng = np.random.default_rng(1)
    jpgs = [_jpeg(rng, n) for n in range(N_PER_SHARD * N_SHARDS)]
    jpgs[DUP_B] = jpgs[DUP_A]

    def shard(s):
        for n in range(s * N_PER_SHARD, (s + 1) * N_PER_SHARD):
            key, caption = f"{n:09d}", f"a {COLORS[n % len(COLORS)]} thing number {n}"
            yield {"__key__": key, "jpg": jpgs[n], "txt": caption,
                   "json": {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption}}

    write_shard_dir(root, (shard(s) for s in range(N_SHARDS)), durable=False)
    add_sidecars(root)  # width / height reach the index's metadata through the sidecars, as from `clipforge shard`
    return jpgs


def _ckpt(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    return save_model(CLIP(get_config("tiny")), path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("search")
    jpgs = make_shards(root / "shards")
    ckpt = _ckpt(root / "ckpt")
    make_index_dir(root / "flat", root / "shards", ckpt)
    s = Searcher(root / "flat", options=SearchOptions(duckdb_temp_dir=str(root / "duckdb")))
    meta = pq.read_table(s.set.meta_path).to_pylist()
    return SimpleNamespace(root=root, ckpt=ckpt, s=s, meta=meta, jpgs=jpgs, x=s.index.reconstruct_n(0, len(meta)))


@pytest.fixture(scope="module")
def ivf_dir(env):
    return make_index_dir(env.root / "ivf", env.root / "shards", env.ckpt, factory="IVF4,Flat")


def exact(env, q: np.ndarray, k: int, ids=None) -> tuple[list[int], np.ndarray]:
    ids = np.arange(len(env.x)) if ids is None else np.asarray(ids, np.int64)
    scores = env.x[ids] @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return ids[order].tolist(), scores[order]


def test_text_search_is_exact_and_hits_carry_the_metadata(env):
    res = env.s.search("a red thing", k=6)
    assert len(res) == 1 and len(res[0]) == 6 and res.methods == ["plain"] and res.notes == []
    q = env.s.encode(["a red thing"])[0]
    ids, scores = exact(env, q, 6)
    assert [h.id for h in res[0]] == ids and np.allclose([h.score for h in res[0]], scores, atol=1e-5)
    for rank, h in enumerate(res[0], 1):
        row = env.meta[h.id]
        assert h.rank == rank and h.extra == {}
        assert (h.key, h.caption, h.url, h.shard, h.offset, h.size) == \
               (row["key"], row["caption"], row["url"], row["shard"], row["offset"], row["size"])
        assert h.image == f"{row['shard']}#{row['member']}" and env.s.image_bytes(h) == env.jpgs[int(row["key"])]


def test_image_queries_bytes_path_and_pil_find_themselves(env, tmp_path):
    i = 11
    data = env.jpgs[int(env.meta[i]["key"])]
    (tmp_path / "q.jpg").write_bytes(data)
    with Image.open(io.BytesIO(data)) as img:
        pil = img.copy()
    res = env.s.search([data, tmp_path / "q.jpg", pil, bytearray(data)], k=3)
    assert len(res) == 4
    for hits in res:
        assert hits[0].id == i and hits[0].score > 0.999
        assert [h.id for h in hits] == [h.id for h in res[0]]


def test_embeddings_and_mixed_batches(env):
    q = env.s.encode(["a blue thing number 7"])[0]
    text = env.s.search("a blue thing number 7", k=8)[0]
    for query in (q, 5 * q, q.astype(np.float64)):           # normalised by the searcher
        hits = env.s.search(query, k=8)[0]
        assert [h.id for h in hits] == [h.id for h in text]
        assert np.allclose([h.score for h in hits], [h.score for h in text], atol=1e-5)
    two = env.s.search(np.stack([q, env.x[3]]), k=4)
    assert len(two) == 2 and [h.id for h in two[0]] == [h.id for h in text[:4]] and two[1][0].id == 3
    mixed = env.s.search(["a blue thing number 7", env.jpgs[int(env.meta[3]["key"])], env.x[9]], k=4)
    assert [h.id for h in mixed[0]] == [h.id for h in text[:4]] and mixed[1][0].id == 3 and mixed[2][0].id == 9


def test_columns_come_back_as_extra(env):
    hits = env.s.search(env.x[0], k=5, columns=["width", "height", "member"])[0]
    for h in hits:
        row = env.meta[h.id]
        assert h.extra == {"width": row["width"], "height": row["height"], "member": row["member"]}
        assert h.extra["width"] == 48 and h.extra["height"] in (40, 48, 56)
    with pytest.raises(QueryError, match="unknown columns"):
        env.s.search(env.x[0], k=2, columns=["nope"])


FILTERS = [
    ("caption ILIKE '%RED%'", lambda r: "red" in r["caption"]),
    ("key IN ('000000003', '000000030')", lambda r: r["key"] in ("000000003", "000000030")),
    ("height > 40 AND NOT shard = 'shard-00000.tar'", lambda r: r["height"] > 40 and r["shard"] != "shard-00000.tar"),
    ("key = 'none'", lambda r: False),
]


@pytest.mark.parametrize("strategy", ["widen", "selector", "auto"])
@pytest.mark.parametrize("expr, pred", FILTERS, ids=[f for f, _ in FILTERS])
def test_filter_by_widening_and_by_id_selector_is_exact(env, strategy, expr, pred):
    s = Searcher(env.root / "flat", options=SearchOptions(filter_strategy=strategy,
                                                          duckdb_temp_dir=str(env.root / "duckdb")))
    allowed = [i for i, r in enumerate(env.meta) if pred(r)]
    q = env.x[0] + 0.6 * env.x[20] + 0.3 * np.random.default_rng(0).normal(size=env.x.shape[1]).astype(np.float32)
    for k in (2, 7):
        res = s.search(q, k=k, filter=expr)
        ids, scores = exact(env, q / np.linalg.norm(q), k, allowed)
        assert [h.id for h in res[0]] == ids and np.allclose([h.score for h in res[0]], scores, atol=1e-5)
        want = "empty" if not allowed else ("selector" if len(allowed) <= 0.05 * len(env.meta) else "widen") \
            if strategy == "auto" else strategy
        assert res.methods == [want]


@pytest.mark.parametrize("factory", ["IVF4,Flat", "HNSW8", "IVF4_HNSW4,Flat", "L2norm,IVF4,Flat", "IVF4,Flat,RFlat"])
def test_id_selector_on_approximate_indexes(env, factory, tmp_path):
    """The selector carries the index's nprobe / efSearch (faiss's own default nprobe is 1): here exhaustive ones,
    given to the Searcher (the builder tunes on caption queries, which promises nothing for this filtered query)."""
    make_index_dir(tmp_path / "i", env.root / "shards", env.ckpt, factory=factory)
    params = exhaustive_params(tmp_path / "i")
    expr = "caption LIKE '%green%' OR caption LIKE '%blue%'"
    allowed = [i for i, r in enumerate(env.meta) if "green" in r["caption"] or "blue" in r["caption"]]
    results = {}
    for strategy in ("widen", "selector"):
        s = Searcher(tmp_path / "i", search_params=params,
                     options=SearchOptions(filter_strategy=strategy, duckdb_temp_dir=str(tmp_path)))
        assert params.items() <= s.search_params.items()
        res = s.search(env.x[1], k=10, filter=expr)
        assert res.methods == [strategy] and all(h.id in allowed for h in res[0]) and len(res[0]) == 10
        results[strategy] = [h.id for h in res[0]]
    assert results["widen"] == results["selector"]
    # exact codes and exhaustive parameters: the true filtered top 10
    assert results["selector"] == exact(env, env.x[1], 10, allowed)[0]


def test_selector_falls_back_to_widening_where_faiss_takes_none(env, tmp_path):
    make_index_dir(tmp_path / "pq", env.root / "shards", env.ckpt, factory="PQ4x4")
    s = Searcher(tmp_path / "pq", options=SearchOptions(filter_strategy="selector", duckdb_temp_dir=str(tmp_path)))
    assert not s.selectable
    res = s.search(env.x[1], k=3, filter="caption LIKE '%red%'")
    assert res.methods == ["widen"] and len(res[0]) == 3 and all("red" in h.caption for h in res[0])


def _ondisk_copy(src: Path, dst: Path, lists_name: str = IVFDATA_FILE) -> Path:
    """The IVF build of src as an index merged on disk (image.index + image.ivfdata) in a new index dir dst."""
    ivf_set = open_index_set(src)
    full = faiss.read_index(str(ivf_set.index_path))
    bid = new_build_id()
    folder = build_dir(dst, bid)
    folder.mkdir(parents=True)
    trained = faiss.clone_index(full)
    trained.reset()
    merge_ondisk(trained, [str(ivf_set.index_path)], str(folder / lists_name))
    faiss.write_index(trained, str(folder / INDEX_FILE))
    if lists_name != IVFDATA_FILE:
        (folder / lists_name).rename(folder / IVFDATA_FILE)
    sha = ivf_set.info["weights_sha256"]
    write_metadata(folder / META_FILE, pq.read_table(ivf_set.meta_path), bid, sha)
    write_report(folder / REPORT_FILE, {"factory": "IVF4,Flat on disk"}, bid, sha)
    keep = {k: v for k, v in ivf_set.info.items() if k not in ("format", "build_id", "build", "files")}
    commit_build(dst, bid, keep)
    return dst


def test_an_index_merged_on_disk_is_found_next_to_its_index_after_a_move(env, ivf_dir, tmp_path):
    _ondisk_copy(ivf_dir, tmp_path / "built")
    moved = tmp_path / "elsewhere" / "index"
    moved.parent.mkdir()
    shutil.move(tmp_path / "built", moved)
    s = Searcher(moved)
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(s.index).invlists),
                      faiss.OnDiskInvertedLists)
    ref = Searcher(ivf_dir)
    for q in (env.x[5], env.x[30]):
        assert [h.id for h in s.search(q, k=8)[0]] == [h.id for h in ref.search(q, k=8)[0]]
    res = s.search(env.x[5], k=4, filter="caption LIKE '%red%'")
    assert len(res[0]) == 4 and all("red" in h.caption for h in res[0])


def test_on_disk_lists_under_another_name_are_an_error_not_a_crash(env, ivf_dir, tmp_path):
    _ondisk_copy(ivf_dir, tmp_path / "bad", lists_name="lists.tmp")
    with pytest.raises(SearchError, match="lists.tmp"):
        Searcher(tmp_path / "bad")


def test_dedup_drops_the_twin_and_is_a_note_where_vectors_cannot_be_reconstructed(env, ivf_dir):
    a, b = (next(i for i, r in enumerate(env.meta) if r["key"] == f"{n:09d}") for n in (DUP_A, DUP_B))
    plain = [h.id for h in env.s.search(env.x[a], k=6)[0]]
    assert set(plain[:2]) == {a, b}
    res = env.s.search(env.x[a], k=5, dedup=0.9999)
    assert [h.id for h in res[0]] == [plain[0], *plain[2:6]] and res.notes == [] and res.methods == ["widen"]
    loose = [h.id for h in env.s.search(env.x[a], k=5, dedup=0.5)[0]]
    sub = env.x[loose] @ env.x[loose].T
    assert (sub[~np.eye(len(loose), dtype=bool)] < 0.5).all()
    ivf = Searcher(ivf_dir)
    assert not ivf.can_reconstruct
    res = ivf.search(env.x[a], k=4, dedup=0.9)
    assert len(res[0]) == 4 and "dedup skipped" in res.notes[0]


def test_k_is_capped_at_the_vector_count(env):
    n = len(env.meta)
    assert len(env.s.search(env.x[0], k=10 * n)[0]) == n
    assert len(env.s.search(env.x[0], k=10 * n, filter="caption LIKE '%red%'")[0]) == n // len(COLORS)
    assert env.s.search(env.x[0], k=0) == [[]] and env.s.search([], k=3) == []


def test_the_model_is_loaded_only_for_text_and_image_queries(env, tmp_path):
    ckpt = shutil.copytree(env.ckpt, tmp_path / "ckpt")
    make_index_dir(tmp_path / "index", env.root / "shards", ckpt)
    shutil.rmtree(ckpt)
    s = Searcher(tmp_path / "index")
    hits = s.search(env.x[2], k=3, filter="caption LIKE '%a%'", columns=["width"])[0]
    assert hits[0].id == 2 and not s.model_loaded
    for query in ("a red thing", env.jpgs[0]):
        with pytest.raises(SearchError, match="cannot load checkpoint"):
            s.search(query, k=3)


def test_a_checkpoint_with_other_weights_is_refused(env, tmp_path):
    other = _ckpt(tmp_path / "other", seed=1)
    s = Searcher(env.root / "flat", checkpoint=other)
    with pytest.raises(SearchError, match="is not the one build"):
        s.search("a red thing", k=2)


def test_bad_queries_are_query_errors_before_anything_is_encoded(env, tmp_path):
    s = Searcher(env.root / "flat", options=SearchOptions(duckdb_temp_dir=str(tmp_path)))
    d = s.dim
    cases = [(np.ones(d - 1), "dimensions"), (np.zeros(d), "non-zero"), (np.full(d, np.nan), "finite"),
             (b"not an image", "not a decodable image"), (tmp_path / "missing.jpg", "cannot read image"),
             (5, "not a query"), ([5], "neither text"),
             (np.array(["a"] * d), "must be numbers"), (np.ones((2, 2, d)), r"\[D\] or \[Q, D\]")]
    for query, message in cases:
        with pytest.raises(QueryError, match=message):
            s.search(query, k=2)
    for kw, message in [({"filter": "lower(caption) = 'x'"}, "bad filter: function calls"),
                        ({"dedup": 1.5}, "dedup must be"), ({"columns": ["x"]}, "unknown columns")]:
        with pytest.raises(QueryError, match=message):
            s.search("a red thing", k=2, **kw)
    assert not s.model_loaded
    assert np.allclose(np.linalg.norm(s.embed(np.full(d, 1e300)), axis=1), 1)   # huge but finite: fine


def test_mismatched_or_missing_index_sets_are_search_errors(env, tmp_path):
    with pytest.raises(SearchError, match="index not found"):
        Searcher(tmp_path / "missing")
    bad = shutil.copytree(env.root / "flat", tmp_path / "bad")
    build = bad / read_json(bad / "index.json")["build"]
    report = read_json(build / REPORT_FILE)
    atomic_write_json(build / REPORT_FILE, {**report, "build_id": "someone-else"})
    with pytest.raises(SearchError, match="mismatched index set"):
        Searcher(bad)
    atomic_write_json(build / REPORT_FILE, report)
    assert Searcher(bad).num_vectors == len(env.meta)
    with open(build / INDEX_FILE, "ab") as f:
        f.write(b"x")
    with pytest.raises(SearchError, match="mismatched index set"):
        Searcher(bad)
    atomic_write_json(bad / "index.json", {"format": "clipforge.index.v1"})
    with pytest.raises(SearchError, match="unknown format"):
        Searcher(bad)


def test_a_rebuild_is_seen_by_a_new_searcher_and_the_old_one_keeps_working(env, tmp_path):
    root = make_index_dir(tmp_path / "index", env.root / "shards", env.ckpt)
    old = Searcher(root)
    make_index_dir(root, env.root / "shards", env.ckpt)
    new = Searcher(root)
    assert new.build_id != old.build_id
    assert [h.id for h in old.search(env.x[7], k=3)[0]] == [h.id for h in new.search(env.x[7], k=3)[0]]


def test_metadata_is_read_a_row_group_at_a_time(tmp_path):
    n = 50
    table = pa.table({"key": [f"k{i}" for i in range(n)], "v": list(range(n))})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=7)
    reader = MetadataReader(tmp_path / "m.parquet", cache=3)
    ids = [49, 0, 13, 14, 13, 6, 7, 35]
    assert reader.rows(ids, ["v", "key"]) == [{"v": i, "key": f"k{i}"} for i in ids]
    assert len(reader.cache) <= 3 and reader.num_rows == n and reader.columns == ["key", "v"]


def test_metadata_lookups_use_the_memory_mapped_arrow_twin(env, tmp_path):
    """Every build writes metadata.arrow with metadata.parquet (same rows, same tags); lookups read it (no parquet
    decoding, no cache), give the same rows, and a twin of another build or row count is a mismatched set."""
    s = Searcher(env.root / "flat")
    twin = s.set.root / ROWS_FILE
    assert twin.is_file() and s.meta.ipc is not None
    ids = [len(env.meta) - 1, 0, 5, 3, 5]
    cols = list(pq.read_schema(s.set.meta_path).names)
    parquet_only = tmp_path / "p" / "metadata.parquet"
    parquet_only.parent.mkdir()
    shutil.copy(s.set.meta_path, parquet_only)
    old = MetadataReader(parquet_only)
    assert old.ipc is None and s.meta.rows(ids, cols) == old.rows(ids, cols) and not s.meta.cache
    bad = shutil.copytree(env.root / "flat", tmp_path / "bad")
    build = bad / read_json(bad / "index.json")["build"]
    with pa.OSFile(str(build / ROWS_FILE)) as f:  # read into memory (a mapped table would die with the rewrite)
        t = pa.ipc.open_file(f).read_all()
    with pa.OSFile(str(build / ROWS_FILE), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t.slice(1))
    with pytest.raises(SearchError, match="metadata.arrow rows"):
        Searcher(bad)


def test_the_report_page_uses_the_searcher(env, tmp_path):
    out = write_html(env.s, ["a red thing", "a blue thing"], k=3, out_path=tmp_path / "r.html")
    page = out.read_text()
    assert page.count('class="card"') == 6 and env.s.build_id in page and "data:image/jpeg;base64," in page


def test_cli_text_image_columns_filter_and_exit_codes(env, tmp_path, capsys):
    (tmp_path / "q.jpg").write_bytes(env.jpgs[int(env.meta[3]["key"])])
    argv = ["a red thing", "--index", str(env.root / "flat"), "--image", str(tmp_path / "q.jpg"), "--k", "3",
            "--columns", "width,height", "--filter", "height >= 40", "--dedup", "0.99", "--json",
            "--duckdb-temp-dir", str(tmp_path)]
    assert isearch.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert [o["query"] for o in out] == ["a red thing", f"image {tmp_path / 'q.jpg'}"]
    assert all(len(o["hits"]) == 3 and set(o["hits"][0]["extra"]) == {"width", "height"} for o in out)
    assert out[1]["hits"][0]["id"] == 3
    assert isearch.main(["a red thing", "--index", str(env.root / "flat"), "--k", "2", "--columns", "width"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("query: a red thing\n  1. ") and "width=48" in text and ".tar#" in text
    assert isearch.main(["x", "--index", str(env.root / "flat"), "--filter", "nope = 1"]) == 2
    assert "bad filter: unknown column 'nope'" in capsys.readouterr().err
    assert isearch.main(["x", "--index", str(tmp_path / "missing")]) == 2
    assert "index not found" in capsys.readouterr().err
    assert isearch.main(["--index", str(env.root / "flat")]) == 2
    assert "give at least one query" in capsys.readouterr().err
    assert isearch.main(["x", "--index", str(env.root / "flat"), "--image", str(tmp_path / "nope.jpg")]) == 2
