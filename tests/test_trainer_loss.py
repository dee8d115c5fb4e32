"""The distributed local loss (2 gloo ranks) equals the single-process full-batch loss, gradients included."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.loss import clip_loss
from trainer.clip.model import CLIP, get_config
from trainer.clip.tokenizer import tokenize
from helpers import free_port

N, WORLD = 8, 2


def _model():
    torch.manual_seed(0)
    return CLIP(get_config("tiny"))


def _data():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(N, 3, 64, 64, generator=g)
    tokens = tokenize([f"caption number {i}" for i in range(N)], 32)
    return images, tokens


def _rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = _model()
        images, tokens = _data()
        b = N // WORLD
        sl = slice(rank * b, (rank + 1) * b)
        loss = clip_loss(*model(images[sl], tokens[sl]))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        for g in grads.values():  # what data parallelism does: average the gradients
            dist.all_reduce(g)
            g /= WORLD
        loss_mean = loss.detach().clone()
        dist.all_reduce(loss_mean)
        loss_mean /= WORLD
        if rank == 0:
            torch.save({"loss": loss_mean, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


def test_two_rank_loss_and_grads_equal_full_batch(tmp_path):
    mp.spawn(_rank_main, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "dist.pt")

    model = _model()
    images, tokens = _data()
    loss = clip_loss(*model(images, tokens))  # no process group: plain full-batch loss
    loss.backward()
    torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_single_process_loss_matches_reference_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    scale = torch.tensor(14.0)
    logits = scale * img @ txt.T
    labels = torch.arange(5)
    ref = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(clip_loss(img, txt, scale), ref)


def _blocked_equals_dense(monkeypatch, n, m, block_rows, scalars, blocked, dense, upstream):
    """Run loss(x, y, *scalars) blocked (BLOCK_ELEMENTS = block_rows rows) and dense on the same normalised
    [n, 16] / [m, 16] inputs, backward with an upstream gradient other than 1; value and every gradient agree."""
    import trainer.loss as L

    monkeypatch.setattr(L, "BLOCK_ELEMENTS", block_rows * m)
    g = torch.Generator().manual_seed(n * 100 + m)
    x0 = torch.nn.functional.normalize(torch.randn(n, 16, generator=g), dim=-1)
    y0 = torch.nn.functional.normalize(torch.randn(m, 16, generator=g), dim=-1)
    results = []
    for fn in (blocked, dense):
        x, y = x0.clone().requires_grad_(), y0.clone().requires_grad_()
        params = [torch.tensor(v, requires_grad=True) for v in scalars]
        loss = fn(x, y, *params)
        (upstream * loss).backward()
        results.append((loss.detach(), x.grad, y.grad, *(p.grad for p in params)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("n,m,offset,block_rows", [(7, 7, 0, 3), (3, 9, 3, 2), (4, 12, 8, 1), (5, 5, 0, 5)])
def test_blocked_cross_entropy_equals_dense(monkeypatch, n, m, offset, block_rows, smoothing):
    """The CLIP loss's row-blocked cross-entropy (no [n, M] logits held) = F.cross_entropy on the dense logits:
    value and gradients w.r.t. rows, columns and the scale, for uneven blocks and a local-loss offset, with and
    without label smoothing (torch's label_smoothing)."""
    from trainer.loss import BlockedCrossEntropy

    _blocked_equals_dense(
        monkeypatch, n, m, block_rows, [14.0],
        blocked=lambda x, y, s: BlockedCrossEntropy.apply(x, y, s, offset, smoothing),
        dense=lambda x, y, s: torch.nn.functional.cross_entropy(s * x @ y.T, torch.arange(n) + offset,
                                                                label_smoothing=smoothing),
        upstream=2.5)


def test_label_smoothing_is_clip_only():
    from trainer.config import TrainConfig
    from trainer.loss import ClipLoss, make_loss

    assert isinstance(make_loss("clip", 0.1), ClipLoss) and make_loss("clip", 0.1).label_smoothing == 0.1
    with pytest.raises(ValueError, match="label-smoothing"):
        make_loss("siglip", 0.1)
    with pytest.raises(ValueError, match="--label-smoothing needs --loss clip"):
        TrainConfig.tiny(loss="siglip", label_smoothing=0.1)


@pytest.mark.parametrize("n,m,offset,block_rows", [(7, 7, 0, 3), (3, 9, 3, 2), (5, 5, 0, 5)])
def test_blocked_sigmoid_loss_equals_dense(monkeypatch, n, m, offset, block_rows):
    """SigLIP's row-blocked loss = the dense formula -1/n sum log sigmoid(z * (s x.y + b)): value and gradients."""
    from trainer.loss import BlockedSigmoidLoss

    z = -torch.ones(n, m)
    z[torch.arange(n), torch.arange(n) + offset] = 1.0
    _blocked_equals_dense(
        monkeypatch, n, m, block_rows, [10.0, -3.0],
        blocked=lambda x, y, s, b: BlockedSigmoidLoss.apply(x, y, s, b, offset),
        dense=lambda x, y, s, b: -torch.nn.functional.logsigmoid(z * (s * x @ y.T + b)).sum() / n,
        upstream=1.5)
