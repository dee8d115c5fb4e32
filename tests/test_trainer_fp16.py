"""fp16 with dynamic loss scaling, run for real through DeepSpeed's fp16 code path (CPU, gloo).

DeepSpeed's CPU accelerator declares fp16 unsupported (so `--precision fp16` is refused on a CPU machine, tested in
test_trainer_zero.py), but its fp16 optimizers and loss scaler are plain torch and run on CPU. These tests switch
that declaration on for the test process only and train the tiny CLIP in fp16: a high initial loss scale makes the
first steps overflow, which DeepSpeed must skip (weights and LR schedule unchanged) while halving the scale; the
trainer logs the scale and the skipped steps; and a run resumed from a checkpoint taken in the middle of that
continues with the same losses, scales and skips as the uninterrupted run. And an fp16 step moves the weights as
an fp32 step does (DeepSpeed 0.19's stage-0 fp16 path does not scale the loss yet unscales the gradients: its steps
were 18x too small, so `--zero 0` runs fp16 at stage 1).
"""
import json
import math

import pytest
import torch

from helpers import write_shards
from trainer.clip.checkpoint import load_model
from trainer.train import main

STEPS, WARMUP, LR, POWER = 8, 4, 1e-3, 18
TORCH_LINEAR = torch.nn.functional.linear


@pytest.fixture
def cpu_fp16(monkeypatch):
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)


def _rows(run):
    return {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def _lr(optimizer_steps: int) -> float:  # trainer.engine's schedule after that many applied optimizer steps
    if optimizer_steps < WARMUP:
        return LR * (optimizer_steps + 1) / WARMUP
    return LR * 0.5 * (1 + math.cos(math.pi * (optimizer_steps - WARMUP) / (STEPS - WARMUP)))


@pytest.mark.parametrize("zero,accum", [(0, 1), (2, 2), (3, 1)])
def test_fp16_skips_overflowing_steps_and_resumes_exactly(tmp_path, cpu_fp16, zero, accum):
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)
    args = ["--shards", str(shards), "--preset", "tiny", "--steps", str(STEPS), "--batch-size", str(8 // accum),
            "--grad-accum", str(accum), "--zero", str(zero), "--precision", "fp16", "--loss-scale-power", str(POWER),
            "--warmup", str(WARMUP), "--lr", str(LR), "--log-every", "1", "--save-every", "3", "--keep-last", "3",
            "--workers", "0"]
    ref = tmp_path / "ref"
    assert main([*args, "--out", str(ref)]) == 0
    resolved = json.loads((ref / "train_config.json").read_text())
    assert (resolved["zero_requested"], resolved["zero"]) == (zero, max(zero, 1))  # stage-0 fp16 runs as stage 1
    rows = _rows(ref)
    assert sorted(rows) == list(range(1, STEPS + 1))
    assert json.loads((ref / "ds_config.json").read_text())["fp16"]["initial_scale_power"] == POWER

    # 2**18 overflows: step 1 is skipped at that scale (hysteresis 2), then the scale halves on each overflow
    # until the gradients fit; the scale never grows within the 1000-step window.
    overflows = [rows[s]["overflow_steps"] for s in range(1, STEPS + 1)]
    scales = [rows[s]["loss_scale"] for s in range(1, STEPS + 1)]
    assert overflows[0] == 1 and scales[0] == 2.0**POWER
    assert 2 <= overflows[-1] < STEPS  # some steps skipped, then training went on
    assert all(b - a in (0, 1) for a, b in zip(overflows, overflows[1:]))
    assert all(s == 2.0 ** round(math.log2(s)) and s <= 2.0**POWER for s in scales)
    assert all(b <= a for a, b in zip(scales, scales[1:])) and scales[-1] < 2.0**POWER
    for step in range(1, STEPS + 1):
        row, skipped_before = rows[step], rows[step - 1]["overflow_steps"] if step > 1 else 0
        # the LR used by step N: the schedule advanced once per APPLIED optimizer step before it
        assert row["lr"] == pytest.approx(_lr(step - 1 - skipped_before), rel=1e-6), step
        assert math.isfinite(row["loss"])
        if row["overflow_steps"] == skipped_before:  # an applied step has a finite, logged gradient norm
            assert row["grad_norm"] is not None and math.isfinite(row["grad_norm"])
        else:
            assert row["grad_norm"] is None
    weights = load_model(ref / "checkpoint").state_dict()
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())
    first = rows[3]["overflow_steps"]
    assert first >= 2  # the checkpoint at step 3 holds a lowered scale and a non-zero skip count

    run = tmp_path / "run"  # the run killed after step 3 (its checkpoint), resumed
    assert main([*args, "--out", str(run), "--resume", str(ref / "checkpoints" / "step_00000003")]) == 0
    got = _rows(run)
    assert sorted(got) == list(range(4, STEPS + 1))
    for step in range(4, STEPS + 1):
        for key in ("loss", "lr", "loss_scale", "overflow_steps", "grad_norm", "logit_scale"):
            assert got[step][key] == pytest.approx(rows[step][key], rel=1e-5, abs=1e-6), (step, key)
    resumed = load_model(run / "checkpoint").state_dict()
    assert all(torch.equal(weights[k], resumed[k]) for k in weights)
    assert torch.nn.functional.linear is TORCH_LINEAR  # ZeRO-3's process-wide replacement was undone


def test_fp16_step_updates_weights_like_fp32(tmp_path, cpu_fp16):
    """One AdamW step from the same init on the same batch: fp16 (requested at ZeRO 0, run at 1, a scale that does
    not overflow) moves the weights as far as fp32 does, in the same direction. DeepSpeed's own stage-0 fp16 path
    (gradients divided by a scale the loss never got) moves them 0.43x as far at this scale, 0.05x at 2**16."""
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=8, size=32)
    args = ["--shards", str(shards), "--preset", "tiny", "--steps", "1", "--batch-size", "8", "--zero", "0",
            "--warmup", "1", "--lr", "1e-3", "--workers", "0", "--loss-scale-power", "8"]
    init = load_model_state_init()
    deltas = {}
    for precision in ("fp32", "fp16"):
        out = tmp_path / precision
        assert main([*args, "--precision", precision, "--out", str(out)]) == 0
        assert json.loads((out / "summary.json").read_text())["zero_stage"] == (1 if precision == "fp16" else 0)
        after = load_model(out / "checkpoint").state_dict()
        deltas[precision] = torch.cat([(after[k] - init[k]).flatten() for k in sorted(init)])
    a, b = deltas["fp32"], deltas["fp16"]
    assert a.norm() > 0.5  # lr 1e-3 on ~1e6 weights: Adam's first step moves each by up to lr
    assert b.norm() / a.norm() == pytest.approx(1.0, abs=0.1)
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.9


def load_model_state_init() -> dict:
    """The tiny CLIP's initial weights as trainer.train builds them (torch.manual_seed(seed 0), then CLIP(...))."""
    from trainer.clip.model import CLIP, get_config

    torch.manual_seed(0)
    return CLIP(get_config("tiny")).state_dict()
