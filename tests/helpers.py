"""Shared test helpers (importable from the tests: pytest puts tests/ on sys.path)."""

import hashlib
import importlib.util
import io
import json
import socket
import sys
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image


def loss_and_grads(model, images, tokens):
    """Plain single-process CLIP loss and every parameter's gradient (a reference for wrapped/parallel runs)."""
    img, txt, scale = model(images, tokens)
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for MASTER_PORT of spawned gloo ranks, test servers, ...)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_shards(root, n_shards=2, per_shard=32, size=64, corrupt_keys=(), manifest=True):
    """Shards in the clipforge.shards.v1 format: {key}.jpg / .txt / .json per sample + manifest.json."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards, k = [], 0
    for s in range(n_shards):
        name = f"shard-{s:05d}.tar"
        with wds.TarWriter(str(root / name)) as w:
            for _ in range(per_shard):
                key = f"{k:09d}"
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
                jpg = b"\xff\xd8 definitely not a jpeg" if k in corrupt_keys else buf.getvalue()
                caption = f"a photo of object number {k}"
                meta = {"key": key, "url": f"http://example.com/{key}.jpg", "caption": caption,
                        "width": size, "height": size, "sha256": hashlib.sha256(jpg).hexdigest()}
                w.write({"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta)})
                k += 1
        shards.append({"tar": name, "parquet": name.replace(".tar", ".parquet"), "num_samples": per_shard})
    if manifest:
        (root / "manifest.json").write_text(json.dumps(
            {"format": "clipforge.shards.v1", "num_samples": k, "shards": shards}))
    return root


def load_bench(name: str):
    """Import bench/<name>.py (bench/ is not a package) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod
