"""The on-disk contracts between clipforge's stages; every stage reads and writes them through these modules.

    atomic     how any contract file is written: temp file in the same dir, fsync, os.replace, fsync of the dir
    crawl      CRAWL_DIR: img2dataset's {id}.tar / .parquet / _stats.json + _clipforge/crawl_manifest.json
    ledger     FILTER_DIR: ledger/part-NNNNN.parquet (every crawled row, every decision), emb/, terms.parquet,
               filter_manifest.json
    shards     SHARDS_DIR: manifest.json + shard-XXXXX.tar / .parquet, img2dataset dirs, the member-name rule
    embeddings EMBED_DIR: emb/img|txt-XXXXX.npy (row-aligned with meta/XXXXX.parquet) + embed.json
    index      INDEX_DIR: builds/<id>/{image.index (FAISS), metadata.parquet, report.json} + index.json (the swap)

Model checkpoints (DIR/model.safetensors + config.json) are trainer.clip.checkpoint's. Nothing here imports
torch, deepspeed or ray.
"""
