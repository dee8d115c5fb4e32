"""ZeRO stages, activation checkpointing and accumulation agree (2 gloo ranks, CPU, fp32), bf16 master weights,
and fp16 config/errors.

One spawn of 2 ranks trains the tiny CLIP for 4 optimizer steps on the same fixed batches (4 samples per rank per
step, gradient clipping 1.0 on) under several engine configurations; the loss curve, the gradient norms and the
final full fp32 weights must match the reference (ZeRO 0, no checkpointing, no accumulation) within
rtol 1e-4 (losses, grad norms) and rtol 1e-4 / atol 1e-5 (weights).
"""
import json
import math
import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from trainer.engine import build_ds_config
from trainer.clip.model import CLIP, get_config
from trainer.clip.tokenizer import tokenize
from trainer.config import TrainConfig
from trainer.step import make_train_module, train_step
from trainer.train import main
from helpers import free_port

WORLD, STEPS, PER_RANK = 2, 4, 4
# (loss, zero stage, grad checkpointing, grad accum): the first row of each loss is its reference
RUNS = [
    ("clip", 0, False, 1),
    ("clip", 0, True, 1),
    ("clip", 1, True, 1),
    ("clip", 2, True, 1),
    ("clip", 3, True, 1),
    ("clip", 3, True, 2),
    ("siglip", 0, False, 1),
    ("siglip", 2, True, 2),
    ("siglip", 3, True, 1),
]


def _batches(step, rank):
    g = torch.Generator().manual_seed(100 * step + rank)
    images = torch.randn(PER_RANK, 3, 64, 64, generator=g)
    tokens = tokenize([f"step {step} rank {rank} caption {i}" for i in range(PER_RANK)], 32)
    return images, tokens


def _train(loss, zero, ckpt, accum, rank):
    from trainer.engine import build_engine, full_fp32_state_dict

    micro = PER_RANK // accum
    cfg = TrainConfig.tiny(batch_size=micro, grad_accum=accum, zero=zero, grad_checkpointing=ckpt, loss=loss,
                           warmup=1, lr=1e-3, grad_clip=1.0)
    engine, _, _ = build_engine(cfg, WORLD, total_steps=10)  # the tiny CLIP from seed 0
    losses, norms = [], []
    for step in range(STEPS):
        images, tokens = _batches(step, rank)
        micro_batches = [(images[i * micro : (i + 1) * micro], tokens[i * micro : (i + 1) * micro])
                         for i in range(accum)]
        loss_value, _ = train_step(engine, micro_batches)
        mean = loss_value.detach().clone()
        torch.distributed.all_reduce(mean)
        losses.append(mean.item() / WORLD)
        norms.append(float(engine.get_global_grad_norm()))
    state = full_fp32_state_dict(engine, zero)
    if hasattr(engine, "destroy"):  # drop ZeRO-3 hooks / partitions before the next engine
        engine.destroy()
    return {"losses": losses, "norms": norms, "state": state}


def _bf16_masters(zero, rank):
    """A bf16 engine: its fp32 master weights right after init and after 2 steps (2 ranks, each its partition)."""
    from trainer.engine import build_engine, full_fp32_state_dict

    cfg = TrainConfig.tiny(batch_size=PER_RANK, zero=zero, precision="bf16", warmup=1, lr=1e-3, loss="siglip",
                           grad_checkpointing=False)
    torch.manual_seed(0)  # the module build_engine makes from seed 0, in fp32
    init = {k: v.detach().clone() for k, v in make_train_module(CLIP(get_config("tiny")), "siglip").named_parameters()}
    engine, _, _ = build_engine(cfg, WORLD, total_steps=10)
    at_init = full_fp32_state_dict(engine, zero)
    for step in range(2):
        train_step(engine, [_batches(step, rank)])
    trained = full_fp32_state_dict(engine, zero)
    if hasattr(engine, "destroy"):
        engine.destroy()
    return {"init": init, "at_init": at_init, "trained": trained}


def _rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from trainer.engine import destroy_distributed, init_distributed

    init_distributed(TrainConfig.tiny())
    try:
        results = {}
        for run in RUNS:
            t0 = time.time()
            results[run] = _train(*run, rank)
            results[run]["seconds"] = time.time() - t0
        for zero in range(4):
            results[("bf16", zero)] = _bf16_masters(zero, rank)
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "zero.pt"))
    finally:
        destroy_distributed()


@pytest.fixture(scope="module")
def zero_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero")
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "zero.pt")


@pytest.mark.parametrize("run", RUNS[1:6] + RUNS[7:], ids=lambda r: f"{r[0]}-zero{r[1]}-ckpt{int(r[2])}-accum{r[3]}")
def test_same_loss_curve_and_weights_as_zero0(zero_results, run):
    ref = zero_results[next(r for r in RUNS if r[0] == run[0])]
    got = zero_results[run]
    assert len(got["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref["losses"]), rtol=1e-4, atol=0)
    assert ref["losses"][-1] < ref["losses"][0]  # it trains
    torch.testing.assert_close(torch.tensor(got["norms"]), torch.tensor(ref["norms"]), rtol=1e-4, atol=0)
    assert set(got["state"]) == set(ref["state"])
    for name, p in ref["state"].items():
        torch.testing.assert_close(got["state"][name], p, rtol=1e-4, atol=1e-5, msg=name)
    if run[0] == "siglip":
        assert got["state"]["loss.logit_bias"].item() != -10.0  # the bias is trained by the engine's optimizer


@pytest.mark.parametrize("zero", range(4))
def test_bf16_master_weights_start_exact_and_are_exported(zero_results, zero):
    """DeepSpeed builds the fp32 masters from the bf16-cast module; build_engine resets them to the exact fp32 init
    (SigLIP's logit_scale = log 10, not its bf16 rounding), and the exported weights are the masters (at stage 0 too,
    which deepspeed.utils.safe_get_full_fp32_param does not cover), not the bf16 copies."""
    got = zero_results[("bf16", zero)]
    for name, value in got["init"].items():
        assert torch.equal(got["at_init"][name], value), name
    assert got["at_init"]["model.logit_scale"].item() == pytest.approx(math.log(10), abs=1e-6)  # bf16: 2.296875
    trained = torch.cat([v.flatten() for k, v in got["trained"].items() if k in got["init"]])
    assert (trained != trained.bfloat16().float()).float().mean() > 0.9  # fp32 values, not bf16 copies
    changed = torch.cat([(got["trained"][k] - v).abs().flatten() for k, v in got["init"].items()])
    assert changed.max() > 1e-4  # it trained


def test_fp16_ds_config_uses_dynamic_loss_scaling():
    cfg = TrainConfig.tiny(precision="fp16", zero=1, batch_size=4, grad_accum=2)
    ds = build_ds_config(cfg, world_size=2)
    assert ds["fp16"]["enabled"] is True and ds["fp16"]["loss_scale"] == 0
    assert ds["fp16"]["initial_scale_power"] == 16 and ds["bf16"]["enabled"] is False
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 2
    for precision in ("fp32", "bf16"):
        assert build_ds_config(TrainConfig.tiny(precision=precision), 1)["fp16"]["enabled"] is False


def test_fp16_on_cpu_is_a_clear_error(tmp_path, capsys):
    from deepspeed.accelerator import get_accelerator

    from trainer.engine import check_precision

    if get_accelerator().is_fp16_supported():
        pytest.skip("this accelerator supports fp16")
    with pytest.raises(ValueError, match="fp16"):
        check_precision("fp16")
    check_precision("fp32")
    from helpers import write_shards

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    assert main(["--shards", str(shards), "--out", str(tmp_path / "run"), "--preset", "tiny", "--steps", "1",
                 "--precision", "fp16"]) == 2
    assert "--precision fp16 is not supported" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before any rank or engine started


def test_ds_config_written_for_accumulation_run(tmp_path):
    from helpers import write_shards

    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    out = tmp_path / "run"
    assert main(["--shards", str(shards), "--out", str(out), "--preset", "tiny", "--steps", "2", "--nproc", "1",
                 "--batch-size", "4", "--grad-accum", "2", "--loss", "siglip", "--zero", "0"]) == 0
    ds = json.loads((out / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["loss"] == "siglip" and summary["grad_accum"] == 2 and summary["samples_seen"] == 16
    loss_state = json.loads((out / "loss_state.json").read_text())
    assert loss_state["loss"] == "siglip" and loss_state["logit_bias"] != -10.0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

