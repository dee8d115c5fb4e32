"""Build a FAISS text-to-image index from an EMBED_DIR: chosen for a memory budget, tuned to a measured recall.

    python -m indexing.build EMBED_DIR --out INDEX_DIR [--memory-budget 4GB] [--target-recall 0.95] [--k 10]
        [--factory auto] [--train-sample 0] [--add-batch 65536] [--tune-queries 1000] [--eval-queries 1000]
        [--device auto] [--on-disk] [--add] [--seed 0]

Reads EMBED_DIR (trainer.clip.formats.embeddings: embed.json, emb/img-XXXXX.npy memory-mapped, meta/XXXXX.parquet)
part by part: only `embedded` rows are indexed, vector id i = the i-th of them in part order = row i of the build's
metadata.parquet (all the meta parts' columns). Steps: choose the index (indexing.choose: Flat, HNSW32, IVF-Flat,
IVF-PQ with or without a refine, on disk beyond RAM; every decision with a reason) -> train it on a seeded random
sample gathered part by part -> add the vectors in --add-batch batches -> tune nprobe / efSearch /
quantizer_efSearch / k_factor_rf on caption text queries against streamed exact ground truth (indexing.tune) ->
report recall@1/10/100, QPS and latency on a disjoint held-out query set.

Writes a new build of INDEX_DIR (trainer.clip.formats.index): builds/<id>/{image.index, [image.ivfdata],
metadata.parquet, report.json, build.json}, then index.json (the atomic swap). A rerun writes another build and
swaps it in; the previous build stays openable until the next swap prunes it. `--add` appends the embed parts not
yet indexed as a new build (indexing.grow); existing vector ids never change. GPU (faiss-gpu, --device auto|cuda):
training, IVF adds and the ground truth run on GPU 0; the index is moved back to the CPU before it is written.
"""
from __future__ import annotations

import time

from indexing import grow
from indexing.builder import BuildError, Gpu, IndexConfig, base_info, choose_for, finish, log, make_index, \
    new_build_folder, query_sample, read_manifest
from indexing.tune import Collection
from trainer.clip.flags import CLI, run_main
from trainer.clip.formats.embeddings import EmbedFormatError
from trainer.clip.formats.index import META_FILE, IndexFormatError

__all__ = ["IndexConfig", "BuildError", "build", "add", "main"]


def build(cfg: IndexConfig) -> dict:
    """The whole stage (or --add: indexing.grow.add); returns the new index.json content plus "report"."""
    if cfg.add:
        return grow.add(cfg)
    t0 = time.time()
    embed_dir, manifest = read_manifest(cfg.embeddings)
    try:
        coll = Collection.from_embed_dir(embed_dir, manifest)
    except (EmbedFormatError, KeyError, ValueError) as e:
        raise BuildError(f"{embed_dir}: {e}") from e
    if coll.n == 0:
        raise BuildError(f"no embedded vectors in {embed_dir} ({len(coll.sources)} parts)")
    if manifest.get("failed"):
        log(f"warning: {len(manifest['failed'])} part(s) failed in `clipforge embed` and are not indexed "
            f"(rerun embed, then `--add`)")
    query_sample(cfg, coll.d)  # a bad --query-file fails now, not after the training
    choice = choose_for(cfg, coll)
    with new_build_folder(cfg.out) as (build_id, root):
        gpu = Gpu.open(cfg.device)
        index = grow.build_on_disk(cfg, coll, choice, root, gpu) if choice.on_disk else \
            make_index(cfg, coll, choice, gpu)
        base = base_info(embed_dir, manifest)
        grow.write_metadata(root / META_FILE, coll.sources, build_id, base["weights_sha256"], base["shards_dir"])
        return finish(cfg, index, coll, choice, root, build_id, base, t0, gpu)


def add(cfg: IndexConfig) -> dict:
    """`--add`: see indexing.grow.add."""
    return grow.add(cfg)


def summary(info: dict) -> int:
    held = info["report"].get("held_out", {})
    recall = ", ".join(f"{k}={held[k]}" for k in ("recall@1", "recall@10", "recall@100") if k in held)
    print(f"indexed {info['num_vectors']:,} vectors with {info['factory']} {info['search_params']}"
          f"{' (on disk)' if info.get('on_disk') else ''}; held-out {recall or 'not measured (no queries)'}; "
          f"{held.get('qps_batched', '-')} QPS batched, p50 {held.get('latency_ms_p50', '-')} ms; build "
          f"{info['build_id']} in {info['build_seconds']}s -> {info.get('out', '')}")
    for reason in info["choice"]["reasons"]:
        print(f"  - {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    cli = CLI(IndexConfig, prog="python -m indexing.build", description=__doc__.split("\n\n")[0],
              presets={"default": IndexConfig, "tiny": IndexConfig.tiny})
    # OSError: e.g. --out is a file or not writable
    return run_main(cli, argv, lambda cfg: summary({**build(cfg), "out": cfg.out}),
                    (BuildError, EmbedFormatError, IndexFormatError, OSError), prefix="indexing.build")


if __name__ == "__main__":
    raise SystemExit(main())
