"""Training-step memory, simulated without a GPU: peak live tensor bytes of clipforge vs open_clip, and the largest
batch each fits into a memory budget.

    python bench/bench_memory.py --arch ViT-B-32 ViT-B-16 --budget-gib 75 --out bench_memory.json
    python bench/bench_memory.py --arch tiny --budget-gib 0.5 --max-batch-cap 4096      # seconds, on any laptop

How: every tensor is a FakeTensor (torch._subclasses.fake_tensor.FakeTensorMode: shapes, dtypes and autograd are
real, no data and no compute), so a ViT-B/16 step at batch 20,000 is simulated in seconds on a CPU. A
TorchDispatchMode (LiveBytes below) follows every storage from the op that creates it to its release and keeps
the peak of the live bytes per device. Two full steps run, so the optimizer state is counted. The "device" is
the fake CPU; clipforge's activation offload sends block inputs to "meta", counted apart as host memory.

Sides (same architecture, same fp32 images [B,3,S,S] and int64 tokens [B,ctx] as the trainers' loaders give):
* open_clip: open_clip.create_model, fp32 weights, set_grad_checkpointing(True), forward + open_clip.loss.ClipLoss
  under torch.autocast(bf16), backward, torch AdamW (fp32 moments): open_clip's train loop.
* clipforge: trainer.clip.model.CLIP in bf16 (DeepSpeed bf16 keeps the module in bf16), trainer.parallel
  .apply_activation_checkpointing (full checkpointing; optionally --offload / --chunks), trainer.loss.clip_loss,
  backward. DeepSpeed's ZeRO-2 state is not simulated op by op; it is allocated as fake tensors of its documented
  sizes on one rank: fp32 master weights, Adam exp_avg and exp_avg_sq (12 bytes/param), the fp32 gradient
  partition (4 bytes/param) and the bf16 contiguous-gradient bucket (min(reduce_bucket_size 5e8, params) x 2
  bytes); the bf16 gradients of backward are counted as they happen.

What it does not see: allocator rounding and fragmentation, cuBLAS / flash-attention workspaces, the CUDA context,
and one difference of autocast: on CPU, torch.autocast keeps open_clip's residual stream in bf16, on CUDA in fp32
(layer_norm runs in fp32 there), so open_clip's GPU activations are larger than simulated here and the printed
ratios understate clipforge's advantage on a GPU. On one H100 80GB (2026-11-23, bench_train_gpu.py, real OOMs)
open_clip fitted 11,776 (ViT-B/32) and 5,632 (ViT-B/16); this simulation puts those batches at 65.2 and 59.2 GiB.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
import weakref
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "bench"):  # trainer/ and gpu_sides.py (open_clip's model built as bench_train_gpu builds it)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from trainer.clip.formats.atomic import atomic_write_json  # noqa: E402

GIB = 2**30
HOST = "meta"  # where simulated activation offload puts tensors (any device other than the simulated one)


class LiveBytes(TorchDispatchMode):
    """Live and peak bytes per device type of every storage created under this mode (or passed to track())."""

    def __init__(self):
        super().__init__()
        self.current, self.peak = defaultdict(int), defaultdict(int)
        self._seen = WeakIdKeyDictionary()  # storage -> bytes

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._seen:  # a view of a storage already counted
            return
        n, dev = storage.nbytes(), t.device.type
        self._seen[storage] = n
        self.current[dev] += n
        self.peak[dev] = max(self.peak[dev], self.current[dev])
        weakref.finalize(storage, self._release, dev, n)

    def _release(self, dev: str, n: int) -> None:
        self.current[dev] -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.track(t)
        return out


def _fake_params(module: torch.nn.Module, mode) -> None:
    """Replace a real module's parameters and buffers by fake ones (module.to() cannot swap in fake tensors)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = torch.nn.Parameter(mode.from_tensor(p), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = mode.from_tensor(b)


def _flop_counter():
    """torch's FLOP counter, taught the CPU flash-attention ops (what SDPA runs on a fake CPU tensor) with the
    formulas it uses for the CUDA ones."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *a, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v),
    })


def simulate(arch: str, side: str, batch: int, offload: bool = False, chunks: int = 1, policy: str = "full",
             group: int = 1, steps: int = 1, count_flops: bool = False) -> dict:
    """Peak live GiB (device and host) of `steps` training steps of `side` at `batch`, simulated. The optimizer
    state exists from the start (as from the second step of a real run). With count_flops: instead the GFLOP per
    sample the step executes, recomputation included (torch's FLOP counter keeps tensors alive for its module
    tracking, so it does not run in a memory simulation)."""
    from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily

    from trainer.loss import clip_loss  # clipforge's loss: row-blocked cross-entropy (no [B, B] logits held)
    from trainer.clip.model import CLIP, get_config

    cfg = get_config(arch)
    with FakeTensorMode() as mode:
        with unset_fake_temporarily():  # real weights on the CPU (a few hundred MB), made fake below
            if side == "open_clip":
                from gpu_sides import OpenClipSide

                model = OpenClipSide.build_model(arch)
            else:
                model = CLIP(cfg).to(torch.bfloat16)
        _fake_params(model, mode)
        n_params = sum(p.numel() for p in model.parameters())
        tracker = LiveBytes()
        images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = torch.randint(1, 49407, (batch, cfg.text.context_length))
        for t in [*model.parameters(), *model.buffers(), images, tokens]:
            tracker.track(t)
        if side == "open_clip":
            model.set_grad_checkpointing(True)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            for p in model.parameters():  # create the AdamW state (what a first step does), then count it
                p.grad = torch.zeros_like(p)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for state in optimizer.state.values():
                for t in state.values():
                    if isinstance(t, torch.Tensor):
                        tracker.track(t)
            autocast = torch.autocast("cpu", dtype=torch.bfloat16)
            from open_clip.loss import ClipLoss  # open_clip's own loss: dense [B, B] logits in both directions

            loss_fn = ClipLoss()
        else:
            from trainer.parallel import apply_activation_checkpointing

            apply_activation_checkpointing(model, offload=offload, chunks=chunks, host=HOST, policy=policy,
                                           group=group)
            optimizer, autocast, loss_fn = None, torch.autocast("cpu", enabled=False), clip_loss
        with tracker, (_flop_counter() if count_flops else contextlib.nullcontext()) as flops:
            if optimizer is None:  # DeepSpeed ZeRO-2 bf16 state on one rank (see the module docstring)
                zero_state = [torch.empty(n_params, dtype=torch.float32) for _ in range(4)]  # noqa: F841
                bucket = torch.empty(min(int(5e8), n_params), dtype=torch.bfloat16)  # noqa: F841
            for _ in range(steps):
                with autocast:
                    out = model(images, tokens)
                    if isinstance(out, dict):
                        out = (out["image_features"], out["text_features"], out["logit_scale"])
                    loss = loss_fn(*out[:3])
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                else:
                    for p in model.parameters():
                        p.grad = None  # DeepSpeed moves them into its buckets, then frees them
                del out, loss
    if count_flops:
        return {"gflop_per_sample": flops.get_total_flops() / steps / batch / 1e9}
    return {"device_gib": tracker.peak["cpu"] / GIB, "host_gib": tracker.peak[HOST] / GIB}


def largest_batch(arch: str, side: str, budget_gib: float, cap: int, step: int = 64, probe: int = 1024,
                  **kw) -> tuple[int, int]:
    """Largest multiple of `step` (<= cap) whose simulated device peak fits `budget_gib`. -> (batch, simulations).

    Memory grows about linearly with the batch (plus the loss's batch^2 logits), so two probes give a first
    guess; then the bracket around it is widened until it holds and bisected to within `step`."""
    runs = 0

    def peak(b: int) -> float:
        nonlocal runs
        runs += 1
        return simulate(arch, side, b, **kw)["device_gib"]

    p1, p2 = peak(probe), peak(2 * probe)
    if p1 > budget_gib:
        lo, hi = 0, probe
    else:
        slope = max((p2 - p1) / probe, 1e-12)
        guess = int(2 * probe + (budget_gib - p2) / slope) // step * step
        guess = max(step, min(guess, cap))
        lo, hi = guess * 7 // 8 // step * step, min(cap + step, guess * 9 // 8 // step * step + step)
        while lo > 0 and peak(lo) > budget_gib:
            lo, hi = lo // 2 // step * step, lo
        while hi <= cap and peak(hi) <= budget_gib:
            lo, hi = hi, min(cap + step, 2 * hi)
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if peak(mid) <= budget_gib else (lo, mid)
    return min(lo, cap), runs


def variants(chunks: int) -> list[tuple[str, dict]]:
    return [("open_clip", {}), ("clipforge", {}), ("clipforge+offload", {"offload": True}),
            (f"clipforge+chunks{chunks}", {"chunks": chunks}),
            (f"clipforge+group2+chunks{chunks}", {"group": 2, "chunks": chunks}),
            (f"clipforge+offload+chunks{chunks}", {"offload": True, "chunks": chunks}),
            ("clipforge+selective", {"policy": "selective"}),
            (f"clipforge+selective+offload+chunks{chunks}", {"policy": "selective", "offload": True, "chunks": chunks})]


def run(archs, budget_gib: float, batches, cap: int, chunks: int, out: str | None = None,
        only: list[str] | None = None) -> dict:
    """Every variant (or those named in `only`, open_clip always: the ratios' base) on every arch."""
    chosen = [(name, kw) for name, kw in variants(chunks) if not only or name in only or name == "open_clip"]
    result = {"budget_gib": budget_gib, "torch": torch.__version__, "rows": [], "largest": {}, "gflop_per_sample": {}}
    for arch in archs:
        for name, kw in chosen:
            side = name.split("+")[0]
            for b in batches:
                t = time.perf_counter()
                r = simulate(arch, side, b, **kw)
                row = {"arch": arch, "side": name, "batch": b, **{k: round(v, 3) for k, v in r.items()},
                       "sim_s": round(time.perf_counter() - t, 1)}
                result["rows"].append(row)
                print(f"{arch:10s} {name:40s} batch {b:6d}  device {r['device_gib']:7.2f} GiB  "
                      f"host {r['host_gib']:6.2f} GiB", flush=True)
            gflop = simulate(arch, side, batches[0], count_flops=True, **kw)["gflop_per_sample"]
            result["gflop_per_sample"].setdefault(arch, {})[name] = round(gflop, 2)
            print(f"{arch:10s} {name:40s} executes {gflop:.1f} GFLOP per sample (batch {batches[0]})", flush=True)
            best, runs = largest_batch(arch, side, budget_gib, cap, **kw)
            result["largest"].setdefault(arch, {})[name] = best
            print(f"{arch:10s} {name:40s} largest batch in {budget_gib} GiB: {best}{' (cap)' if best >= cap else ''}"
                  f"  [{runs} simulations]", flush=True)
        base = result["largest"][arch]["open_clip"]
        for name, best in result["largest"][arch].items():
            if name != "open_clip" and base:
                print(f"ratio {arch} {name}/open_clip largest batch: {best / base:.2f}", flush=True)
        # Executed FLOPs per sample (recomputation included): where a step is compute-bound, samples/s scale with
        # their inverse, so open_clip's / clipforge's is the speed-up such a step can get from less recomputation.
        work = result["gflop_per_sample"][arch]
        for name, gflop in work.items():
            if name != "open_clip":
                print(f"ratio {arch} open_clip/{name} executed FLOPs per sample: {work['open_clip'] / gflop:.2f}",
                      flush=True)
    if out:
        atomic_write_json(out, result)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--budget-gib", type=float, default=75.0,
                   help="device memory for tensors (default 75: an 80 GB H100 less context and workspaces)")
    p.add_argument("--batch", type=int, nargs="*", default=[1024], help="batches to report the peak at")
    p.add_argument("--max-batch-cap", type=int, default=131072)
    p.add_argument("--chunks", type=int, default=16, help="checkpoint chunks of the chunked clipforge variants")
    p.add_argument("--variants", nargs="+", metavar="NAME",
                   help="only these clipforge variants (names as printed, e.g. clipforge+selective); default all")
    p.add_argument("--out")
    a = p.parse_args(argv)
    known = [name for name, _ in variants(a.chunks)]
    if a.variants and not set(a.variants) <= set(known):
        p.error(f"--variants: choose from {', '.join(known)}")
    run(a.arch, a.budget_gib, a.batch, a.max_batch_cap, a.chunks, a.out, only=a.variants)
    return 0


if __name__ == "__main__":
    sys.exit(main())
