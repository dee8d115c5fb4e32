"""CLIP's symmetric contrastive loss, distributed as a "local loss" over gathered features.

Every rank holds b pairs. Features are all-gathered WITH gradient (GatherWithGrad below: same semantics as
torch.distributed.nn.functional.all_gather, which torch 2.13 deprecates; its backward sums every rank's gradient
for a slice back to the slice's owner), and each rank scores its own b rows against all
W*b columns. The positives of rank r sit at columns r*b .. r*b+b-1. With the data-parallel gradient average over
ranks this yields exactly the gradient of the single-process full-batch loss, at O(b * W*b) memory per rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward returns sum over ranks of d(loss_rank)/d(own slice)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # [b, E] -> [W*b, E]
        rank, world = _world()
        ctx.rank, ctx.b = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # [W*b, E] -> [b, E]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # sum of every rank's gradient w.r.t. every slice (works on gloo and nccl)
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, E] on every rank -> [W*b, E] (rank order), differentiable w.r.t. every rank's input."""
    _, world = _world()
    if world == 1:
        return x
    return GatherWithGrad.apply(x)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric cross-entropy. Inputs: L2-normalised [b, E] features of this rank, scalar logit scale.

    Returns this rank's loss (the mean over its b rows); averaging it over ranks gives the full-batch loss.
    """
    rank, _ = _world()
    image_features, text_features = image_features.float(), text_features.float()
    all_image = gather_with_grad(image_features)  # [W*b, E]
    all_text = gather_with_grad(text_features)  # [W*b, E]
    b = image_features.shape[0]
    labels = torch.arange(b, device=image_features.device) + rank * b  # [b] positives in global columns
    logits_per_image = logit_scale * image_features @ all_text.T  # [b, W*b]
    logits_per_text = logit_scale * text_features @ all_image.T  # [b, W*b]
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
