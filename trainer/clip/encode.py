"""Embedding with a loaded CLIP model: what every stage that embeds (the filter's CLIP score, `clipforge embed`,
the search service's queries) shares. Pure torch + numpy + Pillow: no ray, no faiss. Reads image bytes from an
open file at given offsets (one pread each); writes nothing.

    feats = encode_texts(model, tokenizer, ["a red apple"], device="cpu")     # float32 [Q, D], L2-normalised
    feats = encode_image_batch(model, images, device, amp_dtype)               # float32 [B, D], L2-normalised
    x = load_image_at(fd, offset, size, preprocess)                            # [3, S, S], or None: no image

    enc = BatchEncoder(model, preprocess, tokenizer, device, batch_size=256, threads=4)
    for rows, img, txt in enc.encode(tar_path, offsets, sizes, captions):     # per batch: the rows that decoded
        ...                                                                    # img / txt float32 [len(rows), D]

BatchEncoder overlaps the input with the model: a thread pool reads, decodes, preprocesses and tokenises batch
k+1 while the forward pass of batch k runs (PIL releases the GIL while it decodes).
"""
from __future__ import annotations

import contextlib
import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Callable, Iterator, Sequence

import numpy as np

MAX_IMAGE_BYTES = 256 << 20  # a larger image size is a counted decode failure, never a huge read


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


# ------------------------------------------------------------------------------------------------ image bytes
def load_image_at(fd: int, offset: int, size: int, preprocess: Callable):
    """Image bytes at `offset` of the open file `fd` -> preprocess(PIL image), or None (the caller counts it) when
    they are out of range, cut short, too large or do not decode."""
    from PIL import Image

    if offset < 0 or not 0 < size <= MAX_IMAGE_BYTES:
        return None
    try:
        data = os.pread(fd, size, offset)
        if len(data) != size:
            return None
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
                return None
            img.load()  # a full decode, so a truncated file fails here
            return preprocess(img)
    except Exception:  # noqa: BLE001 -- PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        return None


class BatchEncoder:
    """Encodes rows (offset, size, caption) of one file in batches, reading and decoding ahead on a thread pool.

    encode(path, offsets, sizes, captions) yields, per batch, (rows, img, txt): `rows` int64 positions (into the
    inputs) of the images that decoded, `img` their L2-normalised image embeddings and `txt` their captions'
    (None when texts=False), float32 numpy [len(rows), D]. Rows whose image did not decode are left out."""

    def __init__(self, model, preprocess: Callable, tokenizer: Callable | None, device: str = "cpu",
                 batch_size: int = 256, threads: int = 2, amp_dtype=None):
        self.model, self.preprocess, self.tokenizer, self.device = model, preprocess, tokenizer, device
        self.batch_size = int(batch_size)
        self.amp_dtype = amp_dtype if amp_dtype is not None else amp_dtype_for(device)
        self.pool = ThreadPoolExecutor(max(2, int(threads)), thread_name_prefix="encode-decode")

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def encode(self, path: str, offsets: Sequence[int], sizes: Sequence[int], captions: Sequence[str] | None = None,
               texts: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
        """See the class docstring. `captions` may be None with texts=False. The file is open while this runs."""
        texts = texts and captions is not None and self.tokenizer is not None
        if not len(offsets):
            return
        fd = os.open(path, os.O_RDONLY)
        try:  # the batches are closed (their reads waited for) before fd
            with contextlib.closing(self._batches(fd, offsets, sizes, captions if texts else None)) as batches:
                for sel, images, tokens in batches:
                    ok = [i for i, x in enumerate(images) if x is not None]
                    if ok:
                        yield (sel[ok], *self._forward(images, ok, tokens))
        finally:
            os.close(fd)

    def _submit(self, fd: int, sel: np.ndarray, offsets, sizes, captions):
        futures = [self.pool.submit(load_image_at, fd, int(offsets[i]), int(sizes[i]), self.preprocess)
                   for i in sel]
        tokens = self.pool.submit(self.tokenizer, [captions[i] or "" for i in sel]) if captions is not None else None
        return sel, futures, tokens

    def _batches(self, fd: int, offsets, sizes, captions):
        """(positions, preprocessed images or None, tokens or None) per batch; the next batch is read, decoded and
        tokenised by the pool while the caller runs the forward pass of this one."""
        n, bs, pending = len(offsets), self.batch_size, deque()
        try:
            for start in range(0, n, bs):
                pending.append(self._submit(fd, np.arange(start, min(start + bs, n)), offsets, sizes, captions))
                if len(pending) > 1:
                    yield self._result(pending.popleft())
            while pending:
                yield self._result(pending.popleft())
        finally:  # an abandoned generator: nothing may still read fd once the caller closes it
            for _, futures, tokens in pending:
                waits = [*futures, *([tokens] if tokens is not None else [])]
                for f in waits:
                    f.cancel()
                wait_futures(waits)

    @staticmethod
    def _result(batch):
        sel, futures, tokens = batch
        return sel, [f.result() for f in futures], tokens.result() if tokens is not None else None

    def _forward(self, images: list, ok: list[int], tokens):
        """The decoded rows' (image, text or None) embeddings, float32 numpy [b, D], L2-normalised."""
        import torch

        x = torch.stack([images[i] for i in ok])  # [b, 3, S, S]
        fi = encode_image_batch(self.model, x, self.device, self.amp_dtype)
        if tokens is None:
            return fi, None
        return fi, encode_token_batch(self.model, tokens[torch.as_tensor(ok)], self.device, self.amp_dtype)


class LazyEncoder:
    """The BatchEncoder of a checkpoint, loaded on first use: a worker (a Ray actor, or this process) that only
    finds parts already done never loads the model. Sets torch's thread count to `threads` when asked (an actor's
    CPUs)."""

    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int = 256, threads: int = 1,
                 set_threads: bool = True):
        import torch

        self.checkpoint, self.device, self.batch_size = checkpoint, device, int(batch_size)
        self.threads = max(1, int(threads or 1))
        if set_threads:
            torch.set_num_threads(self.threads)
        self.encoder: BatchEncoder | None = None
        self.dim = 0

    @property
    def loaded(self) -> bool:
        return self.encoder is not None

    def get(self) -> BatchEncoder:
        if self.encoder is None:
            from trainer.clip.checkpoint import load_pretrained

            model, preprocess, tokenizer = load_pretrained(self.checkpoint, device=self.device)
            self.dim = int(model.config.embed_dim)
            self.encoder = BatchEncoder(model, preprocess, tokenizer, self.device, self.batch_size, self.threads)
        return self.encoder

    def close(self) -> None:
        if self.encoder is not None:
            self.encoder.close()
