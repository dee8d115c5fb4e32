"""Contrastive losses (CLIP's softmax and SigLIP's sigmoid), distributed as "local losses" over gathered features,
and the feature cache that makes gradient accumulation contrastive-aware.

Every rank holds b pairs. Features are all-gathered WITH gradient (GatherWithGrad below: same semantics as
torch.distributed.nn.functional.all_gather, which torch 2.13 deprecates; its backward sums every rank's gradient
for a slice back to the slice's owner), and each rank scores its own b rows against all
W*b columns. The positives of rank r sit at columns r*b .. r*b+b-1. With the data-parallel gradient average over
ranks this yields exactly the gradient of the single-process full-batch loss, at O(b * W*b) memory per rank.

Gradient accumulation over N micro-batches (trainer.step.train_step) first computes every micro-batch's
features without grad and gathers them once (FeatureCache, [W, N, b, E], no grad). Micro-batch i is then re-run
with grad; its fresh features replace slot i of the cache on every rank (fresh slots are gathered with grad), so
each rank scores its N*b local rows against all W*N*b columns. Summing the N backward passes gives exactly the
gradient of the full W*N*b-sample loss (each pass carries the gradient through slot i only), so the per-micro
losses must NOT be divided by N (train_step hands DeepSpeed loss * N, which it divides by N). The loss's own scalars
(logit_scale, SigLIP's logit_bias) enter every pass with the whole loss behind them, so their gradient is scaled
by 1/N on the way back (FeatureCache.shared): summed over the N passes it is their full-batch gradient once,
not N times.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

LOSSES = ("clip", "siglip")


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


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on every rank -> [W, b, ...] (rank order), no autograd."""
    _, world = _world()
    if world == 1:
        return x.unsqueeze(0)
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, dim=0)


# ------------------------------------------------------------------------------------------------ losses
BLOCK_ELEMENTS = 1 << 24  # logits held at once by the CLIP / SigLIP loss: 64 MB in fp32 (rows per block = this // M)


def _rows_per_block(n: int, M: int) -> int:
    """Rows of an [n, M] logits matrix computed at once so that a block holds at most BLOCK_ELEMENTS logits."""
    return max(1, min(n, BLOCK_ELEMENTS // max(M, 1)))


class BlockedCrossEntropy(torch.autograd.Function):
    """mean over rows k of [logsumexp_j(s * x_k.y_j) - s * x_k.y_(offset+k)]: F.cross_entropy of the [n, M] logits
    s * x @ y.T with labels offset + k, computed in row blocks so that the logits never exist whole.

    x: [n, E] rows, y: [M, E] columns, s: scalar. Forward keeps only the n row logsumexps; backward recomputes each
    block's logits, turns them into softmax - one-hot and accumulates dx, dy and ds. Memory O(block * M) instead of
    the dense version's ~4 [n, M] fp32 matrices (logits, log-softmax, their gradients) — at a 40k batch on one GPU
    that is ~20-25 GB; cost: one more [block, E] x [E, M] matmul per block in backward (~0.1% of a ViT-B step).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, y: torch.Tensor, s: torch.Tensor, offset: int,
                smoothing: float = 0.0) -> torch.Tensor:
        n, M = x.shape[0], y.shape[0]
        block = _rows_per_block(n, M)
        lse = torch.cat([torch.logsumexp(s * (x[i:i + block] @ y.T), dim=1) for i in range(0, n, block)])  # [n]
        positives = s * (x * y[offset:offset + n]).sum(dim=1)  # [n]
        target = (1 - smoothing) * positives  # label smoothing: the target puts `smoothing` evenly on all M
        if smoothing:
            target = target + smoothing * s * (x @ y.mean(dim=0))  # mean_j logits_kj, without the [n, M] matrix
        ctx.save_for_backward(x, y, s, lse)
        ctx.offset, ctx.block, ctx.smoothing = offset, block, smoothing
        return (lse - target).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, y, s, lse = ctx.saved_tensors
        n, block = x.shape[0], ctx.block
        dx, dy, ds = torch.empty_like(x), torch.zeros_like(y), torch.zeros_like(s)
        for i in range(0, n, block):
            xb = x[i:i + block]  # [c, E]
            dots = xb @ y.T  # [c, M]
            g = torch.exp(s * dots - lse[i:i + block, None])  # softmax rows
            rows = torch.arange(xb.shape[0], device=x.device)
            g[rows, ctx.offset + i + rows] -= 1.0 - ctx.smoothing  # d(lse - target) / d(logits)
            if ctx.smoothing:
                g -= ctx.smoothing / y.shape[0]
            g *= grad / n
            ds += (g * dots).sum()
            dx[i:i + block] = s * (g @ y)
            dy += s * (g.T @ xb)
        return dx, dy, ds, None, None


def _clip_logits_loss(img, txt, all_img, all_txt, logit_scale, offset, smoothing: float = 0.0):
    """Rows: this rank's n pairs; columns: all M pairs; positives of row k at column offset + k. Image->text and
    text->image cross-entropy, each in row blocks (BlockedCrossEntropy), with optional label smoothing (= torch's
    F.cross_entropy(label_smoothing=...))."""
    return (BlockedCrossEntropy.apply(img, all_txt, logit_scale, offset, smoothing)
            + BlockedCrossEntropy.apply(txt, all_img, logit_scale, offset, smoothing)) / 2


class BlockedSigmoidLoss(torch.autograd.Function):
    """-(1/n) sum_kj log sigmoid(z_kj (s * x_k.y_j + b)), z = +1 at (k, offset + k) and -1 elsewhere, in row blocks
    like BlockedCrossEntropy: no [n, M] logits / signs matrices held, backward recomputes each block."""

    @staticmethod
    def _block(x, y, s, b, offset, i, block):  # -> (dots [c, M], z * logits [c, M])
        xb = x[i:i + block]
        dots = xb @ y.T
        zl = -(s * dots + b)
        rows = torch.arange(xb.shape[0], device=x.device)
        zl[rows, offset + i + rows] *= -1.0
        return dots, zl

    @staticmethod
    def forward(ctx, x, y, s, b, offset: int):
        n, M = x.shape[0], y.shape[0]
        block = _rows_per_block(n, M)
        total = sum(-F.logsigmoid(BlockedSigmoidLoss._block(x, y, s, b, offset, i, block)[1]).sum()
                    for i in range(0, n, block))
        ctx.save_for_backward(x, y, s, b)
        ctx.offset, ctx.block = offset, block
        return total / n

    @staticmethod
    def backward(ctx, grad):
        x, y, s, b = ctx.saved_tensors
        n, block = x.shape[0], ctx.block
        dx, dy, ds, db = torch.empty_like(x), torch.zeros_like(y), torch.zeros_like(s), torch.zeros_like(b)
        for i in range(0, n, block):
            dots, zl = BlockedSigmoidLoss._block(x, y, s, b, ctx.offset, i, block)
            # d(-log sigmoid(z l)) / dl = -z sigmoid(-z l): z = -1 off the diagonal, +1 on it
            rows = torch.arange(dots.shape[0], device=x.device)
            g = torch.sigmoid(-zl)  # [c, M]
            g[rows, ctx.offset + i + rows] *= -1.0
            g *= grad / n
            ds += (g * dots).sum()
            db += g.sum()
            dx[i:i + block] = s * (g @ y)
            dy += s * (g.T @ x[i:i + block])
        return dx, dy, ds, db, None


def _siglip_logits_loss(img, all_txt, logit_scale, logit_bias, offset):
    """Sigmoid loss (Zhai et al., 2023): every (image, text) pair is a binary problem, +1 on the diagonal.

    Normalised by this rank's row count n, so the mean over ranks is the full-batch loss
    -1/|B| sum_ij log sigmoid(z_ij (t x_i.y_j + b)). Computed in row blocks (BlockedSigmoidLoss).
    """
    return BlockedSigmoidLoss.apply(img, all_txt, logit_scale, logit_bias, offset)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric cross-entropy (label smoothing `smoothing`). Inputs: L2-normalised [b, E] features of this rank,
    scalar logit scale.

    Returns this rank's loss (the mean over its b rows); averaging it over ranks gives the full-batch loss.
    """
    rank, _ = _world()
    image_features, text_features = image_features.float(), text_features.float()
    all_image = gather_with_grad(image_features)  # [W*b, E]
    all_text = gather_with_grad(text_features)  # [W*b, E]
    b = image_features.shape[0]
    return _clip_logits_loss(image_features, text_features, all_image, all_text, logit_scale.float(), rank * b,
                             smoothing)


def siglip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor) -> torch.Tensor:
    """Sigmoid loss of this rank's b images against all W*b (gathered with grad) texts.

    Returns this rank's loss (sum over its b rows and all columns, / b); averaging it over ranks gives the
    single-process full-batch sigmoid loss, and the data-parallel gradient average gives its gradient.
    """
    rank, _ = _world()
    image_features, text_features = image_features.float(), text_features.float()
    all_text = gather_with_grad(text_features)  # [W*b, E]
    b = image_features.shape[0]
    return _siglip_logits_loss(image_features, all_text, logit_scale.float(), logit_bias.float(), rank * b)


# ------------------------------------------------------------------------------------------ accumulation
class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


@dataclass
class FeatureCache:
    """No-grad features of all N micro-batches of one accumulated step on all W ranks, and the fresh slot.

    image, text: [W, N, b, E] (float32, rank-major: global column of (rank r, micro j, row k) = (r*N + j)*b + k).
    """

    image: torch.Tensor
    text: torch.Tensor
    index: int = 0

    @classmethod
    def build(cls, image_features: list[torch.Tensor], text_features: list[torch.Tensor]) -> "FeatureCache":
        """From this rank's per-micro-batch features ([b, E] each): one all_gather each (a collective)."""
        img = gather_no_grad(torch.stack([f.detach().float() for f in image_features]))  # [W, N, b, E]
        txt = gather_no_grad(torch.stack([f.detach().float() for f in text_features]))
        return cls(img, txt)

    @property
    def num_micro(self) -> int:
        return self.image.shape[1]

    def shared(self, x: torch.Tensor) -> torch.Tensor:
        """A loss scalar used in all N passes (logit_scale, logit_bias): identity forward, gradient / N."""
        return _ScaleGrad.apply(x, 1.0 / self.num_micro)

    def at(self, index: int) -> "FeatureCache":
        return FeatureCache(self.image, self.text, index)

    def splice(self, fresh: torch.Tensor, cached: torch.Tensor, need_global: bool):
        """fresh [b, E] (with grad) -> (local rows [N*b, E], global columns [W*N*b, E] or None, row offset)."""
        rank, world = _world()
        W, N, b, E = cached.shape
        assert fresh.shape == (b, E), f"micro-batch features {tuple(fresh.shape)} != cached {(b, E)}"
        i = self.index
        local = torch.cat([cached[rank, :i].reshape(-1, E), fresh, cached[rank, i + 1 :].reshape(-1, E)])
        glob = None
        if need_global:
            fresh_all = gather_with_grad(fresh).view(W, 1, b, E)  # every rank's fresh slot i, with grad
            glob = torch.cat([cached[:, :i], fresh_all, cached[:, i + 1 :]], dim=1).reshape(W * N * b, E)
        return local, glob, rank * N * b


class ContrastiveLoss(nn.Module):
    """Base: a loss as a module, so loss-side parameters live in the DeepSpeed engine next to the model's."""

    name = ""

    def forward(self, image_features, text_features, logit_scale, cache: FeatureCache | None = None):
        raise NotImplementedError


class ClipLoss(ContrastiveLoss):
    name = "clip"

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = float(label_smoothing)

    def forward(self, image_features, text_features, logit_scale, cache: FeatureCache | None = None):
        if cache is None:
            return clip_loss(image_features, text_features, logit_scale, self.label_smoothing)
        img, all_img, offset = cache.splice(image_features.float(), cache.image, need_global=True)
        txt, all_txt, _ = cache.splice(text_features.float(), cache.text, need_global=True)
        return _clip_logits_loss(img, txt, all_img, all_txt, cache.shared(logit_scale.float()), offset,
                                 self.label_smoothing)


class SigLipLoss(ContrastiveLoss):
    """Sigmoid loss with a learnable bias. The bias is this module's parameter (the CLIP model file is unchanged);
    trainer.train wraps model + loss in one module so DeepSpeed's optimizer (and ZeRO partitioning) owns it.
    SigLIP initialises t' = log 10 (the model's logit_scale; trainer.train sets it) and b = -10."""

    name = "siglip"

    def __init__(self, init_bias: float = -10.0):
        super().__init__()
        self.logit_bias = nn.Parameter(torch.tensor(float(init_bias)))

    def forward(self, image_features, text_features, logit_scale, cache: FeatureCache | None = None):
        if cache is None:
            return siglip_loss(image_features, text_features, logit_scale, self.logit_bias)
        img, _, offset = cache.splice(image_features.float(), cache.image, need_global=False)
        _, all_txt, _ = cache.splice(text_features.float(), cache.text, need_global=True)
        scale, bias = cache.shared(logit_scale.float()), cache.shared(self.logit_bias.float())
        return _siglip_logits_loss(img, all_txt, scale, bias, offset)


SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)


def make_loss(name: str, label_smoothing: float = 0.0) -> ContrastiveLoss:
    if label_smoothing and name != "clip":
        raise ValueError("--label-smoothing applies to --loss clip (softmax targets), not to " + name)
    if name == "clip":
        return ClipLoss(label_smoothing)
    if name == "siglip":
        return SigLipLoss()
    raise ValueError(f"--loss must be one of {', '.join(LOSSES)}, got {name!r}")
