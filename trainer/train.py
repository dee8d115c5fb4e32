"""Train a CLIP on clipforge shards with DeepSpeed ZeRO (data parallel, CPU/gloo or GPU/nccl).

    python -m trainer.train --shards SHARDS_DIR --out RUN_DIR --model tiny --steps 20 --batch-size 16 --nproc 2

With --nproc N > 1 (and not already inside a launched rank) the command re-launches itself on N local ranks with
torch.distributed.run; every rank then builds the same model, draws its own endless shard stream and runs exactly
the same number of steps. Rank 0 writes RUN_DIR/{train_config.json, ds_config.json, metrics.jsonl, summary.json,
checkpoint/}. DeepSpeed is only touched through trainer.engine.

The DeepSpeed engine wraps a TrainModule (the CLIP model + the loss module, so loss-side parameters such as
SigLIP's logit_bias are optimised and ZeRO-partitioned like the model's; the saved checkpoint holds the CLIP
alone, loss parameters go to RUN_DIR/loss_state.json). One optimizer step is `train_step`: with --grad-accum N it
is contrastive-aware (negatives = the whole accumulated batch on all ranks, see trainer.loss).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer import resume
from trainer.clip.checkpoint import export_open_clip, save_model
from trainer.clip.formats.atomic import atomic_write_text
from trainer.clip.ports import free_port
from trainer.data import DataError, read_sources, train_batches
from trainer.loss import LOSSES, SIGLIP_INIT_LOGIT_SCALE, ContrastiveLoss, FeatureCache, make_loss
from trainer.clip.model import CLIP, get_config
from trainer.monitor import flops_per_sample, make_monitor
from trainer.parallel import POLICIES, apply_activation_checkpointing, compile_blocks, frozen_batchnorm_stats
from trainer.clip.transform import TrainAugment


@dataclass
class TrainConfig:
    shards: list[str] = field(default_factory=list)  # one or more shard dirs (clipforge or img2dataset output)
    shard_weights: list[float] | None = None  # sample share of each shard dir (default: its sample count)
    resampled: bool = False  # draw shards with replacement (multi-node default in open_clip) instead of rounds
    out: str = ""
    model: str = "ViT-B-32"
    epochs: int = 1  # used when steps == 0
    steps: int = 0  # optimizer steps; 0 -> epochs * ceil(num_samples / global batch)
    batch_size: int = 256  # per rank, per micro step
    grad_accum: int = 1  # micro-batches per optimizer step; contrastive-aware (negatives = all of them)
    loss: str = "clip"  # clip (softmax, learnable temperature) | siglip (sigmoid, + learnable bias)
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = 2000  # steps
    grad_clip: float = 1.0
    nproc: int = 1
    zero: int = 2
    grad_checkpointing: bool = True
    offload_activations: bool = False  # checkpointed blocks' inputs wait for backward in (pinned) host memory
    checkpoint_chunks: int = 1  # recompute each transformer block in this many batch chunks (less peak memory)
    checkpoint_policy: str = "full"  # full: keep block inputs only; selective: keep matmul outputs too (faster)
    checkpoint_group: int = 1  # checkpoint transformer blocks this many at a time (fewer kept inputs)
    compile: bool = False  # torch.compile each transformer block (trainer.parallel.compile_blocks)
    precision: str = "auto"  # auto -> bf16 on GPU, fp32 on CPU; fp16 (dynamic loss scaling) needs a GPU
    loss_scale_power: int = 16  # fp16: dynamic loss scaling starts at 2**N (halved on overflow, doubled when stable)
    seed: int = 0
    workers: int = 0
    shuffle_buffer: int = 1000
    aug_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: fraction of the image area kept
    patch_dropout: float = 0.0  # FLIP: fraction of ViT patch tokens dropped in training (0.5 ~ 2x faster)
    log_every: int = 10
    ds_shm_comm: bool = False  # DeepSpeed's JIT-built CPU shm allreduce (first use compiles ~1 min)
    save_every: int = 0  # optimizer steps between checkpoints (0: off)
    save_every_minutes: float = 0.0  # wall minutes between checkpoints, checked at log steps (0: off)
    keep_last: int = 2  # complete checkpoints kept in RUN_DIR/checkpoints
    resume: str = ""  # "latest" (start fresh if there is none yet) or a checkpoint dir
    eval_retrieval: str = ""  # held-out shard dir: image<->text recall@1/5/10 (trainer.evaluate)
    eval_zeroshot: str = ""  # labelled shard dir or ImageFolder dir: zero-shot top-1/top-5
    eval_classes: str = ""  # classes file {"classnames": [...], "templates": [...]} for --eval-zeroshot
    eval_every: int = 0  # optimizer steps between evaluations (0: only at the end, if eval data is given)
    eval_batch_size: int = 64

    def __post_init__(self):
        if isinstance(self.shards, (str, Path)):
            self.shards = [str(self.shards)]
        self.shards = [str(s) for s in self.shards]

    @property
    def checkpointing(self) -> bool:
        return self.save_every > 0 or self.save_every_minutes > 0

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        base = dict(model="tiny", steps=10, batch_size=8, lr=1e-3, warmup=2, log_every=1, shuffle_buffer=64)
        return cls(**{**base, **overrides})


PRESETS = {"default": TrainConfig, "tiny": TrainConfig.tiny}


def parse_args(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, nargs="+",
                   help="shard dir(s): clipforge shards (manifest.json + *.tar) or plain img2dataset output")
    p.add_argument("--shard-weights", type=float, nargs="+",
                   help="sample share of each --shards dir (default: proportional to its sample count)")
    p.add_argument("--resampled", action=argparse.BooleanOptionalAction, default=None,
                   help="draw shards with replacement instead of one shuffled round after another")
    p.add_argument("--out", required=True, help="run dir (checkpoint/, metrics.jsonl, summary.json, ...)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="base values; flags override")
    p.add_argument("--model", help="model preset name (trainer.clip.model.PRESETS)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--epochs", type=int)
    g.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="per-rank micro batch")
    p.add_argument("--grad-accum", type=int,
                   help="micro-batches per optimizer step (contrastive-aware: features of all micro-batches are "
                        "cached without grad, each is re-run with grad against all of them)")
    p.add_argument("--loss", choices=list(LOSSES), help="clip (default) or siglip (sigmoid loss, learnable bias)")
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--nproc", type=int)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--offload-activations", action=argparse.BooleanOptionalAction, default=None,
                   help="with --grad-checkpointing: keep each block's input in host memory until backward")
    p.add_argument("--checkpoint-policy", choices=list(POLICIES),
                   help="with --grad-checkpointing: 'full' (default) recomputes each block in backward; 'selective' "
                        "keeps its matmul/attention outputs and recomputes only element-wise ops (no matmul runs "
                        "twice: faster, more memory)")
    p.add_argument("--checkpoint-group", type=int,
                   help="with --grad-checkpointing: checkpoint transformer blocks K at a time, keeping 1/K of the "
                        "block inputs (default 1)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile every transformer block (fused element-wise kernels; the first steps "
                        "compile); not with --zero 3 or --offload-activations")
    p.add_argument("--checkpoint-chunks", type=int,
                   help="with --grad-checkpointing: checkpoint each transformer block in K batch chunks, so the "
                        "block recomputed in backward holds 1/K of the batch (default 1)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--loss-scale-power", type=int,
                   help="with --precision fp16: the dynamic loss scale starts at 2**N (default 16); DeepSpeed skips "
                        "a step whose gradients overflow and halves the scale, and doubles it after 1000 clean steps")
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--shuffle-buffer", type=int)
    p.add_argument("--patch-dropout", type=float, help="FLIP patch dropout rate for ViT towers (default 0)")
    p.add_argument("--aug-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random resized crop area range (default 0.9 1.0; 1 1 = centre-ish square crops only)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--ds-shm-comm", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--save-every", type=int, help="checkpoint every N optimizer steps (default 0: off)")
    p.add_argument("--save-every-minutes", type=float, help="checkpoint every M minutes (checked at log steps)")
    p.add_argument("--keep-last", type=int, help="complete checkpoints to keep (default 2)")
    p.add_argument("--eval-retrieval", help="held-out shard dir: image<->text recall@1/5/10 during training")
    p.add_argument("--eval-zeroshot", help="labelled shard dir or ImageFolder: zero-shot top-1/5 during training")
    p.add_argument("--eval-classes", help="classes JSON {classnames, templates} for --eval-zeroshot")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps on all ranks (default 0: at the end only)")
    p.add_argument("--eval-batch-size", type=int)
    p.add_argument("--resume", help="'latest' (newest checkpoint in OUT/checkpoints; a fresh start if none) or a "
                                    "checkpoint dir: weights, optimizer, schedule, data position and RNG states")
    args = vars(p.parse_args(argv))
    preset = args.pop("preset")
    overrides = {k: v for k, v in args.items() if v is not None}
    if "epochs" in overrides:
        overrides.setdefault("steps", 0)
    return PRESETS[preset](**overrides)


def validate(cfg: TrainConfig) -> None:
    get_config(cfg.model)  # KeyError on unknown model
    for name in ("batch_size", "grad_accum", "nproc", "log_every", "checkpoint_chunks", "checkpoint_group"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.steps < 0 or (cfg.steps == 0 and cfg.epochs < 1):
        raise ValueError("need --steps >= 1 or --epochs >= 1")
    if cfg.checkpoint_policy not in POLICIES:
        raise ValueError(f"--checkpoint-policy must be one of {', '.join(POLICIES)}, got {cfg.checkpoint_policy!r}")
    if (cfg.offload_activations or cfg.checkpoint_chunks > 1 or cfg.checkpoint_group > 1
            or cfg.checkpoint_policy != "full") and not cfg.grad_checkpointing:
        raise ValueError("--offload-activations, --checkpoint-chunks, --checkpoint-group and --checkpoint-policy "
                         "apply to checkpointed blocks: they need --grad-checkpointing")
    if cfg.compile and cfg.checkpoint_group > 1:
        raise ValueError("--compile works with per-block checkpointing only (--checkpoint-group 1)")
    if cfg.compile and cfg.zero == 3:
        raise ValueError("--compile does not work with --zero 3 (DeepSpeed's parameter-gathering hooks run inside "
                         "every block); use --zero 0-2")
    if cfg.compile and cfg.offload_activations:
        raise ValueError("--compile does not work with --offload-activations (torch.compile cannot trace the "
                         "saved-tensor hooks; the blocks would silently run uncompiled)")
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if not 0 <= cfg.loss_scale_power <= 32:
        raise ValueError(f"--loss-scale-power must be in 0..32, got {cfg.loss_scale_power}")
    if cfg.precision in ("fp16", "bf16"):
        from trainer import engine as ds

        ds.check_precision(cfg.precision)  # fp16 on a CPU-only machine: a clear error, before any rank starts
    for name in ("save_every", "save_every_minutes", "keep_last", "eval_every"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    read_sources(cfg.shards, cfg.shard_weights)  # DataError on a missing/empty shard dir or bad weights
    _eval_data(cfg)  # EvalDataError (a DataError) on bad eval data
    if cfg.resume and cfg.resume != resume.LATEST:
        resume.find(Path(cfg.out) / "checkpoints", cfg.resume)  # FileNotFoundError if it is not a checkpoint


# ------------------------------------------------------------------------------------------------ launch
def launch(cfg: TrainConfig, argv: list[str]) -> int:
    """Run this module on cfg.nproc local ranks via torch.distributed.run; returns its exit code."""
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    # The ranks get their argv through the environment: torchrun's own parser would otherwise claim
    # abbreviations of its options (e.g. --nproc) from the script's arguments.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", ARGV_ENV: json.dumps(argv)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "trainer.train",
    ]
    print(f"[trainer] launching {cfg.nproc} ranks: {' '.join(cmd[1:])}", flush=True)
    child = subprocess.Popen(cmd, env=env)
    with _forward_signals(child):  # a preemption SIGTERM reaches torchrun, which passes it to the ranks
        return child.wait()


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # preemption (SLURM --signal, Kubernetes), or by hand
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped by a signal after saving a checkpoint


@contextlib.contextmanager
def _on_signals(handler):
    """Install `handler` for STOP_SIGNALS while inside (main thread only: elsewhere, e.g. a Ray Train worker
    thread, Python cannot install handlers and the block runs unchanged)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _forward_signals(child: subprocess.Popen):
    return _on_signals(lambda signum, frame: child.send_signal(signum))


ARGV_ENV = "CLIPFORGE_TRAIN_ARGV"


def _in_launched_rank() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def single_process_env():
    """A plain single process gets a 1-rank torch.distributed env, restored afterwards (tests call main())."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ------------------------------------------------------------------------------------------------ step
class TrainModule(nn.Module):
    """What the DeepSpeed engine wraps: the CLIP model (unchanged) and the loss module with its own parameters.

    forward(images, tokens) -> (loss, image_features, text_features, logit_scale) with the loss computed inside
    (so under ZeRO-3 the loss parameters are gathered by the engine's hooks like any others);
    features_only=True -> (image_features, text_features, logit_scale); cache -> the contrastive-aware
    accumulation loss of this micro-batch's fresh features against the cached ones (trainer.loss.FeatureCache).
    """

    def __init__(self, model: nn.Module, loss: ContrastiveLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images, tokens, cache: FeatureCache | None = None, features_only: bool = False):
        image_features, text_features, logit_scale = self.model(images, tokens)
        if features_only:
            return image_features, text_features, logit_scale
        loss = self.loss(image_features, text_features, logit_scale, cache=cache)
        return loss, image_features, text_features, logit_scale


def make_train_module(model: CLIP, loss: str) -> TrainModule:
    """Wrap a CLIP with the named loss. SigLIP starts from its paper's temperature: logit_scale = log 10."""
    if loss == "siglip":
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
    return TrainModule(model, make_loss(loss))


def train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over N = len(micro_batches) micro-batches of (images, tokens) already on the device.

    N must equal the engine's gradient_accumulation_steps. N == 1: forward, backward, step. N > 1
    (contrastive-aware, like open_clip's accum_freq):
      1. every micro-batch runs without grad; its features are cached and gathered once across ranks. The torch
         RNG state before each is saved, and BatchNorm running stats are frozen for this pass (they are updated
         once, in pass 2);
      2. micro-batch i re-runs with grad from its saved RNG state (patch dropout draws the same tokens, so the
         fresh features equal the cached ones); its loss scores the fresh features against the cache (every
         other micro-batch of every rank as negatives). The N backward passes each carry the gradient through
         one slot of the same full-batch loss, so their SUM is the full-batch gradient: DeepSpeed's 1/N
         (engine.backward divides by gradient_accumulation_steps) is undone by passing loss * N.
         (Not scale_wrt_gas=False: in DeepSpeed 0.19 the engine's forward-output hook on the loss tensor then
         fires before backward() registers its graph and divides by N anyway.) engine.step() follows each
         backward; DeepSpeed turns the N calls into exactly one optimizer step at the accumulation boundary.
    Returns (this rank's loss (detached; the mean of the N micro losses, which all equal the full accumulated
    batch loss), logit_scale (detached)).
    """
    n = len(micro_batches)
    gas = engine.gradient_accumulation_steps()
    if n != gas:
        raise ValueError(f"train_step got {n} micro-batches but the engine accumulates {gas}")
    if n == 1:
        images, tokens = micro_batches[0]
        loss, _, _, logit_scale = engine(images, tokens)
        engine.backward(loss)
        engine.step()
        return loss.detach(), logit_scale.detach()

    rng_states, image_features, text_features = [], [], []
    with torch.no_grad(), frozen_batchnorm_stats(engine.module):
        for images, tokens in micro_batches:
            rng_states.append(resume.rng_state())
            img, txt, _ = engine(images, tokens, features_only=True)
            image_features.append(img)
            text_features.append(txt)
    cache = FeatureCache.build(image_features, text_features)
    del image_features, text_features
    rng_after = resume.rng_state()
    total = None
    for i, (images, tokens) in enumerate(micro_batches):
        resume.set_rng_state(rng_states[i])
        loss, _, _, logit_scale = engine(images, tokens, cache=cache.at(i))
        engine.backward(loss * n)  # DeepSpeed divides by n: the sum over micro-batches is the full gradient
        engine.step()
        total = loss.detach() if total is None else total + loss.detach()
    resume.set_rng_state(rng_after)
    return total / n, logit_scale.detach()


# ------------------------------------------------------------------------------------------------ train
def _write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2))


def _fault_injection(step: int, rank: int, world: int) -> None:
    """Test hook: CLIPFORGE_FAULT_STEP=N SIGKILLs rank CLIPFORGE_FAULT_RANK (default: the last) after step N,
    the way a preempted node dies (no cleanup, no final save)."""
    if os.environ.get("CLIPFORGE_FAULT_STEP") == str(step) and rank == int(os.environ.get("CLIPFORGE_FAULT_RANK", world - 1)):
        print(f"[trainer] fault injection: killing rank {rank} after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


def _eval_data(cfg: TrainConfig):
    """The held-out eval sets named by the config (None if none): scanned once, identically on every rank."""
    if not (cfg.eval_retrieval or cfg.eval_zeroshot):
        if cfg.eval_classes:
            raise ValueError("--eval-classes needs --eval-zeroshot")
        return None
    from trainer.evaluate import build_eval_data

    return build_eval_data(retrieval=cfg.eval_retrieval or None, zeroshot=cfg.eval_zeroshot or None,
                           classes=cfg.eval_classes or None)


def _evaluate(engine, eval_data, cfg: TrainConfig, rank: int, world: int) -> dict:
    """Zero-shot / retrieval metrics of the current weights, computed on all ranks (each embeds a padded slice;
    through the model's forward, so ZeRO-3 gathers partitioned weights). -> {"eval/...": value} on every rank."""
    from trainer.evaluate import evaluate, flatten_metrics

    t0, rng = time.time(), resume.rng_state()
    metrics = evaluate(engine.module.model, eval_data, engine.device, rank=rank, world=world,
                       batch_size=cfg.eval_batch_size)
    resume.set_rng_state(rng)  # evaluation leaves the training randomness untouched
    return {**flatten_metrics(metrics, prefix=""), "seconds": time.time() - t0}  # e.g. "retrieval/text_to_image_R@1"


def train(cfg: TrainConfig) -> dict:
    """Train in this process (one rank of the launched world). -> the run summary (rank 0 also writes it)."""
    from trainer import engine as ds  # the only DeepSpeed-importing module

    try:
        return _train(cfg, ds)
    finally:
        ds.undo_process_patches()  # ZeRO-3's process-wide torch.nn.functional.linear replacement


def _train(cfg: TrainConfig, ds) -> dict:
    rank, local_rank, world = ds.init_distributed(cfg)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision="bf16" if on_gpu else "fp32")
    ds.check_precision(cfg.precision)
    zero_requested = cfg.zero
    zero, zero_why = ds.effective_zero_stage(cfg.zero, cfg.precision, world)
    cfg = dataclasses.replace(cfg, zero=zero)
    out = Path(cfg.out)
    sources = read_sources(cfg.shards, cfg.shard_weights)
    num_samples = sum(s.num_samples for s in sources)
    global_batch = cfg.global_batch_size(world)
    steps_per_epoch = math.ceil(num_samples / global_batch)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    ds_config = ds.build_ds_config(cfg, world)
    model_config = get_config(cfg.model)
    if cfg.patch_dropout:
        model_config.vision.patch_dropout = cfg.patch_dropout  # training only; eval/inference see every patch

    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    model = CLIP(model_config)
    if cfg.grad_checkpointing:  # from the outside; state_dict keys unchanged
        apply_activation_checkpointing(model, offload=cfg.offload_activations, chunks=cfg.checkpoint_chunks,
                                       policy=cfg.checkpoint_policy, group=cfg.checkpoint_group)
    if cfg.compile:  # after checkpointing: each block's graph includes its checkpoint
        compile_blocks(model)
    engine, scheduler = ds.init_engine(make_train_module(model, cfg.loss), cfg, ds_config, total_steps)
    torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank randomness of the step (patch dropout)
    random.seed(cfg.seed * 1000 + rank)

    ckpt_root = out / "checkpoints"
    start_step, rank_state = 0, {}
    found = resume.find(ckpt_root, cfg.resume) if cfg.resume else None
    if found is not None:
        start_step, rank_state = resume.load(engine, found, rank)  # collective
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**asdict(cfg), "zero_requested": zero_requested, "world_size": world, "global_batch_size": global_batch,
                    "num_samples": num_samples, "num_shards": sum(len(s.tars) for s in sources),
                    "missing_shards": sum(s.missing_tars for s in sources),
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "model_config": model_config.to_dict()}
        _write_json(out / "train_config.json", resolved)
        _write_json(out / "ds_config.json", ds_config)
        print(f"[trainer] model={cfg.model} loss={cfg.loss} world={world} zero={cfg.zero}"
              + (f" (--zero {zero_requested}: {zero_why})" if zero_why else "")
              + " "
              f"precision={cfg.precision} grad_accum={cfg.grad_accum} global_batch={global_batch} steps={total_steps} ({steps_per_epoch}/epoch) "
              f"samples={num_samples} shards={resolved['num_shards']} missing_shards={resolved['missing_shards']}"
              + (f" resumed from {found} at step {start_step}" if found is not None else
                 " (no checkpoint to resume yet)" if cfg.resume else ""), flush=True)

    batches = train_batches(sources, model_config.vision.image_size, model_config.text.context_length,
                            cfg.batch_size, seed=cfg.seed, rank=rank, world=world, workers=cfg.workers,
                            shuffle_buffer=cfg.shuffle_buffer, augment=TrainAugment(scale=tuple(cfg.aug_scale)),
                            resampled=cfg.resampled, state=rank_state.get("data"), pin_memory=on_gpu)
    if rank_state.get("rng"):  # the RNGs as they were after the checkpoint's step (the stream uses its own seeds)
        resume.set_rng_state(rank_state["rng"])
    device = engine.device
    eval_data = _eval_data(cfg)
    monitor = make_monitor(rank, out, total_steps, start_step=start_step, global_batch=global_batch, world_size=world,
                           flops_per_sample=flops_per_sample(model_config), device=device, precision=cfg.precision)
    t_start = t_saved = time.time()
    steps_since_log, last_loss, eval_metrics = 0, float("nan"), {}
    skipped_local = int(rank_state.get("skipped", 0))
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step host sync

    def save_checkpoint(step: int) -> None:
        state = {"step": step, "data": batches.state_dict(), "rng": resume.rng_state(), "skipped": skipped_local}
        path = resume.save(engine, ckpt_root, step, rank, state, cfg.keep_last)  # collective
        if rank == 0:
            print(f"[trainer] checkpoint {path}", flush=True)

    stop_signal, preempted = [], False  # SIGTERM/SIGUSR1 on a rank: all save at the next log step and stop
    with _on_signals(lambda signum, frame: stop_signal.append(signum)):
        for step in range(start_step, total_steps):
            micro_batches = []
            for _ in range(cfg.grad_accum):
                images, tokens, skipped = next(batches)
                skipped_local += skipped
                micro_batches.append((images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)))
            lr = scheduler.get_last_lr()[0]
            loss, logit_scale = train_step(engine, micro_batches)
            loss_sum += loss.double()
            steps_since_log += 1
            want_save = cfg.save_every > 0 and (step + 1) % cfg.save_every == 0
            if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:  # same condition on every rank
                minutes = (time.time() - t_saved) / 60
                time_due = rank == 0 and cfg.save_every_minutes > 0 and minutes >= cfg.save_every_minutes
                flags = [float(skipped_local), float(time_due), float(bool(stop_signal))]
                stats = torch.cat([(loss_sum / steps_since_log)[None], loss_sum.new_tensor(flags)])
                dist.all_reduce(stats)  # rank 0's clock decides time-based saves; a signal on any rank stops all
                last_loss, skipped_total = stats[0].item() / world, int(stats[1].item())
                want_save, preempted = want_save or stats[2].item() > 0, stats[3].item() > 0
                monitor.log(step + 1, last_loss, lr=lr, logit_scale=logit_scale, skipped_samples=skipped_total,
                            epoch=(step + 1) / steps_per_epoch,
                            **(ds.step_stats(engine, cfg.precision) if rank == 0 else {}))  # a no-op on ranks > 0
                steps_since_log = 0
                loss_sum.zero_()
            if eval_data is not None and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == total_steps):
                eval_metrics = _evaluate(engine, eval_data, cfg, rank, world)  # collective: every rank, same calls
                monitor.log_eval(step + 1, eval_metrics)
            if preempted or (cfg.checkpointing and (want_save or step + 1 == total_steps)):
                save_checkpoint(step + 1)
                t_saved = time.time()
            if preempted:
                break
            _fault_injection(step + 1, rank, world)
    monitor.close()
    if preempted:
        if rank == 0:
            print(f"[trainer] stopped by signal {stop_signal or '(on another rank)'} after step {step + 1}; "
                  f"checkpoint saved, continue with --resume latest", flush=True)
        return {"preempted": True, "steps": step + 1, "checkpoint": str(resume.find(ckpt_root, resume.LATEST))}

    stats = torch.tensor([float(skipped_local)], dtype=torch.float64).to(device)
    dist.all_reduce(stats)
    wall_s = time.time() - t_start
    steps_run = total_steps - start_step
    state = ds.full_fp32_state_dict(engine, cfg.zero)  # every rank must call it (collectives)
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    loss_state = {k[len("loss."):]: v for k, v in state.items() if k.startswith("loss.")}
    if rank == 0:
        final = CLIP(model_config)
        final.load_state_dict(model_state, strict=True)
        save_model(final, out / "checkpoint")  # fp32 weights, even after bf16 training
        export_open_clip(final, out / "open_clip")  # open_clip.create_model("local-dir:" + RUN_DIR/open_clip)
        _write_json(out / "loss_state.json", {"loss": cfg.loss, **{k: v.tolist() for k, v in loss_state.items()}})
    del state, model_state
    dist.barrier(**({"device_ids": [local_rank]} if on_gpu else {}))
    summary = {"steps": total_steps, "resumed_from_step": start_step, "samples_seen": total_steps * global_batch,
               "skipped_samples": int(stats[0].item()), "final_loss": last_loss, "wall_s": wall_s,
               "samples_per_s": steps_run * global_batch / max(wall_s, 1e-9), "world_size": world,
               "zero_stage": cfg.zero, "model": cfg.model, "precision": cfg.precision, "loss": cfg.loss,
               "grad_accum": cfg.grad_accum, **{k: v.tolist() for k, v in loss_state.items()},
               **{f"eval/{k}": v for k, v in eval_metrics.items()},
               "checkpoint": str((out / "checkpoint").resolve())}
    if rank == 0:
        _write_json(out / "summary.json", summary)
        print(f"[trainer] done: {json.dumps(summary)}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv and _in_launched_rank() and ARGV_ENV in os.environ:
        argv = json.loads(os.environ[ARGV_ENV])
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    try:
        if _in_launched_rank():
            summary = train(cfg)
        else:
            validate(cfg)
            if cfg.nproc > 1:
                return launch(cfg, argv)
            with single_process_env():
                summary = train(cfg)
        if summary.get("preempted"):
            return EXIT_PREEMPTED
    except (DataError, ValueError, KeyError, FileNotFoundError) as e:
        print(f"[trainer] error: {e}", file=sys.stderr, flush=True)
        return 2
    finally:
        if dist.is_available() and dist.is_initialized():
            from trainer.engine import destroy_distributed

            destroy_distributed()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
