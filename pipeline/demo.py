"""`make demo` / `clipforge demo`: every stage, end to end, on the offline sample web.

    sample web (openmoji) -> served on 127.0.0.1 -> crawl (img2dataset on in-process Ray) -> filter -> shard
    -> train (DeepSpeed ZeRO-2, 2 gloo ranks, gradient checkpointing) -> embed + FAISS index -> search + HTML

Each stage is called through its public `main(argv)`, exactly as its CLI would be, and reads only what the previous
stage wrote on disk. Outputs go under WORKDIR (default ./demo):
    web/ crawl/ filter/ shards/ run/ index/ results.html demo_summary.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline.common import init_ray
from trainer.clip.formats.atomic import atomic_write_json
from trainer.clip.formats.crawl import CRAWL_MANIFEST
from trainer.clip.ports import free_port

QUERIES = ["a red apple", "a rocket", "a dog face"]


@dataclass
class DemoConfig:
    workdir: str = "demo"
    max_emoji: int = 1200
    variants: int = 2
    crawl_samples_per_shard: int = 1000
    shard_samples_per_shard: int = 512
    model: str = "tiny"
    epochs: int = 30  # ~8.5 min on 2 CPU cores; text->image R@5 over the training captions ~0.8 (chance 0.002)
    steps: int = 0  # >0 overrides epochs
    batch_size: int = 64  # per rank
    lr: float = 2e-3
    warmup: int = 50  # optimizer steps
    log_every: int = 20
    shuffle_buffer: int = 1000
    nproc: int = 2
    queries: list[str] = field(default_factory=lambda: list(QUERIES))
    k: int = 5

    @classmethod
    def tiny(cls, workdir: str) -> "DemoConfig":
        """The small end-to-end run used by the test suite."""
        return cls(workdir=workdir, max_emoji=120, variants=2, crawl_samples_per_shard=100,
                   shard_samples_per_shard=64, epochs=0, steps=6, batch_size=16, warmup=2, log_every=2, shuffle_buffer=64)


def _stage(name: str, fn, timings: dict):
    print(f"\n=== {name} ===", flush=True)
    t0 = time.time()
    rc = fn()
    timings[name] = round(time.time() - t0, 1)
    if rc:
        raise SystemExit(f"demo: stage {name!r} failed with exit code {rc}")


def run(cfg: DemoConfig) -> dict:
    from indexing import build as index_build
    from indexing.report import write_html
    from indexing.search import Searcher
    from pipeline import crawl, filter as filt, sampleweb, shard
    from trainer import train

    w = Path(cfg.workdir).resolve()
    d = {k: w / k for k in ("web", "crawl", "filter", "shards", "run", "index")}
    timings: dict[str, float] = {}
    t_start = time.time()

    port = free_port()
    web_cfg = sampleweb.SampleWebConfig(max_emoji=cfg.max_emoji, variants=cfg.variants, port=port)
    _stage("sample web", lambda: sampleweb.build(d["web"], web_cfg) and 0, timings)
    server = sampleweb.serve(d["web"], port)
    init_ray()  # one in-process Ray on 127.0.0.1 for the pipeline stages
    try:
        _stage("crawl", lambda: crawl.main([str(d["web"] / "urls.parquet"), str(d["crawl"]), "--samples-per-shard",
                                            str(cfg.crawl_samples_per_shard), "--image-size", "128",
                                            "--thread-count", "32", "--timeout", "5"]), timings)
    finally:
        server.shutdown()
    _stage("filter", lambda: filt.main([str(d["crawl"]), str(d["filter"])]), timings)
    _stage("shard", lambda: shard.main([str(d["filter"]), str(d["shards"]), "--samples-per-shard",
                                        str(cfg.shard_samples_per_shard)]), timings)
    import ray

    ray.shutdown()  # give the cores to the trainer

    length = ["--steps", str(cfg.steps)] if cfg.steps else ["--epochs", str(cfg.epochs)]
    _stage("train", lambda: train.main(["--shards", str(d["shards"]), "--out", str(d["run"]), "--preset", "tiny",
                                        "--model", cfg.model, "--batch-size", str(cfg.batch_size),
                                        "--lr", str(cfg.lr), "--warmup", str(cfg.warmup),
                                        "--log-every", str(cfg.log_every),
                                        "--shuffle-buffer", str(cfg.shuffle_buffer), "--nproc", str(cfg.nproc),
                                        "--zero", "2", "--grad-checkpointing", *length,
                                        # a killed demo continues training where its last checkpoint left off
                                        "--save-every", "100", "--resume", "latest"]), timings)
    _stage("index", lambda: index_build.main(["--shards", str(d["shards"]), "--checkpoint",
                                              str(d["run"] / "checkpoint"), "--out", str(d["index"])]), timings)

    print("\n=== search ===", flush=True)
    searcher = Searcher(d["index"])
    results = searcher.search(cfg.queries, k=cfg.k)
    for q, hits in zip(cfg.queries, results):
        print(f'\n"{q}"')
        for h in hits:
            print(f"  {h.rank}. {h.score:.4f}  {h.caption:<40.40}  {searcher.image_path(h)}")
    html = write_html(searcher, cfg.queries, cfg.k, w / "results.html")
    timings["total"] = round(time.time() - t_start, 1)

    summary = {
        "config": asdict(cfg), "timings_s": timings,
        "crawl": json.loads((d["crawl"] / CRAWL_MANIFEST).read_text())["totals"],
        "filter": {k: v for k, v in json.loads((d["filter"] / "filter_manifest.json").read_text()).items()
                   if k in ("input_rows", "kept", "dropped")},
        "shards": {k: v for k, v in json.loads((d["shards"] / "manifest.json").read_text()).items()
                   if k in ("num_samples", "missing")} | {"num_shards": len(list(d["shards"].glob("shard-*.tar")))},
        "train": json.loads((d["run"] / "summary.json").read_text()),
        "index": json.loads((d["index"] / "index.json").read_text()),
        "search": {q: [{"rank": h.rank, "score": h.score, "caption": h.caption, "image": h.image} for h in hits]
                   for q, hits in zip(cfg.queries, results)},
        "paths": {k: str(v) for k, v in d.items()} | {"results_html": str(html)},
    }
    atomic_write_json(w / "demo_summary.json", summary)
    print("\n=== where everything is ===")
    for k, v in summary["paths"].items():
        print(f"  {k:<13} {v}")
    print(f"  {'summary':<13} {w / 'demo_summary.json'}")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    return summary


def main(argv=None) -> int:
    d = DemoConfig()
    p = argparse.ArgumentParser(prog="clipforge demo", description=__doc__.split("\n")[0])
    p.add_argument("--workdir", default=d.workdir)
    p.add_argument("--tiny", action="store_true", help="the small preset the test suite runs (about a minute)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--max-emoji", type=int, default=d.max_emoji)
    p.add_argument("--query", action="append", help="repeatable; default: " + ", ".join(QUERIES))
    a = p.parse_args(argv)
    cfg = DemoConfig.tiny(a.workdir) if a.tiny else DemoConfig(workdir=a.workdir, epochs=a.epochs, steps=a.steps,
                                                                 max_emoji=a.max_emoji)
    if a.query:
        cfg.queries = a.query
    run(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
