"""Training-step benchmark on one GPU: clipforge (DeepSpeed ZeRO-2, bf16, activation checkpointing) vs open_clip
(torch.autocast bf16, grad checkpointing, AdamW), ViT CLIPs, synthetic in-memory batches.

    python bench/bench_train_gpu.py --arch ViT-B-32 ViT-B-16 --batch 256 --out bench_train.json
    python bench/bench_train_gpu.py --arch tiny --batch 8 --steps 2 --device cpu --no-max-batch   # smoke test

What one step is, per side (data loading is not measured: one random batch lives on the device for the whole run,
images [B,3,S,S] float32 in N(0,1) as both trainers' loaders deliver float32, tokens [B,ctx] int64 with random ids,
an end-of-text token 49407 at a random position and zero padding after it):

* clipforge: the trainer's own engine and step: trainer.engine.build_engine(TrainConfig with zero=2, precision
  bf16 and the side's checkpointing flags) builds the CLIP, applies activation checkpointing / compile, wraps the
  loss module and starts DeepSpeed, world size 1; each step is trainer.step.train_step (forward + loss inside the
  engine's module -> engine.backward -> engine.step: grad clipping 1.0, torch AdamW through DeepSpeed's
  "torch_adam", LR schedule stepping), the code path `clipforge train` runs.
* open_clip: open_clip.create_model(arch, pretrained=None) (a custom-config open_clip.model.CLIP for clipforge
  presets open_clip does not ship, e.g. "tiny"), fp32 weights, model.set_grad_checkpointing(True), forward + loss
  under torch.autocast(bf16), open_clip.loss.ClipLoss, backward, clip_grad_norm_(1.0), torch.optim.AdamW (same
  lr/betas/eps/weight decay, decay on matrices only), zero_grad, logit_scale clamp - open_clip's train loop.

Per arch and side: `warmup` steps, then `steps` timed steps between torch.cuda.synchronize() calls -> samples/s at
an equal batch, peak memory (torch.cuda.max_memory_allocated since the model was built: weights, grads, optimizer
state and activations) and MFU. Then the largest batch that fits: every try builds a fresh model/engine and runs two
full steps (the optimizer state exists from the second step on); it starts at --max-batch-start (default 8x the equal
batch), doubles until the first OOM (or the cap), then bisects to within --max-batch-tol (default 1/16; multiples of
64), with empty_cache between tries and a time budget per search (a try predicted to overrun it is not started). On the GPU every (phase, arch, side) group runs in its own subprocess, so one side's allocator
state never counts against the other.

FLOPs (analytic, per sample, multiply-add = 2 FLOPs): per transformer layer of width D, T tokens, MLP ratio r:
2*T*(4+2r)*D^2 for the matmuls + 4*T^2*D for QK^T and AV (full T^2 also for the causal text tower), plus the patch
embedding 2*N*3*p^2*D, the two projections and the loss logits 4*B*E. "model FLOPs" = 3 x forward (forward +
backward); "hardware FLOPs" adds the forward of every checkpointed block once more (the recompute). MFU = model
FLOPs/s / peak, HFU = hardware FLOPs/s / peak, peak = --peak-tflops (default 989 = H100 SXM dense bf16 spec); with
--measure-peak the script also times a bf16 8192^3 matmul and reports MFU against that measured ceiling.

--sides open_clip clipforge clipforge_offload clipforge_group clipforge_selective clipforge_selective_compile adds
the trainer's large-batch settings (--offload-activations --checkpoint-chunks 16, *_offload; --checkpoint-group 2
--checkpoint-chunks 16, no host memory, *_group) and its fast settings
(--checkpoint-policy selective: no matmul recomputed, HFU = MFU, *_selective; plus --compile, *_selective_compile;
compilation happens in the warm-up steps) as more sides: largest batch and samples/s.

Diagnostics (extra rows, clearly named; the trainer is not changed): --diagnostic-no-sync (DeepSpeed's throughput
timer, two device syncs per step, off), --profile DIR
(torch.profiler tables of 3 steps per side).

Measured 2026-11-23 on one NVIDIA H100 80GB HBM3 (SXM, driver 580.159.04; torch 2.11.0+cu130, deepspeed 0.19.8,
open_clip 3.3.0, Python 3.12; bf16 8192^3 matmul measured at 793 TFLOP/s), MFU against 989 TFLOP/s, model FLOPs
44.3 (B/32) and 123.3 (B/16) GFLOP/sample; samples/s are means of 15 timed steps after 4 warm-up steps:

    arch      side                            batch  samples/s  peak GiB   MFU
    ViT-B-32  open_clip                         256   1881-2499    3.21    8.4-11.2%   (3 runs, 3 machines; partly overhead-bound)
    ViT-B-32  clipforge                         256   1109-1426    4.11    5.0-6.4%
    ViT-B-32  open_clip                        1024        3293    7.43   14.8%
    ViT-B-32  clipforge                        1024   1882-1906    7.51    8.4-8.5%
    ViT-B-16  open_clip                         256   1318-1323    4.89   16.4-16.5%
    ViT-B-16  clipforge                         256     639-689    5.84    8.0-8.6%
    ViT-B-16  open_clip                        1024   1455-1456   13.55   18.1%
    ViT-B-16  clipforge                        1024     802-826   14.51   10.0-10.3%
    largest batch (2 steps fit):  ViT-B-32 open_clip 11776 (12288 OOM), clipforge 15872 (16384 OOM) -> 1.35x
                                  ViT-B-16 open_clip  5632  (6144 OOM), clipforge  5120  (6144 OOM) -> 0.91x
    with odd-sized tensors last in each group (then a diagnostic, now trainer.engine.param_groups' order):
                                  ViT-B-32 1149 (256) / 3317 (1024), ViT-B-16 1056 (256) / 1596 (1024) samples/s

clipforge as trained today runs at 0.50-0.59x open_clip's samples/s. The profile shows why: ZeRO-2 flattens each
AdamW group into one bf16 buffer and the no-decay group holds the 0-dim logit_scale second, so every bias and
LayerNorm weight after it sits at an odd element offset (2-byte aligned); cuBLASLt then runs every bias addmm on a
legacy sm75 CUTLASS kernel (ViT-B/16, B=256: 181 ms of 323 GPU-ms per step, vs 17 ms for open_clip's Hopper kernel
with a fused bias epilogue). With odd-sized tensors moved to the end of their group (now the trainer's default) it is
1.10x (B/16) and 1.01x (B/32) open_clip at batch 1024 and 0.80x / 0.61x at 256, where it is CPU-bound (DeepSpeed's
per-step work). None of the issue's targets (1.3x samples/s, 2x max batch, 50% MFU) is met.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, Path(__file__).resolve().parent):  # the repo (trainer/) and bench/ (gpu_sides.py)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from trainer.clip.formats.atomic import atomic_write_json  # noqa: E402

from gpu_sides import (_is_oom, _Side, flops_per_sample, make_side, measure_matmul_tflops,  # noqa: E402,F401
                       synthetic_batch)

SIDES = ("open_clip", "clipforge")
# the trainer with other settings: summary keys *_offload, *_group, *_selective, *_selective_compile
VARIANT_SIDES = ("clipforge_offload", "clipforge_group", "clipforge_selective", "clipforge_selective_compile")
H100_SXM_BF16_DENSE_TFLOPS = 989.0


# ------------------------------------------------------------------------------------------------------ helpers
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _cleanup(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _mem(device: str) -> dict:
    if not device.startswith("cuda"):
        return {}
    return {"allocated_gib": torch.cuda.memory_allocated() / 2**30}


@contextlib.contextmanager
def distributed_env(device: str, needed: bool):
    """A 1-rank torch.distributed through DeepSpeed for the clipforge side; env restored and torn down after."""
    if not needed:
        yield
        return
    from trainer import engine as ds
    from trainer.config import TrainConfig
    from trainer.launch import single_process_env

    with single_process_env():
        try:
            if device.startswith("cuda"):
                torch.cuda.set_device(torch.device(device).index or 0)
            ds.init_distributed(TrainConfig())
            yield
        finally:
            ds.destroy_distributed()


# ------------------------------------------------------------------------------------------------------ measures
def measure_throughput(side: str, arch: str, batch: int, warmup: int, steps: int, device: str,
                       precision: str, peak_tflops: float, profile_dir: str | None = None) -> dict:
    """warmup + timed steps at one batch -> samples/s, step time, peak memory, MFU/HFU, finite loss."""
    _cleanup(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _mem(device)
    s = make_side(side, arch, device, precision)
    t_build = time.perf_counter()
    s.build(batch)
    build_s = time.perf_counter() - t_build
    images, tokens = synthetic_batch(arch, batch, device)
    losses = []
    for _ in range(warmup):
        losses.append(s.step(images, tokens))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        losses.append(s.step(images, tokens))
    _sync(device)
    elapsed = time.perf_counter() - t0
    losses = [float(x) for x in losses]
    r = {"side": side, "arch": arch, "batch": batch, "warmup": warmup, "steps": steps, "precision": precision,
         "build_s": build_s, "step_s": elapsed / steps, "samples_per_s": batch * steps / elapsed,
         "loss_first": losses[0], "loss_last": losses[-1], "finite": all(math.isfinite(x) for x in losses),
         "baseline_allocated_gib": base.get("allocated_gib")}
    if device.startswith("cuda"):
        r["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        r["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    r.update(_mfu(arch, batch, r["samples_per_s"], peak_tflops, recompute=s.recomputes_matmuls))
    if profile_dir:
        r["profile"] = profile_steps(s, images, tokens, device, Path(profile_dir) / f"prof_{arch}_{side}_{batch}.txt")
    s.free()
    del s, images, tokens
    _cleanup(device)
    return r


def profile_steps(s: _Side, images, tokens, device: str, path: Path, n: int = 3) -> dict:
    """torch.profiler over n more steps: the top ops by self device (or CPU) time, written to `path`."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(n):
            s.step(images, tokens)
        _sync(device)
        wall = (time.perf_counter() - t0) / n
    ka = prof.key_averages()
    sort = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    try:
        table = ka.table(sort_by=sort, row_limit=45, max_name_column_width=70)
    except Exception:  # noqa: BLE001 - older torch names the column self_cuda_time_total
        table = ka.table(sort_by="self_cuda_time_total", row_limit=45, max_name_column_width=70)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{s.name} {s.arch} batch {images.shape[0]}: {n} profiled steps, {1000 * wall:.1f} ms/step "
                    f"wall (profiler on)\n{table}\n")
    return {"file": path.name, "wall_ms_per_step_profiled": 1000 * wall}


def _mfu(arch: str, batch: int, samples_per_s: float, peak_tflops: float, recompute: bool = True) -> dict:
    """recompute=False: selective checkpointing, no matmul runs twice (hardware FLOPs = model FLOPs)."""
    f = flops_per_sample(arch, batch)
    if f is None:
        return {}
    hardware = f["hardware"] if recompute else f["model"]
    return {"model_gflops_per_sample": f["model"] / 1e9, "hardware_gflops_per_sample": hardware / 1e9,
            "model_tflops": samples_per_s * f["model"] / 1e12, "mfu": samples_per_s * f["model"] / (peak_tflops * 1e12),
            "hfu": samples_per_s * hardware / (peak_tflops * 1e12)}


def try_batch(side: str, arch: str, batch: int, device: str, precision: str, steps: int = 2) -> dict:
    """Fresh model/optimizer at `batch`, `steps` full steps. -> {"ok", "peak_mem_gib", "step_s", ...}."""
    _cleanup(device)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    base = _mem(device).get("allocated_gib")
    t0 = time.perf_counter()
    s = make_side(side, arch, device, precision)
    out: dict = {"batch": batch, "baseline_allocated_gib": base}
    try:
        s.build(batch)
        images, tokens = synthetic_batch(arch, batch, device)
        last = None
        for i in range(steps):
            _sync(device)
            ts = time.perf_counter()
            loss = s.step(images, tokens)
            _sync(device)
            last = time.perf_counter() - ts
        out.update(ok=True, last_step_s=last, loss=float(loss))
        del images, tokens, loss
    except Exception as e:  # noqa: BLE001 - OOM is the expected failure; anything else is recorded and stops
        out.update(ok=False, oom=_is_oom(e), error=None if _is_oom(e) else f"{type(e).__name__}: {e}"[:500])
    if device.startswith("cuda"):
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    try:
        s.free()
    except Exception:  # noqa: BLE001 - a half-built engine after an OOM
        pass
    del s
    _cleanup(device)
    out["wall_s"] = time.perf_counter() - t0
    return out


def search_max_batch(try_fn, known_ok: int, start: int, cap: int, deadline: float, granule: int = 64,
                     rel_tol: float = 1 / 16, log=print) -> dict:
    """Largest batch for which try_fn(batch)["ok"]: doubling from `start` (known_ok is assumed to fit), then
    bisection between the last fit and the first failure until hi - lo <= max(granule, lo * rel_tol).
    Stops at `cap`, at the first non-OOM failure, or when the next try would pass `deadline` (time.monotonic)."""
    tries, lo, hi, reason = [], known_ok, None, "converged"
    est_s_per_sample = None  # from the latest fitting try (the first try also pays one-off kernel warm-up)

    def attempt(b):
        nonlocal est_s_per_sample
        if est_s_per_sample is not None and time.monotonic() + est_s_per_sample * b > deadline:
            return None
        if time.monotonic() > deadline:
            return None
        r = {"batch": b, **try_fn(b)}
        tries.append(r)
        if r.get("ok") and r.get("wall_s"):
            est_s_per_sample = r["wall_s"] / b
        log(f"    try batch {b}: {'fits' if r.get('ok') else ('OOM' if r.get('oom') else 'ERROR')}"
            + (f" peak {r['peak_mem_gib']:.1f} GiB" if r.get("peak_mem_gib") is not None else "")
            + (f" step {r['last_step_s']:.3f} s" if r.get("last_step_s") else "")
            + (f" ({r['error']})" if r.get("error") else ""))
        return r

    b = max(start, known_ok)
    while True:
        b = min(b, cap)
        r = attempt(b)
        if r is None:
            reason = "time budget"
            break
        if r.get("ok"):
            lo = b
            if b >= cap:
                reason = "cap"
                break
            b *= 2
            continue
        if not r.get("oom"):
            reason = "error"
        hi = b
        break
    while hi is not None and reason == "converged" and hi - lo > max(granule, lo * rel_tol):
        mid = max(lo + granule, (lo + hi) // 2 // granule * granule)
        if mid >= hi:
            break
        r = attempt(mid)
        if r is None:
            reason = "time budget"
            break
        if r.get("ok"):
            lo = mid
        elif r.get("oom"):
            hi = mid
        else:
            reason = "error"
            break
    fits = [t for t in tries if t.get("ok")]
    best = max(fits, key=lambda t: t["batch"]) if fits else None
    return {"max_batch": lo, "first_oom": hi, "stopped_by": reason, "capped": reason == "cap",
            "peak_mem_gib_at_max": best.get("peak_mem_gib") if best else None,
            "step_s_at_max": best.get("last_step_s") if best else None, "tries": tries}


# ------------------------------------------------------------------------------------------------------ jobs
def _job(spec: dict) -> dict:
    """One group of measurements in this process. spec: {"kind": "throughput"|"max_batch", ...}."""
    device, precision = spec["device"], spec["precision"]
    sides = spec["sides"]
    out = {"kind": spec["kind"], "results": []}
    needs_ds = any(s.startswith("clipforge") for s in sides)
    with distributed_env(device, needs_ds):
        if spec["kind"] == "throughput":
            for batch in spec["batches"]:
                for side in sides:
                    if side == "clipforge_no_ds_timer_sync" and batch != spec["batches"][0]:
                        continue
                    try:
                        prof = spec.get("profile_dir") if batch == spec["batches"][0] else None
                        r = measure_throughput(side, spec["arch"], batch, spec["warmup"], spec["steps"], device,
                                               precision, spec["peak_tflops"], profile_dir=prof)
                    except Exception as e:  # noqa: BLE001 - recorded; the other measurements still run
                        r = {"side": side, "arch": spec["arch"], "batch": batch,
                             "error": f"{type(e).__name__}: {e}"[:500], "oom": _is_oom(e)}
                        _cleanup(device)
                    print(_fmt_thr(r), flush=True)
                    out["results"].append(r)
        else:
            (side,) = sides
            print(f"  max batch {spec['arch']} {side}: start {spec['start']} cap {spec['cap']} "
                  f"budget {spec['budget_s']:.0f} s", flush=True)
            r = search_max_batch(
                lambda b: try_batch(side, spec["arch"], b, device, precision),
                known_ok=spec["known_ok"], start=spec["start"], cap=spec["cap"],
                deadline=time.monotonic() + spec["budget_s"], granule=spec.get("granule", 64),
                rel_tol=spec.get("rel_tol", 1 / 16))
            r.update(side=side, arch=spec["arch"])
            if r.get("step_s_at_max"):
                r["samples_per_s_at_max_1step"] = r["max_batch"] / r["step_s_at_max"]
                at_max = _mfu(spec["arch"], r["max_batch"], r["samples_per_s_at_max_1step"], spec["peak_tflops"],
                              recompute=not side.startswith("clipforge_selective"))
                r.update({f"{k}_at_max_1step": v for k, v in at_max.items() if k in ("mfu", "hfu")})
            print(f"  -> {side} {spec['arch']}: max batch {r['max_batch']} (first OOM {r['first_oom']}, "
                  f"stopped by {r['stopped_by']})", flush=True)
            out["results"].append(r)
    return out


def _run_job(spec: dict, isolate: bool, timeout_s: float | None) -> dict:
    if not isolate:
        return _job(spec)
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--job", str(spec_path), "--job-out", str(out_path)]
        try:
            proc = subprocess.run(cmd, timeout=timeout_s, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        if out_path.exists():
            return json.loads(out_path.read_text())
        return {"kind": spec["kind"], "results": [], "error": f"job exited {rc} without a result",
                "spec": {k: v for k, v in spec.items() if k != "peak_tflops"}}


# ------------------------------------------------------------------------------------------------------ run
def _fmt_thr(r: dict) -> str:
    if "error" in r:
        return f"  {r['arch']:<9} {r['side']:<31} B={r['batch']:<5} ERROR {r['error'][:200]}"
    mem = f"{r['peak_mem_gib']:6.2f} GiB" if r.get("peak_mem_gib") is not None else "     n/a"
    mfu = f"MFU {100 * r['mfu']:5.1f}% HFU {100 * r['hfu']:5.1f}%" if "mfu" in r else ""
    return (f"  {r['arch']:<9} {r['side']:<31} B={r['batch']:<5} {r['samples_per_s']:9.1f} samples/s "
            f"step {1000 * r['step_s']:8.1f} ms  peak {mem}  {mfu}  loss {r['loss_last']:.3f}")


@dataclass
class RunConfig:
    arch_list: list[str]
    batch: int = 256
    steps: int = 20
    device: str = "cuda"
    warmup: int = 5
    extra_batches: list[int] = field(default_factory=list)
    sides: tuple[str, ...] = SIDES
    diagnostic_no_sync: bool = False
    max_batch: bool = True
    max_batch_cap: int = 32768
    max_batch_budget_s: float = 90.0
    max_batch_tol: float = 1 / 16
    max_batch_start: int | None = None  # default 8 x batch
    profile_dir: str | None = None
    total_budget_s: float = 1e9
    precision: str | None = None
    peak_tflops: float = H100_SXM_BF16_DENSE_TFLOPS
    measure_peak: bool = False
    isolate: bool | None = None
    out: str | None = None


def run(arch_list, batch: int = 256, steps: int = 20, device: str = "cuda", **kw) -> dict:
    """The whole benchmark; returns (and with out=PATH writes) the results dict. See the module docstring."""
    cfg = RunConfig(list(arch_list), batch, steps, device, **kw)
    on_gpu = device.startswith("cuda")
    precision = cfg.precision or ("bf16" if on_gpu else "fp32")
    isolate = on_gpu if cfg.isolate is None else cfg.isolate
    t_start = time.monotonic()
    deadline = t_start + cfg.total_budget_s
    res: dict = {"device": device, "precision": precision, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                 "config": {k: v for k, v in cfg.__dict__.items()}, "versions": _versions(),
                 "peak_tflops_used": cfg.peak_tflops, "throughput": [], "max_batch": [], "errors": []}
    if on_gpu:
        res["gpu"] = torch.cuda.get_device_name(0)
        res["gpu_total_mem_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        if cfg.measure_peak:
            res["measured_matmul_tflops_bf16_8192"] = measure_matmul_tflops()
            _cleanup(device)
            print(f"measured bf16 8192^3 matmul: {res['measured_matmul_tflops_bf16_8192']:.0f} TFLOP/s", flush=True)

    def save():
        if cfg.out:
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(cfg.out, res)

    sides = list(cfg.sides) + (["clipforge_no_ds_timer_sync"] if cfg.diagnostic_no_sync else [])
    print(f"== throughput: {', '.join(cfg.arch_list)}; batches {[batch] + list(cfg.extra_batches)}; "
          f"{cfg.warmup} warmup + {steps} timed steps; {precision}", flush=True)
    for arch in cfg.arch_list:
        spec = {"kind": "throughput", "arch": arch, "batches": [batch] + list(cfg.extra_batches), "sides": sides,
                "warmup": cfg.warmup, "steps": steps, "device": device, "precision": precision,
                "peak_tflops": cfg.peak_tflops, "profile_dir": cfg.profile_dir}
        j = _run_job(spec, isolate, timeout_s=max(60.0, deadline - time.monotonic()) if isolate else None)
        res["throughput"] += j["results"]
        if j.get("error"):
            res["errors"].append(j["error"])
        save()

    if cfg.max_batch:
        jobs = [(arch, side) for arch in cfg.arch_list for side in cfg.sides]
        print(f"== max batch: cap {cfg.max_batch_cap}, budget {cfg.max_batch_budget_s:.0f} s per search", flush=True)
        for i, (arch, side) in enumerate(jobs):
            left = deadline - time.monotonic()
            if left < 20:
                res["errors"].append(f"max batch {arch} {side}: skipped, total time budget spent")
                continue
            budget = min(cfg.max_batch_budget_s, left / (len(jobs) - i) if i < len(jobs) - 1 else left)
            known = [r for r in res["throughput"] if r.get("arch") == arch and r.get("side") == side
                     and r.get("finite")]
            known_ok = max((r["batch"] for r in known), default=0)
            spec = {"kind": "max_batch", "arch": arch, "sides": [side], "device": device, "precision": precision,
                    "known_ok": known_ok, "start": max(cfg.max_batch_start or 8 * batch, known_ok), "cap": cfg.max_batch_cap,
                    "budget_s": budget, "rel_tol": cfg.max_batch_tol, "peak_tflops": cfg.peak_tflops}
            j = _run_job(spec, isolate, timeout_s=budget + 90 if isolate else None)
            res["max_batch"] += j["results"]
            if j.get("error"):
                res["errors"].append(j["error"])
            save()

    res["summary"] = summarize(res, batch)
    res["wall_s"] = time.monotonic() - t_start
    save()
    print(format_table(res, batch), flush=True)
    return res


def summarize(res: dict, batch: int) -> dict:
    out = {}
    for arch in dict.fromkeys(r["arch"] for r in res["throughput"] + res["max_batch"]):
        thr = {r["side"]: r for r in res["throughput"] if r["arch"] == arch and r["batch"] == batch and "error" not in r}
        mb = {r["side"]: r for r in res["max_batch"] if r["arch"] == arch}
        s = {}
        if "clipforge" in thr and "open_clip" in thr:
            s["samples_per_s_ratio"] = thr["clipforge"]["samples_per_s"] / thr["open_clip"]["samples_per_s"]
            if thr["open_clip"].get("peak_mem_gib"):
                s["peak_mem_ratio"] = thr["clipforge"]["peak_mem_gib"] / thr["open_clip"]["peak_mem_gib"]
        for b in sorted({r["batch"] for r in res["throughput"] if r["arch"] == arch} - {batch}):
            t2 = {r["side"]: r for r in res["throughput"] if r["arch"] == arch and r["batch"] == b and "error" not in r}
            if "clipforge" in t2 and "open_clip" in t2:
                s[f"samples_per_s_ratio_at_{b}"] = t2["clipforge"]["samples_per_s"] / t2["open_clip"]["samples_per_s"]
        if "clipforge" in mb and "open_clip" in mb and mb["open_clip"]["max_batch"]:
            s["max_batch_ratio"] = mb["clipforge"]["max_batch"] / mb["open_clip"]["max_batch"]
            s["max_batch_ratio_is_lower_bound"] = bool(mb["clipforge"]["capped"] or
                                                       mb["clipforge"]["stopped_by"] == "time budget")
        for variant in VARIANT_SIDES:  # clipforge_offload -> *_offload keys, clipforge_selective -> *_selective
            suffix = variant.removeprefix("clipforge")
            if variant in mb and "open_clip" in mb and mb["open_clip"]["max_batch"]:
                s[f"max_batch_ratio{suffix}"] = mb[variant]["max_batch"] / mb["open_clip"]["max_batch"]
            if variant in thr and "open_clip" in thr:
                s[f"samples_per_s_ratio{suffix}"] = thr[variant]["samples_per_s"] / thr["open_clip"]["samples_per_s"]
        out[arch] = s
    return out


def format_table(res: dict, batch: int) -> str:
    lines = [f"\n== results ({res.get('gpu', res['device'])}, {res['precision']}, peak {res['peak_tflops_used']:.0f} "
             f"TFLOP/s; {res['date']})",
             f"{'arch':<9} {'side':<31} {'batch':>5} {'samples/s':>10} {'step ms':>8} {'peak GiB':>8} {'MFU':>6} "
             f"{'HFU':>6}"]
    for r in res["throughput"]:
        if "error" in r:
            lines.append(f"{r['arch']:<9} {r['side']:<31} {r['batch']:>5} ERROR {r['error'][:80]}")
            continue
        mem = f"{r['peak_mem_gib']:8.2f}" if r.get("peak_mem_gib") is not None else f"{'n/a':>8}"
        mfu = f"{100 * r['mfu']:5.1f}% {100 * r['hfu']:5.1f}%" if "mfu" in r else f"{'':>13}"
        lines.append(f"{r['arch']:<9} {r['side']:<31} {r['batch']:>5} {r['samples_per_s']:10.1f} "
                     f"{1000 * r['step_s']:8.1f} {mem} {mfu}")
    if res["max_batch"]:
        lines.append(f"{'arch':<9} {'side':<31} {'max batch':>9} {'1st OOM':>8} {'stopped':>11} {'peak GiB':>8} "
                     f"{'samples/s@max (1 step)':>22}")
        for r in res["max_batch"]:
            pk = f"{r['peak_mem_gib_at_max']:8.1f}" if r.get("peak_mem_gib_at_max") else f"{'n/a':>8}"
            sp = f"{r['samples_per_s_at_max_1step']:10.1f}" if r.get("samples_per_s_at_max_1step") else ""
            mfu = f" MFU {100 * r['mfu_at_max_1step']:.1f}%" if r.get("mfu_at_max_1step") else ""
            lines.append(f"{r['arch']:<9} {r['side']:<31} {r['max_batch']:>9} {str(r['first_oom']):>8} "
                         f"{r['stopped_by']:>11} {pk} {sp}{mfu}")
    for arch, s in res.get("summary", {}).items():
        lines.append(f"{arch}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                             for k, v in s.items()))
    for e in res["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)


def _versions() -> dict:
    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    for mod in ("deepspeed", "open_clip"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001
            v[mod] = f"unavailable ({type(e).__name__})"
    return v


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", nargs="+", default=["ViT-B-32", "ViT-B-16"])
    p.add_argument("--batch", type=int, default=256, help="the equal batch both sides are timed at")
    p.add_argument("--extra-batches", type=int, nargs="*", default=[], help="more equal batches to time")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp32"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--no-max-batch", action="store_true", help="skip the largest-batch search")
    p.add_argument("--max-batch-cap", type=int, default=32768)
    p.add_argument("--max-batch-tol", type=float, default=1 / 16, help="bisect until (first OOM - fit) <= tol * fit")
    p.add_argument("--max-batch-start", type=int, help="first batch tried (default 8 x --batch)")
    p.add_argument("--profile", help="also torch.profiler 3 steps per side at --batch; tables written to this dir")
    p.add_argument("--max-batch-budget", type=float, default=90.0, help="seconds per (arch, side) search")
    p.add_argument("--total-budget", type=float, default=1e9, help="seconds for the whole run (searches shrink)")
    p.add_argument("--diagnostic-no-sync", action="store_true",
                   help="also time clipforge with DeepSpeed's throughput timer (2 syncs/step) off (a diagnostic)")
    p.add_argument("--peak-tflops", type=float, default=H100_SXM_BF16_DENSE_TFLOPS)
    p.add_argument("--sides", nargs="+", default=list(SIDES),
                   choices=[*SIDES, *VARIANT_SIDES],
                   help="clipforge_offload = the trainer with --offload-activations --checkpoint-chunks 16; "
                        "clipforge_group = --checkpoint-group 2 --checkpoint-chunks 16; "
                        "clipforge_selective = with --checkpoint-policy selective; clipforge_selective_compile = "
                        "selective + --compile")
    p.add_argument("--measure-peak", action="store_true", help="also time a bf16 8192^3 matmul")
    p.add_argument("--isolate", action=argparse.BooleanOptionalAction, default=None,
                   help="one subprocess per (phase, arch[, side]) group (default: on cuda only)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--job-out", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.job:
        out = _job(json.loads(Path(a.job).read_text()))
        Path(a.job_out).write_text(json.dumps(out))
        return 0
    run(a.arch, a.batch, a.steps, a.device, warmup=a.warmup, extra_batches=a.extra_batches,
        max_batch=not a.no_max_batch, max_batch_cap=a.max_batch_cap, max_batch_tol=a.max_batch_tol, max_batch_start=a.max_batch_start,
        profile_dir=a.profile, max_batch_budget_s=a.max_batch_budget,
        total_budget_s=a.total_budget, precision=a.precision, peak_tflops=a.peak_tflops,
        measure_peak=a.measure_peak, diagnostic_no_sync=a.diagnostic_no_sync,
        isolate=a.isolate, sides=tuple(a.sides), out=a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
