"""Model checkpoints: DIR/model.safetensors (weights) + DIR/config.json (CLIPConfig). No pickle anywhere.

The config (including quick_gelu) travels with the weights so a model is always rebuilt with the activation
it was trained with.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from trainer.model import CLIP, CLIPConfig
from trainer.tokenizer import tokenize
from trainer.transform import image_transform

FORMAT = "clipforge.clip.v1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_model(model: CLIP, out_dir: str | Path) -> Path:
    """Write out_dir/model.safetensors then out_dir/config.json (each atomically). Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP/DeepSpeed engines
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT}
    _atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=meta))
    config = {"format": FORMAT, **model.config.to_dict()}

    def write_json(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)

    _atomic_write(out_dir / CONFIG, write_json)
    return out_dir


def load_config(path: str | Path) -> CLIPConfig:
    cfg_path = Path(path) / CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"no {CONFIG} in checkpoint dir {path}")
    try:
        d = json.loads(cfg_path.read_text(encoding="utf-8"))
        if d.pop("format", FORMAT) != FORMAT:
            raise ValueError("unknown format")
        return CLIPConfig.from_dict(d)
    except (ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"invalid {cfg_path}: {e}") from e


def load_model(path: str | Path, device="cpu") -> CLIP:
    """Rebuild the CLIP from DIR/config.json and load DIR/model.safetensors (strict). Returns an eval-mode model."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint dir not found: {path}")
    config = load_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in checkpoint dir {path}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {weights} (not a safetensors file?): {e}") from e
    model = CLIP(config)
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise CheckpointError(f"{weights} does not match config: missing {sorted(missing)[:5]}, "
                              f"unexpected {sorted(unexpected)[:5]}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:  # shape mismatch
        raise CheckpointError(f"{weights} does not match config: {e}") from e
    return model.to(device).eval()


def load_pretrained(path: str | Path, device="cpu"):
    """-> (model, preprocess, tokenizer): preprocess(PIL) -> [3,S,S]; tokenizer(list[str]) -> LongTensor[B, ctx]."""
    model = load_model(path, device=device)
    preprocess = image_transform(model.config.vision.image_size, train=False)
    context_length = model.config.text.context_length

    def tokenizer(texts) -> torch.Tensor:
        return tokenize(texts, context_length=context_length)

    return model, preprocess, tokenizer
