"""SigLIP loss and contrastive-aware gradient accumulation (CPU, gloo, fp32).

- the 2-rank SigLIP local loss (gathered texts with grad) == the 1-process full-batch sigmoid loss, grads too;
- the feature-cache accumulation on 2 ranks x 2 micro-batches == the full batch (both losses, plain autograd);
- train_step on a real DeepSpeed engine (world 1): micro 4 x accum 2 == micro 8 x accum 1 (loss, grad norm,
  gradients, parameters after each optimizer step), clip and siglip, ZeRO 0 and 2;
- the no-grad and the grad pass of a micro-batch see the same patch-dropout draw (RNG restored).
"""
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.loss import ClipLoss, FeatureCache, SigLipLoss, siglip_loss
from trainer.clip.model import CLIP, get_config
from trainer.clip.tokenizer import tokenize
from trainer.config import TrainConfig
from trainer.step import make_train_module, train_step
from helpers import free_port

N, WORLD = 8, 2


def _model(patch_dropout=0.0):
    torch.manual_seed(0)
    cfg = get_config("tiny")
    cfg.vision.patch_dropout = patch_dropout
    return CLIP(cfg)


def _data(n=N, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 3, 64, 64, generator=g)
    tokens = tokenize([f"caption number {i} of batch {seed}" for i in range(n)], 32)
    return images, tokens


def _loss_module(name):
    return SigLipLoss(init_bias=-2.0) if name == "siglip" else ClipLoss()  # bias -2: a loss with real gradient


def _full_batch(name):
    """Single process, no process group: the full-batch loss and grads (model + loss parameters)."""
    module = make_train_module(_model(), name)
    module.loss = _loss_module(name)
    images, tokens = _data()
    loss = module(images, tokens)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


def _rank_main(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        images, tokens = _data()
        b = N // WORLD
        results = {}
        for name in ("clip", "siglip"):
            # (a) the plain distributed local loss on this rank's b samples
            # (b) accumulation: 2 micro-batches of b/2 per rank, features cached without grad, each re-run with grad
            for mode in ("local", "accum"):
                module = make_train_module(_model(), name)
                module.loss = _loss_module(name)
                mine = images[rank * b : (rank + 1) * b], tokens[rank * b : (rank + 1) * b]
                if mode == "local":
                    loss = module(*mine)[0]
                    loss.backward()
                    losses = [loss.detach()]
                else:
                    micro = [(mine[0][j : j + b // 2], mine[1][j : j + b // 2]) for j in (0, b // 2)]
                    with torch.no_grad():
                        feats = [module(im, tok, features_only=True) for im, tok in micro]
                    cache = FeatureCache.build([f[0] for f in feats], [f[1] for f in feats])
                    assert cache.image.shape == (WORLD, 2, b // 2, 128)
                    losses = []
                    for i, (im, tok) in enumerate(micro):
                        loss = module(im, tok, cache=cache.at(i))[0]
                        loss.backward()  # summed over micro-batches, NOT divided by their number
                        losses.append(loss.detach())
                grads = {n: p.grad.clone() for n, p in module.named_parameters()}
                for g in grads.values():  # data parallelism: average the gradients over ranks
                    dist.all_reduce(g)
                    g /= WORLD
                loss_mean = torch.stack(losses)
                dist.all_reduce(loss_mean)
                results[(name, mode)] = {"losses": loss_mean / WORLD, "grads": grads}
        if rank == 0:
            torch.save(results, os.path.join(out_dir, "dist.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("accum")
    mp.spawn(_rank_main, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    return torch.load(out / "dist.pt")


@pytest.mark.parametrize("name", ["siglip", "clip"])
@pytest.mark.parametrize("mode", ["local", "accum"])
def test_two_rank_loss_and_grads_equal_full_batch(two_rank_results, name, mode):
    got = two_rank_results[(name, mode)]
    loss, grads = _full_batch(name)
    for micro_loss in got["losses"]:  # every accumulation pass evaluates the same full-batch loss
        torch.testing.assert_close(micro_loss, loss, rtol=1e-5, atol=1e-6)
    assert set(got["grads"]) == set(grads)
    if name == "siglip":
        assert "loss.logit_bias" in grads and grads["loss.logit_bias"].abs() > 0
    for n, g in grads.items():
        torch.testing.assert_close(got["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)


def test_siglip_matches_reference_formula():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 16), dim=-1)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    ref = 0.0
    for i in range(5):
        for j in range(5):
            z = 1.0 if i == j else -1.0
            ref -= math.log(torch.sigmoid(z * (scale * img[i] @ txt[j] + bias)).item())
    torch.testing.assert_close(siglip_loss(img, txt, scale, bias), torch.tensor(ref / 5), rtol=1e-5, atol=1e-6)
    assert SigLipLoss().logit_bias.item() == -10.0 and SigLipLoss().logit_bias.shape == ()
    module = make_train_module(_model(), "siglip")
    assert math.isclose(module.model.logit_scale.item(), math.log(10), rel_tol=1e-6)
    assert "loss.logit_bias" in dict(module.named_parameters())


# --------------------------------------------------------------------------- DeepSpeed engine, world 1
@pytest.fixture
def ds_world1():
    from trainer.engine import destroy_distributed, init_distributed
    from trainer.launch import single_process_env

    with single_process_env():
        init_distributed(TrainConfig.tiny())
        try:
            yield
        finally:
            destroy_distributed()


def _engine(loss_name, micro, accum, zero, patch_dropout=0.0, grad_checkpointing=False):
    from trainer.engine import build_engine

    # eps 1e-3: parameters whose true gradient is 0 (an attention key bias: softmax ignores a shift of every logit)
    # get float-noise gradients (~1e-9) of either sign, which Adam with eps 1e-6 would turn into steps of
    # ~lr * |g| / eps ~ 1e-5 in a direction set by rounding (it differs between CPUs). A larger eps keeps that
    # noise at ~1e-8 while a wrong accumulation (other gradients) still changes the step.
    cfg = TrainConfig.tiny(batch_size=micro, grad_accum=accum, zero=zero, grad_clip=1e6, loss=loss_name, warmup=1,
                           lr=1e-3, weight_decay=0.1, eps=1e-3, patch_dropout=patch_dropout,
                           grad_checkpointing=grad_checkpointing)
    engine, _, _ = build_engine(cfg, 1, total_steps=10)  # the CLIP of _model(patch_dropout): tiny, seed 0
    return engine


def _run(engine, micro, accum, steps=2):
    """`steps` optimizer steps over fixed data (8 samples per step); per step: loss, grad norm, grads, params."""
    captured = {}
    zero0 = engine.zero_optimization_stage() == 0
    if zero0:  # snapshot the accumulated gradients right before the (single) optimizer step
        inner = engine.optimizer.step

        def step(*args, **kwargs):
            captured.setdefault("grads", []).append(
                {n: p.grad.detach().clone() for n, p in engine.module.named_parameters()})
            return inner(*args, **kwargs)

        engine.optimizer.step = step
    rows = []
    for s in range(steps):
        images, tokens = _data(8, seed=10 + s)
        batches = [(images[i * micro : (i + 1) * micro], tokens[i * micro : (i + 1) * micro]) for i in range(accum)]
        before = engine.global_steps
        loss, _ = train_step(engine, batches)
        assert engine.global_steps == before + 1  # exactly one optimizer step per accumulated batch
        rows.append({"loss": loss.item(), "grad_norm": engine.get_global_grad_norm(),
                     "params": {n: p.detach().clone() for n, p in engine.module.named_parameters()}})
    for row, grads in zip(rows, captured.get("grads", [None] * steps)):
        row["grads"] = grads
    return rows


@pytest.mark.parametrize("loss_name,zero", [("clip", 0), ("siglip", 0), ("clip", 2)])
def test_accumulation_matches_full_batch_on_deepspeed(ds_world1, loss_name, zero):
    full = _run(_engine(loss_name, micro=8, accum=1, zero=zero), micro=8, accum=1)
    accum = _run(_engine(loss_name, micro=4, accum=2, zero=zero), micro=4, accum=2)
    for a, f in zip(accum, full):
        assert math.isclose(a["loss"], f["loss"], rel_tol=1e-5), (a["loss"], f["loss"])
        assert math.isclose(a["grad_norm"], f["grad_norm"], rel_tol=1e-5), (a["grad_norm"], f["grad_norm"])
        if a["grads"] is not None:
            for n, g in f["grads"].items():
                torch.testing.assert_close(a["grads"][n], g, rtol=1e-4, atol=1e-6, msg=n)
        for n, p in f["params"].items():
            torch.testing.assert_close(a["params"][n], p, rtol=1e-5, atol=1e-5, msg=n)


def test_wrong_number_of_micro_batches_is_an_error(ds_world1):
    engine = _engine("clip", micro=4, accum=2, zero=0)
    with pytest.raises(ValueError, match="accumulates 2"):
        train_step(engine, [_data(4)])


def test_patch_dropout_draw_is_identical_in_both_passes(ds_world1):
    engine = _engine("clip", micro=4, accum=2, zero=0, patch_dropout=0.5, grad_checkpointing=True)
    seen = []
    engine.module.model.visual.patch_dropout.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    images, tokens = _data(8)
    torch.manual_seed(123)
    train_step(engine, [(images[:4], tokens[:4]), (images[4:], tokens[4:])])
    # no-grad pass: micro 0, micro 1; grad pass: micro 0, micro 1 (checkpoint recomputation is inside blocks)
    assert len(seen) == 4 and seen[0].shape[1] == 1 + 32  # 64 patches of 8x8, half dropped (+ class token)
    torch.testing.assert_close(seen[2], seen[0], rtol=0, atol=0)
    torch.testing.assert_close(seen[3], seen[1], rtol=0, atol=0)
