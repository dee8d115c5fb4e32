"""Training data: an endless, deterministic, resumable WebDataset stream of (image, tokens) batches per rank.

Sources. `--shards` takes one or more directories, each either clipforge shards (manifest.json + *.tar, written
by pipeline/) or plain img2dataset output (*.tar with {key}.jpg/.txt/.json members and *_stats.json files).
Several sources are mixed by weight: the weight is the source's share of the samples drawn (default: its
sample count, i.e. every sample equally likely).

Order. One global, endless sequence of shard draws is defined by the seed alone (identical on every rank): each
draw picks a source by weight, then that source's next shard - from a fresh shuffle of its shards every round
(each shard once per round), or uniformly with replacement in resampled mode. The sequence is split across the
S = world * workers data slots shard by shard (slot s reads draws s, s + S, s + 2S, ...), so ranks and workers
read different shards, and any shard count works (even one shard shared by all). Each slot shuffles samples
through its own seeded buffer, decodes them with a per-sample seeded augmentation, and batches them.

Resume. A batch carries its slot's position at the moment it was made: the draw and sample offset reached, the
references (draw, index) of the samples still in the shuffle buffer, the buffer's RNG state and the number of
samples emitted. `TrainBatches.state_dict()` collects the position of every slot as of the last batch the
trainer consumed; `train_batches(..., state=...)` restarts each slot exactly there (it regenerates the shard
sequence, skips to the offset and re-reads the few buffered samples), so the resumed run sees the same batches
as an uninterrupted one. Batches that DataLoader workers had prefetched are simply produced again.

Deadlock-freedom: every slot's stream is endless, so every rank runs exactly the number of steps the trainer
fixes. Corrupt samples (undecodable image, missing caption, broken tar member, missing shard) are skipped and
counted; each batch carries the number skipped since the previous batch of its slot.
"""
from __future__ import annotations

import io
import logging
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from PIL import Image

from trainer.clip.formats.shards import IMAGE_EXTS, MANIFEST, ShardFormatError, count_tar_samples, image_ext, list_shards
from trainer.clip.tokenizer import tokenize
from trainer.clip.transform import TrainAugment, image_transform
from trainer.lifeline import worker_init

log = logging.getLogger("clipforge.trainer.data")


class DataError(ValueError):
    """The shard directory is missing, empty or yields no usable sample."""


@dataclass
class ShardSet:
    tars: list[str]  # absolute paths
    num_samples: int
    root: str = ""
    weight: float | None = None  # sampling weight among several sources; None -> num_samples
    missing_tars: int = 0  # listed in the manifest but not on disk (left out, reported)


def read_shards(shards_dir: str | Path, weight: float | None = None) -> ShardSet:
    """Tars and sample count of one source (any shard dir of trainer.clip.formats.shards: clipforge shards, whose
    listed-but-missing tars are left out and reported, or img2dataset output, counted where no _stats.json says).
    Raises DataError."""
    try:
        d = list_shards(shards_dir)
    except ShardFormatError as e:
        raise DataError(str(e)) from e
    present, missing = [], []
    for shard in d.shards:  # one stat per tar
        (present if shard.exists else missing).append(shard)
    if missing:  # train on the rest; the loss is reported (and an empty remainder is an error below)
        log.warning("%d of %d tars listed in %s are missing, e.g. %s", len(missing), len(d.shards),
                    d.root / MANIFEST, [str(s.tar) for s in missing[:3]])
    counts = [(str(s.tar), s.num_samples if s.num_samples is not None else count_tar_samples(s.tar))
              for s in present]
    tars = [t for t, n in counts if n > 0]
    num_samples = sum(n for _, n in counts)
    if not tars or num_samples <= 0:
        raise DataError(f"no samples in {d.root} ({len(tars)} tars, {num_samples} samples)")
    if weight is not None and weight <= 0:
        raise DataError(f"source weight must be > 0, got {weight} for {d.root}")
    return ShardSet(tars, num_samples, str(d.root), weight, missing_tars=len(missing))


def read_sources(dirs: list[str] | str, weights: list[float] | None = None) -> list[ShardSet]:
    """One ShardSet per directory (see read_shards), with optional weights (one per directory)."""
    dirs = [dirs] if isinstance(dirs, (str, Path)) else list(dirs)
    if weights and len(weights) != len(dirs):
        raise DataError(f"{len(weights)} weights given for {len(dirs)} shard dirs")
    return [read_shards(d, (weights or [None] * len(dirs))[i]) for i, d in enumerate(dirs)]


# ------------------------------------------------------------------------------------------------ shard order
def shard_sequence(sources: list[ShardSet], seed: int, resampled: bool = False):
    """The endless global sequence of shard paths (the same on every rank and worker for a given seed)."""
    rng = random.Random(f"clipforge-shards-{seed}")
    # a draw picks a source with probability ~ weight / mean samples per shard: the sample share follows weight
    probs = [(s.weight if s.weight is not None else s.num_samples) * len(s.tars) / s.num_samples for s in sources]
    orders = [list(s.tars) for s in sources]
    pos = [len(o) for o in orders]  # exhausted -> reshuffle on first use
    while True:
        i = rng.choices(range(len(sources)), weights=probs)[0] if len(sources) > 1 else 0
        if resampled:
            yield rng.choice(orders[i])
            continue
        if pos[i] == len(orders[i]):
            orders[i] = list(sources[i].tars)
            rng.shuffle(orders[i])
            pos[i] = 0
        pos[i] += 1
        yield orders[i][pos[i] - 1]


def slot_shards(sources, seed: int, resampled: bool, slot: int, num_slots: int, start: int = 0):
    """(draw index, shard path) of one data slot from its `start`-th draw on: global draws slot, slot+S, ..."""
    seq = islice(shard_sequence(sources, seed, resampled), slot + start * num_slots, None, num_slots)
    return enumerate(seq, start=start)


# ------------------------------------------------------------------------------------------------ one slot
class _SlotStream:
    """The batches of one data slot (one rank's worker): shard reading, shuffle buffer, decode, batch.

    Everything random is seeded by (seed, slot): the shard order (global), the buffer's picks (its own RNG) and
    each sample's augmentation (a fresh RNG per emitted sample, seeded by its running number).
    """

    def __init__(self, sources, slot: int, num_slots: int, seed: int, resampled: bool, shuffle_buffer: int,
                 transform, context_length: int, batch_size: int, state: dict | None = None):
        self.sources, self.slot, self.num_slots, self.seed = sources, slot, num_slots, seed
        self.resampled, self.bufsize = resampled, max(1, shuffle_buffer)
        self.transform, self.context_length, self.batch_size = transform, context_length, batch_size
        self.total_tars = sum(len(s.tars) for s in sources)
        self.max_failures = 2 * sum(s.num_samples for s in sources) + 100
        state = state or {}
        self.draw, self.offset = int(state.get("draw", 0)), int(state.get("offset", 0))  # next raw sample
        self.emitted = int(state.get("emitted", 0))  # samples handed to decode (seeds their augmentation)
        self.skipped = int(state.get("skipped", 0))  # skipped since the last batch
        self.rng = random.Random(f"clipforge-buffer-{seed}-{slot}")
        if "rng" in state:
            self.rng.setstate(_to_tuple(state["rng"]))
        self.buffer: list[tuple[tuple[int, int], dict]] = []  # ((draw, index in shard), raw sample)
        self._restore_buffer(state.get("buffer", []))

    # -- reading
    def _read_tar(self, url: str):
        def handler(exn):
            self.skipped += 1
            log.warning("skipping broken shard data in %s: %r", url, exn)
            return True

        return wds.tarfile_to_samples(handler=handler)(iter([{"url": url}]))

    def _restore_buffer(self, refs: list) -> None:
        wanted: dict[int, set[int]] = {}
        for draw, index in refs:
            wanted.setdefault(int(draw), set()).add(int(index))
        found = {}
        for draw, url in slot_shards(self.sources, self.seed, self.resampled, self.slot, self.num_slots):
            if draw > max(wanted, default=-1):
                break
            if draw in wanted:
                last = max(wanted[draw])
                for index, sample in enumerate(self._read_tar(url)):
                    if index in wanted[draw]:
                        found[(draw, index)] = sample
                    if index >= last:
                        break
        for draw, index in refs:
            if (int(draw), int(index)) in found:  # a shard that changed on disk since: the sample is lost, counted
                self.buffer.append(((int(draw), int(index)), found[(int(draw), int(index))]))
            else:
                self.skipped += 1

    def _raw(self):
        """Endless ((draw, index), sample) from this slot's shards, from the saved position on."""
        empty_run = 0
        for draw, url in slot_shards(self.sources, self.seed, self.resampled, self.slot, self.num_slots, self.draw):
            n = 0
            for index, sample in enumerate(self._read_tar(url)):
                if draw == self.draw and index < self.offset:
                    continue  # already consumed before the resume
                n += 1
                self.draw, self.offset = draw, index + 1
                yield (draw, index), sample
            self.draw, self.offset = draw + 1, 0
            empty_run = 0 if n else empty_run + 1
            if empty_run > self.total_tars:  # a full round's worth of shards gave nothing
                raise DataError(f"no sample could be read from {self.total_tars} shard(s)")

    def _shuffled(self):
        for item in self._raw():
            self.buffer.append(item)
            if len(self.buffer) >= self.bufsize:
                j = self.rng.randrange(len(self.buffer))
                self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
                yield self.buffer.pop()[1]

    def _decode(self, sample: dict):
        ext = image_ext(sample)
        if ext is None:
            raise KeyError(f"no image member (one of {IMAGE_EXTS})")
        caption = sample["txt"].decode("utf-8")
        rng = random.Random(f"clipforge-aug-{self.seed}-{self.slot}-{self.emitted}")
        with Image.open(io.BytesIO(sample[ext])) as img:
            img.load()
            image = self.transform(img, rng)  # [3, S, S]
        return image, tokenize(caption, self.context_length)[0]  # [ctx]

    def state(self) -> dict:
        return {"slot": self.slot, "draw": self.draw, "offset": self.offset, "emitted": self.emitted,
                "skipped": self.skipped, "rng": self.rng.getstate(), "buffer": [list(r) for r, _ in self.buffer]}

    def __iter__(self):
        images, tokens, failures = [], [], 0
        for sample in self._shuffled():
            try:
                image, tok = self._decode(sample)
            except Exception as exn:  # noqa: BLE001 - any broken sample is skipped and counted
                self.skipped += 1
                failures += 1
                log.warning("skipping sample %s from %s: %r", sample.get("__key__"), sample.get("__url__"), exn)
                if failures > self.max_failures:
                    raise DataError(f"{failures} consecutive undecodable samples; is the data broken?") from exn
                continue
            finally:
                self.emitted += 1
            failures = 0
            images.append(image)
            tokens.append(tok)
            if len(images) == self.batch_size:
                skipped, self.skipped = self.skipped, 0
                # [B,3,S,S], [B,ctx], int, the slot's position after this batch
                yield torch.stack(images), torch.stack(tokens), skipped, self.state()
                images, tokens = [], []


class _TrainTransform:
    """Picklable wrapper of trainer.clip.transform's training transform: (PIL image, rng) -> [3, S, S]."""

    def __init__(self, image_size: int, augment: TrainAugment):
        self.image_size, self.augment = image_size, augment

    def __call__(self, img, rng):
        return image_transform(self.image_size, train=True, augment=self.augment)(img, rng)


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ------------------------------------------------------------------------------------------------ one rank
class _RankDataset(torch.utils.data.IterableDataset):
    """This rank's slots; DataLoader worker j serves slot rank * W + (first + j) % W (W workers, at least 1).
    Plain attributes only, so it pickles under every multiprocessing start method."""

    def __init__(self, slot_args: tuple, rank: int, workers: int, first: int, states: dict):
        super().__init__()
        self.slot_args, self.rank, self.workers, self.first, self.states = slot_args, rank, workers, first, states

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        slot = self.rank * self.workers + (self.first + (info.id if info is not None else 0)) % self.workers
        sources, num_slots, *rest = self.slot_args
        return iter(_SlotStream(sources, slot, num_slots, *rest, state=self.states.get(slot)))


class TrainBatches:
    """Endless iterator of (images [B,3,S,S] float, tokens [B,ctx] long, skipped_since_last_batch int) for one
    rank; `state_dict()` is the position after the last batch returned (pass it back as `state` to resume)."""

    def __init__(self, sources, image_size, context_length, batch_size, seed, rank, world, workers, shuffle_buffer,
                 augment, resampled, state: dict | None, pin_memory: bool = False):
        self.key = {"seed": seed, "world": world, "workers": max(1, workers), "resampled": resampled,
                    "sources": [s.root for s in sources], "batch_size": batch_size}
        self.batches, self.slots = 0, {}
        if state is not None:
            if {k: state.get(k) for k in self.key} == self.key:
                self.batches, self.slots = int(state["batches"]), {int(k): v for k, v in state["slots"].items()}
            else:  # another world size / worker count / data: the old position does not map; no repeats though
                log.warning("data state was saved for %s, this run is %s: the data stream restarts at a new seed",
                            {k: state.get(k) for k in self.key}, self.key)
                seed = seed + 7919 * int(state.get("batches", 0)) + 1
        transform = _TrainTransform(image_size, augment or TrainAugment())
        slot_args = (sources, world * self.key["workers"], seed, resampled, shuffle_buffer, transform, context_length,
                     batch_size)
        dataset = _RankDataset(slot_args, rank, self.key["workers"], self.batches % self.key["workers"], self.slots)
        if workers <= 0:
            self._it = iter(dataset)
        else:
            # its own generator: the workers' base seed is not drawn from the global torch RNG, whose state belongs
            # to the training step (patch dropout) and is restored on resume (workers use no torch RNG anyway)
            # pin_memory (GPU runs): the loader's pin thread puts batches in page-locked memory, so the trainer's
            # .to(device, non_blocking=True) is an asynchronous DMA (what open_clip's loader does)
            loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True,
                                                 generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
                                                 worker_init_fn=worker_init)  # workers die with their rank
            self._it = iter(loader)

    def __iter__(self):
        return self

    def __next__(self):
        images, tokens, skipped, slot_state = next(self._it)
        self.slots[int(slot_state["slot"])] = slot_state
        self.batches += 1
        return images, tokens, int(skipped)

    def state_dict(self) -> dict:
        return {**self.key, "batches": self.batches, "slots": {str(k): v for k, v in self.slots.items()}}


def train_batches(
    shards: ShardSet | list[ShardSet], image_size: int, context_length: int, batch_size: int, seed: int = 0,
    rank: int = 0, world: int = 1, workers: int = 0, shuffle_buffer: int = 1000, augment: TrainAugment | None = None,
    resampled: bool = False, state: dict | None = None, pin_memory: bool = False,
) -> TrainBatches:
    """This rank's endless batch iterator over one source or several weighted sources (see the module doc).
    pin_memory (with workers > 0): batches arrive in page-locked host memory, for asynchronous copies to a GPU."""
    sources = [shards] if isinstance(shards, ShardSet) else list(shards)
    return TrainBatches(sources, image_size, context_length, batch_size, seed, rank, world, workers, shuffle_buffer,
                        augment, resampled, state, pin_memory=pin_memory)
