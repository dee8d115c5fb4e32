"""The search service: an HTTP API and a web page over a versioned index dir (`clipforge index`).

    clipforge serve INDEX_DIR [--host 127.0.0.1] [--port 8080] [--token T]        (= python -m indexing.serve)

Only HTTP lives here: every search goes through indexing.search.Searcher (the same definition of filtering, id
selectors, widening and dedup as the Python API and the CLI). Reads the current build of INDEX_DIR
(trainer.clip.formats.index, checked by open_index_set), its checkpoint (at startup, unless --no-preload-model), and
the shard tars its metadata points at: only the members listed there, by offset/size. Writes nothing but DuckDB's
spill files (--duckdb-temp-dir) while it evaluates a filter; a restart just reloads the index (and so picks up a
rebuild). With --token, every route but / (a static page) and /healthz needs `Authorization: Bearer TOKEN`; a host
that is not a loopback address requires a token.

    POST /search        {"text" | "embedding", "k", "columns", "filter", "dedup"} -> {"results": [...], "notes": [...]}
    POST /search/image  multipart: file (+ form fields k, columns, filter, dedup) -> the same answer
    GET  /image/{id}    the image bytes;  GET /healthz (build id, counts), /metrics (Prometheus text),
    GET  /openapi.json, / (the web page)

`filter` is a small boolean language over the metadata columns (indexing.serve_filter), re-emitted as SQL so no
client text reaches DuckDB verbatim. Every bad input is a 4xx JSON {"detail": ...}.
"""
from __future__ import annotations

import hmac
import ipaddress
import sys
import threading
import time
from dataclasses import dataclass
from typing import Annotated, Any, NoReturn

import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.routing import Match

from indexing.search import Hit, QueryError, Searcher, SearchError, SearchOptions
from trainer.clip.flags import CLI, opt, require, run_main, section

IMAGE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp"}
UPLOAD_SLACK = 64 << 10        # multipart framing and form fields allowed on top of --max-upload-bytes


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class ServeConfig:
    """clipforge serve INDEX_DIR"""
    index_dir: str = opt("", positional=True, help="INDEX_DIR written by `clipforge index`")
    host: str = opt("127.0.0.1", help="interface to bind; anything but a loopback address needs --token")
    port: int = opt(8080, help="TCP port")
    max_k: int = opt(100, help="the largest k a request may ask for")
    max_body_bytes: int = opt(1 << 20, help="the largest JSON request body (413 above it)")
    max_upload_bytes: int = opt(10 << 20, help="the largest image upload (413 above it)")
    token: str = opt("", help="bearer token that every route but / and /healthz requires (required off loopback)")
    device: str = opt("cpu", help="torch device of the query encoders")
    preload_model: bool = opt(True, help="load the checkpoint at startup (a missing one fails then, not on the "
                                         "first text query); --no-preload-model serves embedding queries without it")
    search: SearchOptions = section(SearchOptions)

    def __post_init__(self):
        for name in ("max_k", "max_body_bytes", "max_upload_bytes"):
            require(self, name, getattr(self, name) >= 1, "must be >= 1")
        require(self, "port", 0 <= self.port <= 65535, "must be in [0, 65535]")
        require(self, "token", bool(self.token) or is_loopback(self.host),
                f"is required when --host {self.host!r} is not a loopback address")


# ----------------------------------------------------------------------------------------------- metrics
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
METHODS = {"GET", "POST", "HEAD", "OPTIONS", "PUT", "PATCH", "DELETE"}


class Metrics:
    """Request counts by route / method / status and a latency histogram by route, in Prometheus text format."""

    def __init__(self, num_vectors: int, coalescer=None):
        self.num_vectors, self.lock, self.coalescer = num_vectors, threading.Lock(), coalescer
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, list] = {}  # route -> cumulative bucket counts + [sum, count]

    def observe(self, route: str, method: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "OTHER"
        with self.lock:
            key = (route, method, status)
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.latency.setdefault(route, [0] * len(BUCKETS) + [0.0, 0])
            for j, le in enumerate(BUCKETS):
                h[j] += seconds <= le
            h[-2] += seconds
            h[-1] += 1

    def render(self) -> str:
        req, lat = "clipforge_serve_requests_total", "clipforge_serve_request_duration_seconds"
        lines = [f"# HELP {req} HTTP requests by route, method and status.", f"# TYPE {req} counter"]
        with self.lock:
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f'{req}{{route="{route}",method="{method}",status="{status}"}} {n}')
            lines += [f"# HELP {lat} Request latency by route.", f"# TYPE {lat} histogram"]
            for route, h in sorted(self.latency.items()):
                lines += [f'{lat}_bucket{{route="{route}",le="{le}"}} {c}' for le, c in zip(BUCKETS, h)]
                lines += [f'{lat}_bucket{{route="{route}",le="+Inf"}} {h[-1]}', f'{lat}_sum{{route="{route}"}} '
                          f"{h[-2]:.6f}", f'{lat}_count{{route="{route}"}} {h[-1]}']
        gauge = "clipforge_serve_index_vectors"
        lines += [f"# HELP {gauge} Vectors in the served index.", f"# TYPE {gauge} gauge",
                  f"{gauge} {self.num_vectors}"]
        if self.coalescer is not None:  # mean batch depth under load: queries / batches
            for name, what, n in (("batches", "Batched FAISS searches run", self.coalescer.batches),
                                  ("batched_queries", "Queries those batches held", self.coalescer.queries)):
                metric = f"clipforge_serve_search_{name}_total"
                lines += [f"# HELP {metric} {what}.", f"# TYPE {metric} counter", f"{metric} {n}"]
        return "\n".join(lines) + "\n"


class Guard:
    """ASGI middleware around the routes: metrics for every response, the bearer token, the request size limits
    (a declared Content-Length over the limit is refused unread; a streamed body is counted as it arrives)."""

    def __init__(self, app, cfg: ServeConfig, metrics: Metrics, routes: list):
        self.app, self.cfg, self.metrics, self.routes = app, cfg, metrics, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, t0, status = self._route(scope), time.perf_counter(), [500]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_status)
        finally:
            self.metrics.observe(route, scope["method"], status[0], time.perf_counter() - t0)

    def _route(self, scope) -> str:
        partial = None
        for r in self.routes:
            match, _ = r.matches(scope)
            if match == Match.FULL:
                return r.path
            partial = partial or (r.path if match == Match.PARTIAL else None)
        return partial or "unmatched"

    async def _guarded(self, scope, receive, send):
        def refuse(code: int, detail: str, **headers):
            return JSONResponse({"detail": detail}, status_code=code, headers=headers)(scope, receive, send)

        headers = dict(scope["headers"])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        authorized = scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode("latin-1"),
                                                                        self.cfg.token.encode())
        if self.cfg.token and scope["path"] not in ("/", "/healthz") and not authorized:
            return await refuse(401, "missing or wrong bearer token", **{"WWW-Authenticate": "Bearer"})
        upload = scope["path"] == "/search/image"
        limit = self.cfg.max_upload_bytes + UPLOAD_SLACK if upload else self.cfg.max_body_bytes
        too_big = f"request body over {limit} bytes" + (" (--max-upload-bytes)" if upload else " (--max-body-bytes)")
        declared = headers.get(b"content-length")
        if declared is not None and not declared.isdigit():
            return await refuse(400, "bad Content-Length header")
        if declared is not None and int(declared) > limit:
            return await refuse(413, too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > limit:
                return await refuse(413, too_big)
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay():  # the buffered body once, then the client's own messages (http.disconnect)
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)


# ----------------------------------------------------------------------------------------------- search
def bad(status: int, detail: str) -> NoReturn:
    raise HTTPException(status_code=status, detail=detail)


class SearchService:
    """The app's state: the Searcher, and the HTTP side of a search (bounds, errors as status codes, rows)."""

    def __init__(self, cfg: ServeConfig, searcher: Searcher):
        self.cfg, self.s = cfg, searcher
        self.n, self.dim, self.columns = searcher.num_vectors, searcher.dim, list(searcher.columns)

    def search(self, query, k: int, columns: list[str], expr: str | None, dedup: float | None) -> dict:
        """One query (text, image bytes or an embedding array) -> {"results": up to k rows, score descending,
        "notes": [...]}. A bad query is a 400, a checkpoint that cannot be loaded a 503."""
        if k > self.cfg.max_k:
            bad(422, f"k={k} is over the limit of {self.cfg.max_k}")
        try:
            res = self.s.search([query], k=k, columns=columns, filter=expr, dedup=dedup)
        except QueryError as e:
            bad(400, str(e).removeprefix("query 0: "))
        except SearchError as e:
            print(f"clipforge serve: {e}", file=sys.stderr)
            bad(503, str(e))
        return {"results": [row(h) for h in res[0]], "notes": res.notes}

    def image(self, i: int) -> tuple[bytes, str]:
        """The bytes and content type of vector i's image: its metadata row's member of its shard, nothing else."""
        if not 0 <= i < self.n:
            bad(404, f"no image {i}: ids are 0..{self.n - 1}")
        hit = self.s.hit(i)
        root = self.s.shards_dir.resolve()
        if not (path := (root / hit.shard).resolve()).is_relative_to(root):
            bad(404, f"no image {i}")
        try:
            data = self.s.image_bytes(hit)
        except OSError as e:
            print(f"clipforge serve: cannot read image {i} from {path}: {e}", file=sys.stderr)
            bad(503, f"image {i} cannot be read from its shard")
        member = hit.image.partition("#")[2]
        return data, IMAGE_TYPES.get(member.rpartition(".")[2].lower(), "application/octet-stream")


def row(hit: Hit) -> dict:
    """A hit as a JSON row: id, score, key, caption, url, then the columns asked for (id and score stay ours)."""
    out = {"id": hit.id, "score": hit.score, "key": hit.key, "caption": hit.caption, "url": hit.url}
    return {**out, **{c: v for c, v in hit.extra.items() if c not in ("id", "score")}}


# ----------------------------------------------------------------------------------------------- the app
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class SearchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, max_length=2000, description="a text query")
    embedding: list[FiniteFloat] | None = Field(None, max_length=65536, description="a query vector (normalised here)")
    k: int = Field(10, ge=1, description="results wanted (at most --max-k)")
    columns: list[str] = Field(default_factory=list, max_length=64, description="metadata columns to add to each row")
    filter: str | None = Field(None, description="e.g. caption ILIKE '%dog%' AND size > 1000")
    dedup: float | None = Field(None, gt=0, le=1, description="drop results this cosine-close to a better one")

    @model_validator(mode="after")
    def _one_query(self):
        if (self.text is None) == (self.embedding is None):
            raise ValueError("give exactly one of text or embedding")
        return self


class SearchResponse(BaseModel):
    results: list[dict[str, Any]]
    notes: list[str] = []


def content_type(expected: str):
    def check(request: Request) -> None:
        got = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if got != expected:
            bad(415, f"expected Content-Type {expected}, got {got or 'none'}")
    return check


def create_app(cfg: ServeConfig, searcher: Searcher | None = None) -> FastAPI:
    """The service over cfg.index_dir (or over `searcher`, already open: it keeps its own SearchOptions). SearchError
    when the index is bad, or (cfg.preload_model) when its checkpoint cannot be loaded."""
    searcher = searcher or Searcher(cfg.index_dir, device=cfg.device, options=cfg.search)
    if cfg.preload_model:
        searcher.load_model()  # a bad checkpoint fails at startup, not on the first text query
    svc = SearchService(cfg, searcher)
    metrics = Metrics(svc.n, searcher.coalescer)
    app = FastAPI(title="clipforge search", summary="Text / embedding / image search over a clipforge index",
                  docs_url=None, redoc_url=None)
    app.state.service, app.state.metrics = svc, metrics
    _add_routes(app, svc, metrics)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        print(f"clipforge serve: {request.method} {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes each bad "input" back: a NaN there cannot be encoded (a 500), a huge one is waste
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(Exception, internal_error)
    app.add_middleware(Guard, cfg=cfg, metrics=metrics, routes=app.router.routes)
    return app


def _add_routes(app: FastAPI, svc: SearchService, metrics: Metrics) -> None:
    cfg = svc.cfg

    @app.post("/search", response_model=SearchResponse, dependencies=[Depends(content_type("application/json"))])
    def search(req: SearchRequest):
        query = req.text if req.text is not None else np.asarray(req.embedding, np.float64)
        return svc.search(query, req.k, req.columns, req.filter, req.dedup)

    @app.post("/search/image", response_model=SearchResponse,
              dependencies=[Depends(content_type("multipart/form-data"))])
    def search_image(file: UploadFile = File(..., description="the query image"), k: int = Form(10, ge=1),
                     columns: list[str] = Form([], description="repeat the field, or separate with commas"),
                     filter: str | None = Form(None), dedup: float | None = Form(None, gt=0, le=1)):
        data = file.file.read(cfg.max_upload_bytes + 1)
        if len(data) > cfg.max_upload_bytes:
            bad(413, f"upload over {cfg.max_upload_bytes} bytes (--max-upload-bytes)")
        cols = [c.strip() for value in columns for c in value.split(",") if c.strip()]
        return svc.search(data, k, cols, filter or None, dedup)

    @app.get("/image/{id}", response_class=Response, responses={200: {"content": {"image/jpeg": {}}}})
    def image(id: int):
        data, media_type = svc.image(id)
        return Response(data, media_type=media_type,
                        headers={"Cache-Control": "private, max-age=3600", "X-Content-Type-Options": "nosniff"})

    @app.get("/healthz")
    def healthz():
        info = svc.s.info
        index = {"format": info.get("format"), "build_id": svc.s.build_id, "factory": info.get("factory"),
                 "dim": svc.dim, "metric": info.get("metric"), "search_params": svc.s.search_params,
                 "columns": svc.columns, "model_loaded": svc.s.model_loaded}
        return {"status": "ok", "num_vectors": svc.n, "build_id": svc.s.build_id, "index": index}

    @app.get("/metrics", response_class=PlainTextResponse)
    def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return HTMLResponse(PAGE)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>clipforge search</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;background:#fafafa}
form{display:flex;gap:.5em;flex-wrap:wrap;margin-bottom:1em}
#q{flex:2 1 18em} #filter{flex:1 1 14em} #info{color:#666;margin-top:-.5em}
#grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(180px,1fr));gap:.8em}
.card{margin:0;background:#fff;border:1px solid #ddd;padding:.4em}
.card img{width:100%;height:160px;object-fit:cover;cursor:zoom-in;background:#eee;display:block}
.card figcaption{font-size:12px;word-break:break-word} .score{color:#666;font-variant-numeric:tabular-nums}
#msg{color:#a00;min-height:1.2em}
#viewer{position:fixed;inset:0;background:#000d;display:flex;flex-direction:column;align-items:center;
        justify-content:center;gap:.6em;cursor:zoom-out;color:#fff}
#viewer[hidden]{display:none} #viewer a{color:#9cf}
#viewer img{min-width:min(256px,94vw);height:auto;max-width:94vw;max-height:84vh;background:#fff}
</style></head><body>
<h1>clipforge search</h1>
<p id="info"></p>
<form id="search">
<input id="q" name="q" placeholder="a red apple" required autofocus>
<input id="filter" name="filter" placeholder="filter, e.g. caption ILIKE '%dog%'">
<input id="k" name="k" type="number" min="1" value="24" style="width:5em" title="results">
<input id="token" name="token" type="password" placeholder="token (if the server has one)">
<button id="go" type="submit">Search</button>
</form>
<div id="msg" role="status"></div>
<div id="grid" data-state="idle" data-count="0" data-seq="0"></div>
<div id="viewer" hidden><img id="viewer-img" alt=""><div id="viewer-caption"></div>
<a id="viewer-link" target="_blank" rel="noopener">open the original</a></div>
<script>
const $ = (id) => document.getElementById(id);
const form = $("search"), grid = $("grid"), msg = $("msg"), viewer = $("viewer");
let seq = 0;
const auth = () => form.token.value ? {"Authorization": "Bearer " + form.token.value} : {};
async function imageUrl(id) {  // with a token, <img src> cannot send it: fetch the bytes and show a blob
  if (!form.token.value) return "image/" + id;
  const r = await fetch("image/" + id, {headers: auth()});
  return URL.createObjectURL(await r.blob());
}
function card(hit) {  // <figure class="card" data-id data-key><img class="thumb"><figcaption>...
  const fig = document.createElement("figure"), img = document.createElement("img"),
        cap = document.createElement("figcaption"), text = document.createElement("span"),
        score = document.createElement("span");
  fig.className = "card"; fig.dataset.id = hit.id; fig.dataset.key = hit.key;
  img.className = "thumb"; img.alt = hit.caption || ""; img.loading = "lazy";
  imageUrl(hit.id).then(url => { img.src = url; });
  img.onclick = () => openViewer(hit);
  text.className = "caption"; text.textContent = hit.caption || "";
  score.className = "score"; score.dataset.score = hit.score; score.textContent = " " + hit.score.toFixed(3);
  cap.append(text, score); fig.append(img, cap);
  return fig;
}
async function openViewer(hit) {  // the full image, at its own size (up to the window)
  const url = await imageUrl(hit.id);
  $("viewer-img").src = url; $("viewer-link").href = url;
  $("viewer-caption").textContent = (hit.caption || "") + " (" + hit.score.toFixed(3) + ")";
  viewer.dataset.id = hit.id; viewer.hidden = false;
}
viewer.onclick = (e) => { if (e.target.id !== "viewer-link") viewer.hidden = true; };
document.addEventListener("keydown", (e) => { if (e.key === "Escape") viewer.hidden = true; });
function finish(state, count) {  // data-seq advances once per answered search: a test waits on it
  grid.dataset.state = state; grid.dataset.count = count; grid.dataset.seq = ++seq;
}
form.onsubmit = async (event) => {
  event.preventDefault(); msg.textContent = ""; grid.replaceChildren(); grid.dataset.state = "loading";
  const body = {text: form.q.value, k: Number(form.k.value) || 24};
  if (form.filter.value.trim()) body.filter = form.filter.value;
  try {
    const r = await fetch("search", {method: "POST", body: JSON.stringify(body),
                                     headers: {"Content-Type": "application/json", ...auth()}});
    const data = await r.json();
    if (!r.ok) {
      msg.textContent = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      return finish("error", 0);
    }
    msg.textContent = data.results.length ? data.notes.join("; ") : "no results";
    grid.append(...data.results.map(card));
    finish("done", data.results.length);
  } catch (err) { msg.textContent = "request failed: " + err; finish("error", 0); }
};
fetch("healthz").then(r => r.json()).then(h => {
  $("info").textContent = h.num_vectors + " images, build " + h.build_id;
}).catch(() => {});
</script></body></html>
"""


def run(cfg: ServeConfig) -> int:
    import uvicorn

    app = create_app(cfg)
    svc = app.state.service
    print(f"clipforge serve: {cfg.index_dir} (build {svc.s.build_id}, {svc.n} vectors) on "
          f"http://{cfg.host}:{cfg.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="info", server_header=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    cli = CLI(ServeConfig, prog="clipforge serve", description=__doc__.split("\n\n")[0])
    # ValueError: the trainer's CheckpointError (the index's checkpoint is missing or corrupt)
    return run_main(cli, argv, run, (SearchError, OSError, ValueError), prefix="clipforge serve")


if __name__ == "__main__":
    raise SystemExit(main())
