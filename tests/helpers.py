"""Shared test helpers (importable from the tests: pytest puts tests/ on sys.path)."""

import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from trainer.clip.formats.shards import MANIFEST, write_shard_dir
from trainer.clip.ports import free_port  # noqa: F401 (the tests' free_port)


def loss_and_grads(model, images, tokens):
    """Plain single-process CLIP loss and every parameter's gradient (a reference for wrapped/parallel runs)."""
    img, txt, scale = model(images, tokens)
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
    model.zero_grad()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def process_alive(pid: int) -> bool:
    """pid exists and is not a zombie (a killed process whose reaper has not collected it yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def write_shards(root, n_shards=2, per_shard=32, size=64, corrupt_keys=(), manifest=True):
    """Shards in the clipforge.shards.v1 format: {key}.jpg / .txt / .json per sample + manifest.json."""
    rng = np.random.default_rng(0)

    def sample(k):
        key = f"{k:09d}"
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
        jpg = b"\xff\xd8 definitely not a jpeg" if k in corrupt_keys else buf.getvalue()
        caption = f"a photo of object number {k}"
        meta = {"key": key, "url": f"http://example.com/{key}.jpg", "caption": caption,
                "width": size, "height": size, "sha256": hashlib.sha256(jpg).hexdigest()}
        return {"__key__": key, "jpg": jpg, "txt": caption, "json": json.dumps(meta)}

    write_shard_dir(root, ((sample(s * per_shard + i) for i in range(per_shard)) for s in range(n_shards)),
                    durable=False)
    if not manifest:
        (root / MANIFEST).unlink()
    return root


def load_bench(name: str):
    """Import bench/<name>.py (bench/ is not a package) as module `name`."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(mod)
    return mod
