"""`clipforge train` / `python -m trainer.train`: train a CLIP on shard dirs with DeepSpeed ZeRO (CPU/gloo or
GPU/nccl), data parallel.

    python -m trainer.train --shards SHARDS_DIR --out RUN_DIR --model tiny --steps 20 --batch-size 16 --nproc 2

Reads  one or more shard dirs (trainer.clip.formats.shards), optional eval sets, RUN_DIR/checkpoints/ on --resume.
Writes RUN_DIR/{train_config.json, ds_config.json, metrics.jsonl, summary.json, checkpoint/, open_clip/, ...}
       (trainer.loop), RUN_DIR/checkpoints/step_N/ every --save-every steps (trainer.resume).
Rerun  with --resume latest continues from the newest checkpoint that verifies (a fresh start if there is none):
       the same batches, augmentations and losses as an uninterrupted run. One trainer per run dir (a second one
       exits 2 naming the holder); ranks die with their launcher. Exit 0 done, 2 bad flags or input (a damaged
       --resume dir, a run dir in use), 3 too many consecutive non-finite steps (--max-nonfinite-steps), 4 a
       checkpoint or the final weights could not be written (--save-errors stop), 143 stopped by SIGTERM /
       SIGUSR1 after saving a checkpoint.

With --nproc N > 1 (and not already inside a launched rank) the command re-launches itself on N local ranks
(trainer.launch); under torchrun, the deepspeed launcher, srun or Ray Train each rank trains directly. The config
and every flag: trainer.config (`--help`, `--print-config`); one step: trainer.step; the loop: trainer.loop;
DeepSpeed: trainer.engine.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch.distributed as dist

from trainer import engine as ds
from trainer import launch, lifeline, resume
from trainer.clip.configs import get_config
from trainer.clip.flags import CLI
from trainer.config import PRESETS, TrainConfig
from trainer.data import DataError, read_sources
from trainer.loop import EXIT_SAVE_FAILED, TrainingStopped, eval_data_for, train
from trainer.runlock import RunLock

EXIT_PREEMPTED = launch.EXIT_PREEMPTED


def _length_flags(values: dict) -> dict:
    """--epochs N means an epoch-based run, whatever the preset's --steps."""
    if "epochs" in values:
        values.setdefault("steps", 0)
    return values


def cli() -> CLI:
    return CLI(TrainConfig, prog="python -m trainer.train", description=__doc__.split("\n\n")[0], presets=PRESETS)


def parse_args(argv: list[str]) -> TrainConfig:
    """The config of a command line. SystemExit(2) on a usage or validation error (0 on --help / --print-config)."""
    return cli().parse(argv, adjust=_length_flags)


def validate(cfg: TrainConfig) -> None:
    """What the config cannot check by itself, before any rank starts: the model, the precision on this machine,
    the shard dirs, the eval sets, the resume checkpoint. Raises ValueError / KeyError / DataError /
    FileNotFoundError."""
    get_config(cfg.model.name)  # KeyError on an unknown model
    if cfg.precision.precision in ("fp16", "bf16"):
        ds.check_precision(cfg.precision.precision)  # fp16 on a CPU-only machine: a clear error
    read_sources(cfg.data.shards, cfg.data.shard_weights)  # DataError on a missing / empty shard dir or bad weights
    eval_data_for(cfg)  # EvalDataError (a DataError) on bad eval data
    if cfg.save.resume and cfg.save.resume != resume.LATEST:  # FileNotFoundError / CheckpointDamaged
        resume.select(Path(cfg.out) / "checkpoints", cfg.save.resume)


def run(cfg: TrainConfig, argv: list[str]) -> int:
    """Train here (a launched rank, or one process) or relaunch on --nproc local ranks. -> exit code. Outside a
    launched rank this process holds the run dir's lock (trainer.runlock) for the whole run."""
    if launch.in_launched_rank():
        if not os.environ.get(lifeline.NO_LIFELINE_ENV):
            lifeline.die_with_parent()  # the rank dies with torchrun / the deepspeed launcher
        summary = train(cfg)
    else:
        validate(cfg)
        with RunLock(cfg.out) as lock:
            if cfg.nproc > 1:
                return launch.launch(cfg.nproc, argv, env_extra=lock.child_env())
            with launch.single_process_env(extra=lock.child_env()):
                summary = train(cfg)
    return EXIT_PREEMPTED if summary.get("preempted") else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = launch.launched_argv() or argv
    try:
        cfg = parse_args(argv)
    except SystemExit as e:  # argparse: --help / --print-config (0) or a usage error (2)
        return int(e.code or 0)
    try:
        return run(cfg, argv)
    except (DataError, ValueError, KeyError, FileNotFoundError) as e:  # incl. RunLocked, CheckpointDamaged
        return _stopped(f"error: {e}", 2)
    except TrainingStopped as e:  # too many non-finite steps, a failed save under --save-errors stop
        return _stopped(f"error: {e}", e.code)
    except OSError as e:  # writing the run's files (the final weights) failed: no space, an I/O error
        return _stopped(f"error: could not write the run's files: {e}", EXIT_SAVE_FAILED)
    finally:
        if dist.is_available() and dist.is_initialized():
            ds.destroy_distributed()


def _stopped(message: str, code: int) -> int:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[trainer] {message}", file=sys.stderr, flush=True)
    return launch.record_exit(code)


if __name__ == "__main__":
    raise SystemExit(main())
