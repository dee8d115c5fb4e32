"""Everything DeepSpeed: the generated config, `build_engine` (the one way an engine is made: by the trainer, the
tests and the GPU benchmark), the process group, and gathering weights for saving.

This is the ONLY module of clipforge that imports deepspeed (lazily, so `build_ds_config` stays importable).
"""
from __future__ import annotations

import math
import os
import sys
import torch
from torch import nn

from trainer.clip.model import CLIP, CLIPConfig, get_config
from trainer.config import TrainConfig
from trainer.parallel import apply_activation_checkpointing, compile_blocks
from trainer.step import make_train_module

NO_DECAY_NAMES = ("logit_scale", "class_embedding", "positional_embedding", "token_embedding")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only; none on gains/biases (1-D), embeddings and logit_scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or any(key in name for key in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    # ZeRO packs each group into one flat buffer in this order. A tensor whose size is not a multiple of 8 elements
    # (logit_scale, logit_bias) leaves every later view misaligned, and cuBLASLt then falls back to slow kernels for
    # every bias matmul (measured on an H100: 0.5x the samples/s of open_clip). Keep those tensors at the end.
    aligned_first = lambda params: sorted(params, key=lambda p: p.numel() % 8 != 0)  # noqa: E731 (stable sort)
    return [
        {"params": aligned_first(decay), "weight_decay": weight_decay},
        {"params": aligned_first(no_decay), "weight_decay": 0.0},
    ]


def build_ds_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed JSON config for this run (train_batch_size = micro * grad_accum * world)."""
    o, precision = cfg.optim, cfg.precision.precision
    ds = {
        "train_batch_size": cfg.global_batch_size(world_size),
        "train_micro_batch_size_per_gpu": o.batch_size,
        "gradient_accumulation_steps": o.grad_accum,
        "gradient_clipping": o.grad_clip,
        "steps_per_print": 10**9,  # progress lines come from the trainer
        "wall_clock_breakdown": False,
        "zero_optimization": {"stage": cfg.zero},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                "torch_adam": True,  # plain torch AdamW: no JIT-compiled fused kernel needed on CPU
            },
        },
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": False},
    }
    if precision == "fp16":  # dynamic loss scaling (loss_scale 0), starting at 2**loss_scale_power
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": cfg.precision.loss_scale_power,
                      "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1}
    if cfg.zero == 3:
        ds["zero_optimization"].update({"stage3_gather_16bit_weights_on_model_save": True})
    return ds


def effective_zero_stage(zero: int, precision: str, world_size: int) -> tuple[int, str]:
    """The ZeRO stage a run uses for the requested one, and why it differs ("" if it does not).

    - fp16 at stage 0 runs at stage 1. DeepSpeed 0.19's engine.backward() scales the loss only for its ZeRO
      optimizers, while the stage-0 fp16 optimizers (FP16_Optimizer, FP16_UnfusedOptimizer) still divide the
      gradients by the loss scale in step(): every update is ~2**16 times too small and fp16 gradients get no
      overflow protection (measured here: the first AdamW step moves the weights 18x less than in fp32, and
      training stalls; deepspeedai/DeepSpeed PR #8393, unmerged). Stage 1 is the same math on the correctly
      scaled loss, with the optimizer state partitioned over the ranks.
    - fp32 at stage 1/2 on ONE rank runs at stage 0: nothing is partitioned, but ZeRO still buckets, flattens and
      re-norms every gradient (~30 ms/step on the CPU bench) for the same optimizer math.
    """
    if precision == "fp16" and zero == 0:
        return 1, "DeepSpeed's stage-0 fp16 optimizers get an unscaled loss (PR #8393); stage 1 is the same math"
    if precision == "fp32" and world_size == 1 and zero in (1, 2):
        return 0, "nothing to partition on one rank"
    return zero, ""


def check_precision(precision: str) -> None:
    """ValueError if the accelerator DeepSpeed picked here cannot train in `precision` (fp16 on most CPUs)."""
    if precision not in ("fp16", "bf16"):
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    supported = acc.is_fp16_supported() if precision == "fp16" else acc.is_bf16_supported()
    if not supported:
        raise ValueError(f"--precision {precision} is not supported by DeepSpeed's {acc.device_name()} accelerator "
                         f"on this machine (use fp32 or bf16 on CPU; fp16 needs a GPU)")


def _patch_deepspeed(use_shm_comm: bool) -> None:
    """Two local workarounds for DeepSpeed 0.19 on CPU, applied before the first engine is built.

    1. Its CPU accelerator JIT-compiles a shared-memory allreduce op (~55 s, cached in ~/.cache/torch_extensions)
       when the comm backend is created. Plain gloo is enough for clipforge, so it is skipped unless asked for.
    2. DeepSpeedEngine._broadcast_model and (ZeRO-3) Init._zero_init_param broadcast `p.data.view(torch.uint8)`,
       which fails for 0-dim parameters such as CLIP's logit_scale; they are broadcast as 1-element views instead.
    3. ZeRO stage 0 in fp32 clips gradients with deepspeed.runtime.utils.clip_grad_norm_, whose in-place
       `grad.mul_(clip_coef)` with a [1]-shaped coefficient fails on 0-dim parameters (logit_scale, SigLIP's
       logit_bias), and it drops the norm (get_global_grad_norm() stays None). Replaced by torch's
       clip_grad_norm_ (same formula: coef = max_norm / (norm + 1e-6), capped at 1; gradients are already
       all-reduced, so the local norm is the global one), and the norm is recorded.
    """
    import deepspeed  # noqa: F401
    import deepspeed.comm as ds_dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    comm_torch = sys.modules.get("deepspeed.comm.torch")
    if not use_shm_comm and comm_torch is not None and hasattr(comm_torch, "build_shm_op"):
        comm_torch.build_shm_op = lambda: None
    if getattr(DeepSpeedEngine, "_clipforge_patched", False):
        return
    original = DeepSpeedEngine._broadcast_model

    def broadcast_model(self):
        scalars = [p for p in self.module.parameters() if p.dim() == 0]
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            original(self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    original_init_param = Init._zero_init_param

    def zero_init_param(self, param):
        if param.dim() != 0:
            return original_init_param(self, param)
        self._convert_to_deepspeed_param(param)
        group = self.get_partition_dp_group(param)
        src = 0 if ds_dist.get_world_group() == group else ds_dist.get_global_rank(group, 0)
        ds_dist.broadcast(param.data.reshape(1).view(torch.uint8), src, group)  # a view: fills param.data
        param.partition()

    def clip_fp32_gradients(self):
        params = [p for p in self.module.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.gradient_clipping(), foreach=False)
        self._global_grad_norm = float(norm)
        return norm

    DeepSpeedEngine._broadcast_model = broadcast_model
    DeepSpeedEngine.clip_fp32_gradients = clip_fp32_gradients
    Init._zero_init_param = zero_init_param
    DeepSpeedEngine._clipforge_patched = True


def destroy_distributed() -> None:
    """Tear down the process group through DeepSpeed, which also drops its cached group handles (so a second
    run in the same process, e.g. in tests or a notebook, starts clean)."""
    import deepspeed.comm as ds_dist
    import deepspeed.comm.comm as ds_comm  # `deepspeed.comm.cdb` is a stale copy made by `from .comm import *`

    if ds_comm.cdb is None:  # the group was created outside DeepSpeed (Ray Train) and DeepSpeed never attached
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        return
    ds_dist.destroy_process_group()


def undo_process_patches() -> None:
    """Put back what a ZeRO-3 engine changed for the whole process. ZeRO-3 (memory_efficient_linear, on by default)
    replaces torch.nn.functional.linear with its own autograd Function and leaves it so ("This will persist unless
    manually reset"): every later model in the process, e.g. evaluation, a second run in a notebook or a test,
    would run its linears through it (and selective checkpointing would recompute their matmuls)."""
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as patcher

    original = getattr(patcher, "linear_bk", None)
    if original is not None and torch.nn.functional.linear is not original:
        torch.nn.functional.linear = original


def init_distributed(cfg: TrainConfig) -> tuple[int, int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU, nccl on GPU). -> (rank, local_rank, world)."""
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(os.environ.get("CLIPFORGE_DS_LOG_LEVEL", "WARNING"))
    _patch_deepspeed(cfg.ds_shm_comm)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def model_config(cfg: TrainConfig) -> CLIPConfig:
    """The CLIPConfig a run trains: the --model preset or file, with --patch-dropout (training only)."""
    config = get_config(cfg.model.name)
    if cfg.model.patch_dropout:
        config.vision.patch_dropout = cfg.model.patch_dropout  # eval and inference see every patch
    return config


def build_engine(cfg: TrainConfig, world_size: int, total_steps: int, model: CLIP | None = None,
                 ds_overrides: dict | None = None):
    """The trainer's model set-up, in order: the CLIP (model_config(cfg), initialised from --seed, identically on
    every rank; or `model`), activation checkpointing and per-block compile applied from outside (state_dict keys
    unchanged), the loss wrapped around it (trainer.step), and the DeepSpeed engine with its LR schedule.
    torch.distributed must be initialised (init_distributed). -> (engine, lr_scheduler, ds_config)."""
    ds_config = {**build_ds_config(cfg, world_size), **(ds_overrides or {})}
    if model is None:
        torch.manual_seed(cfg.seed)
        model = CLIP(model_config(cfg))
    ck = cfg.checkpointing
    if ck.enabled:
        apply_activation_checkpointing(model, offload=ck.offload, chunks=ck.chunks, policy=ck.policy, group=ck.group)
    if cfg.model.compile:  # after checkpointing: each block's graph includes its checkpoint
        compile_blocks(model)
    module = make_train_module(model, cfg.model.loss, cfg.model.label_smoothing)
    engine, scheduler = _init_engine(module, cfg, ds_config, total_steps)
    return engine, scheduler, ds_config


def _init_engine(model: nn.Module, cfg: TrainConfig, ds_config: dict, total_steps: int):
    """-> (engine, lr_scheduler). Linear warmup to --lr, then cosine decay to 0 over the remaining steps."""
    import deepspeed

    warmup = max(0, min(cfg.optim.warmup, total_steps - 1))

    def lr_lambda(step: int) -> float:  # multiplier of cfg.lr for optimizer step `step` (0-based)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def make_scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    sixteen_bit = ds_config["bf16"]["enabled"] or ds_config["fp16"]["enabled"]
    fp32_init = {n: p.detach().float().clone() for n, p in model.named_parameters()} if sixteen_bit else {}
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, cfg.optim.weight_decay),
        lr_scheduler=make_scheduler,
        config=ds_config,
    )
    if fp32_init:
        # DeepSpeed casts the module to 16 bits first and builds the fp32 master weights from that copy, so they
        # would start rounded (bf16 keeps 8 mantissa bits: logit_scale = log(1/0.07) = 2.6593 becomes 2.6562).
        # Start them from the exact fp32 initialisation, as open_clip's AMP training does.
        set_full_fp32_params(engine, fp32_init)
    guard_nonfinite(engine)
    return engine, scheduler


def guard_nonfinite(engine) -> bool:
    """Skip optimizer steps whose gradients are not finite on the one path where DeepSpeed does not: ZeRO 0 in
    fp32 hands the plain torch AdamW a NaN / inf gradient, and one such step ruins every weight. DeepSpeed's ZeRO
    1-3, bf16 and fp16 optimizers check the gradient norm themselves and set `optimizer.overflow`, which the
    engine reads after step(): the step is then skipped (engine.skipped_steps += 1, the LR schedule holds,
    engine.was_step_applied() is False). The plain optimizer gets the same contract from a step pre-hook: if the
    global gradient norm is not finite it drops the gradients (AdamW then leaves every parameter and its moments
    alone) and sets `overflow`. With clipping, the norm is the one the clip has just computed (the patched
    clip_fp32_gradients keeps it in engine._global_grad_norm), so the check adds no pass over the gradients;
    without clipping the hook computes it. Under data parallelism every rank holds the same all-reduced
    gradients and the same norm, so every rank decides the same. -> whether a guard was installed."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "overflow"):
        return False
    clipping = engine.gradient_clipping() > 0

    def skip_if_nonfinite(opt, args, kwargs):
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if clipping:  # set by the (patched, see _patch_deepspeed) clip_fp32_gradients just before this step
            norm = torch.tensor(float(engine._global_grad_norm))
        else:
            norm = torch.nn.utils.get_total_norm(grads, foreach=True) if grads else torch.zeros(())
        bad = not bool(torch.isfinite(norm))
        opt.overflow = bad
        if bad:
            for g in opt.param_groups:
                for p in g["params"]:
                    p.grad = None
        return None

    optimizer.overflow = False
    optimizer.register_step_pre_hook(skip_if_nonfinite)
    return True


def _stage0_masters(engine) -> dict[int, torch.Tensor]:
    """ZeRO stage 0 in 16 bits (DeepSpeed's FP16_UnfusedOptimizer, also used for bf16): {id(module param): its fp32
    master}. deepspeed.utils.safe_get/set_full_fp32_param do not know this optimizer (they return None / do
    nothing), so the masters are found by pairing its fp16_groups with its fp32_groups."""
    opt = engine.optimizer
    if engine.zero_optimization_stage() != 0 or not hasattr(opt, "fp16_groups") or not hasattr(opt, "fp32_groups"):
        return {}
    pairs = [(p, q) for g16, g32 in zip(opt.fp16_groups, opt.fp32_groups) for p, q in zip(g16, g32)]
    return {id(p): q for p, q in pairs if isinstance(q, torch.Tensor) and q.shape == p.shape}


def set_full_fp32_params(engine, state: dict[str, torch.Tensor]) -> None:
    """Overwrite the fp32 master weights (ZeRO 0-3, each rank its partition) with the full fp32 tensors in `state`
    (keyed like engine.module.named_parameters(); the same on every rank)."""
    from deepspeed.utils import safe_set_full_fp32_param

    masters = _stage0_masters(engine)
    for name, p in engine.module.named_parameters():
        value = state[name].to(p.device)
        if id(p) in masters:
            masters[id(p)].data.copy_(value)
        elif hasattr(p, "ds_id"):
            _set_zero3_master(p, value)
        else:
            safe_set_full_fp32_param(p, value)  # ZeRO 1/2: this rank's fragment of the fp32 master
    # The 16-bit module copies already are the 16-bit casts of these values (DeepSpeed made them from the same init).


def _set_zero3_master(param, value: torch.Tensor) -> None:
    """ZeRO-3: copy this rank's slice of `value` into its fp32 master partition. Stage 3's own set_full_hp_param
    (what safe_set_full_fp32_param calls) fails on a padded last partition (a 1-element logit_scale on 2 ranks:
    "start (1) + length (1) exceeds dimension size (1)"); the padding stays zero here."""
    opt = param._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(param, release_swap_buffers=False)
    flat = value.flatten().to(part.dtype)
    start = part.numel() * opt._get_param_partition_rank(param)
    n = max(0, min(part.numel(), flat.numel() - start))
    part.data.zero_()
    part.data[:n].copy_(flat[start : start + n])


def step_stats(engine, precision: str) -> dict:
    """Optimizer-side numbers of the last step, for the logs (no collective: every rank holds them).

    grad_norm: the global gradient norm before clipping (None where DeepSpeed computed none, e.g. no clipping at
    ZeRO 0, or where it overflowed). Under fp16 also loss_scale, DeepSpeed's current dynamic loss scale, and
    overflow_steps, the optimizer steps skipped so far because a gradient overflowed: DeepSpeed then leaves the
    weights and the LR schedule as they were and halves the scale (the first overflow after the start or after a
    scale increase only uses up the hysteresis of 2).
    Both are in DeepSpeed's checkpoint, so they continue across --resume.
    """
    norm = engine.get_global_grad_norm()
    norm = None if norm is None else float(norm)
    stats = {"grad_norm": norm if norm is not None and math.isfinite(norm) else None}
    if precision == "fp16":
        stats.update(loss_scale=float(engine.optimizer.loss_scale), overflow_steps=int(engine.skipped_steps))
    return stats


def full_fp32_state_dict(engine, zero_stage: int) -> dict[str, torch.Tensor]:
    """The full fp32 weights on every rank (a collective: ALL ranks must call it).

    Under bf16 the module holds bf16 copies; the fp32 master weights live, partitioned, in the ZeRO optimizer.
    deepspeed.utils.safe_get_full_fp32_param assembles them (ZeRO 1/2/3), stage 0's are paired up directly;
    parameters no optimizer manages fall back to the (gathered, for ZeRO-3) module weights.
    """
    import contextlib

    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    state, masters = {}, _stage0_masters(engine)
    for name, p in engine.module.named_parameters():
        full = masters[id(p)] if id(p) in masters else safe_get_full_fp32_param(p)
        if full is None:
            gather = deepspeed.zero.GatheredParameters([p]) if zero_stage == 3 else contextlib.nullcontext()
            with gather:
                full = p.detach()
        state[name] = full.detach().float().cpu().clone()
    for name, b in engine.module.named_buffers():
        state[name] = b.detach().cpu().clone()
    return state
