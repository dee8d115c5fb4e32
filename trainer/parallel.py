"""Wrappers applied to a CLIP from the outside (the model file stays pure)."""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from trainer.clip.model import ResidualAttentionBlock, Transformer
from trainer.clip.resnet import Bottleneck

CHECKPOINTED = (ResidualAttentionBlock, Bottleneck)
POLICIES = ("full", "selective")

# What the "selective" policy keeps from a block's forward: the outputs of the ops that hold nearly all the FLOPs
# (matmuls, convolutions, fused attention with its logsumexp). Everything else (LayerNorm, GELU, residual adds,
# BatchNorm, ReLU, views) is recomputed in backward: memory-bound work, no matmul runs twice.
_aten = torch.ops.aten
_SAVE = tuple(getattr(_aten, name).default for name in (
    "mm", "addmm", "bmm", "baddbmm", "convolution",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
) if hasattr(_aten, name))

_MATMUL_2D = (_aten.mm.default, _aten.addmm.default)  # nn.Linear: [M, K] @ [K, N] (addmm: bias first)
# Newer torch can route what selective checkpointing saves through saved-tensor hooks (the activation offload).
_SAC_HOOKS = "respect_saved_tensors_hooks" in inspect.signature(checkpoint).parameters


def _save_compute_heavy(ctx, func, *args, **kwargs) -> CheckpointPolicy:
    if func in _MATMUL_2D and args[-1].shape[-1] < args[-2].shape[-1]:
        # A down-projection (N < K: the MLP's second linear). Its output only feeds the residual add, whose
        # backward needs nothing, so it is never recomputed either (torch stops the recomputation once every
        # tensor backward needs is back): keeping it would cost memory for nothing.
        return CheckpointPolicy.PREFER_RECOMPUTE
    return CheckpointPolicy.MUST_SAVE if func in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


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


class offload_saved_tensors(torch.autograd.graph.saved_tensors_hooks):
    """Keep every tensor autograd saves inside this context in `host` memory until backward unpacks it.

    Around a checkpointed block the only tensor saved is the block's input (torch.utils.checkpoint saves it
    through the user's saved-tensor hooks; what the block computes is recomputed), so with activation offload a
    GPU holds one block's activations at a time instead of every block's input. A tensor already on `host` is
    kept as it is (CPU training: nothing to move). From a GPU the copy goes into pinned memory with
    non_blocking=True: the device-to-host copy and the later host-to-device copy are queued on the same stream,
    so the stream orders them and the compute that follows, and torch's pinned-memory allocator records the
    stream before reusing a buffer. `host` is a parameter so that the memory benchmark can send tensors to a
    device it accounts separately (bench/bench_memory.py uses "meta").
    """

    def __init__(self, host: str | torch.device = "cpu"):
        host = torch.device(host)

        def pack(t: torch.Tensor):
            if t.device == host:
                return t
            pin = t.device.type == "cuda"
            # empty_like keeps the strides (a transposed attention output comes back as it was saved: a recomputed
            # view of it must not turn into a copy, which selective checkpointing would reject as a different op)
            packed = torch.empty_like(t, device=host, pin_memory=pin)
            packed.copy_(t, non_blocking=pin)
            return t.device, packed

        def unpack(saved):
            if isinstance(saved, torch.Tensor):
                return saved
            device, packed = saved
            return packed.to(device, non_blocking=packed.is_pinned())

        super().__init__(pack, unpack)


@contextlib.contextmanager
def _both(first, second):
    with first, second:
        yield


def _context_fn(module: nn.Module, policy: str):
    """checkpoint's context_fn: () -> (forward context, recompute context), fresh for every call; None for none.
    Blocks without BatchNorm get none or torch's selective contexts, the only ones torch.compile can trace."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        if policy == "selective":
            return functools.partial(create_selective_checkpoint_contexts, _save_compute_heavy)
        return None

    def with_frozen_stats():
        if policy == "selective":
            fwd, recompute = create_selective_checkpoint_contexts(_save_compute_heavy)
            return fwd, _both(frozen_batchnorm_stats(module), recompute)  # BN buffers swapped first
        return contextlib.nullcontext(), frozen_batchnorm_stats(module)

    return with_frozen_stats


def apply_activation_checkpointing(model: nn.Module, offload: bool = False, chunks: int = 1,
                                   host: str = "cpu", policy: str = "full", group: int = 1) -> int:
    """Recompute each block's activations in backward instead of storing them.

    Wraps every transformer ResidualAttentionBlock and every ResNet Bottleneck forward (an instance attribute, so
    state_dict keys are unchanged) with torch.utils.checkpoint.checkpoint(use_reentrant=False). The recomputation
    of a Bottleneck runs with its BatchNorm running-stat updates switched off, so a checkpointed step leaves the
    same running stats (and gives the same loss and grads) as an uncheckpointed one.

    `policy` = "full" keeps only each block's input and recomputes the whole block in backward (one extra forward
    of the blocks: about +1/3 of a step's FLOPs). "selective" (torch's selective activation checkpointing) also
    keeps the outputs of the block's matmuls and fused attention, so the recomputation is only the cheap
    element-wise ops: no matmul runs twice, for more memory (ViT-B/32, batch 1,024, simulated in
    bench/bench_memory.py: 22.5 GiB vs 7.1 GiB with "full"). Both are exact.

    Two memory options for very large batches, both exact (same loss and gradients up to float rounding):
    * `offload`: the block inputs (all that checkpointing keeps) wait for backward in `host` memory
      (offload_saved_tensors), so the device holds one block's activations instead of every block's input. Cost:
      per sample and block one copy of the input each way over PCIe.
    * `chunks` > 1 (transformer blocks only): the batch is split into `chunks` parts and each part is checkpointed
      on its own. A transformer block treats every sample independently, so the result is the same, and the
      block being recomputed in backward (its MLP hidden state is 4x its input, kept three times in the MLP's
      backward) holds 1/chunks of the batch. The split is along dim 0 and is skipped when the batch is smaller
      than `chunks`. (A Bottleneck's BatchNorm needs the whole batch, so ResNet blocks are never split.)
    * `group` > 1: a tower's transformer blocks are checkpointed `group` consecutive blocks at a time, so only
      every group's input is kept (1/group of the block inputs). The recomputation holds `group` blocks'
      activations (of one chunk, with `chunks`) and also reruns the last MLP matmul of a group's inner blocks,
      which per-block recomputation skips (ViT-B/32 at group 2: 56.4 vs 54.0 GFLOP per sample, +4%).
    With "selective", offload moves the saved matmul outputs to `host` too where torch.utils.checkpoint has
    `respect_saved_tensors_hooks` (torch 2.14); older torch offloads only the block inputs.
    Idempotent. Returns the number of checkpointed units (blocks, or groups of blocks).
    """
    if chunks < 1:
        raise ValueError(f"checkpoint chunks must be >= 1, got {chunks}")
    if policy not in POLICIES:
        raise ValueError(f"checkpoint policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    if group < 1:
        raise ValueError(f"checkpoint group must be >= 1, got {group}")
    wrapped = 0
    for module in model.modules():
        if group > 1 and isinstance(module, Transformer) and not getattr(module, "_checkpointed", False):
            wrapped += _checkpoint_groups(module, group, chunks, _options(module, policy, offload), offload, host)
        elif isinstance(module, CHECKPOINTED) and not getattr(module, "_checkpointed", False):
            inner = module.forward  # the bound original forward
            split = chunks if isinstance(module, ResidualAttentionBlock) else 1
            options = _options(module, policy, offload)

            @functools.wraps(inner)
            def forward(x, *args, _inner=inner, _options=options, _split=split, **kwargs):
                if not torch.is_grad_enabled():  # eval / no_grad: nothing to save, call directly
                    return _inner(x, *args, **kwargs)
                with offload_saved_tensors(host) if offload else contextlib.nullcontext():
                    return _checkpoint_split(_inner, x, _split, _options, *args, **kwargs)

            module.forward = forward
            module._checkpointed = True
            wrapped += 1
    return wrapped


def _options(module: nn.Module, policy: str, offload: bool) -> dict:
    context_fn = _context_fn(module, policy)
    options = dict(use_reentrant=False, **({"context_fn": context_fn} if context_fn else {}))
    if offload and policy == "selective" and _SAC_HOOKS:
        options["respect_saved_tensors_hooks"] = True
    return options


def _checkpoint_split(fn, x: torch.Tensor, split: int, options: dict, *args, **kwargs) -> torch.Tensor:
    """checkpoint(fn, x), or one checkpoint per batch chunk of x (split > 1), concatenated."""
    if split > 1 and x.shape[0] >= split:
        return torch.cat([checkpoint(fn, part, *args, **options, **kwargs) for part in x.chunk(split)], dim=0)
    return checkpoint(fn, x, *args, **options, **kwargs)


def _checkpoint_groups(transformer: Transformer, group: int, chunks: int, options: dict, offload: bool,
                       host: str) -> int:
    """Checkpoint the tower's blocks `group` at a time: one saved input per group of consecutive blocks, each
    group recomputed as a whole. Returns the number of groups."""
    blocks, causal = list(transformer.resblocks), transformer.causal
    inner = transformer.forward

    def segment(start: int):
        def run(h: torch.Tensor) -> torch.Tensor:
            for block in blocks[start:start + group]:
                h = block(h, causal=causal)
            return h
        return run

    segments = [segment(i) for i in range(0, len(blocks), group)]

    @functools.wraps(inner)
    def forward(x):
        if not torch.is_grad_enabled():
            return inner(x)
        with offload_saved_tensors(host) if offload else contextlib.nullcontext():
            for run in segments:
                x = _checkpoint_split(run, x, chunks, options)
        return x

    transformer.forward = forward
    transformer._checkpointed = True
    for block in blocks:
        block._checkpointed = True  # wrapped by their group, not one by one
    return len(segments)


def compile_blocks(model: nn.Module) -> int:
    """torch.compile every transformer block in place (nn.Module.compile: state_dict keys unchanged), after
    activation checkpointing if any: each block's forward — the checkpoint wrapper included — becomes one compiled
    graph (fused LayerNorm / GELU / bias / residual kernels; with --checkpoint-policy selective the recomputation
    is compiled too). The blocks of a tower share one graph (torch guards on parameters as inputs, not on the
    module). Applied per block, as torchtitan does, so a graph break costs one block, not the model. ResNet
    blocks are not compiled (their checkpointing swaps BatchNorm buffers, which torch.compile cannot trace).
    Idempotent. Returns the number of blocks compiled."""
    compiled = 0
    for module in model.modules():
        if isinstance(module, ResidualAttentionBlock) and not getattr(module, "_compiled", False):
            module.compile()
            module._compiled = True
            compiled += 1
    return compiled
