"""Training telemetry for rank 0: analytic FLOPs, peak TFLOP/s of known GPUs, peak memory, and a Monitor that turns
what the loop hands it into metrics.jsonl rows, TensorBoard scalars and a progress bar (or plain log lines).

Files under OUT (the run dir): metrics.jsonl (one JSON object per logged training step), eval.jsonl (one per
log_eval call), tensorboard/ (event files: train/<key>, eval/<key>). No DeepSpeed or Ray here; tensorboard and tqdm
are imported only when a Monitor is built with them switched on.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from trainer.clip.configs import CLIPConfig, get_config
from trainer.clip.formats.atomic import atomic_write_text
from trainer.clip.procinfo import peak_rss_bytes

PEAK_ENV, PROGRESS_ENV = "CLIPFORGE_PEAK_TFLOPS", "CLIPFORGE_PROGRESS"


# ------------------------------------------------------------------------------------------------------ FLOPs
def _block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """One transformer block's forward: qkv (3D^2) + out (D^2) + MLP (2 D H) matmuls, + QK^T and AV (full T^2)."""
    hidden = int(width * mlp_ratio)
    return 2 * tokens * (4 * width**2 + 2 * width * hidden) + 4 * tokens**2 * width


def _resnet_flops(cfg: CLIPConfig) -> tuple[float, float]:
    """(forward FLOPs of the ModifiedResNet tower, the part inside Bottleneck blocks); trainer/clip/resnet.py's layout."""
    v, w = cfg.vision, cfg.vision.width
    r, h = v.image_size // 2, w // 2
    stem = 2 * r * r * 9 * (3 * h + h * h + h * w)  # three 3x3 convs at S/2 (the first one strided)
    r, cin, blocks = r // 2, w, 0  # 2x2 avgpool
    for i, depth in enumerate(v.layers):
        p = w * 2**i
        for b in range(depth):
            ro = r // 2 if (b == 0 and i > 0) else r  # the strided 3x3 runs at r, then an avgpool
            blocks += 2 * (r * r * cin * p + r * r * 9 * p * p + ro * ro * p * 4 * p)  # 1x1, 3x3, 1x1 (x4)
            if b == 0 and (ro != r or cin != 4 * p):
                blocks += 2 * ro * ro * cin * 4 * p  # shortcut: avgpool + 1x1 conv
            r, cin = ro, 4 * p
    c, tokens = w * 32, (v.image_size // 32) ** 2 + 1
    pool = 2 * c * c + 4 * tokens * c * c + 4 * tokens * c + 2 * c * cfg.embed_dim  # q; k, v; attention; c_proj
    return stem + blocks + pool, blocks


def flops_per_sample(model_config: CLIPConfig | str, train: bool = True, *, batch: int = 0,
                     recompute: bool = False) -> float:
    """Analytic FLOPs (multiply-add = 2) for one image + one caption through both towers.

    Counted: every matmul / conv (ViT: patch embedding, the blocks' qkv/out/MLP matmuls plus QK^T and AV, the
    projection; ModifiedResNet: every conv, the attention pool's projections and attention; text: the blocks,
    with the full (not half) causal T^2 attention, the projection). Not counted: norms, activations, softmax,
    embeddings lookups, the optimizer. With train=True the forward is x3 (forward + backward) and ViT patch
    dropout (vision.patch_dropout) shrinks the tokens the blocks see to 1 + max(1, int(N * (1 - p))); with
    train=False it is one forward over every patch. `batch` > 0 adds the contrastive logits of a global batch of
    that size (4 * batch * embed_dim per sample; 0.15% of ViT-B-32 at B=32k). MFU convention: activation-checkpointing
    recompute is NOT counted (model FLOPs); recompute=True adds one more forward of every checkpointed block
    (trainer.parallel wraps transformer blocks and ResNet Bottlenecks), i.e. hardware FLOPs for an HFU (an upper
    bound: torch's non-reentrant checkpoint stops recomputing once the saved tensors are back, skipping e.g. a
    transformer block's last MLP matmul). Exact against torch.utils.flop_counter for every preset (tests).
    """
    cfg = get_config(model_config) if isinstance(model_config, str) else model_config
    v, t = cfg.vision, cfg.text
    if v.is_resnet:
        vision, vision_blocks = _resnet_flops(cfg)
    else:
        n = (v.image_size // v.patch_size) ** 2
        kept = max(1, int(n * (1.0 - v.patch_dropout))) if train and v.patch_dropout > 0 else n
        vision_blocks = v.layers * _block_flops(kept + 1, v.width, v.mlp_ratio)
        vision = 2 * n * 3 * v.patch_size**2 * v.width + vision_blocks + 2 * v.width * cfg.embed_dim
    text_blocks = t.layers * _block_flops(t.context_length, t.width, t.mlp_ratio)
    forward = vision + text_blocks + 2 * t.width * cfg.embed_dim + 4 * batch * cfg.embed_dim
    if not train:
        return forward
    return 3 * forward + (vision_blocks + text_blocks if recompute else 0)


# ------------------------------------------------------------------------------------------------------ device
# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's spec sheets (fp16 for V100 / T4, which lack bf16).
# First substring match of the lower-cased device name wins, so longer names come first.
PEAK_TFLOPS = (("b200", 2250.0), ("h200 nvl", 835.0), ("h200", 989.0), ("gh200", 989.0), ("h100 nvl", 835.0),
               ("h100 pcie", 756.0), ("h100", 989.0), ("h800", 989.0), ("a100", 312.0), ("a800", 312.0),
               ("l40s", 362.0), ("l40", 181.0), ("l4", 121.0), ("a10g", 125.0), ("a10", 125.0),
               ("rtx 6000 ada", 364.0), ("a6000", 155.0), ("4090", 165.0), ("3090", 71.0), ("v100", 125.0),
               ("t4", 65.0))


def peak_tflops(device=None, precision: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of one device: $CLIPFORGE_PEAK_TFLOPS if set, else the table above for a known CUDA GPU
    at bf16/fp16 (the name from torch.cuda.get_device_name), else None (CPU, unknown GPU, fp32): no MFU then."""
    if os.environ.get(PEAK_ENV):
        return float(os.environ[PEAK_ENV])
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    if device.type != "cuda" or precision not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device).lower()
    return next((tf for key, tf in PEAK_TFLOPS if key in name), None)


def peak_memory_bytes(device=None) -> int:
    """torch.cuda.max_memory_allocated on a CUDA device; on CPU the process's peak RSS (ru_maxrss: KiB on Linux)."""
    device = torch.device("cuda" if device is None and torch.cuda.is_available() else (device or "cpu"))
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return peak_rss_bytes()


_detect_peak = peak_tflops  # Monitor's argument of the same name shadows it


# ------------------------------------------------------------------------------------------------------ monitor
def _num(x):
    return x.item() if isinstance(x, torch.Tensor) else x


def _hms(s: float | None) -> str:
    return "?" if s is None else time.strftime("%H:%M:%S", time.gmtime(max(0.0, s)))


def _keep_rows_upto(path: Path, step: int) -> dict | None:
    """Drop the rows of a JSONL file whose step > `step` (rows a crashed run logged past its resume point, or
    everything on a fresh start at step 0) and unparsable (half-written) lines. Returns the last kept row."""
    if not path.exists():
        return None
    lines, kept, last = path.read_text(encoding="utf-8").splitlines(), [], None
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
            last = row
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(k + "\n" for k in kept))
    return last


class Monitor:
    """Rank 0's metrics sink. log(step, loss, ...) once per log interval -> one row (returned) with the derived
    samples_per_s, samples_per_s_per_device, tflops_per_device, mfu (null if the peak is unknown), peak_mem_gb
    (10^9 bytes, this process's device), elapsed_s and eta_s. Rows go to OUT/metrics.jsonl (appended, flushed),
    TensorBoard (train/<key>) and a tqdm bar on stderr, or, when the bar is off (stderr not a TTY,
    CLIPFORGE_PROGRESS=0, progress=False), a plain "[trainer] step ..." line. log_eval -> OUT/eval.jsonl + eval/<key>.

    Resume: start_step=k drops rows with step > k from both JSONL files (rows after the checkpoint a crashed run
    had already logged; a fresh run, k=0, starts them empty), TensorBoard hides the older event files' points from
    step k + 1 on (purge_step), the bar starts at k, ETA counts only the steps this process ran, and elapsed_s
    continues from the last kept row.
    peak_tflops=None -> peak_tflops(device, precision) (env override, GPU table, else None: mfu null).
    enabled=False (other ranks) makes every method a no-op. `clock` is injectable for tests.
    """

    def __init__(self, out_dir=None, total_steps: int = 0, *, start_step: int = 0, global_batch: int = 0,
                 world_size: int = 1, flops_per_sample: float | None = None, peak_tflops: float | None = None,
                 device=None, precision: str = "bf16", enabled: bool = True, progress: bool | None = None,
                 tensorboard: bool = True, clock=time.monotonic, prefix: str = "[trainer]"):
        self.enabled, self.total, self.start_step, self.last_step = enabled, total_steps, start_step, start_step
        self.global_batch, self.world, self.flops, self.prefix = global_batch, world_size, flops_per_sample, prefix
        self.device, self.clock, self.bar, self.writer, self.files = device, clock, None, None, {}
        if not enabled:
            return
        self.peak = peak_tflops if peak_tflops is not None else _detect_peak(device, precision)
        self.t_last, self.run_s, self.elapsed_before = clock(), 0.0, 0.0
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            for kind in ("metrics", "eval"):
                last = _keep_rows_upto(out / f"{kind}.jsonl", start_step)
                if kind == "metrics" and last:
                    self.elapsed_before = float(last.get("elapsed_s", 0.0))
                self.files[kind] = open(out / f"{kind}.jsonl", "a", encoding="utf-8")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out / "tensorboard"), purge_step=start_step + 1)
        env = os.environ.get(PROGRESS_ENV, "")
        if progress is None:
            progress = env == "1" or (env != "0" and sys.stderr.isatty())
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def log(self, step: int, loss, *, lr=None, logit_scale=None, samples: int | None = None,
            interval_s: float | None = None, skipped_samples: int | None = None, **extra) -> dict:
        """One logged step. samples (global, this interval) defaults to (step - last logged step) * global_batch;
        interval_s defaults to the clock time since the last log (or construction). Tensors are .item()-ed;
        extra keys (e.g. epoch=...) are copied into the row."""
        if not self.enabled:
            return {}
        now = self.clock()
        dt = max(float(interval_s if interval_s is not None else now - self.t_last), 1e-9)
        samples = samples if samples is not None else (step - self.last_step) * self.global_batch
        self.t_last, self.last_step, self.run_s = now, step, self.run_s + dt
        run_s, sps = self.run_s, samples / dt
        per_dev = sps / max(self.world, 1)
        tflops = per_dev * self.flops / 1e12 if self.flops else None
        done = step - self.start_step
        row = {"step": step, "loss": float(_num(loss))}
        row.update({k: _num(v) for k, v in (("lr", lr), ("logit_scale", logit_scale),
                                            ("skipped_samples", skipped_samples)) if v is not None})
        row.update({"samples_per_s": sps, "samples_per_s_per_device": per_dev, "tflops_per_device": tflops,
                    "mfu": tflops / self.peak if tflops is not None and self.peak else None,
                    "peak_mem_gb": peak_memory_bytes(self.device) / 1e9,
                    "elapsed_s": self.elapsed_before + run_s,
                    "eta_s": (self.total - step) * run_s / done if done > 0 else None,
                    **{k: _num(v) for k, v in extra.items()}})
        self._write("metrics", "train", step, row)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", samples_s=f"{sps:.1f}", refresh=False)
            self.bar.update(step - self.bar.n)  # redraws (at most every 0.1 s): step/total, rate, ETA, postfix
        else:
            print(self.format(row), flush=True)
        return row

    def format(self, row: dict) -> str:
        """The plain log line: the pre-Monitor '[trainer] step N/T loss .. lr .. X samples/s skipped K' + extras."""
        s = f"{self.prefix} step {row['step']}/{self.total} loss {row['loss']:.4f}"
        s += f" lr {row['lr']:.2e}" if "lr" in row else ""
        s += f" {row['samples_per_s']:.1f} samples/s"
        s += f" skipped {row['skipped_samples']}" if "skipped_samples" in row else ""
        s += f" grad norm {row['grad_norm']:.3g}" if row.get("grad_norm") is not None else ""
        s += (f" loss scale {row['loss_scale']:g} overflow steps {row.get('overflow_steps', 0)}"
              if "loss_scale" in row else "")
        s += f" | {row['samples_per_s_per_device']:.1f}/device"
        s += f" {row['tflops_per_device']:.2f} TFLOP/s" if row["tflops_per_device"] is not None else ""
        s += f" MFU {100 * row['mfu']:.1f}%" if row["mfu"] is not None else ""
        return s + f" peak mem {row['peak_mem_gb']:.2f} GB eta {_hms(row['eta_s'])}"

    def log_eval(self, step: int, metrics: dict) -> dict:
        """Evaluation results at `step` -> OUT/eval.jsonl ({"step", **metrics}) and TensorBoard eval/<key>."""
        if not self.enabled:
            return {}
        row = {"step": step, **{k: _num(v) for k, v in metrics.items()}}
        self._write("eval", "eval", step, row)
        line = f"{self.prefix} eval step {step}: " + " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items() if k != "step")
        (self.bar.write if self.bar is not None else print)(line)
        return row

    def _write(self, kind: str, tag: str, step: int, row: dict) -> None:
        if kind in self.files:
            self.files[kind].write(json.dumps(row) + "\n")
            self.files[kind].flush()
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"{tag}/{k}", v, step)
            self.writer.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        for f in self.files.values():
            f.close()
        self.bar, self.writer, self.files = None, None, {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_monitor(rank: int, out_dir, total_steps: int, **kwargs) -> Monitor:
    """Monitor(...) on rank 0, a no-op Monitor(enabled=False) on every other rank."""
    return Monitor(out_dir, total_steps, enabled=rank == 0, **kwargs)
