"""indexing/serve.py: the HTTP search service over a tiny v2 index dir (synthetic shards, a random-init tiny CLIP,
CPU, embedded and indexed by the real stages through tests/index_data.make_index_dir), through FastAPI's TestClient,
plus one real uvicorn socket."""
from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from index_data import add_sidecars, make_index_dir
from indexing import serve
from indexing.search import Searcher, SearchOptions
from indexing.serve_filter import compile_filter
from trainer.clip.checkpoint import save_model
from trainer.clip.flags import with_flags
from trainer.clip.formats.shards import write_shard_dir
from trainer.clip.model import CLIP, get_config

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
THINGS = ["apple", "car", "dog", "house", "boat"]
N_PER_SHARD, N_SHARDS = 24, 2
DUP_A, DUP_B = 5, 30     # sample DUP_B carries the very same jpg bytes as DUP_A
TOKEN = "s3cret-token"


def _jpeg(rng: np.random.Generator) -> bytes:
    """A distinct small image: a random background, noise and a random rectangle."""
    arr = np.clip(rng.integers(0, 256, size=3) + rng.normal(0, 30, size=(48, 56, 3)), 0, 255).astype(np.uint8)
    y, x = rng.integers(0, 30), rng.integers(0, 30)
    arr[y:y + 16, x:x + 20] = rng.integers(0, 256, size=3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_shards(root: Path) -> list[bytes]:
    rng = np.random.default_rng(0)
    jpgs = [_jpeg(rng) for _ in range(N_PER_SHARD * N_SHARDS)]
    jpgs[DUP_B] = jpgs[DUP_A]

    def shard(s):
        for n in range(s * N_PER_SHARD, (s + 1) * N_PER_SHARD):
            key, caption = f"{n:09d}", f"a {COLORS[n % len(COLORS)]} {THINGS[n % len(THINGS)]} number {n}"
            meta = {"key": key, "url": f"https://example.com/{key}.jpg", "caption": caption}
            yield {"__key__": key, "jpg": jpgs[n], "txt": caption, "json": meta}

    write_shard_dir(root, (shard(s) for s in range(N_SHARDS)), durable=False)
    add_sidecars(root)  # the shard dir `clipforge shard` writes: a sidecar parquet per tar
    return jpgs


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    jpgs = make_shards(root / "shards")
    torch.manual_seed(0)
    ckpt = save_model(CLIP(get_config("tiny")), root / "ckpt")
    make_index_dir(root / "index", root / "shards", ckpt)
    cfg = serve.ServeConfig(index_dir=str(root / "index"), max_k=20,
                            search=SearchOptions(duckdb_temp_dir=str(root / "duckdb")))
    searcher = Searcher(root / "index", options=cfg.search)
    app = serve.create_app(cfg, searcher)
    meta = pq.read_table(searcher.set.meta_path).to_pylist()
    by_key = {f"{n:09d}": jpg for n, jpg in enumerate(jpgs)}
    return SimpleNamespace(root=root, cfg=cfg, app=app, client=TestClient(app), searcher=searcher, meta=meta,
                           jpgs=[by_key[row["key"]] for row in meta], x=searcher.index.reconstruct_n(0, len(meta)))


def other_app(env, **overrides):
    """A second app with other limits: over the same loaded Searcher, or over a new one where a search option
    (which the Searcher owns) changes."""
    cfg = with_flags(env.cfg, **overrides)
    searcher = env.searcher if cfg.search == env.cfg.search else Searcher(cfg.index_dir, options=cfg.search)
    return TestClient(serve.create_app(cfg, searcher))


def search(env, client=None, **body):
    return (client or env.client).post("/search", json=body)


def ok(resp) -> list[dict]:
    assert resp.status_code == 200, resp.text
    return resp.json()["results"]


def test_text_search_sorted_with_columns(env):
    hits = ok(search(env, text="a red apple", k=7, columns=["shard", "offset", "size"]))
    assert len(hits) == 7
    scores = [h["score"] for h in hits]
    assert scores == sorted(scores, reverse=True)
    for h in hits:
        row = env.meta[h["id"]]
        assert {k: h[k] for k in ("key", "caption", "url", "shard", "offset", "size")} == \
               {k: row[k] for k in ("key", "caption", "url", "shard", "offset", "size")}
    q = env.searcher.encode(["a red apple"])[0]
    assert abs(hits[0]["score"] - float(np.max(env.x @ q))) < 1e-4  # a Flat index: exact
    assert all(abs(h["score"] - float(env.x[h["id"]] @ q)) < 1e-4 for h in hits)
    assert set(ok(search(env, text="x", k=2))[0]) == {"id", "score", "key", "caption", "url"}


def test_embedding_search_equals_text_search(env):
    text_hits = ok(search(env, text="a blue boat number 7", k=10))
    emb = env.searcher.encode(["a blue boat number 7"])[0]
    emb_hits = ok(search(env, embedding=emb.tolist(), k=10))
    assert [h["id"] for h in emb_hits] == [h["id"] for h in text_hits]
    assert np.allclose([h["score"] for h in emb_hits], [h["score"] for h in text_hits], atol=1e-5)
    scaled = ok(search(env, embedding=(3 * emb).tolist(), k=10))  # the query is normalised: same cosines
    assert np.allclose([h["score"] for h in scaled], [h["score"] for h in text_hits], atol=1e-5)


def test_image_upload_finds_itself(env):
    i = 11
    resp = env.client.post("/search/image", files={"file": ("q.jpg", env.jpgs[i], "image/jpeg")},
                           data={"k": "5", "columns": "shard,offset"})
    hits = ok(resp)
    assert hits[0]["id"] == i and hits[0]["score"] > 0.999 and "offset" in hits[0]
    key = env.meta[i]["key"]
    hits = ok(env.client.post("/search/image", files={"file": ("q.jpg", env.jpgs[i], "image/jpeg")},
                              data={"k": "5", "filter": f"key <> '{key}'"}))
    assert len(hits) == 5 and i not in [h["id"] for h in hits]


def test_image_bytes_are_the_shard_members(env):
    for i in range(len(env.meta)):
        resp = env.client.get(f"/image/{i}")
        assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
        assert resp.content == env.jpgs[i]


def allowed(env, pred) -> list[int]:
    return [i for i, row in enumerate(env.meta) if pred(row)]


def exact_top(env, text, ids, k) -> list[int]:
    q = env.searcher.encode([text])[0]
    return sorted(ids, key=lambda i: -float(env.x[i] @ q))[:k]


@pytest.mark.parametrize("expr, pred", [
    ("caption ILIKE '%RED%' AND offset > 1000", lambda r: "red" in r["caption"] and r["offset"] > 1000),
    ("key IN ('000000003', '000000040', '000000041')", lambda r: r["key"] in ("000000003", "000000040", "000000041")),
    ("NOT (shard = 'shard-00000.tar') AND (caption LIKE '%dog%' OR caption LIKE '%car%')",
     lambda r: r["shard"] != "shard-00000.tar" and ("dog" in r["caption"] or "car" in r["caption"])),
    ("url IS NOT NULL and size >= -1 and caption NOT ILIKE '%apple%'", lambda r: "apple" not in r["caption"]),
    ("key = 'no such key'", lambda r: False),
])
def test_filter_restricts_results(env, expr, pred):
    ids = allowed(env, pred)
    for k in (2, 8):  # the first round looks at 4k neighbours: a rare match needs the search widened
        hits = ok(search(env, text="a green dog", k=k, filter=expr, columns=["shard", "offset"]))
        assert all(pred(env.meta[h["id"]]) for h in hits)
        assert len(hits) == min(k, len(ids))
        assert {h["id"] for h in hits} == set(exact_top(env, "a green dog", ids, k))  # the true filtered top-k


def test_filter_cache_is_bounded_and_reused(env):
    client = other_app(env, filter_cache=2)
    cache = client.app.state.service.s.filters.cache
    for n in range(4):
        ok(search(env, client, text="a car", k=3, filter=f"offset > {n}"))
    assert len(cache) == 2
    ok(search(env, client, text="a dog", k=3, filter="OFFSET >   2"))   # the same filter: reused, not added
    assert list(cache) == ['("offset" > 3)', '("offset" > 2)']


def test_compile_filter_emits_canonical_sql():
    cols = ["width", "caption", "key"]
    assert compile_filter("width >= 512 AND caption ILIKE '%dog%'", cols) == \
        '(("width" >= 512) AND ("caption" ILIKE \'%dog%\'))'
    assert compile_filter("Caption = 'it''s' or not key is null", cols) == \
        '(("caption" = \'it\'\'s\') OR (NOT ("key" IS NULL)))'
    assert compile_filter("width != -1.5e3 AND key NOT IN ('a', 'b')", cols) == \
        '(("width" <> -1500.0) AND ("key" NOT IN (\'a\', \'b\')))'


BAD_FILTERS = [
    ("no_such_column = 1", "unknown column 'no_such_column'"),
    ("lower(caption) = 'x'", "function calls are not allowed"),
    ("read_parquet('/etc/passwd') IS NULL", "function calls are not allowed"),
    ("key = '1'; DROP TABLE x", "';' is not allowed"),
    ("key IN (SELECT key FROM meta)", "subqueries and SQL statements are not allowed"),
    ("(key = '1'", "unbalanced parentheses"),
    ("key = '1')", "unbalanced parentheses"),
    ("caption = 'unterminated", "unterminated string literal"),
    ("key = NULL", "IS NULL"),
    ("caption LIKE 5", "LIKE needs a quoted string pattern"),
    ("key", "expected a comparison"),
    ("", "the filter is empty"),
    ("NOT " * 40 + "key = 'a'", "nests deeper than"),
    ("(" * 40 + "key = 'a'" + ")" * 40, "nests deeper than"),
    ("key = '" + "x" * 2000 + "'", "characters long"),
    ("caption > 5", "cannot evaluate the filter"),   # parses, but DuckDB refuses the comparison
    ("offset > 1e999", "number out of range"),
]


@pytest.mark.parametrize("expr, message", BAD_FILTERS, ids=[m for _, m in BAD_FILTERS])
def test_bad_filter_is_400(env, expr, message):
    resp = search(env, text="a dog", k=3, filter=expr)
    assert resp.status_code == 400, resp.text
    assert message in resp.json()["detail"]


def test_dedup_removes_near_identical_results(env):
    q = env.x[DUP_A].tolist()
    plain = [h["id"] for h in ok(search(env, embedding=q, k=7))]
    assert set(plain[:2]) == {DUP_A, DUP_B}
    cos = env.x @ env.x.T
    others = cos[~np.eye(len(cos), dtype=bool)]
    threshold = (float(np.sort(others)[-3]) + 1) / 2   # above every pair but the duplicate one (counted twice)
    resp = search(env, embedding=q, k=6, dedup=threshold)
    assert resp.status_code == 200 and resp.json()["notes"] == []
    assert [h["id"] for h in resp.json()["results"]] == [plain[0]] + plain[2:7]   # only the twin is dropped
    threshold = float(np.median(others))                 # a loose threshold: no two results that close
    ids = [h["id"] for h in ok(search(env, embedding=q, k=6, dedup=threshold))]
    assert ids and ids[0] == plain[0] and not {DUP_A, DUP_B} <= set(ids)
    sub = cos[np.ix_(ids, ids)]
    assert (sub[~np.eye(len(ids), dtype=bool)] < threshold).all()


def test_healthz_page_and_openapi(env):
    resp = env.client.get("/healthz")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["num_vectors"] == len(env.meta)
    assert body["index"]["factory"] == "Flat" and "caption" in body["index"]["columns"]
    assert body["build_id"] == body["index"]["build_id"] == env.searcher.build_id
    assert body["index"]["format"] == "clipforge.index.v2" and body["index"]["model_loaded"] is True
    page = env.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<form id="search">' in page.text and 'name="q"' in page.text and 'name="filter"' in page.text
    paths = env.client.get("/openapi.json").json()["paths"]
    assert {"/search", "/search/image", "/image/{id}", "/healthz", "/metrics"} <= set(paths)


def _metrics(client) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    resp = client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(resp.text)}


def _count(families, route, status) -> float:
    return sum(s.value for s in families["clipforge_serve_requests"].samples
               if s.name.endswith("_total") and s.labels["route"] == route and s.labels["status"] == str(status))


def test_metrics_count_requests_in_prometheus_text(env):
    pytest.importorskip("prometheus_client")
    client = other_app(env)
    before = _metrics(client)
    for _ in range(3):
        client.get("/healthz")
    client.get("/image/100000")
    after = _metrics(client)
    assert _count(after, "/healthz", 200) == _count(before, "/healthz", 200) + 3
    assert _count(after, "/image/{id}", 404) == _count(before, "/image/{id}", 404) + 1
    hist = after["clipforge_serve_request_duration_seconds"]
    buckets = [s for s in hist.samples if s.name.endswith("_bucket") and s.labels["route"] == "/healthz"]
    count = next(s.value for s in hist.samples if s.name.endswith("_count") and s.labels["route"] == "/healthz")
    assert len(buckets) >= 5 and buckets[-1].labels["le"] == "+Inf" and buckets[-1].value == count >= 3
    assert [b.value for b in buckets] == sorted(b.value for b in buckets)   # cumulative
    assert after["clipforge_serve_index_vectors"].samples[0].value == len(env.meta)


@pytest.mark.parametrize("body, status", [
    ({"text": "a dog", "k": 21}, 422),                    # over max_k
    ({"text": "a dog", "k": 0}, 422),
    ({"text": "a dog", "k": -3}, 422),
    ({"k": 3}, 422),                                       # neither text nor embedding
    ({"text": "a dog", "embedding": [0.1] * 64, "k": 3}, 422),
    ({"embedding": [0.1, 0.2, 0.3], "k": 3}, 400),         # wrong dimension
    ({"embedding": [0.0] * 64, "k": 3}, 400),              # zero vector (dimension matches the tiny model? see test)
    ({"text": "a dog", "columns": ["no_such_column"]}, 400),
    ({"text": "a dog", "dedup": 1.5}, 422),
    ({"text": "a dog", "unexpected": 1}, 422),
    ({"text": 5}, 422),
])
def test_bad_search_bodies_are_4xx_json(env, body, status):
    if body.get("embedding") == [0.0] * 64:
        body = {**body, "embedding": [0.0] * int(env.searcher.index.d)}
    resp = search(env, **body)
    assert resp.status_code == status, resp.text
    assert "detail" in resp.json()


def test_malformed_requests_are_4xx_json(env):
    c, json_type = env.client, {"content-type": "application/json"}
    for resp in [c.post("/search", content=b"{not json", headers=json_type),
                 c.post("/search", content=b'{"embedding": [NaN], "k": 1}', headers=json_type),
                 c.post("/search", content=b'{"text": "a"}', headers={"content-type": "text/plain"}),
                 c.post("/search", data={"text": "a"}),
                 c.post("/search/image", json={"k": 3}),
                 c.post("/search/image", files={"other": ("q.jpg", b"x", "image/jpeg")}),
                 c.get("/image/abc"), c.get("/image/-1"), c.get(f"/image/{len(env.meta)}"), c.get("/nope"),
                 c.delete("/search")]:
        assert 400 <= resp.status_code < 500, (resp.request.url, resp.status_code, resp.text)
        assert "detail" in resp.json()
    assert c.post("/search", content=b'{"text": "a"}', headers={"content-type": "text/plain"}).status_code == 415
    assert c.get("/image/-1").status_code == 404 and c.get(f"/image/{len(env.meta)}").status_code == 404


def test_oversized_bodies_are_413(env):
    client = other_app(env, max_body_bytes=2000, max_upload_bytes=3000)
    big = b'{"text": "' + b"a" * 3000 + b'"}'
    resp = client.post("/search", content=big, headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "max-body-bytes" in resp.json()["detail"]
    chunks = (big[i:i + 500] for i in range(0, len(big), 500))   # no Content-Length: counted as it streams
    resp = client.post("/search", content=chunks, headers={"content-type": "application/json"})
    assert resp.status_code == 413
    assert ok(search(env, client, text="a dog", k=2))  # a small body still passes
    upload = {"file": ("q.jpg", b"\xff" * 5000, "image/jpeg")}             # over 3000, under the framing slack
    resp = client.post("/search/image", files=upload)
    assert resp.status_code == 413 and "max-upload-bytes" in resp.json()["detail"]
    resp = client.post("/search/image", files={"file": ("q.jpg", b"\xff" * 200_000, "image/jpeg")})
    assert resp.status_code == 413


def test_non_image_uploads_are_400(env):
    truncated = env.jpgs[3][: len(env.jpgs[3]) // 3]
    for data in (b"definitely not an image", b"\xff\xd8\xff\xe0 garbage", truncated, b""):
        resp = env.client.post("/search/image", files={"file": ("q.jpg", data, "image/jpeg")})
        assert resp.status_code == 400, resp.text
        assert "not a decodable image" in resp.json()["detail"]


def test_token_is_required_on_every_route_but_healthz(env):
    client = other_app(env, token=TOKEN)
    good, wrong = {"Authorization": f"Bearer {TOKEN}"}, {"Authorization": "Bearer nope"}
    for method, path, kw in [("post", "/search", {"json": {"text": "a dog", "k": 2}}), ("get", "/image/0", {}),
                             ("get", "/metrics", {}), ("get", "/openapi.json", {}),
                             ("post", "/search/image", {"files": {"file": ("q.jpg", env.jpgs[0], "image/jpeg")}})]:
        for headers in ({}, wrong, {"Authorization": TOKEN}):
            resp = getattr(client, method)(path, headers=headers, **kw)
            assert resp.status_code == 401 and resp.json()["detail"] == "missing or wrong bearer token", path
        assert getattr(client, method)(path, headers=good, **kw).status_code == 200, path
    assert client.get("/healthz").status_code == 200
    assert client.get("/").status_code == 200   # the static page (no data); its script sends the token


def test_unexpected_errors_are_500_json_without_traceback(env, monkeypatch):
    client = TestClient(other_app(env).app, raise_server_exceptions=False)

    def boom(*a, **kw):
        raise RuntimeError("kaboom in a library")

    monkeypatch.setattr(client.app.state.service, "search", boom)
    resp = client.post("/search", json={"text": "a dog"})
    assert resp.status_code == 500 and resp.json() == {"detail": "internal server error"}


def test_config_validation_and_main_exit_codes(env, tmp_path, capsys):
    with pytest.raises(ValueError, match="--token is required"):
        serve.ServeConfig(index_dir="x", host="0.0.0.0")
    assert serve.ServeConfig(index_dir="x", host="0.0.0.0", token="t").token == "t"
    assert serve.ServeConfig(index_dir="x", host="::1").host == "::1"
    assert serve.ServeConfig(index_dir="x", host="localhost").host == "localhost"
    with pytest.raises(ValueError, match="--max-k must be >= 1"):
        serve.ServeConfig(index_dir="x", max_k=0)
    assert serve.main([str(env.root / "index"), "--host", "0.0.0.0"]) == 2
    assert "--token is required" in capsys.readouterr().err
    assert serve.main([str(env.root / "index"), "--host", "192.168.1.10", "--port", "9"]) == 2
    assert serve.main([str(tmp_path / "missing"), "--token", "t"]) == 2
    assert "index not found" in capsys.readouterr().err


@contextlib.contextmanager
def serving(app, port: int):
    """The app on a real uvicorn socket on 127.0.0.1:port, in a thread, for the with block."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    assert not thread.is_alive()


def test_real_socket_healthz(env, free_port):
    with serving(env.app, free_port()) as url:
        with urllib.request.urlopen(f"{url}/healthz", timeout=10) as resp:
            assert resp.status == 200
            assert b'"status":"ok"' in resp.read().replace(b" ", b"")


def test_concurrent_requests_are_coalesced_and_each_gets_its_own_answer(env, free_port):
    pytest.importorskip("prometheus_client")
    app = serve.create_app(env.cfg, env.searcher)
    svc = app.state.service
    q = np.random.default_rng(7).standard_normal((24, svc.dim)).astype(np.float32)
    before = svc.s.coalescer.queries
    with serving(app, free_port()) as url:
        def ask(j):
            body = json.dumps({"embedding": q[j].tolist(), "k": 1 + j % 5}).encode()
            req = urllib.request.Request(f"{url}/search", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=30) as resp:
                return [(r["id"], r["score"]) for r in json.loads(resp.read())["results"]]

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(ask, range(len(q))))
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    x = env.x / np.linalg.norm(env.x, axis=1, keepdims=True)
    for j, hits in enumerate(got):  # each its own k and its own exact top k (ties: the twin images)
        scores = x @ (q[j] / np.linalg.norm(q[j]))
        assert len(hits) == 1 + j % 5
        np.testing.assert_allclose([sc for _, sc in hits], np.sort(scores)[::-1][:len(hits)], atol=1e-4)
        np.testing.assert_allclose([scores[i] for i, _ in hits], [sc for _, sc in hits], atol=1e-4)
    assert svc.s.coalescer.queries == before + len(q)
    assert f"clipforge_serve_search_batched_queries_total {svc.s.coalescer.queries}" in text
    assert 1 <= svc.s.coalescer.batches <= svc.s.coalescer.queries
