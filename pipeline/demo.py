"""`make demo` / `clipforge demo`: every stage, end to end, on the offline sample web.

    sample web (openmoji) + held-out set (Noto Color Emoji) -> served on 127.0.0.1 -> crawl (img2dataset on
    in-process Ray) -> filter (preset demo: rules, language ID, exact + near-duplicate dedup, metadata balancing)
    -> ledger summary -> shard -> train (DeepSpeed ZeRO-2, 2 gloo ranks, gradient checkpointing; evaluated on the
    held-out style) -> embed (images + captions) -> FAISS index (chosen for a memory budget, tuned to held-out text
    queries) -> search + HTML

Each stage is called through its public `main(argv)`, exactly as its CLI would be, and reads only what the previous
stage wrote on disk. Outputs go under WORKDIR (default ./demo):
    web/ heldout/ crawl/ filter/ shards/ run/ embeddings/ index/ results.html demo_summary.json
The held-out set is another design team's drawings of the same concepts (pipeline.heldout); it is never training
data. Its text->image recall and zero-shot group accuracy are printed at the end (skipped, with a note, where the
Noto font or Unicode's emoji data is not installed).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from pipeline.common import init_ray
from trainer.clip.flags import CLI, opt, run_main
from trainer.clip.formats.atomic import atomic_write_json, read_json
from trainer.clip.formats.crawl import CRAWL_MANIFEST
from trainer.clip.formats.embeddings import read_embed_manifest
from trainer.clip.formats.ledger import read_filter_manifest
from trainer.clip.formats.index import read_index_info
from trainer.clip.formats.shards import read_manifest
from trainer.clip.ports import free_port

QUERIES = ["a red apple", "a rocket", "a dog face"]


@dataclass
class DemoConfig:
    """The demo's sizes (the default: ~9 min on 2 CPU cores; text->image R@5 over the training captions ~0.76)."""
    workdir: str = opt("demo", help="where every stage writes (web/ crawl/ filter/ shards/ run/ embeddings/ index/)")
    max_emoji: int = opt(1200, help="distinct emoji rendered into the sample web")
    variants: int = opt(2, help="images per emoji")
    crawl_samples_per_shard: int = opt(1000, help="input rows per crawl shard")
    shard_samples_per_shard: int = opt(512, help="samples per training shard")
    model: str = opt("tiny", help="the model preset trained")
    epochs: int = opt(30, help="training epochs (when --steps is 0)")
    steps: int = opt(0, help="training steps (> 0 overrides --epochs)")
    batch_size: int = opt(64, help="per-rank training batch")
    lr: float = opt(2e-3, help="peak learning rate")
    warmup: int = opt(50, help="warmup steps")
    log_every: int = opt(20, help="steps between training log lines")
    shuffle_buffer: int = opt(1000, help="training shuffle buffer")
    nproc: int = opt(2, help="training ranks (gloo on CPU)")
    queries: list[str] = opt(default_factory=lambda: list(QUERIES), flag="--query", action="append",
                             help="a search query, repeatable (default: " + ", ".join(QUERIES) + ")")
    k: int = opt(5, help="results per query")
    heldout_max: int = opt(0, help="held-out Noto emoji (0: all)")

    @classmethod
    def tiny(cls, workdir: str = "demo") -> "DemoConfig":
        """The small end-to-end run used by the test suite (about a minute)."""
        return cls(workdir=workdir, max_emoji=120, variants=2, crawl_samples_per_shard=100,
                   shard_samples_per_shard=64, epochs=0, steps=6, batch_size=16, warmup=2, log_every=2,
                   shuffle_buffer=64, heldout_max=60)


def _stage(name: str, fn, timings: dict):
    print(f"\n=== {name} ===", flush=True)
    t0 = time.time()
    rc = fn()
    timings[name] = round(time.time() - t0, 1)
    if rc:
        raise SystemExit(f"demo: stage {name!r} failed with exit code {rc}")


def _data_stages(cfg: DemoConfig, d: dict, timings: dict) -> None:
    """sample web -> served on 127.0.0.1 -> crawl -> filter -> shard, each through its CLI's main(argv)."""
    from pipeline import crawl, filter as filt, sampleweb, shard, stats

    port = free_port()
    web_cfg = sampleweb.SampleWebConfig(max_emoji=cfg.max_emoji, variants=cfg.variants, port=port)
    _stage("sample web", lambda: sampleweb.build(d["web"], web_cfg) and 0, timings)
    _stage("held-out set", lambda: _heldout(d, cfg), timings)
    server = sampleweb.serve(d["web"], port)
    ray = init_ray()  # one in-process Ray on 127.0.0.1 for the pipeline stages
    try:
        _stage("crawl", lambda: crawl.main([str(d["web"] / "urls.parquet"), str(d["crawl"]), "--samples-per-shard",
                                            str(cfg.crawl_samples_per_shard), "--image-size", "128",
                                            "--thread-count", "32", "--timeout", "5",
                                            "--allow-private-addresses"]), timings)  # the sample web: 127.0.0.1
    finally:
        server.shutdown()
    _stage("filter", lambda: filt.main([str(d["crawl"]), str(d["filter"]), "--preset", "demo"]), timings)
    _stage("ledger", lambda: stats.main([str(d["filter"]), "--plots", str(d["filter"] / "plots"), "--top", "8"]),
           timings)
    _stage("shard", lambda: shard.main([str(d["filter"]), str(d["shards"]), "--samples-per-shard",
                                        str(cfg.shard_samples_per_shard)]), timings)
    ray.shutdown()  # give the cores to the trainer


def _heldout(d: dict, cfg: DemoConfig) -> int:
    """The Noto held-out set at the model's resolution; 0 and a note when the system data is missing."""
    from pipeline import heldout
    from pipeline.emojidata import EmojiDataError
    from trainer.clip.model import get_config

    try:
        heldout.build(heldout.HeldoutConfig(out=str(d["heldout"]), image_size=get_config(cfg.model).vision.image_size,
                                            max_emoji=cfg.heldout_max))
    except (heldout.HeldoutError, EmojiDataError) as e:
        print(f"note: no held-out evaluation: {e}", flush=True)
    return 0


def _eval_flags(d: dict) -> list[str]:
    h = d["heldout"]
    if not (h / "heldout.json").is_file():
        return []
    return ["--eval-retrieval", str(h), "--eval-zeroshot", str(h), "--eval-classes", str(h / "classes.json")]


def _model_stages(cfg: DemoConfig, d: dict, timings: dict) -> None:
    """train (DeepSpeed ZeRO-2 on nproc gloo ranks) -> embed -> index, each through its CLI's main(argv)."""
    from indexing import build as index_build
    from indexing import embed
    from trainer import train

    length = ["--steps", str(cfg.steps)] if cfg.steps else ["--epochs", str(cfg.epochs)]
    _stage("train", lambda: train.main(["--shards", str(d["shards"]), "--out", str(d["run"]), "--preset", "tiny",
                                        "--model", cfg.model, "--batch-size", str(cfg.batch_size),
                                        "--lr", str(cfg.lr), "--warmup", str(cfg.warmup),
                                        "--log-every", str(cfg.log_every),
                                        "--shuffle-buffer", str(cfg.shuffle_buffer), "--nproc", str(cfg.nproc),
                                        "--zero", "2", "--grad-checkpointing", *length, *_eval_flags(d),
                                        # a killed demo continues training where its last checkpoint left off
                                        "--save-every", "100", "--resume", "latest"]), timings)
    # the laptop executor (no Ray: the trainer just had the cores); on a cluster it is `--executor ray`
    _stage("embed", lambda: embed.main([str(d["shards"]), "--checkpoint", str(d["run"] / "checkpoint"),
                                        "--out", str(d["embeddings"]), "--executor", "local", "--device", "cpu",
                                        "--cpus-per-actor", str(cfg.nproc)]), timings)
    _stage("index", lambda: index_build.main([str(d["embeddings"]), "--out", str(d["index"])]), timings)


def _search(cfg: DemoConfig, d: dict, html_path: Path):
    from indexing.report import write_html
    from indexing.search import Searcher

    print("\n=== search ===", flush=True)
    searcher = Searcher(d["index"])
    results = searcher.search(cfg.queries, k=cfg.k)
    for q, hits in zip(cfg.queries, results):
        print(f'\n"{q}"')
        for h in hits:
            print(f"  {h.rank}. {h.score:.4f}  {h.caption:<40.40}  {searcher.image_path(h)}")
    return results, write_html(searcher, cfg.queries, cfg.k, html_path)


HELDOUT_KEYS = {"text->image R@1": "retrieval/text_to_image_R@1", "text->image R@10": "retrieval/text_to_image_R@10",
                "image->text R@10": "retrieval/image_to_text_R@10", "zero-shot group top-1": "zeroshot/top1",
                "zero-shot mean per-class recall": "zeroshot/mean_per_class_recall"}


def heldout_metrics(run_dir: Path) -> dict | None:
    """The last evaluation the trainer logged on the held-out set (run/eval.jsonl), or None."""
    path = run_dir / "eval.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    if not rows:
        return None
    last = rows[-1]
    return {"step": last["step"], **{k: last[v] for k, v in HELDOUT_KEYS.items() if v in last},
            "num_images": last.get("retrieval/num_images"), "num_classes": last.get("zeroshot/num_classes")}


def _summary(cfg: DemoConfig, d: dict, timings: dict, results, html: Path) -> dict:
    """What every stage wrote, read back through the stage contracts."""
    filt, shards = read_filter_manifest(d["filter"]), read_manifest(d["shards"])
    return {
        "config": asdict(cfg), "timings_s": timings,
        "crawl": read_json(d["crawl"] / CRAWL_MANIFEST)["totals"],
        "filter": {k: v for k, v in filt.items() if k in ("input_rows", "kept", "dropped")},
        "shards": {k: v for k, v in shards.items() if k in ("num_samples", "missing")}
                  | {"num_shards": len(shards["shards"])},
        "train": read_json(d["run"] / "summary.json"),
        "embed": {k: v for k, v in read_embed_manifest(d["embeddings"]).items()
                  if k in ("num_rows", "num_embedded", "not_embedded", "reused_rows", "failed")},
        "index": read_index_info(d["index"]),
        "heldout": heldout_metrics(d["run"]),
        "search": {q: [{"rank": h.rank, "score": h.score, "caption": h.caption, "image": h.image} for h in hits]
                   for q, hits in zip(cfg.queries, results)},
        "paths": {k: str(v) for k, v in d.items()} | {"results_html": str(html)},
    }


def run(cfg: DemoConfig) -> dict:
    w = Path(cfg.workdir).resolve()
    d = {k: w / k for k in ("web", "heldout", "crawl", "filter", "shards", "run", "embeddings", "index")}
    timings: dict[str, float] = {}
    t_start = time.time()
    _data_stages(cfg, d, timings)
    _model_stages(cfg, d, timings)
    results, html = _search(cfg, d, w / "results.html")
    timings["total"] = round(time.time() - t_start, 1)
    summary = _summary(cfg, d, timings, results, html)
    atomic_write_json(w / "demo_summary.json", summary)
    print("\n=== where everything is ===")
    for k, v in summary["paths"].items():
        print(f"  {k:<13} {v}")
    print(f"  {'summary':<13} {w / 'demo_summary.json'}")
    print("timings (s): " + ", ".join(f"{k} {v}" for k, v in timings.items()))
    h = summary["heldout"]
    if h:
        chance = 1 / h["num_classes"] if h.get("num_classes") else float("nan")
        print(f"held-out style (Noto Color Emoji, {h['num_images']} images, never trained on): " + ", ".join(
            f"{k} {v:.3f}" for k, v in h.items() if k in HELDOUT_KEYS) + f" (zero-shot chance {chance:.3f})")
    return summary


def main(argv=None) -> int:
    cli = CLI(DemoConfig, prog="clipforge demo", description=__doc__.split("\n")[0],
              presets={"default": DemoConfig, "tiny": DemoConfig.tiny})
    return run_main(cli, argv, lambda cfg: run(cfg) and 0)


if __name__ == "__main__":
    sys.exit(main())
