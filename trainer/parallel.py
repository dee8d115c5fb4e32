"""Wrappers applied to a CLIP from the outside (the model file stays pure)."""
from __future__ import annotations

import contextlib
import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model import ResidualAttentionBlock
from trainer.resnet import Bottleneck

CHECKPOINTED = (ResidualAttentionBlock, Bottleneck)


_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def frozen_batchnorm_stats(module: nn.Module):
    """The backward-time recomputation of a block re-runs its training-mode BatchNorms, which would update
    running_mean / running_var / num_batches_tracked a second time. Point those buffers at throwaway copies for
    the recomputation and put the real ones back after: the recomputed outputs are identical (batch statistics
    are used in training mode) and the real running stats see exactly one update per step, as without
    checkpointing. (Switching track_running_stats off instead would change the tensors BatchNorm saves for
    backward, which torch.utils.checkpoint rejects.)"""
    saved = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats:
            for name in _BN_STATS:
                buf = getattr(m, name, None)
                if buf is not None:
                    saved.append((m, name, buf))
                    setattr(m, name, buf.clone())  # a registered buffer: this rebinds m._buffers[name]
    try:
        yield
    finally:
        for m, name, buf in saved:
            setattr(m, name, buf)


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block's activations in backward instead of storing them.

    Wraps every transformer ResidualAttentionBlock and every ResNet Bottleneck forward (an instance attribute, so
    state_dict keys are unchanged) with torch.utils.checkpoint.checkpoint(use_reentrant=False). The recomputation
    of a Bottleneck runs with its BatchNorm running-stat updates switched off, so a checkpointed step leaves the
    same running stats (and gives the same loss and grads) as an uncheckpointed one. Idempotent. Returns the
    number of blocks wrapped.
    """
    wrapped = 0
    for module in model.modules():
        if isinstance(module, CHECKPOINTED) and not getattr(module, "_checkpointed", False):
            inner = module.forward  # the bound original forward

            def context_fn(_module=module):
                return contextlib.nullcontext(), frozen_batchnorm_stats(_module)  # (forward, recompute)

            @functools.wraps(inner)
            def forward(*args, _inner=inner, _context_fn=context_fn, **kwargs):
                if not torch.is_grad_enabled():  # eval / no_grad: nothing to save, call directly
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, context_fn=_context_fn, **kwargs)

            module.forward = forward
            module._checkpointed = True
            wrapped += 1
    return wrapped
