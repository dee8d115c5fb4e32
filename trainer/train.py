"""Train a CLIP on clipforge shards with DeepSpeed ZeRO (data parallel, CPU/gloo or GPU/nccl).

    python -m trainer.train --shards SHARDS_DIR --out RUN_DIR --model tiny --steps 20 --batch-size 16 --nproc 2

With --nproc N > 1 (and not already inside a launched rank) the command re-launches itself on N local ranks with
torch.distributed.run; every rank then builds the same model, draws its own endless shard stream and runs exactly
the same number of steps. Rank 0 writes RUN_DIR/{train_config.json, ds_config.json, metrics.jsonl, summary.json,
checkpoint/}. DeepSpeed is only touched through trainer.engine.
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

from trainer.checkpoint import save_model
from trainer.data import DataError, read_shards, train_batches
from trainer.loss import clip_loss
from trainer.model import CLIP, get_config
from trainer.parallel import apply_activation_checkpointing
from trainer.transform import TrainAugment


@dataclass
class TrainConfig:
    shards: str = ""
    out: str = ""
    model: str = "ViT-B-32"
    epochs: int = 1  # used when steps == 0
    steps: int = 0  # optimizer steps; 0 -> epochs * ceil(num_samples / global batch)
    batch_size: int = 256  # per rank, per micro step
    grad_accum: int = 1  # note: negatives come from one micro step (not contrastive-aware accumulation)
    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup: int = 2000  # steps
    grad_clip: float = 1.0
    nproc: int = 1
    zero: int = 2
    grad_checkpointing: bool = True
    precision: str = "auto"  # auto -> bf16 on GPU, fp32 on CPU
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
    p.add_argument("--grad-accum", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup", type=int)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--nproc", type=int)
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3])
    p.add_argument("--grad-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16"])
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
    engine, scheduler = ds.init_engine(model, cfg, ds_config, total_steps)
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
        print(f"[trainer] model={cfg.model} world={world} zero={cfg.zero} precision={cfg.precision} "
              f"global_batch={global_batch} steps={total_steps} ({steps_per_epoch}/epoch) "
              f"samples={shards.num_samples} shards={len(shards.tars)}", flush=True)

    batches = train_batches(shards, model_config.vision.image_size, model_config.text.context_length,
                            cfg.batch_size, seed=cfg.seed, rank=rank, workers=cfg.workers,
                            shuffle_buffer=cfg.shuffle_buffer, augment=TrainAugment(scale=tuple(cfg.aug_scale)))
    device = engine.device
    t_start = t_log = time.time()
    steps_since_log, skipped_local, last_loss = 0, 0, float("nan")
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on device: no per-step host sync
    for step in range(total_steps):
        for _ in range(cfg.grad_accum):
            images, tokens, skipped = next(batches)
            skipped_local += skipped
            image_features, text_features, logit_scale = engine(images.to(device), tokens.to(device))
            loss = clip_loss(image_features, text_features, logit_scale)
            lr = scheduler.get_last_lr()[0]
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach().double() / cfg.grad_accum
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
    if rank == 0:
        final = CLIP(model_config)
        final.load_state_dict(state, strict=True)
        save_model(final, out / "checkpoint")  # fp32 weights, even after bf16 training
    del state
    dist.barrier(**({"device_ids": [local_rank]} if on_gpu else {}))
    summary = {"steps": total_steps, "samples_seen": total_steps * global_batch,
               "skipped_samples": int(stats[0].item()), "final_loss": last_loss, "wall_s": wall_s,
               "samples_per_s": total_steps * global_batch / max(wall_s, 1e-9), "world_size": world,
               "zero_stage": cfg.zero, "model": cfg.model, "precision": cfg.precision,
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
