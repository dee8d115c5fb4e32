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
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from trainer.checkpoint import save_model
from trainer.data import DataError, read_shards, train_batches
from trainer.loss import LOSSES, SIGLIP_INIT_LOGIT_SCALE, ContrastiveLoss, FeatureCache, make_loss
from trainer.model import CLIP, get_config
from trainer.parallel import frozen_batchnorm_stats, apply_activation_checkpointing
from trainer.transform import TrainAugment


@dataclass
class TrainConfig:
    shards: str = ""
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
    precision: str = "auto"  # auto -> bf16 on GPU, fp32 on CPU; fp16 (dynamic loss scaling) needs a GPU
    seed: int = 0
    workers: int = 0
    shuffle_buffer: int = 1000
    aug_scale: tuple[float, float] = (0.9, 1.0)  # random resized crop: fraction of the image area kept
    patch_dropout: float = 0.0  # FLIP: fraction of ViT patch tokens dropped in training (0.5 ~ 2x faster)
    log_every: int = 10
    ds_shm_comm: bool = False  # DeepSpeed's JIT-built CPU shm allreduce (first use compiles ~1 min)

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_size * self.grad_accum * world_size

    @classmethod
    def tiny(cls, **overrides) -> "TrainConfig":
        base = dict(model="tiny", steps=10, batch_size=8, lr=1e-3, warmup=2, log_every=1, shuffle_buffer=64)
        return cls(**{**base, **overrides})


PRESETS = {"default": TrainConfig, "tiny": TrainConfig.tiny}


def parse_args(argv: list[str]) -> TrainConfig:
    p = argparse.ArgumentParser(prog="python -m trainer.train", description=__doc__.split("\n")[0])
    p.add_argument("--shards", required=True, help="shard dir with manifest.json and *.tar")
    p.add_argument("--out", required=True, help="run dir (checkpoint/, metrics.jsonl, summary.json, ...)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", help="base values; flags override")
    p.add_argument("--model", help="model preset name (trainer.model.PRESETS)")
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
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=int)
    p.add_argument("--shuffle-buffer", type=int)
    p.add_argument("--patch-dropout", type=float, help="FLIP patch dropout rate for ViT towers (default 0)")
    p.add_argument("--aug-scale", type=float, nargs=2, metavar=("MIN", "MAX"),
                   help="random resized crop area range (default 0.9 1.0; 1 1 = centre-ish square crops only)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--ds-shm-comm", action=argparse.BooleanOptionalAction, default=None)
    args = vars(p.parse_args(argv))
    preset = args.pop("preset")
    overrides = {k: v for k, v in args.items() if v is not None}
    if "epochs" in overrides:
        overrides.setdefault("steps", 0)
    return PRESETS[preset](**overrides)


def validate(cfg: TrainConfig) -> None:
    get_config(cfg.model)  # KeyError on unknown model
    for name in ("batch_size", "grad_accum", "nproc", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if cfg.steps < 0 or (cfg.steps == 0 and cfg.epochs < 1):
        raise ValueError("need --steps >= 1 or --epochs >= 1")
    if cfg.loss not in LOSSES:
        raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    if cfg.precision not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be auto, fp32, bf16 or fp16, got {cfg.precision!r}")
    if cfg.precision in ("fp16", "bf16"):
        from trainer import engine as ds

        ds.check_precision(cfg.precision)  # fp16 on a CPU-only machine: a clear error, before any rank starts
    read_shards(cfg.shards)  # DataError on a missing/empty shard dir


# ------------------------------------------------------------------------------------------------ launch
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: TrainConfig, argv: list[str]) -> int:
    """Run this module on cfg.nproc local ranks via torch.distributed.run; returns its exit code."""
    threads = max(1, (os.cpu_count() or 1) // cfg.nproc)
    # The ranks get their argv through the environment: torchrun's own parser would otherwise claim
    # abbreviations of its options (e.g. --nproc) from the script's arguments.
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1", ARGV_ENV: json.dumps(argv)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={cfg.nproc}", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={_free_port()}", "-m", "trainer.train",
    ]
    print(f"[trainer] launching {cfg.nproc} ranks: {' '.join(cmd[1:])}", flush=True)
    return subprocess.run(cmd, env=env).returncode


ARGV_ENV = "CLIPFORGE_TRAIN_ARGV"


def _in_launched_rank() -> bool:
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


@contextlib.contextmanager
def _single_process_env():
    """A plain single process gets a 1-rank torch.distributed env, restored afterwards (tests call main())."""
    keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
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


def _get_rng() -> tuple:
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


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
            rng_states.append(_get_rng())
            img, txt, _ = engine(images, tokens, features_only=True)
            image_features.append(img)
            text_features.append(txt)
    cache = FeatureCache.build(image_features, text_features)
    del image_features, text_features
    rng_after = _get_rng()
    total = None
    for i, (images, tokens) in enumerate(micro_batches):
        _set_rng(rng_states[i])
        loss, _, _, logit_scale = engine(images, tokens, cache=cache.at(i))
        engine.backward(loss * n)  # DeepSpeed divides by n: the sum over micro-batches is the full gradient
        engine.step()
        total = loss.detach() if total is None else total + loss.detach()
    _set_rng(rng_after)
    return total / n, logit_scale.detach()


# ------------------------------------------------------------------------------------------------ train
def _write_json(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def train(cfg: TrainConfig) -> dict:
    from trainer import engine as ds  # the only DeepSpeed-importing module

    rank, local_rank, world = ds.init_distributed(cfg)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if cfg.precision == "auto":
        cfg = dataclasses.replace(cfg, precision="bf16" if on_gpu else "fp32")
    ds.check_precision(cfg.precision)
    out = Path(cfg.out)
    shards = read_shards(cfg.shards)
    global_batch = cfg.global_batch_size(world)
    steps_per_epoch = math.ceil(shards.num_samples / global_batch)
    total_steps = cfg.steps or cfg.epochs * steps_per_epoch
    ds_config = ds.build_ds_config(cfg, world)
    model_config = get_config(cfg.model)
    if cfg.patch_dropout:
        model_config.vision.patch_dropout = cfg.patch_dropout  # training only; eval/inference see every patch

    torch.manual_seed(cfg.seed)  # identical init on every rank (DeepSpeed also broadcasts rank 0's weights)
    model = CLIP(model_config)
    if cfg.grad_checkpointing:
        apply_activation_checkpointing(model)  # from the outside; state_dict keys unchanged
    engine, scheduler = ds.init_engine(make_train_module(model, cfg.loss), cfg, ds_config, total_steps)
    torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank augmentation randomness (and DataLoader worker seeds)
    random.seed(cfg.seed * 1000 + rank)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        resolved = {**asdict(cfg), "world_size": world, "global_batch_size": global_batch,
                    "num_samples": shards.num_samples, "num_shards": len(shards.tars),
                    "steps_per_epoch": steps_per_epoch, "total_steps": total_steps,
                    "model_config": model_config.to_dict()}
        _write_json(out / "train_config.json", resolved)
        _write_json(out / "ds_config.json", ds_config)
        (out / "metrics.jsonl").write_text("")
        print(f"[trainer] model={cfg.model} loss={cfg.loss} world={world} zero={cfg.zero} "
              f"precision={cfg.precision} grad_accum={cfg.grad_accum} global_batch={global_batch} steps={total_steps} ({steps_per_epoch}/epoch) "
              f"samples={shards.num_samples} shards={len(shards.tars)}", flush=True)

    batches = train_batches(shards, model_config.vision.image_size, model_config.text.context_length,
                            cfg.batch_size, seed=cfg.seed, rank=rank, workers=cfg.workers,
                            shuffle_buffer=cfg.shuffle_buffer, augment=TrainAugment(scale=tuple(cfg.aug_scale)))
    device = engine.device
    t_start = t_log = time.time()
    steps_since_log, skipped_local, last_loss = 0, 0, float("nan")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step host sync
    for step in range(total_steps):
        micro_batches = []
        for _ in range(cfg.grad_accum):
            images, tokens, skipped = next(batches)
            skipped_local += skipped
            micro_batches.append((images.to(device), tokens.to(device)))
        lr = scheduler.get_last_lr()[0]
        loss, logit_scale = train_step(engine, micro_batches)
        loss_sum += loss.double()
        steps_since_log += 1
        if (step + 1) % cfg.log_every == 0 or step + 1 == total_steps:  # same condition on every rank
            stats = torch.stack([loss_sum / steps_since_log, loss_sum.new_tensor(float(skipped_local))])
            dist.all_reduce(stats)
            last_loss, skipped_total = stats[0].item() / world, int(stats[1].item())
            now = time.time()
            samples_per_s = steps_since_log * global_batch / max(now - t_log, 1e-9)
            if rank == 0:
                row = {"step": step + 1, "loss": last_loss, "lr": lr,
                       "logit_scale": float(logit_scale.detach().float().item()),
                       "samples_per_s": samples_per_s, "skipped_samples": skipped_total,
                       "epoch": (step + 1) / steps_per_epoch, "elapsed_s": now - t_start}
                with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"[trainer] step {step + 1}/{total_steps} loss {last_loss:.4f} lr {lr:.2e} "
                      f"{samples_per_s:.1f} samples/s skipped {skipped_total}", flush=True)
            t_log, steps_since_log = now, 0
            loss_sum.zero_()

    stats = torch.tensor([float(skipped_local)], dtype=torch.float64).to(device)
    dist.all_reduce(stats)
    wall_s = time.time() - t_start
    state = ds.full_fp32_state_dict(engine, cfg.zero)  # every rank must call it (collectives)
    model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
    loss_state = {k[len("loss."):]: v for k, v in state.items() if k.startswith("loss.")}
    if rank == 0:
        final = CLIP(model_config)
        final.load_state_dict(model_state, strict=True)
        save_model(final, out / "checkpoint")  # fp32 weights, even after bf16 training
        _write_json(out / "loss_state.json", {"loss": cfg.loss, **{k: v.tolist() for k, v in loss_state.items()}})
    del state, model_state
    dist.barrier(**({"device_ids": [local_rank]} if on_gpu else {}))
    summary = {"steps": total_steps, "samples_seen": total_steps * global_batch,
               "skipped_samples": int(stats[0].item()), "final_loss": last_loss, "wall_s": wall_s,
               "samples_per_s": total_steps * global_batch / max(wall_s, 1e-9), "world_size": world,
               "zero_stage": cfg.zero, "model": cfg.model, "precision": cfg.precision, "loss": cfg.loss,
               "grad_accum": cfg.grad_accum, **{k: v.tolist() for k, v in loss_state.items()},
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
            train(cfg)
        else:
            validate(cfg)
            if cfg.nproc > 1:
                return launch(cfg, argv)
            with _single_process_env():
                train(cfg)
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
