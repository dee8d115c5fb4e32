"""`clipforge` — one command, a subcommand per stage. Each subcommand is also `python -m <module>`.

    clipforge sample-web OUT            render the offline sample image-text web      (pipeline.sampleweb)
    clipforge serve-web OUT             serve it on 127.0.0.1                         (pipeline.sampleweb)
    clipforge heldout OUT               the held-out eval set in another emoji style  (pipeline.heldout)
    clipforge crawl URLS CRAWL_DIR      img2dataset + Ray -> WebDataset shards        (pipeline.crawl)
    clipforge filter CRAWL_DIR OUT      keep/drop with a reason per row               (pipeline.filter)
    clipforge stats FILTER_DIR          counts by reason + histograms of a ledger     (pipeline.stats)
    clipforge shard FILTER_DIR OUT      training shards + manifest                    (pipeline.shard)
    clipforge train --shards D --out R  CLIP with DeepSpeed ZeRO                      (trainer.train)
    clipforge train-ray --num-workers N -- <train flags>   the same on Ray Train     (trainer.ray_launch)
    clipforge eval --checkpoint C ...   zero-shot, retrieval, linear probe            (trainer.evaluate)
    clipforge embed SHARDS --checkpoint C --out E   images + captions -> embedding dir   (indexing.embed)
    clipforge index EMBED_DIR --out I   FAISS index for a memory budget, tuned to recall (indexing.build)
    clipforge search "a red apple"      text -> image search                          (indexing.search)
    clipforge serve INDEX_DIR           HTTP search service + web page over an index  (indexing.serve)
    clipforge demo                      all of the above on the sample web            (pipeline.demo)

Only each stage's `main(argv)` is imported, and only when its subcommand runs.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "sample-web": ("pipeline.sampleweb", "main_build", "render the offline sample image-text web"),
    "serve-web": ("pipeline.sampleweb", "main_serve", "serve a sample web on 127.0.0.1"),
    "heldout": ("pipeline.heldout", "main", "render the held-out eval set (Noto Color Emoji, Unicode groups)"),
    "crawl": ("pipeline.crawl", "main", "download URL+caption lists with img2dataset on Ray"),
    "filter": ("pipeline.filter", "main", "basic rules + exact dedup, a reason for every drop"),
    "stats": ("pipeline.stats", "main", "counts by reason + histograms of a ledger"),
    "shard": ("pipeline.shard", "main", "write kept samples to WebDataset shards + manifest"),
    "train": ("trainer.train", "main", "train CLIP with DeepSpeed ZeRO"),
    "train-ray": ("trainer.ray_launch", "main", "the same training on Ray Train workers"),
    "eval": ("trainer.evaluate", "main", "zero-shot, retrieval and linear-probe evaluation"),
    "embed": ("indexing.embed", "main", "embed a shard dir's images + captions (Ray actor pool)"),
    "index": ("indexing.build", "main", "FAISS index chosen for a memory budget, tuned to measured recall"),
    "search": ("indexing.search", "main", "text-to-image search in an index"),
    "serve": ("indexing.serve", "main", "HTTP search service + web page over an index"),
    "demo": ("pipeline.demo", "main", "run every stage on the sample web"),
}


def usage() -> str:
    lines = ["usage: clipforge <command> [args]  (clipforge <command> -h for its options)", "", "commands:"]
    lines += [f"  {name:<11} {desc}" for name, (_, _, desc) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] not in COMMANDS:
        print(f"clipforge: unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module, fn, _ = COMMANDS[argv[0]]
    return getattr(importlib.import_module(module), fn)(argv[1:]) or 0


if __name__ == "__main__":
    raise SystemExit(main())
