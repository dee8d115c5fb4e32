"""Wrappers applied to a CLIP from the outside (the model file stays pure)."""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model import ResidualAttentionBlock


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each residual block's activations in backward instead of storing them.

    Wraps every ResidualAttentionBlock's forward (an instance attribute, so state_dict keys are unchanged) with
    torch.utils.checkpoint.checkpoint(use_reentrant=False). Idempotent. Returns the number of blocks wrapped.
    """
    wrapped = 0
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock) and not getattr(module, "_checkpointed", False):
            inner = module.forward  # the bound original forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, **kwargs):
                if not torch.is_grad_enabled():  # eval / no_grad: nothing to save, call directly
                    return _inner(*args, **kwargs)
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            module.forward = forward
            module._checkpointed = True
            wrapped += 1
    return wrapped
