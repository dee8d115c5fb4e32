"""Memory options of activation checkpointing (offload of block inputs, batch-chunked recompute), the low-precision
LayerNorm, and the fake-tensor memory benchmark (bench/bench_memory.py) that measures them without a GPU."""
import json

import pytest
import torch
import torch.nn.functional as F

from helpers import load_bench, loss_and_grads, write_shards
from trainer.clip.model import CLIP, LayerNorm, get_config
from trainer.parallel import apply_activation_checkpointing, offload_saved_tensors
from trainer.clip.tokenizer import tokenize
from trainer.train import main


def tiny_model(checkpointing=True, **opts):
    torch.manual_seed(0)
    model = CLIP(get_config("tiny"))
    if checkpointing:
        apply_activation_checkpointing(model, **opts)
    return model


def batch(n):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), tokenize([f"{i} red dogs" for i in range(n)], context_length=32)


@pytest.mark.parametrize("opts", [dict(offload=True), dict(chunks=3), dict(offload=True, chunks=4),
                                  dict(policy="selective"), dict(policy="selective", chunks=3, offload=True),
                                  dict(group=2, chunks=3), dict(group=3, offload=True),
                                  dict(group=2, policy="selective")])
def test_offload_and_chunks_give_the_same_loss_and_grads(opts):
    images, tokens = batch(7)  # 7 rows in 3 or 4 chunks: uneven parts
    loss_a, grads_a = loss_and_grads(tiny_model(checkpointing=False), images, tokens)
    loss_b, grads_b = loss_and_grads(tiny_model(**opts), images, tokens)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def _step_flops(model, images, tokens) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        loss_and_grads(model, images, tokens)
    return counter.get_total_flops()


def test_selective_checkpointing_runs_no_matmul_twice():
    """Full checkpointing recomputes every block's forward in backward; selective keeps the matmul outputs, so a
    step costs exactly the FLOPs of a step without checkpointing (the recomputed element-wise ops count 0)."""
    images, tokens = batch(4)
    plain = _step_flops(tiny_model(checkpointing=False), images, tokens)
    full = _step_flops(tiny_model(), images, tokens)
    selective = _step_flops(tiny_model(policy="selective"), images, tokens)
    assert selective == plain and full > 1.15 * plain


def test_checkpoint_groups_keep_one_input_per_group():
    """group=2: each tower's 4 blocks become 2 checkpointed groups (state_dict unchanged, idempotent); the offload
    hook sees one saved tensor per group and chunk; the recompute costs a little more than per-block."""
    model = tiny_model(checkpointing=False)
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, group=2) == 4 and apply_activation_checkpointing(model) == 0
    assert list(model.state_dict()) == keys
    images, tokens = batch(4)
    per_block = _step_flops(tiny_model(), images, tokens)  # torch stops each recompute before the last MLP matmul;
    assert per_block < _step_flops(model, images, tokens) < 1.1 * per_block  # a group recomputes its inner ones
    seen = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: seen.append(t.shape) or t, lambda t: t):
        apply_activation_checkpointing(grouped := tiny_model(checkpointing=False), group=2, chunks=2)
        grouped(images, tokens)
    cfg = get_config("tiny")
    block_inputs = [s for s in seen if s[1:] in ((32, cfg.text.width),
                                                 ((cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1,
                                                  cfg.vision.width)) and s[0] == 2]
    assert len(block_inputs) == 2 * 2 + 2 * 2  # (2 groups x 2 chunks) per tower
    with pytest.raises(ValueError, match="group"):
        apply_activation_checkpointing(tiny_model(checkpointing=False), group=0)


def test_unknown_checkpoint_policy_is_rejected():
    with pytest.raises(ValueError, match="policy"):
        tiny_model(policy="some")


def test_offload_saves_only_block_inputs():
    """Under checkpointing, the saved-tensor hooks see exactly one tensor per block: its input."""
    seen = []

    class Spy(offload_saved_tensors):
        def __init__(self, host="cpu"):
            super().__init__(host)
            pack = self.pack_hook
            self.pack_hook = lambda t: (seen.append(tuple(t.shape)), pack(t))[1]

    import trainer.parallel as parallel

    original = parallel.offload_saved_tensors
    parallel.offload_saved_tensors = Spy
    try:
        model = tiny_model(offload=True, chunks=2)
        images, tokens = batch(4)
        image_features, text_features, scale = model(images, tokens)
    finally:
        parallel.offload_saved_tensors = original
    cfg = get_config("tiny")
    grid = (cfg.vision.image_size // cfg.vision.patch_size) ** 2 + 1
    image_inputs = [s for s in seen if s[1:] == (grid, cfg.vision.width)]
    text_inputs = [s for s in seen if s[1:] == (32, cfg.text.width)]
    assert len(image_inputs) == 2 * cfg.vision.layers and len(text_inputs) == 2 * cfg.text.layers  # 2 chunks each
    assert len(seen) == len(image_inputs) + len(text_inputs) and all(s[0] == 2 for s in seen)


def test_chunks_rejected_below_one_and_flags_need_checkpointing(tmp_path, capsys):
    with pytest.raises(ValueError, match="chunks"):
        apply_activation_checkpointing(CLIP(get_config("tiny")), chunks=0)
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=8)
    for flags in (["--offload-activations"], ["--checkpoint-policy", "selective"], ["--checkpoint-group", "2"]):
        assert main(["--shards", str(shards), "--out", str(tmp_path / "r"), "--preset", "tiny",
                     "--no-grad-checkpointing", *flags]) == 2
        assert "need --grad-checkpointing" in capsys.readouterr().err


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_training_run_with_offload_and_chunks(tmp_path, policy):
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    out = tmp_path / "run"
    assert main(["--shards", str(shards), "--out", str(out), "--preset", "tiny", "--steps", "2", "--nproc", "1",
                 "--grad-checkpointing", "--offload-activations", "--checkpoint-chunks", "2",
                 "--checkpoint-policy", policy, "--checkpoint-group", "2"]) == 0
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["offload_activations"] is True and resolved["checkpoint_chunks"] == 2
    assert resolved["checkpoint_policy"] == policy and resolved["checkpoint_group"] == 2
    assert json.loads((out / "summary.json").read_text())["steps"] == 2


def test_bf16_layernorm_matches_fp32_reference_and_keeps_no_fp32_copy():
    torch.manual_seed(0)
    ln = LayerNorm(96)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = torch.randn(8, 40, 96) * 4 + 2
    ref = F.layer_norm(x, (96,), ln.weight, ln.bias, ln.eps)  # fp32
    out = ln.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=0.05, rtol=0.02)  # bf16 rounding of the result only
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append((t.dtype, t.shape)) or t, lambda t: t):
        ln(x.bfloat16().requires_grad_())
    full = [dtype for dtype, shape in saved if shape == x.shape]
    assert full == [torch.bfloat16]  # the input, saved once in bf16 (no fp32 copy of the activations)


# ------------------------------------------------------------------------------------- bench/bench_memory.py
def test_memory_bench_counts_executed_flops():
    """... and no matmul runs twice: the executed FLOPs of a selective step are the model FLOPs (3 x forward, the
    analytic count the trainer's MFU uses), full checkpointing adds the recomputed block matmuls."""
    pytest.importorskip("open_clip")
    from trainer.monitor import flops_per_sample

    bench = load_bench("bench_memory")
    cfg = get_config("ViT-B-32")
    model_gflop = flops_per_sample(cfg, batch=64) / 1e9
    flops = {name: bench.simulate("ViT-B-32", side, 64, count_flops=True, **kw)["gflop_per_sample"]
             for name, side, kw in [("open_clip", "open_clip", {}), ("full", "clipforge", {}),
                                    ("selective", "clipforge", {"policy": "selective"})]}
    assert flops["selective"] == pytest.approx(model_gflop, rel=0.01)
    assert flops["full"] == pytest.approx(flops["open_clip"], rel=0.001) and flops["full"] > 1.15 * flops["selective"]


def test_live_bytes_counts_allocations_views_and_frees():
    bench = load_bench("bench_memory")
    tracker = bench.LiveBytes()
    with tracker:
        a = torch.empty(1024)  # 4 KiB
        v = a.view(32, 32)  # a view: no new bytes
        b = torch.empty(2048, dtype=torch.bfloat16)  # 4 KiB
        del b
        c = torch.empty(256)  # 1 KiB, after b was freed
    assert tracker.peak["cpu"] == 8192 and tracker.current["cpu"] == 4096 + 1024
    del a, v, c


def test_memory_bench_tiny_orders_the_variants(tmp_path):
    pytest.importorskip("open_clip")
    bench = load_bench("bench_memory")
    plain = bench.simulate("tiny", "clipforge", 256)
    offload = bench.simulate("tiny", "clipforge", 256, offload=True)
    chunked = bench.simulate("tiny", "clipforge", 256, offload=True, chunks=8)
    assert plain["host_gib"] == 0 and offload["host_gib"] > 0  # block inputs went to the simulated host
    assert chunked["device_gib"] < offload["device_gib"] < plain["device_gib"]
    oc = bench.simulate("tiny", "open_clip", 256)
    assert oc["device_gib"] > 0 and oc["host_gib"] == 0
    selective = bench.simulate("tiny", "clipforge", 256, policy="selective")
    assert selective["device_gib"] > plain["device_gib"]  # matmul outputs kept: more memory ...
    both = bench.simulate("tiny", "clipforge", 256, policy="selective", offload=True, chunks=8)
    assert both["device_gib"] < selective["device_gib"] and both["host_gib"] > offload["host_gib"]  # ... offloadable
    best, runs = bench.largest_batch("tiny", "clipforge", budget_gib=chunked["device_gib"], cap=1024,
                                     probe=64, offload=True, chunks=8)
    assert best == 256 and runs > 2  # the budget is the peak at 256: the search lands there
