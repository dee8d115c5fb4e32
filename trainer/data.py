"""Training data: an endless WebDataset stream of (image, tokens) batches per rank.

Deadlock-freedom: every rank draws shards with replacement from its own seeded stream (seed, rank, worker), so
the stream never ends and every rank runs exactly the same number of steps (fixed by the trainer from the
manifest's sample count). Works with any number of shards, including one shard shared by several ranks.
Corrupt samples (undecodable image, missing caption, broken tar member) are skipped and counted; each batch
carries the number skipped since the previous batch so counts survive DataLoader worker processes.
"""
from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from trainer.tokenizer import tokenize
from trainer.transform import TrainAugment, image_transform

log = logging.getLogger("clipforge.trainer.data")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class DataError(ValueError):
    """The shard directory is missing, empty or yields no usable sample."""


@dataclass
class ShardSet:
    tars: list[str]  # absolute paths
    num_samples: int


def count_tar_samples(path: str | Path) -> int:
    """Number of distinct sample keys with an image member (used when there is no manifest)."""
    keys = set()
    with tarfile.open(path) as tf:
        for member in tf:
            key, _, ext = member.name.rpartition(".")
            if member.isfile() and ext.lower() in IMAGE_EXTS:
                keys.add(key)
    return len(keys)


def read_shards(shards_dir: str | Path) -> ShardSet:
    """Tars and sample count from SHARDS_DIR/manifest.json (fallback: *.tar, counted). Raises DataError."""
    root = Path(shards_dir)
    if not root.is_dir():
        raise DataError(f"shard dir not found: {root}")
    manifest = root / "manifest.json"
    if manifest.is_file():
        try:
            m = json.loads(manifest.read_text(encoding="utf-8"))
            tars = [str((root / s["tar"]).resolve()) for s in m["shards"] if int(s.get("num_samples", 1)) > 0]
            num_samples = int(m["num_samples"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"invalid manifest {manifest}: {e}") from e
        missing = [t for t in tars if not Path(t).is_file()]
        if missing:
            raise DataError(f"manifest lists missing tars: {missing[:3]}")
    else:
        tars = [str(p.resolve()) for p in sorted(root.glob("*.tar"))]
        num_samples = sum(count_tar_samples(t) for t in tars)
    if not tars or num_samples <= 0:
        raise DataError(f"no samples in {root} ({len(tars)} tars, {num_samples} samples)")
    return ShardSet(tars, num_samples)


class _Stats:
    """Per-process counters shared by the stages of one pipeline."""

    def __init__(self):
        self.skipped = 0  # skipped since the last batch was emitted
        self.raw = 0  # raw samples ever read from the tars

    def handler(self, exn: Exception) -> bool:  # webdataset handler: count, warn, continue
        self.skipped += 1
        log.warning("skipping broken shard data: %r", exn)
        return True


def _worker_id() -> int:
    info = torch.utils.data.get_worker_info()
    return info.id if info is not None else 0


def _shard_stream(tars: list[str], seed: int, rank: int, stats: _Stats):
    """Endless {"url": tar} dicts: shuffled rounds over all tars, seeded by (seed, rank, worker)."""

    def stage():
        rng = random.Random(f"{seed}-{rank}-{_worker_id()}")
        order = list(tars)
        while True:
            raw_before = stats.raw
            rng.shuffle(order)
            for url in order:
                yield {"url": url}
            if stats.raw == raw_before:  # a whole round of shards produced no sample at all
                raise DataError(f"no sample could be read from {len(tars)} shard(s)")

    return stage


def _count_raw(stats: _Stats):
    def stage(src):
        for sample in src:
            stats.raw += 1
            yield sample

    return stage


def _decode(transform, context_length: int, stats: _Stats, max_consecutive_failures: int):
    def stage(src):
        failures = 0
        for sample in src:
            try:
                ext = next(e for e in IMAGE_EXTS if e in sample)
                caption = sample["txt"].decode("utf-8")
                with Image.open(io.BytesIO(sample[ext])) as img:
                    img.load()
                    image = transform(img)  # [3, S, S]
                tokens = tokenize(caption, context_length)[0]  # [ctx]
            except Exception as exn:  # noqa: BLE001 - any broken sample is skipped and counted
                stats.skipped += 1
                failures += 1
                log.warning("skipping sample %s from %s: %r", sample.get("__key__"), sample.get("__url__"), exn)
                if failures > max_consecutive_failures:
                    raise DataError(f"{failures} consecutive undecodable samples; is the data broken?") from exn
                continue
            failures = 0
            yield image, tokens

    return stage


def _batch(batch_size: int, stats: _Stats):
    def stage(src):
        images, tokens = [], []
        for image, tok in src:
            images.append(image)
            tokens.append(tok)
            if len(images) == batch_size:
                skipped, stats.skipped = stats.skipped, 0
                yield torch.stack(images), torch.stack(tokens), skipped  # [B,3,S,S], [B,ctx], int
                images, tokens = [], []

    return stage


def make_pipeline(
    shards: ShardSet, image_size: int, context_length: int, batch_size: int, seed: int = 0, rank: int = 0,
    shuffle_buffer: int = 1000, augment: TrainAugment | None = None,
) -> wds.DataPipeline:
    stats = _Stats()
    return wds.DataPipeline(
        _shard_stream(shards.tars, seed, rank, stats),
        wds.tarfile_to_samples(handler=stats.handler),
        _count_raw(stats),
        wds.shuffle(shuffle_buffer, initial=min(100, shuffle_buffer), rng=random.Random(f"shuffle-{seed}-{rank}")),
        _decode(image_transform(image_size, train=True, augment=augment), context_length, stats, 2 * shards.num_samples + 100),
        _batch(batch_size, stats),
    )


def train_batches(
    shards: ShardSet, image_size: int, context_length: int, batch_size: int, seed: int = 0, rank: int = 0,
    workers: int = 0, shuffle_buffer: int = 1000, augment: TrainAugment | None = None,
):
    """Endless iterator of (images [B,3,S,S] float, tokens [B,ctx] long, skipped_since_last_batch int)."""
    pipeline = make_pipeline(shards, image_size, context_length, batch_size, seed, rank, shuffle_buffer, augment)
    if workers <= 0:
        return iter(pipeline)
    loader = wds.WebLoader(pipeline, batch_size=None, num_workers=workers, persistent_workers=True)
    return iter(loader)
