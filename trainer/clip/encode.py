"""Embedding with a loaded CLIP model: what every stage that embeds (the filter's CLIP score, `clipforge embed`,
the search service's queries) shares. Pure torch + numpy: no ray, no faiss.

    feats = encode_texts(model, tokenizer, ["a red apple"], device="cpu")     # float32 [Q, D], L2-normalised
    feats = encode_image_batch(model, images, device, amp_dtype)               # float32 [B, D], L2-normalised
"""
from __future__ import annotations

import contextlib

import numpy as np


def amp_dtype_for(device: str):
    """bf16 where the CUDA device supports it, else fp16; None (no autocast) off CUDA."""
    import torch

    if not str(device).startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _autocast(amp_dtype):
    import torch

    return torch.autocast("cuda", dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()


def encode_image_batch(model, images, device: str = "cpu", amp_dtype=None) -> np.ndarray:
    """images: FloatTensor [B, 3, S, S] (preprocessed) -> float32 numpy [B, D], L2-normalised."""
    import torch
    import torch.nn.functional as F

    cuda = amp_dtype is not None
    with torch.inference_mode(), _autocast(amp_dtype):
        feats = model.encode_image(images.to(device, non_blocking=cuda))
    return F.normalize(feats.float(), dim=-1).cpu().numpy()


def encode_token_batch(model, tokens, device: str = "cpu", amp_dtype=None) -> np.ndarray:
    """tokens: LongTensor [B, ctx] -> float32 numpy [B, D], L2-normalised."""
    import torch
    import torch.nn.functional as F

    cuda = amp_dtype is not None
    with torch.inference_mode(), _autocast(amp_dtype):
        feats = model.encode_text(tokens.to(device, non_blocking=cuda))
    return F.normalize(feats.float(), dim=-1).cpu().numpy()


def encode_texts(model, tokenizer, texts: list[str], device: str = "cpu", batch_size: int = 256,
                 amp_dtype=None) -> np.ndarray:
    """list[str] -> float32 [Q, D] L2-normalised text embeddings ([0, D] for no texts)."""
    out = [encode_token_batch(model, tokenizer(list(texts[i:i + batch_size])), device, amp_dtype)
           for i in range(0, len(texts), batch_size)]
    dim = int(model.config.embed_dim)
    return np.ascontiguousarray(np.concatenate(out)) if out else np.zeros((0, dim), np.float32)
