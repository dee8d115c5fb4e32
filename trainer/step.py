"""One optimizer step: the module DeepSpeed wraps (the CLIP + its loss) and train_step, with contrastive-aware
gradient accumulation. Used by the training loop, the tests and the GPU benchmark alike.
"""
from __future__ import annotations

import torch
from torch import nn

from trainer import resume
from trainer.clip.model import CLIP
from trainer.loss import SIGLIP_INIT_LOGIT_SCALE, ContrastiveLoss, FeatureCache, make_loss
from trainer.parallel import frozen_batchnorm_stats


class TrainModule(nn.Module):
    """What the DeepSpeed engine wraps: the CLIP model (unchanged) and the loss module with its own parameters.

    forward(images, tokens) -> (loss, image_features, text_features, logit_scale) with the loss computed inside
    (so under ZeRO-3 the loss parameters are gathered by the engine's hooks like any others);
    features_only=True -> (image_features, text_features, logit_scale); cache -> the contrastive-aware
    accumulation loss of this micro-batch's fresh features against the cached ones (trainer.loss.FeatureCache).
    """

    def __init__(self, model: nn.Module, loss: ContrastiveLoss):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, images, tokens, cache: FeatureCache | None = None, features_only: bool = False):
        image_features, text_features, logit_scale = self.model(images, tokens)
        if features_only:
            return image_features, text_features, logit_scale
        loss = self.loss(image_features, text_features, logit_scale, cache=cache)
        return loss, image_features, text_features, logit_scale


def make_train_module(model: CLIP, loss: str, label_smoothing: float = 0.0) -> TrainModule:
    """Wrap a CLIP with the named loss. SigLIP starts from its paper's temperature: logit_scale = log 10."""
    if loss == "siglip":
        with torch.no_grad():
            model.logit_scale.fill_(SIGLIP_INIT_LOGIT_SCALE)
    return TrainModule(model, make_loss(loss, label_smoothing))


def train_step(engine, micro_batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over N = len(micro_batches) micro-batches of (images, tokens) already on the device.

    N must equal the engine's gradient_accumulation_steps. N == 1: forward, backward, step. N > 1
    (contrastive-aware, like open_clip's accum_freq):
      1. every micro-batch runs without grad; its features are cached and gathered once across ranks. The torch
         RNG state before each is saved, and BatchNorm running stats are frozen for this pass (they are updated
         once, in pass 2);
      2. micro-batch i re-runs with grad from its saved RNG state (patch dropout draws the same tokens, so the
         fresh features equal the cached ones); its loss scores the fresh features against the cache (every
         other micro-batch of every rank as negatives). The N backward passes each carry the gradient through
         one slot of the same full-batch loss, so their SUM is the full-batch gradient: DeepSpeed's 1/N
         (engine.backward divides by gradient_accumulation_steps) is undone by passing loss * N.
         (Not scale_wrt_gas=False: in DeepSpeed 0.19 the engine's forward-output hook on the loss tensor then
         fires before backward() registers its graph and divides by N anyway.) engine.step() follows each
         backward; DeepSpeed turns the N calls into exactly one optimizer step at the accumulation boundary.
    Returns (this rank's loss (detached; the mean of the N micro losses, which all equal the full accumulated
    batch loss), logit_scale (detached)).
    """
    n = len(micro_batches)
    gas = engine.gradient_accumulation_steps()
    if n != gas:
        raise ValueError(f"train_step got {n} micro-batches but the engine accumulates {gas}")
    if n == 1:
        images, tokens = micro_batches[0]
        loss, _, _, logit_scale = engine(images, tokens)
        engine.backward(loss)
        engine.step()
        return loss.detach(), logit_scale.detach()

    rng_states, image_features, text_features = [], [], []
    with torch.no_grad(), frozen_batchnorm_stats(engine.module):
        for images, tokens in micro_batches:
            rng_states.append(resume.rng_state())
            img, txt, _ = engine(images, tokens, features_only=True)
            image_features.append(img)
            text_features.append(txt)
    cache = FeatureCache.build(image_features, text_features)
    del image_features, text_features
    rng_after = resume.rng_state()
    total = None
    for i, (images, tokens) in enumerate(micro_batches):
        resume.set_rng_state(rng_states[i])
        loss, _, _, logit_scale = engine(images, tokens, cache=cache.at(i))
        engine.backward(loss * n)  # DeepSpeed divides by n: the sum over micro-batches is the full gradient
        engine.step()
        total = loss.detach() if total is None else total + loss.detach()
    resume.set_rng_state(rng_after)
    return total / n, logit_scale.detach()
