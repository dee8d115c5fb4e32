"""The training loop of one rank: set up (process group, precision, engine, data stream, resume), run the steps
(log, evaluate, checkpoint, stop on a preemption signal), and finish (gather the fp32 weights, export, summary).

Rank 0 writes RUN_DIR/{train_config.json, ds_config.json, metrics.jsonl, eval.jsonl, summary.json, checkpoint/,
open_clip/, loss_state.json} and RUN_DIR/checkpoints/ is written by every rank (trainer.resume). Every collective
runs on every rank in the same order: the same step count (the data streams never end), the same log / eval /
save steps (decided by all-reduced flags), so no rank ever waits for a collective the others skip.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from trainer import engine as ds
from trainer import resume
from trainer.runlock import RunLock, RunLocked, held_above
from trainer.clip.checkpoint import export_open_clip, save_model
from trainer.clip.flags import flat
from trainer.clip.formats.atomic import atomic_write_json
from trainer.clip.model import CLIP
from trainer.config import TrainConfig
from trainer.data import read_sources, train_batches
from trainer.evaluate import build_eval_data, evaluate, flatten_metrics
from trainer.launch import on_signals
from trainer.monitor import flops_per_sample, make_monitor
from trainer.step import train_step


EXIT_DIVERGED = 3  # too many consecutive non-finite steps
EXIT_SAVE_FAILED = 4  # a checkpoint save failed under --save-errors stop


class TrainingStopped(RuntimeError):
    """The run stopped itself for a reason it printed (every rank raises it at the same step); `code`: exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def eval_data_for(cfg: TrainConfig):
    """The held-out eval sets named by the config (None if none): scanned once, identically on every rank."""
    e = cfg.eval
    if not e.enabled:
        return None
    return build_eval_data(retrieval=e.retrieval or None, zeroshot=e.zeroshot or None, classes=e.classes or None)


def train(cfg: TrainConfig) -> dict:
    """Train in this process (one rank of the launched world). -> the run summary (rank 0 also writes it)."""
    run = None
    try:
        run = Run.start(cfg)
        return run.finish(run.loop())
    finally:
        if run is not None and run.lock is not None:
            run.lock.release()
        ds.undo_process_patches()  # ZeRO-3's process-wide torch.nn.functional.linear replacement


@dataclass
class Plan:
    """The numbers of a run, fixed before its first step."""
    world: int
    num_samples: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int
    sources: list = field(repr=False, default_factory=list)


def plan(cfg: TrainConfig, world: int) -> Plan:
    sources = read_sources(cfg.data.shards, cfg.data.shard_weights)
    num_samples = sum(s.num_samples for s in sources)
    global_batch = cfg.global_batch_size(world)
    steps_per_epoch = math.ceil(num_samples / global_batch)
    return Plan(world, num_samples, global_batch, steps_per_epoch,
                cfg.optim.steps or cfg.optim.epochs * steps_per_epoch, sources)


def resolve(cfg: TrainConfig, world: int) -> tuple[TrainConfig, int, str]:
    """--precision auto and the ZeRO stage actually run (see engine.effective_zero_stage). -> (cfg, requested zero,
    why it differs)."""
    precision = cfg.precision.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "fp32"
    ds.check_precision(precision)
    zero, why = ds.effective_zero_stage(cfg.zero, precision, world)
    resolved = dataclasses.replace(cfg, zero=zero,
                                   precision=dataclasses.replace(cfg.precision, precision=precision))
    return resolved, cfg.zero, why


class Run:
    """One rank's run; built by Run.start, driven by loop() and finish()."""

    def __init__(self, cfg: TrainConfig, p: Plan, rank: int, local_rank: int):
        self.cfg, self.plan, self.rank, self.local_rank, self.world = cfg, p, rank, local_rank, p.world
        self.out, self.ckpt_root = Path(cfg.out), Path(cfg.out) / "checkpoints"
        self.on_gpu = torch.cuda.is_available()
        self.model_config = ds.model_config(cfg)
        self.start_step, self.skipped_local, self.eval_metrics, self.last_loss = 0, 0, {}, float("nan")
        self.health = Health(cfg.optim.max_nonfinite_steps)
        self.lock: RunLock | None = None

    @classmethod
    def start(cls, cfg: TrainConfig) -> "Run":
        rank, local_rank, world = ds.init_distributed(cfg)
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        lock = lock_run_dir(cfg.out, rank)
        cfg, zero_requested, zero_why = resolve(cfg, world)
        run = cls(cfg, plan(cfg, world), rank, local_rank)
        run.lock = lock
        run.engine, run.scheduler, run.ds_config = ds.build_engine(cfg, world, run.plan.total_steps)
        torch.manual_seed(cfg.seed * 1000 + rank)  # per-rank randomness of the step (patch dropout)
        random.seed(cfg.seed * 1000 + rank)
        found, rank_state = run.restore()
        if rank == 0:
            run.write_run_files(zero_requested)
            run.announce(zero_requested, zero_why, found)
        run.open_streams(rank_state)
        return run

    def restore(self) -> tuple[Path | None, dict]:
        """--resume: weights, optimizer, schedule (DeepSpeed) and this rank's data position + RNG (collective)."""
        found, stats, skipped = (resume.select(self.ckpt_root, self.cfg.save.resume, self.rank, self.world)
                                 if self.cfg.save.resume else (None, {}, []))
        if self.rank == 0:
            for line in skipped:
                print(f"[trainer] warning: skipping damaged checkpoint {line}", file=sys.stderr, flush=True)
            if found is not None:
                print(f"[trainer] checkpoint {found.name}: " + ("no manifest (written before manifests): not "
                      "verified" if stats.get("legacy") else f"{stats['files']} files, {stats['bytes'] / 1e6:.1f} "
                      f"MB verified in {stats['seconds']:.2f} s"), flush=True)
        rank_state: dict = {}
        if found is not None:
            self.start_step, rank_state = resume.load(self.engine, found, self.rank)
            self.skipped_local = int(rank_state.get("skipped", 0))
            self.health.skipped = int(rank_state.get("nonfinite_steps", 0))
        return found, rank_state

    def write_run_files(self, zero_requested: int) -> None:
        """train_config.json: every flag as resolved (flag name -> value) plus the run's derived numbers."""
        p = self.plan
        self.out.mkdir(parents=True, exist_ok=True)
        resolved = {**flat(self.cfg), "zero_requested": zero_requested, "world_size": p.world,
                    "global_batch_size": p.global_batch, "num_samples": p.num_samples,
                    "num_shards": sum(len(s.tars) for s in p.sources),
                    "missing_shards": sum(s.missing_tars for s in p.sources),
                    "steps_per_epoch": p.steps_per_epoch, "total_steps": p.total_steps,
                    "model_config": self.model_config.to_dict()}
        self.resolved = resolved
        atomic_write_json(self.out / "train_config.json", resolved)
        atomic_write_json(self.out / "ds_config.json", self.ds_config)

    def announce(self, zero_requested: int, zero_why: str, found: Path | None) -> None:
        cfg, p, r = self.cfg, self.plan, self.resolved
        resumed = (f" resumed from {found} at step {self.start_step}" if found is not None else
                   " (no checkpoint to resume yet)" if cfg.save.resume else "")
        print(f"[trainer] model={cfg.model.name} loss={cfg.model.loss} world={p.world} zero={cfg.zero}"
              + (f" (--zero {zero_requested}: {zero_why})" if zero_why else "")
              + f" precision={cfg.precision.precision} grad_accum={cfg.optim.grad_accum} global_batch={p.global_batch}"
              f" steps={p.total_steps} ({p.steps_per_epoch}/epoch) samples={p.num_samples}"
              f" shards={r['num_shards']} missing_shards={r['missing_shards']}" + resumed, flush=True)

    def open_streams(self, rank_state: dict) -> None:
        """This rank's batch stream (from its saved position), the eval sets and the metrics sink."""
        cfg, p, mc = self.cfg, self.plan, self.model_config
        d = cfg.data
        self.batches = train_batches(p.sources, mc.vision.image_size, mc.text.context_length, cfg.optim.batch_size,
                                     seed=cfg.seed, rank=self.rank, world=p.world, workers=d.workers,
                                     shuffle_buffer=d.shuffle_buffer, augment=d.augment(),
                                     resampled=d.resampled, state=rank_state.get("data"), pin_memory=self.on_gpu)
        if rank_state.get("rng"):  # the RNGs as they were after the checkpoint's step (the stream has its own seeds)
            resume.set_rng_state(rank_state["rng"])
        self.eval_data = eval_data_for(cfg)
        self.monitor = make_monitor(self.rank, self.out, p.total_steps, start_step=self.start_step,
                                    global_batch=p.global_batch, world_size=p.world,
                                    flops_per_sample=flops_per_sample(mc), device=self.engine.device,
                                    precision=cfg.precision.precision)

    # -------------------------------------------------------------------------------------------- the steps
    def micro_batches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        device, out = self.engine.device, []
        for _ in range(self.cfg.optim.grad_accum):
            images, tokens, skipped = next(self.batches)
            self.skipped_local += skipped
            out.append((images.to(device, non_blocking=True), tokens.to(device, non_blocking=True)))
        return out

    def loop(self) -> int | None:
        """Run the steps. -> the step after which a preemption signal stopped the run, or None at the end."""
        cfg, total = self.cfg, self.plan.total_steps
        self.t_start = self.t_saved = time.time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.engine.device)  # no per-step host sync
        since_log, stop_signal = 0, []  # a signal on any rank: every rank saves at the next log step and stops
        with on_signals(lambda signum, frame: stop_signal.append(signum)):
            for step in range(self.start_step, total):
                lr = self.scheduler.get_last_lr()[0]
                loss, logit_scale = train_step(self.engine, poison(step + 1, self.micro_batches()))
                applied = self.health.record(step + 1, self.engine.was_step_applied(), self.rank)
                finite = applied or self.finite_everywhere(loss)  # an fp16 overflow step's loss is finite
                if finite:  # the logged mean leaves out non-finite losses
                    loss_sum += loss.double()
                    since_log += 1
                want_save, preempted = cfg.save.every > 0 and (step + 1) % cfg.save.every == 0, False
                if (step + 1) % cfg.log_every == 0 or step + 1 == total:  # the same condition on every rank
                    mean = loss_sum / since_log if since_log else loss_sum + float("nan")
                    save_due, preempted = self.log(step + 1, mean, lr, logit_scale, bool(stop_signal))
                    want_save, since_log = want_save or save_due, 0
                    loss_sum.zero_()
                self.health.check_streak(step + 1, self.ckpt_root)
                want_save = want_save and (finite or step + 1 == total)  # none right after a NaN forward
                if self.eval_data is not None and ((cfg.eval.every and (step + 1) % cfg.eval.every == 0)
                                                   or step + 1 == total):
                    self.evaluate(step + 1)
                if preempted or (cfg.save.enabled and (want_save or step + 1 == total)):
                    self.save(step + 1)
                if preempted:
                    self.monitor.close()
                    if self.rank == 0:
                        print(f"[trainer] stopped by signal {stop_signal or '(on another rank)'} after step "
                              f"{step + 1}; checkpoint saved, continue with --resume latest", flush=True)
                    return step + 1
                fault_injection(step + 1, self.rank, self.world)
        self.monitor.close()
        return None

    def finite_everywhere(self, loss: torch.Tensor) -> bool:
        """Collective, on skipped steps only (every rank knows a step was skipped: DeepSpeed's overflow flag is
        all-reduced): whether every rank's loss was finite, so every rank takes the same save decision."""
        flag = torch.isfinite(loss.detach()).to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def log(self, step: int, mean_loss: torch.Tensor, lr: float, logit_scale, signalled: bool) -> tuple[bool, bool]:
        """All-reduce the interval's loss, skip count and the save / stop flags; rank 0 logs. -> (save, stop).
        Rank 0's clock decides time-based saves; a signal on any rank stops all."""
        minutes = (time.time() - self.t_saved) / 60
        time_due = self.rank == 0 and self.cfg.save.every_minutes > 0 and minutes >= self.cfg.save.every_minutes
        flags = [float(self.skipped_local), float(time_due), float(signalled)]
        stats = torch.cat([mean_loss[None], mean_loss.new_tensor(flags)])
        dist.all_reduce(stats)
        self.last_loss = stats[0].item() / self.world
        self.monitor.log(step, self.last_loss, lr=lr, logit_scale=logit_scale, skipped_samples=int(stats[1].item()),
                         epoch=step / self.plan.steps_per_epoch, nonfinite_steps=self.health.skipped,
                         **(ds.step_stats(self.engine, self.cfg.precision.precision) if self.rank == 0 else {}))
        return stats[2].item() > 0, stats[3].item() > 0

    def evaluate(self, step: int) -> None:
        """Zero-shot / retrieval metrics of the current weights, on all ranks (each embeds a padded slice, through
        the model's forward, so ZeRO-3 gathers partitioned weights); the training randomness is left untouched."""
        t0, rng = time.time(), resume.rng_state()
        metrics = evaluate(self.engine.module.model, self.eval_data, self.engine.device, rank=self.rank,
                           world=self.world, batch_size=self.cfg.eval.batch_size)
        resume.set_rng_state(rng)
        self.eval_metrics = {**flatten_metrics(metrics, prefix=""), "seconds": time.time() - t0}
        self.monitor.log_eval(step, self.eval_metrics)

    def save(self, step: int) -> None:
        """A training checkpoint (collective): DeepSpeed's state + every rank's data position and RNG states."""
        state = {"step": step, "data": self.batches.state_dict(), "rng": resume.rng_state(),
                 "skipped": self.skipped_local, "nonfinite_steps": self.health.skipped}
        result = resume.save(self.engine, self.ckpt_root, step, self.rank, state, self.cfg.save.keep_last)
        self.t_saved = time.time()
        self.health.saved(step, result, self.cfg.save.on_error, self.rank, self.ckpt_root)

    # -------------------------------------------------------------------------------------------- the end
    def finish(self, preempted_at: int | None) -> dict:
        if preempted_at is not None:
            return {"preempted": True, "steps": preempted_at,
                    "checkpoint": str(resume.find(self.ckpt_root, resume.LATEST))}
        stats = torch.tensor([float(self.skipped_local)], dtype=torch.float64).to(self.engine.device)
        dist.all_reduce(stats)
        wall_s = time.time() - self.t_start
        loss_state = self.export()
        dist.barrier(**({"device_ids": [self.local_rank]} if self.on_gpu else {}))
        return self.summarize(int(stats[0].item()), wall_s, loss_state)

    def export(self) -> dict:
        """The full fp32 weights (collective), written by rank 0: RUN_DIR/checkpoint (clipforge), RUN_DIR/open_clip
        (open_clip.create_model("local-dir:" + path)) and the loss's own parameters. -> those loss parameters."""
        state = ds.full_fp32_state_dict(self.engine, self.cfg.zero)
        model_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        loss_state = {k[len("loss."):]: v.tolist() for k, v in state.items() if k.startswith("loss.")}
        if self.rank == 0:
            final = CLIP(self.model_config)
            final.load_state_dict(model_state, strict=True)
            save_model(final, self.out / "checkpoint")  # fp32 weights, even after bf16 training
            export_open_clip(final, self.out / "open_clip")
            atomic_write_json(self.out / "loss_state.json", {"loss": self.cfg.model.loss, **loss_state})
        return loss_state

    def summarize(self, skipped: int, wall_s: float, loss_state: dict) -> dict:
        cfg, p = self.cfg, self.plan
        steps_run = p.total_steps - self.start_step
        summary = {"steps": p.total_steps, "resumed_from_step": self.start_step,
                   "samples_seen": p.total_steps * p.global_batch, "skipped_samples": skipped,
                   "final_loss": self.last_loss, "wall_s": wall_s,
                   "samples_per_s": steps_run * p.global_batch / max(wall_s, 1e-9), "world_size": p.world,
                   "zero_stage": cfg.zero, "model": cfg.model.name, "precision": cfg.precision.precision,
                   "loss": cfg.model.loss, "grad_accum": cfg.optim.grad_accum, **loss_state,
                   **{f"eval/{k}": v for k, v in self.eval_metrics.items()},
                   "checkpoint": str((self.out / "checkpoint").resolve())}
        if self.rank == 0:
            atomic_write_json(self.out / "summary.json", summary)
            print(f"[trainer] done: {json.dumps(summary)}", flush=True)
        return summary


def fault_injection(step: int, rank: int, world: int) -> None:
    """Test hook: CLIPFORGE_FAULT_STEP=N SIGKILLs rank CLIPFORGE_FAULT_RANK (default: the last) after step N,
    the way a preempted node dies (no cleanup, no final save)."""
    if os.environ.get("CLIPFORGE_FAULT_STEP") == str(step) and rank == int(os.environ.get("CLIPFORGE_FAULT_RANK",
                                                                                           world - 1)):
        print(f"[trainer] fault injection: killing rank {rank} after step {step}", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class Health:
    """What went wrong, the same on every rank: optimizer steps skipped because the loss or a gradient was not
    finite (DeepSpeed's overflow checks, engine.guard_nonfinite at ZeRO 0 fp32), and failed saves."""
    limit: int  # consecutive skipped steps that stop the run (0: never)
    skipped: int = 0  # skipped steps so far (continued across --resume)
    streak: int = 0
    first_bad: int = 0
    save_failures: int = 0  # consecutive

    def record(self, step: int, applied: bool, rank: int) -> bool:
        if applied:
            self.streak = 0
            return True
        self.skipped, self.streak = self.skipped + 1, self.streak + 1
        self.first_bad = step if self.streak == 1 else self.first_bad
        if rank == 0:
            print(f"[trainer] step {step}: the loss or a gradient is not finite; step skipped, the weights are "
                  f"unchanged ({self.streak} in a row, {self.skipped} in all)", file=sys.stderr, flush=True)
        return False

    def check_streak(self, step: int, ckpt_root: Path) -> None:
        if self.limit and self.streak >= self.limit:
            last = resume.find(ckpt_root, resume.LATEST)
            raise TrainingStopped(
                f"{self.streak} consecutive steps ({self.first_bad}-{step}) had a non-finite loss or gradient "
                f"(--max-nonfinite-steps {self.limit}): the run stops. Skipped steps change no weight, and the last "
                f"good checkpoint is kept: {last or 'none saved yet'}. Resume with --resume latest (a lower --lr, "
                f"or check the data around these steps)", EXIT_DIVERGED)

    def saved(self, step: int, result, on_error: str, rank: int, ckpt_root: Path) -> None:
        if result.path is not None:
            self.save_failures = 0
            if rank == 0:
                print(f"[trainer] checkpoint {result.path} ({result.bytes / 1e6:.1f} MB in {result.seconds:.2f} s, "
                      f"checksums {result.checksum_seconds:.2f} s)", flush=True)
            return
        self.save_failures += 1
        last = resume.find(ckpt_root, resume.LATEST)
        msg = (f"checkpoint save at step {step} failed ({self.save_failures} in a row): "
               + "; ".join(result.errors[:3]) + f". `latest` still names the last good one: {last or 'none'}")
        if on_error == "stop":
            raise TrainingStopped(msg + " (--save-errors stop: the run stops)", EXIT_SAVE_FAILED)
        if rank == 0:
            print(f"[trainer] warning: {msg}; training goes on and the next save tries again "
                  f"(--save-errors stop to stop instead)", file=sys.stderr, flush=True)


def lock_run_dir(out: str, rank: int) -> RunLock | None:
    """Collective: rank 0 locks the run dir unless its launcher holds the lock already (trainer.runlock); every rank
    raises RunLocked if rank 0 could not."""
    lock, refused = None, ""
    if rank == 0 and not held_above(out):
        try:
            lock = RunLock(out).acquire()
        except RunLocked as e:
            refused = str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [refused]
        dist.broadcast_object_list(box, src=0)
        refused = box[0]
    if refused:
        raise RunLocked(refused)
    return lock


def poison(step: int, micro_batches: list) -> list:
    """Test hook: CLIPFORGE_NAN_STEPS="4,5" fills the images of those steps with NaN on every rank, so the loss and
    the gradients are not finite (what a diverging run or a poisoned batch does)."""
    steps = os.environ.get("CLIPFORGE_NAN_STEPS", "")
    if steps and str(step) in steps.split(","):
        return [(torch.full_like(images, float("nan")), tokens) for images, tokens in micro_batches]
    return micro_batches
