"""Periodic checkpoints and exact resume: a 2-rank run SIGKILLed mid-run and resumed with --resume latest
continues with the same losses as an uninterrupted run (CPU, gloo, DeepSpeed ZeRO)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import write_shards
from trainer import resume
from trainer.clip.checkpoint import load_model
from trainer.train import main


def _losses(run):
    return {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.parametrize("zero,extra", [(2, []), (3, ["--grad-accum", "2", "--patch-dropout", "0.3"])])
def test_killed_run_resumes_with_identical_losses(tmp_path, monkeypatch, zero, extra):
    shards = write_shards(tmp_path / "shards", n_shards=3, per_shard=12, size=32, corrupt_keys={7})
    args = ["--shards", str(shards), "--preset", "tiny", "--steps", "8", "--batch-size", "4", "--nproc", "2",
            "--zero", str(zero), "--log-every", "1", "--save-every", "3", "--keep-last", "2", "--shuffle-buffer", "10",
            "--workers", "1", *extra]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0

    monkeypatch.setenv("CLIPFORGE_FAULT_STEP", "5")  # rank 1 is SIGKILLed after step 5; last checkpoint: step 3
    assert main([*args, "--out", str(run), "--resume", "latest"]) != 0
    assert resume.find(run / "checkpoints", "latest").name == "step_00000003"
    assert max(_losses(run)) >= 5  # the killed run got past its checkpoint before dying
    monkeypatch.delenv("CLIPFORGE_FAULT_STEP")
    assert main([*args, "--out", str(run), "--resume", "latest"]) == 0

    expected, got = _losses(ref), _losses(run)
    assert sorted(got) == list(range(1, 9))  # rows the killed run logged after step 3 were replaced
    for step in range(4, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from_step"] == 3 and summary["steps"] == 8
    assert summary["skipped_samples"] == json.loads((ref / "summary.json").read_text())["skipped_samples"]
    assert [p.name for p in resume.complete(run / "checkpoints")] == ["step_00000006", "step_00000008"]
    a, b = load_model(ref / "checkpoint").state_dict(), load_model(run / "checkpoint").state_dict()
    assert all((a[k] - b[k]).abs().max() < 1e-4 for k in a)
    assert (run / "open_clip" / "open_clip_config.json").is_file()


def test_bf16_stage0_resume_is_exact(tmp_path):
    """bf16 at ZeRO 0 keeps its fp32 masters in DeepSpeed's FP16_UnfusedOptimizer (not a ZeRO optimizer): a run
    resumed from the step-3 checkpoint continues with the same losses and final fp32 weights (one process)."""
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=16, size=32)
    args = ["--shards", str(shards), "--preset", "tiny", "--steps", "6", "--batch-size", "8", "--zero", "0",
            "--precision", "bf16", "--log-every", "1", "--save-every", "3", "--keep-last", "3", "--workers", "0"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main([*args, "--out", str(ref)]) == 0
    assert main([*args, "--out", str(run), "--resume", str(ref / "checkpoints" / "step_00000003")]) == 0
    expected, got = _losses(ref), _losses(run)
    assert sorted(got) == [4, 5, 6] and all(got[s] == expected[s] for s in got)
    a, b = load_model(ref / "checkpoint").state_dict(), load_model(run / "checkpoint").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_arguments(tmp_path, capsys):
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=8, size=32)
    base = ["--shards", str(shards), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1"]
    assert main([*base, "--resume", str(tmp_path / "nope")]) == 2
    assert "not a complete clipforge training checkpoint" in capsys.readouterr().err
    assert main([*base, "--save-every", "-1"]) == 2
    # --resume latest without any checkpoint yet: a fresh start (safe to pass in every requeued job)
    assert main([*base, "--resume", "latest", "--save-every", "1"]) == 0
    assert "no checkpoint to resume yet" in capsys.readouterr().out
    assert resume.find(tmp_path / "run" / "checkpoints", "latest").name == "step_00000001"


def test_sigterm_saves_a_checkpoint_and_stops(tmp_path):
    """Preemption: SIGTERM to the launcher reaches every rank (via torchrun); they agree at the next log step, save a
    checkpoint together and exit 143-style; --resume latest continues from that step."""
    shards = write_shards(tmp_path / "shards", n_shards=2, per_shard=8, size=32)
    out = tmp_path / "run"
    args = ["--shards", str(shards), "--out", str(out), "--preset", "tiny", "--batch-size", "4", "--nproc", "2",
            "--log-every", "1", "--shuffle-buffer", "4"]
    env = {**os.environ, "CLIPFORGE_PROGRESS": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "trainer.train", *args, "--steps", "100000"], env=env,
                            cwd=Path(__file__).resolve().parents[1])
    deadline = time.time() + 300
    while time.time() < deadline and len(_losses(out) if (out / "metrics.jsonl").is_file() else {}) < 2:
        assert proc.poll() is None, "training ended before it was signalled"
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) != 0
    saved = resume.find(out / "checkpoints", "latest")
    step = json.loads((saved / "meta.json").read_text())["step"]
    assert step >= 2 and not (out / "summary.json").exists()
    assert main([*args, "--steps", str(step + 1), "--resume", "latest"]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == step
