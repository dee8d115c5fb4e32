"""torch.compile of the transformer blocks from outside (trainer.parallel.compile_blocks), with and without
activation checkpointing, and the trainer's --compile flag. CPU: inductor generates C++ (the first step of each
test compiles, ~10-30 s)."""
import copy
import json
import math

import pytest
import torch

from helpers import loss_and_grads, write_shards
from trainer.clip.model import CLIP, get_config
from trainer.parallel import apply_activation_checkpointing, compile_blocks
from trainer.clip.tokenizer import tokenize
from trainer.train import main


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 64, 64, generator=g), tokenize([f"{i} red dogs" for i in range(n)], context_length=32)


@pytest.mark.parametrize("opts", [None, dict(policy="full", chunks=2), dict(policy="selective")])
def test_compiled_blocks_give_the_same_loss_and_grads(opts):
    torch.manual_seed(0)
    ref = CLIP(get_config("tiny"))
    model = copy.deepcopy(ref)
    keys = list(model.state_dict())
    if opts is not None:
        apply_activation_checkpointing(model, **opts)
    counters = torch._dynamo.utils.counters
    assert compile_blocks(model) == 8 and compile_blocks(model) == 0  # 4 + 4 blocks; idempotent
    assert list(model.state_dict()) == keys  # in-place compile: checkpoints load as before
    images, tokens = _batch()
    loss_a, grads_a = loss_and_grads(ref, images, tokens)
    loss_b, grads_b = loss_and_grads(model, images, tokens)
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-5, rtol=1e-4, msg=name)
    # really compiled: dynamo captured graphs, and no block fell back to eager at a graph break
    assert counters["stats"]["unique_graphs"] >= 1
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_compile_flag_trains_and_refuses_what_it_cannot_do(tmp_path, capsys):
    """Refused: ZeRO-3, activation offload, grouped checkpointing (only per-block checkpointing is compiled)."""
    shards = write_shards(tmp_path / "shards", n_shards=1, per_shard=16)
    base = ["--shards", str(shards), "--preset", "tiny", "--steps", "2", "--batch-size", "4", "--compile"]
    for extra, message in ((["--zero", "3"], "--zero 3"), (["--offload-activations"], "--offload-activations"),
                           (["--checkpoint-group", "2"], "--checkpoint-group 1")):
        assert main([*base, "--out", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
    out = tmp_path / "run"
    assert main([*base, "--out", str(out), "--nproc", "1", "--checkpoint-policy", "selective"]) == 0
    resolved = json.loads((out / "train_config.json").read_text())
    assert resolved["compile"] is True and resolved["checkpoint_policy"] == "selective"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and math.isfinite(summary["final_loss"])
