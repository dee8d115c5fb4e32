"""Self-contained HTML report of text-to-image search results (thumbnails inlined as base64 JPEG).

    from indexing.report import write_html
    write_html(Searcher("runs/index"), ["a red apple", "a dog on a beach"], k=8, out_path="runs/search.html")

    python -m indexing.report "a red apple" "a dog" --index INDEX_DIR --k 8 --out search.html

Reads the index dir through indexing.search.Searcher (the current build) and each hit's image bytes from its
shard; writes one HTML file, atomically (a rerun replaces it).
"""
from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from trainer.clip.flags import CLI, opt, run_main
from trainer.clip.formats.atomic import atomic_write_text

THUMB = 224  # longest side of an inlined thumbnail, pixels

CSS = """
:root { --bg:#0f1115; --card:#181b22; --fg:#e8eaf0; --muted:#8b93a7; --accent:#6ea8fe; }
* { box-sizing: border-box; }
body { margin: 0; padding: 28px 36px; background: var(--bg); color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
header h1 { margin: 0 0 4px; font-size: 22px; font-weight: 650; }
header p { margin: 0 0 24px; color: var(--muted); font-size: 13px; }
section { margin-bottom: 34px; }
section h2 { font-size: 16px; font-weight: 600; margin: 0 0 12px; }
section h2 span { color: var(--accent); }
.row { display: grid; grid-template-columns: repeat(auto-fill, minmax(190px, 1fr)); gap: 14px; }
.card { background: var(--card); border-radius: 10px; overflow: hidden; box-shadow: 0 2px 10px #0006;
        display: flex; flex-direction: column; }
.card .img { aspect-ratio: 1 / 1; background: #0a0c10; display: flex; align-items: center; justify-content: center; }
.card img { width: 100%; height: 100%; object-fit: cover; display: block; }
.card .meta { padding: 9px 11px 11px; }
.card .score { display: flex; justify-content: space-between; font-variant-numeric: tabular-nums;
               color: var(--muted); font-size: 12px; margin-bottom: 5px; }
.card .score b { color: var(--accent); font-weight: 650; }
.bar { height: 3px; background: #2a2f3a; border-radius: 2px; margin-bottom: 7px; }
.bar i { display: block; height: 100%; background: var(--accent); border-radius: 2px; }
.card .cap { font-size: 13px; overflow-wrap: anywhere; }
.card .path { font: 11px ui-monospace, monospace; color: var(--muted); margin-top: 5px; overflow-wrap: anywhere; }
.empty { color: var(--muted); font-style: italic; }
"""

# a 1x1 grey JPEG-free placeholder (SVG) for images that cannot be read/decoded
PLACEHOLDER = "data:image/svg+xml;base64," + base64.b64encode(
    b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64"><rect width="64" height="64" fill="#222"/>'
    b'<text x="32" y="36" font-size="10" text-anchor="middle" fill="#888">n/a</text></svg>').decode()


def thumbnail_uri(jpg: bytes, size: int = THUMB) -> str:
    """jpg bytes -> data: URI of a downscaled JPEG (keeps the page small for large images)."""
    try:
        with Image.open(io.BytesIO(jpg)) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size), Image.Resampling.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=85)
        return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    except Exception:
        return PLACEHOLDER


def _card(searcher, hit) -> str:
    try:
        uri = thumbnail_uri(searcher.image_bytes(hit))
    except OSError:
        uri = PLACEHOLDER
    e = html.escape
    pct = max(0.0, min(1.0, hit.score)) * 100
    link = f' href="{e(hit.url)}"' if hit.url.startswith(("http://", "https://")) else ""
    return (f'<div class="card"><a class="img"{link}><img src="{uri}" alt="{e(hit.caption)}" loading="lazy"></a>'
            f'<div class="meta"><div class="score"><span>#{hit.rank}</span><b>{hit.score:.4f}</b></div>'
            f'<div class="bar"><i style="width:{pct:.1f}%"></i></div>'
            f'<div class="cap">{e(hit.caption)}</div><div class="path">{e(hit.image)}</div></div></div>')


def render_html(searcher, queries: list[str], k: int) -> str:
    results = searcher.search(list(queries), k=k)
    info = getattr(searcher, "info", {})
    e = html.escape
    sections = []
    for q, hits in zip(queries, results):
        cards = "".join(_card(searcher, h) for h in hits) or '<p class="empty">no results</p>'
        sections.append(f'<section><h2>Query: <span>{e(q)}</span></h2><div class="row">{cards}</div></section>')
    sub = (f"{info.get('num_vectors', '?')} images &middot; {e(str(info.get('factory', '?')))} "
           f"&middot; build {e(str(info.get('build_id', '?')))} "
           f"&middot; top-{k} by cosine similarity &middot; checkpoint {e(str(info.get('checkpoint', '?')))}")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>clipforge search</title><style>{CSS}</style></head><body>'
            f'<header><h1>clipforge text-to-image search</h1><p>{sub}</p></header>'
            f'{"".join(sections)}</body></html>\n')


def write_html(searcher, queries: list[str], k: int, out_path: str | Path) -> Path:
    """Render the results page and write it atomically."""
    return atomic_write_text(out_path, render_html(searcher, queries, k))


@dataclass
class ReportConfig:
    """An HTML page of search results."""
    queries: list[str] = opt(default_factory=list, positional=True, help="one or more text queries")
    index: str = opt("", required=True, help="INDEX_DIR written by `clipforge index`")
    k: int = opt(8, help="results per query")
    out: str = opt("search.html", help="the page to write")
    device: str = opt("cpu", help="torch device of the text encoder")


def run(cfg: ReportConfig) -> int:
    from indexing.search import Searcher

    print(write_html(Searcher(cfg.index, device=cfg.device), cfg.queries, cfg.k, cfg.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    from indexing.search import SearchError

    cli = CLI(ReportConfig, prog="python -m indexing.report", description="HTML page of search results.")
    return run_main(cli, argv, run, (SearchError, OSError), prefix="indexing.report")


if __name__ == "__main__":
    raise SystemExit(main())
