"""Stage 1 worker: crawl one shard (an input file's row range) into img2dataset's shard files, committed atomically.

Reads  the shard's rows from the input file (pipeline.crawl_input.read_rows: only those rows, bounded memory).
Writes CRAWL_DIR/{id:05d}.tar, .parquet (trainer.clip.formats.crawl.CrawlShardWriter: img2dataset's layout and
       schema, plus an `error_class` column and the input's carried columns), then {id:05d}_stats.json.

Per row: a safe fetch (pipeline.fetch), a header probe (Pillow reads only the header: format, size, EXIF; refuses
more than max_pixels before any decode, and a JPEG / PNG / GIF body that ends before its end marker), then
img2dataset's Resizer (OpenCV decode, resize, encode). Every row lands in the parquet with a status, an error
class and the raw message; only successes go to the tar.

Exactly once: the writer works in CRAWL_DIR/_clipforge/tmp/{id}.{attempt}.{random}/; the tar and parquet are
moved into place, then the marker is written atomically. A kill at any point leaves either a complete shard
(marker present) or an uncommitted one, which the driver deletes and redoes. Two attempts of one shard (a task
presumed lost that was still running) write the same rows under the same keys; whichever commits last wins whole.
"""
from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations (via img2dataset) must not phone home

from pipeline.crawl_input import ShardSpec, read_rows  # noqa: E402
from pipeline.fetch import FetchConfig, Fetched, FetchError, HostLimits, fetch  # noqa: E402
from trainer.clip.flags import opt  # noqa: E402
from trainer.clip.formats.atomic import atomic_write_json, move_into_place  # noqa: E402
from trainer.clip.procinfo import peak_rss_bytes, rss_bytes  # noqa: E402
from trainer.clip.formats.crawl import CRAWL_FORMAT, CRAWL_TMP, CrawlShardWriter, crawl_shard  # noqa: E402

FAULT_ENV = "CLIPFORGE_CRAWL_FAULT"  # tests: "download:N" | "commit" | "raise:SHARD" (see fault()) | "manifest"
OUTPUT_COLUMNS = ("key", "status", "error_message", "error_class", "width", "height", "original_width",
                  "original_height", "exif", "sha256")
DECODE_CLASSES = ("not_image", "too_many_pixels", "decode_error")  # status failed_to_resize; the rest: to_download
END_MARKERS = {"JPEG": (b"\xff\xd9",), "PNG": (b"IEND\xaeB`\x82",), "GIF": (b"\x3b",)}


@dataclass
class ImageConfig:
    """What is written for each image (img2dataset's Resizer settings)."""
    image_size: int = opt(256, help="resize target side in pixels")
    resize_mode: str = opt("keep_ratio", choices=("no", "keep_ratio", "center_crop", "border"),
                           help="img2dataset's resize mode (keep_ratio: the trainer centre-crops)")
    resize_only_if_bigger: bool = opt(True, help="never upscale")
    encode_format: str = opt("jpg", choices=("jpg", "png", "webp"), help="image format written to the tars")
    encode_quality: int = opt(95, help="JPEG / WebP quality (PNG: compression level 0-9)")


@dataclass
class ShardJob:
    """Everything one shard task needs (picklable; the driver builds one per attempt)."""
    spec: ShardSpec
    output_dir: str
    fingerprint: str
    samples_per_shard: int
    url_col: str
    caption_col: str | None
    extra_cols: list[str] | None
    fetch: FetchConfig
    image: ImageConfig
    thread_count: int = 32
    attempt: int = 1
    driver_pid: int = 0
    extra_names: dict[str, str] = field(default_factory=dict)  # input column -> output column (clashes renamed)


def probe(got: Fetched, max_pixels: int) -> dict:
    """Header-only look at a body: {format, width, height, exif}, or FetchError (not_image / too_many_pixels /
    decode_error). Nothing is decoded here."""
    from PIL import ExifTags, Image, UnidentifiedImageError

    body = got.body or b""
    try:
        with Image.open(io.BytesIO(body)) as im:
            fmt, (w, h) = im.format, im.size
            exif = {ExifTags.TAGS.get(k, str(k)): str(v)[:200] for k, v in im.getexif().items()}
    except Image.DecompressionBombError as e:
        raise FetchError("too_many_pixels", str(e)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise FetchError("not_image", f"{got.content_type or 'no Content-Type'}, {len(body)} bytes starting "
                                      f"{body[:12]!r}: {e}") from None
    if w * h > max_pixels:
        raise FetchError("too_many_pixels", f"{w}x{h} = {w * h} px > max {max_pixels}")
    ends = END_MARKERS.get(fmt)
    if ends and not any(m in body[-64:] for m in ends):
        raise FetchError("decode_error", f"truncated {fmt}: no end marker in the last bytes of {len(body)}")
    return {"format": fmt, "width": w, "height": h, "exif": json.dumps(exif) if exif else None}


def dct_reduced(body: bytes, info: dict, im: ImageConfig) -> bytes | None:
    """A large JPEG decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled IDCT), as a BMP for the
    Resizer, when that still leaves the side the resize mode targets at >= image_size; else None. The Resizer
    then resizes a quarter (or less) of the pixels: about 1.8x less CPU per web-sized image, same output size.
    Original sizes come from the header (probe), not from this."""
    if info["format"] != "JPEG" or im.resize_mode == "no":
        return None
    side = max(info["width"], info["height"]) if im.resize_mode == "border" else min(info["width"], info["height"])
    factor = next((f for f in (8, 4, 2) if side // f >= im.image_size), 0)
    if not factor:
        return None
    import cv2
    import numpy as np

    flag = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}[factor]
    img = cv2.imdecode(np.frombuffer(body, np.uint8), flag | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        return None  # the Resizer's own decode reports the error
    ok, bmp = cv2.imencode(".bmp", img)
    return bmp.tobytes() if ok else None


def img2dataset_resizer():
    """img2dataset's resizer module, loaded from its file. `import img2dataset.resizer` would run the package's
    __init__, which imports its writers, webdataset and through it torch: ~600 MB in every crawl worker for code
    the crawl does not use. resizer.py itself needs only cv2, numpy and albumentations."""
    import importlib.util

    name = "clipforge_img2dataset_resizer"
    if name not in sys.modules:
        origin = importlib.util.find_spec("img2dataset").submodule_search_locations[0]
        spec = importlib.util.spec_from_file_location(name, os.path.join(origin, "resizer.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


def fault(point: str, job: ShardJob, rows_done: int = 0) -> None:
    """Tests: kill the whole crawl (driver, then this worker) at a named point, as a node-wide kill -9 would."""
    spec = os.environ.get(FAULT_ENV, "")
    name, _, n = spec.partition(":")
    if name != point or (n and rows_done != int(n)):
        return
    if job.driver_pid:
        os.kill(job.driver_pid, signal.SIGKILL)
    os._exit(137)


class ShardTask:
    """One attempt at one shard: fetch with a thread pool, probe in the threads, resize + write here."""

    def __init__(self, job: ShardJob):
        Resizer = img2dataset_resizer().Resizer

        self.job = job
        im = job.image
        self.resizer = Resizer(im.image_size, im.resize_mode, im.resize_only_if_bigger,
                               encode_format=im.encode_format, encode_quality=im.encode_quality)
        self.digits = max(0, math.ceil(math.log10(job.samples_per_shard)))  # img2dataset's key rule
        self.counts: Counter = Counter()
        self.classes: Counter = Counter()
        self.messages: Counter = Counter()
        self.bytes = 0
        self.types = extra_types(job.spec, list(job.extra_names))

    def key(self, i: int) -> str:
        return f"{self.job.spec.id:05d}{i:0{self.digits}d}" if self.digits else f"{self.job.spec.id:05d}"

    def work(self, row: dict, limits: HostLimits) -> tuple[dict, Fetched, dict | None]:
        """In a pool thread: fetch + probe. -> (row, fetched, probe info or None)."""
        url = row.get("url")
        if row.get("_input_error"):
            return row, Fetched(str(url), error_class="invalid_input", message=row["_input_error"]), None
        if not url or not isinstance(url, str):
            return row, Fetched(str(url), error_class="invalid_url", message="empty URL"), None
        got = fetch(url, self.job.fetch, limits)
        if not got.ok:
            return row, got, None
        try:
            return row, got, probe(got, self.job.fetch.max_pixels)
        except FetchError as e:
            return row, Fetched(url, error_class=e.error_class, message=str(e), status=got.status), None

    def record(self, writer, i: int, row: dict, got: Fetched, info: dict | None) -> None:
        """Here (one thread: img2dataset's Resizer redirects fds 1/2 while it runs): resize, then write the row."""
        import hashlib

        img = width = height = None
        if info is not None:
            body = dct_reduced(got.body, info, self.job.image) or got.body
            img, width, height, ow, oh, err = self.resizer(io.BytesIO(body))
            if err:
                got = Fetched(got.url, error_class="decode_error", message=err, status=got.status)
                img = None
        cls = got.error_class
        status = "success" if cls is None else "failed_to_resize" if cls in DECODE_CLASSES else "failed_to_download"
        meta = {"url": row.get("url"), "caption": row.get("caption"),
                **{out: _plain(row.get(col), self.types[col]) for col, out in self.job.extra_names.items()},
                "key": self.key(i), "status": status, "error_message": got.message, "error_class": cls,
                "width": width, "height": height,
                "original_width": info["width"] if img is not None else None,
                "original_height": info["height"] if img is not None else None,
                "exif": info["exif"] if img is not None else None,
                "sha256": hashlib.sha256(got.body).hexdigest() if img is not None else None}
        writer.write(img, meta["key"], row.get("caption"), meta)
        self.counts[status] += 1
        self.classes[cls or "success"] += 1
        self.messages[(got.message or "success")[:200]] += 1
        self.bytes += len(got.body or b"") if img is not None else 0

    def download(self, writer) -> None:
        job, limits = self.job, HostLimits(self.job.fetch.per_host_concurrency, self.job.fetch.per_host_rate)
        rows = enumerate(read_rows(job.spec, job.url_col, job.caption_col, job.extra_cols))
        with ThreadPoolExecutor(job.thread_count, thread_name_prefix="fetch") as pool:
            pending: dict = {}
            done_rows = 0
            for i, row in rows:
                pending[pool.submit(self.work, row, limits)] = i
                while len(pending) >= 2 * job.thread_count:
                    done_rows = self._drain(writer, pending, done_rows)
            while pending:
                done_rows = self._drain(writer, pending, done_rows)

    def _drain(self, writer, pending: dict, done_rows: int) -> int:
        finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
        for f in finished:
            self.record(writer, pending.pop(f), *f.result())
            done_rows += 1
            fault("download", self.job, done_rows)
        return done_rows

    def run(self) -> dict:
        job, t0, rss0 = self.job, time.time(), _rss_mb()
        final = crawl_shard(job.output_dir, job.spec.id)
        tmp = Path(job.output_dir) / CRAWL_TMP / f"{job.spec.id:05d}.{job.attempt}.{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            writer = CrawlShardWriter(tmp, job.spec.id, self.schema(), job.image.encode_format)
            self.download(writer)
            writer.close()
            move_into_place([(tmp / final.tar.name, final.tar), (tmp / final.parquet.name, final.parquet)],
                            between=lambda i: fault("commit", job))
            marker = self.marker(t0, rss0)
            atomic_write_json(final.stats, marker)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return marker

    def schema(self):
        import pyarrow as pa

        ints = ("width", "height", "original_width", "original_height")
        cols = [("url", pa.string()), ("caption", pa.string()),
                *((out, self.types[col]) for col, out in self.job.extra_names.items()),
                *((c, pa.int32() if c in ints else pa.string()) for c in OUTPUT_COLUMNS)]
        return pa.schema(cols)

    def marker(self, t0: float, rss0: float) -> dict:
        import ray

        job, n = self.job, sum(self.counts.values())
        node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else socket.gethostname()
        return {"format": CRAWL_FORMAT, "shard": job.spec.id, "fingerprint": job.fingerprint, "file": job.spec.file,
                "rows": [job.spec.start, job.spec.stop], "count": n, "successes": self.counts["success"],
                "failed_to_download": self.counts["failed_to_download"],
                "failed_to_resize": self.counts["failed_to_resize"],
                "status_dict": dict(self.messages.most_common(50)), "error_classes": dict(self.classes),
                "bytes": self.bytes, "start_time": t0, "end_time": time.time(), "duration": time.time() - t0,
                "attempt": job.attempt, "node_id": node, "host": socket.gethostname(), "pid": os.getpid(),
                "rss_start_mb": rss0, "peak_rss_mb": _peak_rss_mb()}


def extra_types(spec: ShardSpec, cols: list[str]) -> dict:
    """Arrow type of each carried input column: Parquet keeps the file's types (nested ones as JSON text), the text
    formats carry strings."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = dict.fromkeys(cols, pa.string())
    if spec.format == "parquet":
        with fsspec.open(spec.file, "rb") as f:
            schema = pq.read_schema(f)
        for col in cols:
            t = schema.field(col).type if col in schema.names else pa.string()
            types[col] = t if pa.types.is_primitive(t) or pa.types.is_string(t) else pa.string()
    return types


def _plain(v, arrow_type):
    """An extra column's value as its parquet column holds it (text columns: non-strings as JSON text)."""
    import pyarrow as pa

    if v is None or not pa.types.is_string(arrow_type) or isinstance(v, str):
        return v
    return json.dumps(v, default=str)


def _rss_mb() -> float:
    return round(rss_bytes() / 2**20, 1)


def _peak_rss_mb() -> float:
    return round(peak_rss_bytes() / 2**20, 1)


def crawl_one(job: ShardJob) -> dict:
    """The task body: crawl and commit one shard. -> its marker (what the driver aggregates)."""
    if os.environ.get(FAULT_ENV) == f"raise:{job.spec.id}":  # tests: a shard whose every attempt fails
        raise RuntimeError(f"injected failure of shard {job.spec.id}")
    return ShardTask(job).run()
