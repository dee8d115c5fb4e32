"""The filter stage's CLIP-score step: the cosine of each candidate row's image and caption embeddings.

Reads, per crawl shard NNNNN, the features part `FILTER_DIR/_clipforge/features/part-NNNNN.parquet` (columns
part_row, caption, image_offset, image_size, reason) and the image bytes of its candidate rows (`reason` null and
`image_offset` not null), read straight from the crawl tar at image_offset / image_size (no tar parsing).

Writes, per part, each file atomically and in this order:
    FILTER_DIR/emb/img-NNNNN.npy, emb/txt-NNNNN.npy    [rows of the features part, D] L2-normalised embeddings in
                                                       clip_embedding_dtype, zero rows where nothing was scored
                                                       (only with clip_save_embeddings)
    FILTER_DIR/_clipforge/scores/part-NNNNN.parquet    part_row int32, clip_score float32 (null: the image did not
                                                       decode), one row per candidate row; its schema metadata
                                                       holds the weights sha256 and the input fingerprint. It is
                                                       the part's completion marker, so it is removed before a
                                                       part is recomputed and written last.
and, once the parts are done, FILTER_DIR/emb/info.json = {"checkpoint", "weights_sha256", "dim", "dtype"}.

Rerun: a part whose scores parquet carries the same weights sha256, the same fingerprint of its input rows
(candidate rows, captions, offsets, the crawl tar's size) and the same embedding setting, with its npy files in
place, is reused; anything else is recomputed. The reuse check runs in the actors, which load the model only
when a part needs it.

Distribution: a pool of Ray actors (raykit.actors), each loading the model once (one GPU each when the cluster
has GPUs, else `clip_cpus_per_actor` CPUs and as many torch threads), each batch's images read and decoded ahead
while the model runs (trainer.clip.encode.BatchEncoder). The driver keeps two parts in flight per actor, retries a
part whose actor raised or died (recreating dead actors, killing one stuck past the task timeout) up to
`max_shard_retry` times, and reports a part that failed every attempt instead of raising. Actors write the files;
the driver only sees small per-part counts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raykit.actors import actor_plan, run_actors
from raykit.config import DistributeConfig
from trainer.clip.encode import LazyEncoder
from trainer.clip.encode import load_image_at as load_image  # noqa: F401 -- this module's name for it
from trainer.clip.flags import opt, require
from trainer.clip.formats.atomic import atomic_open, atomic_write, atomic_write_json
from trainer.clip.formats.ledger import EMB_DIR, WORK_DIR, embedding_paths, part_name

CLIP_MODES = ("off", "threshold", "top_fraction")
CLIP_DEVICES = ("auto", "cpu", "cuda")
EMBEDDING_DTYPES = ("float16", "float32")
SCORES_DIR = "scores"
SCORES_SCHEMA = pa.schema([("part_row", pa.int32()), ("clip_score", pa.float32())])
FEATURE_COLUMNS = ("part_row", "caption", "image_offset", "image_size", "reason")
FAULT_ENV = "CLIPFORGE_CLIPSCORE_FAULT"  # tests: "die:SHARD" (the first attempt's actor dies) | "raise:SHARD"


@dataclass
class ClipScoreConfig:
    """CLIP score: image-caption cosine of a CLIP model (off unless --clip-checkpoint is given)."""
    clip_checkpoint: str = opt("", help="CLIP checkpoint scoring image-caption pairs: a clipforge dir or an "
                                        "OpenAI / open_clip / HF weights file or dir (empty: CLIP score off)")
    clip_mode: str = opt("off", choices=CLIP_MODES,
                         help="threshold: drop scores below --clip-threshold; top_fraction: keep the best "
                              "--clip-top-fraction of the scored rows; off: drop nothing (scores and embeddings "
                              "are still computed with --clip-checkpoint, e.g. for --semantic-dup)")
    clip_threshold: float = opt(0.28, help="minimum cosine (0.28 is LAION's, on the ViT-B/32 scale)")
    clip_top_fraction: float = opt(0.3, help="fraction of scored rows kept in top_fraction mode (DataComp: 0.3)")
    clip_batch_size: int = opt(256, help="image-caption pairs per forward pass")
    clip_actors: int = opt(0, help="scoring actors (0: one per GPU when the cluster has GPUs, else cluster CPUs "
                                   "// --clip-cpus-per-actor)")
    clip_cpus_per_actor: float = opt(1.0, help="Ray CPUs per actor: its torch threads and image-decode threads "
                                               "(give GPU actors several)")
    clip_device: str = opt("auto", choices=CLIP_DEVICES, help="auto: CUDA when the cluster has GPUs, else CPU")
    clip_save_embeddings: bool = opt(True, help="keep the image and caption embeddings (emb/*.npy, for semantic "
                                                "dedup and the indexer)")
    clip_embedding_dtype: str = opt("float16", choices=EMBEDDING_DTYPES, help="dtype of the saved embeddings")

    def __post_init__(self):
        require(self, "clip_mode", self.clip_mode in CLIP_MODES, f"must be one of {', '.join(CLIP_MODES)}")
        require(self, "clip_threshold", -1.0 <= self.clip_threshold <= 1.0, "must be in [-1, 1] (a cosine)")
        require(self, "clip_top_fraction", 0.0 < self.clip_top_fraction <= 1.0, "must be in (0, 1]")
        require(self, "clip_batch_size", self.clip_batch_size >= 1, "must be >= 1")
        require(self, "clip_actors", self.clip_actors >= 0, "must be >= 0")
        require(self, "clip_cpus_per_actor", self.clip_cpus_per_actor > 0, "must be > 0")
        require(self, "clip_device", self.clip_device in CLIP_DEVICES, f"must be one of {', '.join(CLIP_DEVICES)}")
        require(self, "clip_embedding_dtype", self.clip_embedding_dtype in EMBEDDING_DTYPES,
                f"must be one of {', '.join(EMBEDDING_DTYPES)}")

    @property
    def enabled(self) -> bool:
        return bool(self.clip_checkpoint)

    @property
    def embeddings(self) -> str:
        """What the parts' npy files hold: the dtype, or "" when embeddings are not saved (part of the reuse key)."""
        return self.clip_embedding_dtype if self.clip_save_embeddings else ""


@dataclass(frozen=True)
class ScoreJob:
    shard_id: int
    crawl_tar: str  # absolute path of the crawl tar
    features: str  # absolute path of the features parquet


def scores_path(filter_dir: str | Path, shard_id: int) -> Path:
    return Path(filter_dir) / WORK_DIR / SCORES_DIR / f"{part_name(shard_id)}.parquet"


def info_path(filter_dir: str | Path) -> Path:
    return Path(filter_dir) / EMB_DIR / "info.json"


# ------------------------------------------------------------------------------------------------ one part's input
@dataclass
class PartInput:
    """The candidate rows of one features part (arrays aligned with `rows`)."""
    n: int  # rows of the features part
    rows: np.ndarray  # int64 part_row of each candidate
    offsets: np.ndarray  # int64 byte offset of the image data in the crawl tar
    sizes: np.ndarray  # int64 image size (-1: unknown)
    captions: list[str]
    fingerprint: str  # sha256 of everything above and the crawl tar's name and size


def read_part(job: ScoreJob) -> PartInput:
    """The features part's candidate rows. ValueError when a column is missing or part_row is not 0..n-1."""
    names = pq.read_schema(job.features).names
    missing = [c for c in FEATURE_COLUMNS if c not in names]
    if missing:
        raise ValueError(f"{job.features}: no column(s) {', '.join(missing)}")
    t = pq.read_table(job.features, columns=list(FEATURE_COLUMNS))
    part_row = t.column("part_row").to_numpy(zero_copy_only=False)
    if not np.array_equal(part_row, np.arange(t.num_rows)):
        raise ValueError(f"{job.features}: part_row is not 0..{t.num_rows - 1} in row order")
    cand = t.filter(pc.and_(pc.is_null(t.column("reason")), pc.is_valid(t.column("image_offset"))))
    rows = cand.column("part_row").to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = cand.column("image_offset").to_numpy(zero_copy_only=False).astype(np.int64)
    sizes = pc.fill_null(cand.column("image_size"), -1).to_numpy(zero_copy_only=False).astype(np.int64)
    captions = [c if isinstance(c, str) else "" for c in cand.column("caption").to_pylist()]
    digest = hashlib.sha256(f"{Path(job.crawl_tar).name}\0{_file_size(job.crawl_tar)}\0{t.num_rows}\0".encode())
    for a in (rows, offsets, sizes):
        digest.update(a.tobytes())
    digest.update("\0".join(captions).encode("utf-8", "surrogatepass"))
    return PartInput(t.num_rows, rows, offsets, sizes, captions, digest.hexdigest())


def _file_size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return -1


def reusable(filter_dir: str | Path, job: ScoreJob, part: PartInput, weights_sha256: str, embeddings: str):
    """The counts of a part already done with this model, input and embedding setting, else None."""
    path = scores_path(filter_dir, job.shard_id)
    if not path.exists():
        return None
    try:
        meta = {k.decode(): v.decode() for k, v in (pq.read_schema(path).metadata or {}).items()}
    except (OSError, pa.ArrowException):
        return None
    want = {"weights_sha256": weights_sha256, "input_sha256": part.fingerprint, "embeddings": embeddings}
    if any(meta.get(k) != v for k, v in want.items()):
        return None
    try:
        dim, scored, decode_failed = int(meta["dim"]), int(meta["scored"]), int(meta["decode_failed"])
    except (KeyError, ValueError):
        return None
    if embeddings:
        for npy in embedding_paths(filter_dir, job.shard_id):
            try:
                a = np.load(npy, mmap_mode="r")
            except (OSError, ValueError):
                return None
            if a.shape != (part.n, dim) or a.dtype != np.dtype(embeddings):
                return None
    return {"rows": part.n, "scored": scored, "decode_failed": decode_failed, "dim": dim}


def _fault(job: ScoreJob, attempt: int) -> None:
    """Tests: FAULT_ENV "die:N" kills the actor on part N's first attempt; "raise:N" fails every attempt."""
    kind, _, shard = os.environ.get(FAULT_ENV, "").partition(":")
    if shard != str(job.shard_id):
        return
    if kind == "die" and attempt == 1:
        os._exit(137)
    if kind == "raise":
        raise RuntimeError(f"injected failure of part {job.shard_id} ({FAULT_ENV})")


# ------------------------------------------------------------------------------------------------ the actor
class PartScorer:
    """Scores whole parts with one model (a Ray actor in score_parts; usable directly in one process)."""

    def __init__(self, cfg: ClipScoreConfig, weights_sha256: str, cpus: float = 1.0, device: str = "cpu"):
        self.cfg, self.weights_sha256, self.device = cfg, weights_sha256, device
        self.model = LazyEncoder(cfg.clip_checkpoint, device, cfg.clip_batch_size, max(1, int(cpus)))

    def score(self, filter_dir: str, job: ScoreJob, attempt: int = 1) -> dict:
        """Score one part (or reuse it). -> {"rows", "scored", "decode_failed", "dim", "reused", "seconds",
        "actor"}."""
        _fault(job, attempt)
        t0 = time.monotonic()
        part = read_part(job)
        done = reusable(filter_dir, job, part, self.weights_sha256, self.cfg.embeddings)
        if done is not None:
            return {**done, "reused": True, "seconds": time.monotonic() - t0, "actor": os.getpid()}
        self.model.get()  # loaded before the old files go
        scores_path(filter_dir, job.shard_id).unlink(missing_ok=True)  # the old completion marker goes first
        if not self.cfg.clip_save_embeddings:  # no stale embeddings of another model next to the new scores
            for npy in embedding_paths(filter_dir, job.shard_id):
                npy.unlink(missing_ok=True)
        img, txt, scores = self._embed(job, part)
        stats = {"rows": part.n, "scored": int(np.count_nonzero(~np.isnan(scores))), "dim": self.model.dim}
        stats["decode_failed"] = len(scores) - stats["scored"]
        self._write(filter_dir, job, part, img, txt, scores, stats)
        return {**stats, "reused": False, "seconds": time.monotonic() - t0, "actor": os.getpid()}

    def _embed(self, job: ScoreJob, part: PartInput):
        """-> (image emb [n, D] | None, text emb [n, D] | None, float32 scores per candidate, NaN = no image)."""
        dtype = self.cfg.clip_embedding_dtype
        img = np.zeros((part.n, self.model.dim), dtype) if self.cfg.clip_save_embeddings else None
        txt = np.zeros((part.n, self.model.dim), dtype) if self.cfg.clip_save_embeddings else None
        scores = np.full(len(part.rows), np.nan, np.float32)
        for idx, fi, ft in self.model.get().encode(job.crawl_tar, part.offsets, part.sizes, part.captions):
            scores[idx] = np.einsum("bd,bd->b", fi, ft)
            if img is not None:
                img[part.rows[idx]], txt[part.rows[idx]] = fi, ft
        return img, txt, scores

    def _write(self, filter_dir: str, job: ScoreJob, part: PartInput, img, txt, scores, stats: dict) -> None:
        """The npy files, then the scores parquet (the completion marker), each atomically."""
        if img is not None:
            for path, emb in zip(embedding_paths(filter_dir, job.shard_id), (img, txt)):
                with atomic_open(path, "wb") as f:
                    np.save(f, emb)
        meta = {"weights_sha256": self.weights_sha256, "input_sha256": part.fingerprint,
                "embeddings": self.cfg.embeddings, "checkpoint": self.cfg.clip_checkpoint, **stats}
        schema = SCORES_SCHEMA.with_metadata({k: str(v) for k, v in meta.items()})
        table = pa.Table.from_arrays([pa.array(part.rows, pa.int32()),
                                      pa.array(scores, pa.float32(), mask=np.isnan(scores))], schema=schema)
        atomic_write(scores_path(filter_dir, job.shard_id), lambda tmp: pq.write_table(table, tmp))


# ------------------------------------------------------------------------------------------------ the driver
def _summary(sha: str, results: dict, failed: dict, n_actors: int, seconds: float) -> dict:
    computed = sum(r["scored"] for r in results.values() if not r["reused"])
    by_actor: dict[str, int] = {}
    for r in results.values():
        by_actor[str(r["actor"])] = by_actor.get(str(r["actor"]), 0) + 1
    return {"scored": sum(r["scored"] for r in results.values()),
            "decode_failed": sum(r["decode_failed"] for r in results.values()),
            "computed": computed, "parts": len(results), "reused": sum(r["reused"] for r in results.values()),
            "images_per_s": computed / seconds if seconds > 0 else 0.0, "seconds": seconds,
            "failed": failed, "weights_sha256": sha,
            "dim": next((r["dim"] for r in results.values()), None), "actors": n_actors, "parts_by_actor": by_actor}


def score_parts(cfg: ClipScoreConfig, filter_dir: str, jobs: list[ScoreJob], distribute: DistributeConfig) -> dict:
    """Score (or reuse) every job's part on a Ray actor pool (Ray must be initialised). -> {"scored": rows with a
    score in the parts now complete, "decode_failed", "computed": rows scored by this run, "parts": parts
    complete, "reused": parts reused, "images_per_s" (this run's), "seconds", "failed": {shard_id: cause},
    "weights_sha256", "dim" (None when no part completed), "actors", "parts_by_actor": {actor pid: parts}}."""
    from trainer.clip.checkpoint import weights_sha256

    if not cfg.enabled:
        raise ValueError("score_parts: CLIP score is off (no --clip-checkpoint)")
    sha, t0 = weights_sha256(cfg.clip_checkpoint), time.monotonic()
    cfg = dataclasses.replace(cfg, clip_checkpoint=os.path.abspath(cfg.clip_checkpoint))  # actors' cwd may differ
    filter_dir = os.path.abspath(filter_dir)
    if not jobs:
        return _summary(sha, {}, {}, 0, 0.0)
    n, gpu = actor_plan(len(jobs), cfg.clip_actors, cfg.clip_cpus_per_actor, cfg.clip_device, "--clip-", "clipscore")
    fault = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}} if os.environ.get(FAULT_ENV) else None  # tests
    results, failed = run_actors(PartScorer, (cfg, sha, cfg.clip_cpus_per_actor, "cuda" if gpu else "cpu"), jobs,
                                 distribute, method="score", args=(filter_dir,), n_actors=n, gpu=gpu,
                                 cpus_per_actor=cfg.clip_cpus_per_actor, label=lambda job: job.shard_id,
                                 name="clipscore", count=lambda r: 0 if r["reused"] else r["scored"], verb="scored",
                                 runtime_env=fault)
    features = {job.shard_id: job.features for job in jobs}
    failed = {sid: {"features": features[sid], **cause} for sid, cause in failed.items()}
    out = _summary(sha, results, failed, n, time.monotonic() - t0)
    if cfg.clip_save_embeddings and out["dim"] is not None:
        atomic_write_json(info_path(filter_dir), {"checkpoint": cfg.clip_checkpoint,
                                                  "weights_sha256": sha, "dim": out["dim"],
                                                  "dtype": cfg.clip_embedding_dtype})
    return out
