"""Crawl throughput: clipforge crawl (img2dataset on Ray + shard verification/retry) vs plain img2dataset
(its default multiprocessing distributor), same URL list, same local server, same settings, one script.

    python bench/bench_crawl.py [--max-emoji 1200] [--variants 2] [--samples-per-shard 1000] [--threads 32]

Prints images/s of each and the ratio clipforge / img2dataset (>= ~1.0 means the safety net costs nothing).
The server is the sample web on 127.0.0.1, so this measures the crawler's overhead (decode, resize, encode,
write), not the network.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def run(max_emoji: int, variants: int, samples_per_shard: int, threads: int, workdir: str | None = None) -> dict:
    from img2dataset import download

    from pipeline import crawl, sampleweb
    from pipeline.common import init_ray
    from trainer.clip.formats.atomic import read_json
    from trainer.clip.formats.crawl import complete_shards
    from trainer.clip.ports import free_port

    tmp = Path(workdir or tempfile.mkdtemp(prefix="bench-crawl-"))
    cfg = sampleweb.SampleWebConfig(max_emoji=max_emoji, variants=variants, port=free_port())
    web = sampleweb.build(tmp / "web", cfg)
    server = sampleweb.serve(tmp / "web", cfg.port)
    common = dict(number_sample_per_shard=samples_per_shard, thread_count=threads, timeout=10, image_size=128,
                  resize_mode="keep_ratio", resize_only_if_bigger=True, encode_format="jpg")
    n_proc = os.cpu_count() or 1
    try:
        # peer: plain img2dataset, multiprocessing distributor (its default), one process per core
        t0 = time.perf_counter()
        download(url_list=web["urls"], output_folder=str(tmp / "peer"), input_format="parquet", url_col="url",
                 caption_col="caption", output_format="webdataset", processes_count=n_proc,
                 distributor="multiprocessing", compute_hash="sha256", enable_wandb=False, **common)
        t_peer = time.perf_counter() - t0
        peer_ok = sum(read_json(shard.stats)["successes"] for shard in complete_shards(tmp / "peer"))

        init_ray(num_cpus=n_proc)  # started before timing: a long-lived cluster is the normal case
        c = crawl.CrawlConfig(url_list=web["urls"], output_dir=str(tmp / "ours"), samples_per_shard=samples_per_shard,
                              thread_count=threads, timeout=10, image_size=128)
        t0 = time.perf_counter()
        m = crawl.run(c)
        t_ours = time.perf_counter() - t0
        ours_ok = m["totals"]["success"]
    finally:
        server.shutdown()
        if workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"rows": web["rows"], "img2dataset": {"s": t_peer, "ok": peer_ok, "img_per_s": peer_ok / t_peer},
            "clipforge": {"s": t_ours, "ok": ours_ok, "img_per_s": ours_ok / t_ours},
            "ratio": (ours_ok / t_ours) / (peer_ok / t_peer)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--max-emoji", type=int, default=1200)
    p.add_argument("--variants", type=int, default=2)
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--threads", type=int, default=32)
    a = p.parse_args(argv)
    r = run(a.max_emoji, a.variants, a.samples_per_shard, a.threads)
    print(f"rows: {r['rows']}  cores: {os.cpu_count()}")
    for name in ("img2dataset", "clipforge"):
        x = r[name]
        print(f"{name:<12} {x['ok']:6d} images in {x['s']:6.1f} s = {x['img_per_s']:7.1f} images/s")
    print(f"ratio clipforge / img2dataset: {r['ratio']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
