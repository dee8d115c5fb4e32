"""The two sides of bench_train_gpu.py — clipforge's DeepSpeed engine and open_clip — plus the analytic FLOPs and
the synthetic batches they are timed on. Kept apart so the benchmark driver stays readable."""
from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from trainer.clip.model import get_config  # noqa: E402
from trainer.monitor import flops_per_sample as analytic_flops  # noqa: E402

EOT = 49407

# ------------------------------------------------------------------------------------------------------ FLOPs
def flops_per_sample(arch: str, batch: int) -> dict | None:
    """Analytic training FLOPs per sample for a ViT CLIP config (None for ResNet towers), from
    trainer.monitor.flops_per_sample: "model" = 3 x forward (incl. the [B,E]x[E,B] logits), "hardware" adds the
    recompute of every checkpointed block."""
    cfg = get_config(arch)
    if cfg.vision.is_resnet:
        return None
    fwd = analytic_flops(cfg, train=False, batch=batch)
    return {"forward": fwd, "model": 3 * fwd, "hardware": analytic_flops(cfg, batch=batch, recompute=True)}


def measure_matmul_tflops(n: int = 8192, reps: int = 20) -> float:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (start.elapsed_time(end) / 1e3) / 1e12


# ------------------------------------------------------------------------------------------------------ data
def synthetic_batch(arch: str, batch: int, device: str, seed: int = 0):
    cfg = get_config(arch)
    S, L = cfg.vision.image_size, cfg.text.context_length
    g = torch.Generator(device="cpu").manual_seed(seed)
    tokens = torch.randint(1, EOT - 1, (batch, L), generator=g)
    eot_pos = torch.randint(1, L, (batch,), generator=g)
    tokens[torch.arange(batch), eot_pos] = EOT
    tokens[torch.arange(L).unsqueeze(0) > eot_pos.unsqueeze(1)] = 0  # padding after the end token
    tokens[:, 0] = 49406  # start token
    images = torch.randn(batch, 3, S, S, device=device)  # float32, drawn on the device (no host copy of GBs)
    return images, tokens.to(device)


# ------------------------------------------------------------------------------------------------------ sides
def _is_oom(e: BaseException) -> bool:
    if isinstance(e, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "alloc_failed" in msg)


class _Side:
    """One trainer's step on one arch; build() makes a fresh model + optimizer, step() runs one training step."""

    name = ""
    recomputes_matmuls = True  # full activation checkpointing: every checkpointed block's forward runs twice

    def __init__(self, arch: str, device: str, precision: str):
        self.arch, self.device, self.precision = arch, device, precision

    def build(self, batch: int) -> None:
        raise NotImplementedError

    def step(self, images, tokens):
        raise NotImplementedError

    def free(self) -> None:
        raise NotImplementedError


class ClipforgeSide(_Side):
    name = "clipforge"

    def __init__(self, arch, device, precision, ds_timer_sync: bool = True, offload: bool = False, chunks: int = 1,
                 policy: str = "full", compile: bool = False, group: int = 1):
        super().__init__(arch, device, precision)
        self.ds_timer_sync = ds_timer_sync  # False = diagnostic variant only (DeepSpeed's per-step syncs off)
        # the trainer's --offload-activations / --checkpoint-chunks / --checkpoint-policy
        self.offload, self.chunks, self.policy, self.compile, self.group = offload, chunks, policy, compile, group
        self.recomputes_matmuls = policy == "full"
        self.engine = None

    def config(self, batch: int):
        """The trainer's config for this side: the flags `clipforge train` would get."""
        from trainer.config import TrainConfig

        return TrainConfig.from_flags(model=self.arch, batch_size=batch, zero=2, precision=self.precision,
                                      grad_checkpointing=True, offload_activations=self.offload,
                                      checkpoint_chunks=self.chunks, checkpoint_policy=self.policy,
                                      checkpoint_group=self.group, compile=self.compile, steps=10**6, warmup=10)

    def build(self, batch: int) -> None:
        """The engine exactly as the trainer builds it (trainer.engine.build_engine: model, checkpointing, compile
        (it compiles on the first steps: the bench's warm-up), the loss module, DeepSpeed)."""
        from trainer.engine import build_engine

        timers = {"timers": {"throughput": {"enabled": False, "synchronized": False}}} if not self.ds_timer_sync else {}
        self.engine, self.scheduler, _ = build_engine(self.config(batch), 1, total_steps=10**6, ds_overrides=timers)

    def step(self, images, tokens):
        """One optimizer step through the trainer's own train_step (the loss computed inside its TrainModule)."""
        from trainer.step import train_step

        loss, _ = train_step(self.engine, [(images, tokens)])
        return loss

    def free(self) -> None:
        if self.engine is not None and hasattr(self.engine, "destroy"):
            self.engine.destroy()
        self.engine = self.scheduler = None


class OpenClipSide(_Side):
    name = "open_clip"

    def __init__(self, arch, device, precision):
        super().__init__(arch, device, precision)
        self.model = self.opt = self.loss_fn = None

    @staticmethod
    def build_model(arch: str):
        """open_clip's own model of that name, or open_clip.model.CLIP from clipforge's config (e.g. "tiny")."""
        import open_clip

        if arch in open_clip.list_models():
            return open_clip.create_model(arch, pretrained=None)
        c = get_config(arch)
        v, t = c.vision, c.text
        if v.is_resnet:
            raise ValueError(f"{arch}: only ViT configs are mapped to open_clip here")
        vision_cfg = {"image_size": v.image_size, "layers": v.layers, "width": v.width, "patch_size": v.patch_size,
                      "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}
        text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                    "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
        return open_clip.model.CLIP(c.embed_dim, vision_cfg, text_cfg, quick_gelu=c.quick_gelu)

    def build(self, batch: int) -> None:
        from open_clip.loss import ClipLoss
        from trainer.config import OptimConfig

        cfg = OptimConfig()  # same optimizer hyper-parameters as the clipforge side
        torch.manual_seed(0)
        model = self.build_model(self.arch).to(self.device)
        model.set_grad_checkpointing(True)
        model.train()
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
        self.grad_clip = cfg.grad_clip
        self.model, self.loss_fn = model, ClipLoss()

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=torch.device(self.device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, images, tokens):
        with self._autocast():
            image_features, text_features, logit_scale = self.model(images, tokens)
            loss = self.loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    def free(self) -> None:
        self.model = self.opt = self.loss_fn = None


def make_side(side: str, arch: str, device: str, precision: str) -> _Side:
    if side == "clipforge":
        return ClipforgeSide(arch, device, precision)
    if side == "clipforge_no_ds_timer_sync":
        return ClipforgeSide(arch, device, precision, ds_timer_sync=False)
    if side == "clipforge_offload":  # --offload-activations --checkpoint-chunks 16 (the large-batch settings)
        return ClipforgeSide(arch, device, precision, offload=True, chunks=16)
    if side == "clipforge_group":  # --checkpoint-group 2 --checkpoint-chunks 16 (large batch, no host memory)
        return ClipforgeSide(arch, device, precision, group=2, chunks=16)
    if side == "clipforge_selective":  # --checkpoint-policy selective (no matmul recomputed)
        return ClipforgeSide(arch, device, precision, policy="selective")
    if side == "clipforge_selective_compile":  # --checkpoint-policy selective --compile (the fast settings)
        return ClipforgeSide(arch, device, precision, policy="selective", compile=True)
    if side == "open_clip":
        return OpenClipSide(arch, device, precision)
    raise ValueError(f"unknown side {side!r}")
