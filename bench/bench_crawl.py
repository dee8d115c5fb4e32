"""Crawl throughput: `clipforge crawl` vs plain img2dataset (its multiprocessing distributor), same URL list, same
local web, same image settings, both timed the same way: process start to exit, median of N runs.

    python bench/bench_crawl.py [--urls 20000] [--runs 3] [--slow 0.02] [--failing 0.03] [--out bench/results/x.json]

The web: 32 multi-threaded HTTP servers on 127.0.0.2 ... 127.0.0.33 (32 hosts, as a real URL list spreads over
many), serving 256 distinct JPEGs of 512-1024 px; a fraction of the URLs answers only after 2 s (slow), another
fraction is a 404 or a reset connection (failing). Prints images/s, images/s per core and the peak RSS of each
side's whole process tree, and the ratio clipforge / img2dataset (target >= 1.2).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from benchlib import timed  # noqa: E402

HOSTS = [f"127.0.0.{i}" for i in range(2, 34)]
PEER = """
import sys
from img2dataset import download
if __name__ == "__main__":
    download(url_list=sys.argv[1], output_folder=sys.argv[2], input_format="parquet", url_col="url",
             caption_col="caption", output_format="webdataset", distributor="multiprocessing",
             processes_count=int(sys.argv[3]), image_size=256, resize_mode="keep_ratio", enable_wandb=False)
"""


def make_images(n: int = 256) -> list[bytes]:
    import numpy as np
    from PIL import Image

    rng, out = np.random.default_rng(0), []
    for i in range(n):
        w, h = int(rng.integers(512, 1025)), int(rng.integers(512, 1025))
        y, x = np.mgrid[0:h, 0:w]
        img = np.stack([(x * (i + 1) // 7) % 256, (y * 3) % 256, ((x + y) // 5 + i) % 256], -1).astype(np.uint8)
        img = np.clip(img + rng.integers(0, 24, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def handler(images: list[bytes]):
    class Web(BaseHTTPRequestHandler):
        def do_GET(self):
            kind, _, n = self.path.strip("/").partition("/")
            try:
                if kind == "slow":
                    time.sleep(2)
                if kind == "missing":
                    self.send_error(404)
                    return
                if kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.connection.close()
                    return
                body = images[int(n.split(".")[0]) % len(images)]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError, OSError):
                pass

        def log_message(self, *args):
            pass

    return Web


def serve(images: list[bytes]) -> list[ThreadingHTTPServer]:
    servers = []
    for host in HOSTS:
        s = ThreadingHTTPServer((host, 0), handler(images))
        s.daemon_threads = True
        threading.Thread(target=s.serve_forever, daemon=True).start()
        servers.append(s)
    return servers


def url_list(path: Path, servers, n: int, slow: float, failing: float) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng, urls, kinds = random.Random(0), [], {"ok": 0, "slow": 0, "missing": 0, "reset": 0}
    for i in range(n):
        s = servers[rng.randrange(len(servers))]
        r = rng.random()
        kind = "slow" if r < slow else "missing" if r < slow + failing / 2 else "reset" if r < slow + failing else "ok"
        kinds[kind] += 1
        urls.append(f"http://{s.server_address[0]}:{s.server_address[1]}/{kind}/{i}.jpg")
    pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(n)]}), path)
    return kinds


def successes(out: Path) -> int:
    sys.path.insert(0, str(ROOT))
    from trainer.clip.formats.atomic import read_json
    from trainer.clip.formats.crawl import complete_shards

    return sum(read_json(s.stats)["successes"] for s in complete_shards(out))


def side(name: str, cmd_for, work: Path, runs: int, env: dict) -> dict:
    walls, peaks, oks = [], [], []
    for r in range(runs):
        out = work / f"{name}-{r}"
        wall, peak, rc = timed(cmd_for(out), env)
        if rc != 0:
            raise RuntimeError(f"{name} run {r} exited {rc}")
        walls.append(wall)
        peaks.append(peak)
        oks.append(successes(out))
        print(f"{name:<12} run {r}: {oks[-1]} images in {wall:.1f} s, peak RSS {peak:.0f} MB", flush=True)
    wall, cores = statistics.median(walls), os.cpu_count() or 1
    ok = oks[walls.index(sorted(walls)[len(walls) // 2])]
    return {"wall_s": walls, "median_s": wall, "images": ok, "images_per_s": ok / wall,
            "images_per_s_per_core": ok / wall / cores, "peak_rss_mb": max(peaks)}


def run(n_urls: int = 20_000, runs: int = 3, slow: float = 0.02, failing: float = 0.03,
        workdir: str | None = None) -> dict:
    work = Path(workdir or tempfile.mkdtemp(prefix="bench-crawl-"))
    servers = serve(make_images())
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    cores = os.cpu_count() or 1
    try:
        kinds = url_list(work / "urls.parquet", servers, n_urls, slow, failing)
        (work / "peer.py").write_text(PEER)
        peer = side("img2dataset", lambda out: [sys.executable, str(work / "peer.py"), str(work / "urls.parquet"),
                                                str(out), str(cores)], work, runs, env)
        ours = side("clipforge", lambda out: [sys.executable, "-m", "pipeline.crawl", str(work / "urls.parquet"),
                                              str(out), "--image-size", "256", "--allow-private-addresses",
                                              "--progress-interval-s", "0"], work, runs, env)
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
    return {"urls": n_urls, "kinds": kinds, "cores": cores, "runs": runs, "img2dataset": peer, "clipforge": ours,
            "ratio": ours["images_per_s"] / peer["images_per_s"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--urls", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--slow", type=float, default=0.02, help="fraction of URLs answering after 2 s")
    p.add_argument("--failing", type=float, default=0.03, help="fraction of URLs that 404 or reset")
    p.add_argument("--out", help="write the result as JSON here")
    a = p.parse_args(argv)
    r = run(a.urls, a.runs, a.slow, a.failing)
    r["date"], r["command"] = time.strftime("%Y-%m-%d"), "python bench/bench_crawl.py " + " ".join(argv or sys.argv[1:])
    for name in ("img2dataset", "clipforge"):
        x = r[name]
        print(f"{name:<12} {x['images']:6d} images, median {x['median_s']:6.1f} s = {x['images_per_s']:7.1f} "
              f"images/s ({x['images_per_s_per_core']:.1f} per core), peak RSS {x['peak_rss_mb']:.0f} MB")
    print(f"ratio clipforge / img2dataset: {r['ratio']:.2f}  (urls {r['urls']}, {r['kinds']}, cores {r['cores']})")
    if a.out:
        Path(a.out).write_text(json.dumps(r, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
