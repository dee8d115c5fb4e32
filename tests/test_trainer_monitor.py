"""trainer/monitor.py: analytic FLOPs against torch's FLOP counter, derived fields with a fake clock, JSONL and
TensorBoard output across a resume, peak TFLOP/s / MFU reporting and the progress-bar switch."""
import json
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from trainer import monitor as mon
from trainer.clip.model import CLIP, get_config
from trainer.monitor import Monitor, flops_per_sample, make_monitor, peak_memory_bytes, peak_tflops


def _counted(cfg, train: bool, backward: bool = False) -> float:
    """Per-sample FLOPs torch's dispatch-level counter sees (every mm/bmm/addmm/conv) on a meta-device model."""
    with torch.device("meta"):
        model = CLIP(cfg).train(train)
        images = torch.randn(2, 3, cfg.vision.image_size, cfg.vision.image_size)
        tokens = torch.zeros(2, cfg.text.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        image_features, text_features, _ = model(images, tokens)
        if backward:
            (image_features.sum() + text_features.sum()).backward()
    return counter.get_total_flops() / 2


@pytest.mark.parametrize("name", ["tiny", "small", "RN50"])
def test_forward_flops_match_counter(name):
    cfg = get_config(name)
    assert flops_per_sample(cfg, train=False) == pytest.approx(_counted(cfg, train=False), rel=0.01)


def test_vit_patch_dropout_and_train_convention():
    cfg = get_config("tiny")
    assert flops_per_sample(cfg) == pytest.approx(_counted(cfg, True, backward=True), rel=0.02)  # fwd + bwd = 3x
    cfg.vision.patch_dropout = 0.5
    assert flops_per_sample(cfg) == pytest.approx(_counted(cfg, True, backward=True), rel=0.02)
    assert flops_per_sample(cfg) < 0.7 * flops_per_sample(get_config("tiny"))  # fewer tokens in the vision blocks
    assert flops_per_sample(cfg, train=False) == flops_per_sample(get_config("tiny"), train=False)  # eval: all
    full = flops_per_sample(cfg)
    assert full < flops_per_sample(cfg, recompute=True) < 4 / 3 * full + 1  # recompute only for HFU
    assert flops_per_sample("tiny", batch=1024) - flops_per_sample("tiny") == 3 * 4 * 1024 * cfg.embed_dim


def test_vit_b_numbers_the_bench_reports():
    assert 3 * flops_per_sample("ViT-B-32", train=False, batch=256) == pytest.approx(44.33e9, rel=1e-3)
    assert flops_per_sample("ViT-B-16", batch=256) == pytest.approx(123.26e9, rel=1e-3)


def test_peak_tflops_and_memory(monkeypatch):
    monkeypatch.delenv(mon.PEAK_ENV, raising=False)
    assert peak_tflops("cpu") is None
    monkeypatch.setenv(mon.PEAK_ENV, "100")
    assert peak_tflops("cpu") == 100.0
    monkeypatch.delenv(mon.PEAK_ENV)
    names = {"NVIDIA H100 80GB HBM3": 989, "NVIDIA H100 PCIe": 756, "NVIDIA H200": 989, "NVIDIA A100-SXM4-80GB": 312,
             "NVIDIA A10G": 125, "NVIDIA L4": 121, "Tesla V100-SXM2-16GB": 125, "NVIDIA GeForce RTX 4090": 165,
             "NVIDIA L40S": 362, "Some Future GPU": None}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: current)
    for current, expected in names.items():
        assert peak_tflops(torch.device("cuda", 0)) == expected, current
    assert peak_tflops(torch.device("cuda", 0), precision="fp32") is None
    assert peak_memory_bytes("cpu") > 10 * 2**20  # peak RSS in bytes (a torch process is > 10 MiB)


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_derived_fields_eta_and_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(mon.PEAK_ENV, raising=False)
    clock, fps = FakeClock(), 1e9
    m = Monitor(tmp_path, 100, global_batch=64, world_size=4, flops_per_sample=fps, clock=clock, progress=False,
                tensorboard=False)
    clock.t += 8.0
    row = m.log(10, torch.tensor(2.5), lr=1e-3, logit_scale=torch.tensor(14.0), skipped_samples=3, epoch=0.5)
    assert row["samples_per_s"] == pytest.approx(640 / 8) and row["samples_per_s_per_device"] == pytest.approx(20)
    assert row["tflops_per_device"] == pytest.approx(20 * fps / 1e12)
    assert row["mfu"] is None  # CPU, no CLIPFORGE_PEAK_TFLOPS
    assert row["eta_s"] == pytest.approx(90 * 0.8) and row["elapsed_s"] == pytest.approx(8.0)
    assert row["loss"] == 2.5 and row["logit_scale"] == 14.0 and row["epoch"] == 0.5 and row["peak_mem_gb"] > 0
    clock.t += 2.0
    row = m.log(20, 2.0, samples=1280)  # faster interval; ETA uses the mean rate of the run so far (10 s / 20 steps)
    assert row["samples_per_s"] == pytest.approx(640) and row["eta_s"] == pytest.approx(80 * 0.5)
    m.log(25, 1.95, grad_norm=0.75, loss_scale=32768.0, overflow_steps=2)  # fp16 runs add the scaler's state
    m.log(30, 1.9, interval_s=5.0, grad_norm=None, loss_scale=16384.0, overflow_steps=3)  # an overflowed step
    m.log_eval(30, {"zeroshot_top1": 0.25})
    m.close()
    out = capsys.readouterr().out
    assert "[trainer] step 10/100 loss 2.5000 lr 1.00e-03 80.0 samples/s skipped 3" in out and "eta 00:01:12" in out
    assert "MFU" not in out and "[trainer] eval step 30: zeroshot_top1 0.25" in out
    assert "grad norm 0.75 loss scale 32768 overflow steps 2 |" in out
    assert "skipped 0 loss scale 16384 overflow steps 3 |" not in out and " loss scale 16384 overflow steps 3 |" in out
    assert "grad norm" not in out.split("step 30/100")[1].split("\n")[0]  # no norm on an overflowed step
    row25 = _read(tmp_path / "metrics.jsonl")[2]
    assert (row25["step"], row25["grad_norm"], row25["loss_scale"], row25["overflow_steps"]) == (25, 0.75, 32768.0, 2)

    # resume from a checkpoint at step 20: the crashed run's row 30 (and its eval) is dropped, the rest continues
    monkeypatch.setenv(mon.PEAK_ENV, "0.001")
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 40, "loss": 1.')  # a half-written line from the crash
    clock = FakeClock()
    m = make_monitor(0, tmp_path, 100, start_step=20, global_batch=64, world_size=4, flops_per_sample=fps,
                     clock=clock, progress=False, tensorboard=False)
    clock.t += 4.0
    row = m.log(30, 1.8)
    m.close()
    assert row["eta_s"] == pytest.approx(70 * 0.4) and row["elapsed_s"] == pytest.approx(10.0 + 4.0)
    assert row["mfu"] == pytest.approx(row["tflops_per_device"] / 0.001)
    rows = _read(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [10, 20, 30] and rows[-1]["loss"] == 1.8
    assert not (tmp_path / "eval.jsonl").read_text()
    fresh = Monitor(tmp_path, 5, clock=clock, progress=False, tensorboard=False)  # start_step 0: empty files
    fresh.close()
    assert not (tmp_path / "metrics.jsonl").read_text()


def test_other_ranks_are_no_ops(tmp_path):
    m = make_monitor(1, tmp_path / "run", 10, progress=True)
    assert m.log(1, 1.0) == {} and m.log_eval(1, {"a": 1.0}) == {}
    m.close()
    assert not (tmp_path / "run").exists()


def test_tensorboard_scalars(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv(mon.PEAK_ENV, "1")
    clock = FakeClock()
    with Monitor(tmp_path, 4, global_batch=8, flops_per_sample=1e9, clock=clock, progress=False) as m:
        for step in (2, 4):
            clock.t += 1.0
            m.log(step, 3.0 / step, lr=0.1)
        m.log_eval(4, {"recall@5": 0.5})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/samples_per_s", "train/mfu", "train/eta_s", "eval/recall@5"} <= tags
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 1.5), (4, 0.75)]
    assert acc.Scalars("train/samples_per_s")[0].value == pytest.approx(16.0)
    assert math.isclose(acc.Scalars("eval/recall@5")[0].value, 0.5)

    with Monitor(tmp_path, 4, start_step=2, global_batch=8, clock=clock, progress=False) as m:  # resume at 2
        clock.t += 1.0
        m.log(4, 0.5)
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(2, 1.5), (4, 0.5)]  # the old step 4 purged


def test_progress_bar_only_on_a_tty(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(mon.PROGRESS_ENV, raising=False)
    m = Monitor(None, 10)  # pytest's captured stderr is not a TTY
    assert m.bar is None
    m.close()
    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    monkeypatch.setenv(mon.PROGRESS_ENV, "0")
    assert Monitor(None, 10).bar is None
    monkeypatch.delenv(mon.PROGRESS_ENV)
    clock = FakeClock()
    m = Monitor(None, 10, start_step=4, global_batch=2, clock=clock)
    assert m.bar is not None and m.bar.n == 4
    clock.t += 1.0
    m.log(6, 0.5)
    assert m.bar.n == 6
    m.close()
    captured = capsys.readouterr()
    assert "[trainer] step" not in captured.out and "6/10" in captured.err and "samples_s=4.0" in captured.err
