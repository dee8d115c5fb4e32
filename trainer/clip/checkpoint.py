"""Model checkpoints: DIR/model.safetensors (weights) + DIR/config.json (CLIPConfig), and compatibility with
the checkpoints other tools write (OpenAI, open_clip, Hugging Face transformers; trainer.clip.convert maps the keys).

The config (including quick_gelu) travels with the weights so a model is always rebuilt with the activation
it was trained with. Safe by default: .pt/.pth/.bin files are read with torch.load(weights_only=True) only, so
a file whose pickle would construct arbitrary objects (and run code) is refused; there is no unsafe path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import pickle
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trainer.clip import convert
from trainer.clip.formats.atomic import atomic_write, atomic_write_json
from trainer.clip.model import CLIP, CLIPConfig
from trainer.clip.tokenizer import tokenize
from trainer.clip.transform import image_transform

FORMAT = "clipforge.clip.v1"
WEIGHTS, CONFIG = "model.safetensors", "config.json"
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
TORCH_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
# weights files looked for in a directory that is not a clipforge checkpoint (open_clip / HF layouts)
DIR_WEIGHTS = (WEIGHTS, OPEN_CLIP_WEIGHTS, "open_clip_pytorch_model.bin", "pytorch_model.bin", "model.pt")
OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
log = logging.getLogger("trainer.clip.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete or does not match its config."""


def save_model(model: CLIP, out_dir: str | Path) -> Path:
    """Write out_dir/model.safetensors then out_dir/config.json (each atomically). Returns out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP/DeepSpeed engines
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    meta = {"format": FORMAT, "config": json.dumps(model.config.to_dict())}  # a lone .safetensors self-describes
    atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata=meta))
    atomic_write_json(out_dir / CONFIG, {"format": FORMAT, **model.config.to_dict()})
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


# ----------------------------------------------------------------------------------------------- foreign files
def _torch_load(path: Path) -> object:
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message suggests weights_only=False; keep only the line naming the offending global
        lines = [ln for ln in str(e).splitlines() if "GLOBAL" in ln or "nsupported" in ln]
        why = lines[0].strip() if lines else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: its pickle holds Python objects other than tensors and plain containers, "
            f"and unpickling them could run arbitrary code ({why}). clipforge only reads weights "
            "(torch.load weights_only=True) and has no unsafe mode; re-save the state dict as .safetensors "
            "in an environment you trust") from e
    except RuntimeError as e:
        if "TorchScript" in str(e):
            raise CheckpointError(
                f"{path} is a TorchScript archive (e.g. OpenAI's original download); clipforge does not execute "
                "TorchScript. Convert it where you trust the file: torch.jit.load(p, map_location='cpu')"
                ".state_dict() -> safetensors.torch.save_file") from e
        raise CheckpointError(f"cannot read {path}: {e}") from e
    except (OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read a weights file (.safetensors, or .pt/.pth/.bin/.ckpt via weights_only torch.load) -> (tensors, info).
    Unwraps {"state_dict": ...} / {"model": ...}; info = {"wrapped": bool, "metadata": safetensors metadata}."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    info = {"wrapped": False, "metadata": {}}
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                info["metadata"] = f.metadata() or {}
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read {path} (not a safetensors file?): {e}") from e
    elif path.suffix in TORCH_SUFFIXES:
        obj = _torch_load(path)
    else:
        raise CheckpointError(f"{path}: unknown weights format (expected .safetensors, "
                              f"{', '.join(sorted(TORCH_SUFFIXES))} or a checkpoint dir)")
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    for key in ("state_dict", "model"):
        if isinstance(obj.get(key), dict):
            obj, info["wrapped"] = obj[key], True
            break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise CheckpointError(f"{path} holds no tensors (keys: {sorted(obj)[:5]})")
    return state, info


def _side_config(folder: Path, metadata: dict) -> tuple[CLIPConfig | None, str]:
    """The config stored with weights in `folder`: clipforge safetensors metadata / config.json, open_clip's
    open_clip_config.json or a transformers config.json. -> (config or None, where it came from)."""
    try:
        if metadata.get("format") == FORMAT and "config" in metadata:
            return CLIPConfig.from_dict(json.loads(metadata["config"])), "safetensors metadata"
        oc = folder / OPEN_CLIP_CONFIG
        if oc.is_file():
            d = json.loads(oc.read_text(encoding="utf-8"))
            return CLIPConfig.from_open_clip_dict(d), str(oc)
        cj = folder / CONFIG
        if cj.is_file():
            d = json.loads(cj.read_text(encoding="utf-8"))
            if d.get("format") == FORMAT:
                return load_config(folder), str(cj)
            if "text_config" in d and "vision_config" in d:
                return convert.hf_config_to_clip_config(d), str(cj)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise CheckpointError(f"invalid model config next to the weights in {folder}: {e}") from e
    return None, ""


def _resolve_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for name in DIR_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(f"no weights file in checkpoint dir {path} (looked for {', '.join(DIR_WEIGHTS)})")


def weights_sha256(path: str | Path) -> str:
    """sha256 (hex) of the weights file `path` resolves to, as load_checkpoint reads it: a clipforge dir's
    model.safetensors, an OpenAI / open_clip / HF weights file, or the weights file of such a dir (DIR_WEIGHTS
    order). Streamed in 1 MiB blocks; CheckpointError when there is none."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    file = _resolve_file(path)
    digest = hashlib.sha256()
    try:
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e}") from e
    return digest.hexdigest()


def load_checkpoint(path: str | Path, config: CLIPConfig | None = None, device="cpu",
                    quick_gelu: bool | None = None) -> CLIP:
    """Load CLIP weights from a clipforge dir, an OpenAI / open_clip state dict (.pt/.pth/.bin/.safetensors, plain,
    {"state_dict": ...}, "module."/"_orig_mod." prefixes) or a transformers CLIPModel state dict (file or dir).

    The architecture comes from `config`, else a config stored with the weights (clipforge config.json or
    safetensors metadata, open_clip_config.json, HF config.json), else the tensor shapes. `quick_gelu` overrides
    the activation; when nothing says, it defaults to True for plain OpenAI-layout and HF state dicts (OpenAI's
    and most converted weights) and False for wrapped/prefixed open_clip training checkpoints.
    If the image grid or text context differs from `config`, position embeddings are interpolated / truncated.
    Returns an eval-mode model on `device`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / CONFIG).is_file() and config is None and quick_gelu is None:
        try:
            if json.loads((path / CONFIG).read_text(encoding="utf-8")).get("format") == FORMAT:
                return load_model(path, device=device)  # the native, strict path
        except (ValueError, AttributeError):
            pass
    file = _resolve_file(path)
    raw, info = read_state_dict(file)
    try:
        state, layout = convert.to_clipforge(raw)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from e
    side_cfg, where = _side_config(file.parent, info["metadata"]) if config is None else (None, "")
    if quick_gelu is None and config is None:
        if side_cfg is not None:
            quick_gelu = side_cfg.quick_gelu
            log.info("%s: config (quick_gelu=%s) from %s", file, quick_gelu, where)
        else:
            prefixed = any(k.startswith(("module.", "_orig_mod.")) for k in raw)
            quick_gelu = layout == "hf" or (layout == "openai" and not info["wrapped"] and not prefixed)
            log.warning("%s: the activation is not recorded with these %s weights; assuming quick_gelu=%s "
                        "(pass quick_gelu= to override)", file, layout, quick_gelu)
    if config is None:
        config = side_cfg
    if config is None:
        try:
            config = convert.infer_config(state, quick_gelu=bool(quick_gelu))
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{file}: cannot infer the model config ({e}); pass config=") from e
        log.info("%s: inferred config %s", file, config.to_dict())
    config = CLIPConfig.from_dict(config.to_dict())  # never mutate the caller's config
    if quick_gelu is not None:
        config.quick_gelu = bool(quick_gelu)
    model = CLIP(config)
    try:
        state = convert.fit_state_dict(state, {k: v.shape for k, v in model.state_dict().items()})
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError) as e:
        raise CheckpointError(f"{file} does not match config: {e}") from e
    return model.to(device).eval()


# ----------------------------------------------------------------------------------------------- export
def _cpu_state(model) -> dict[str, torch.Tensor]:
    model = getattr(model, "module", model)
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def export_safetensors(model: CLIP, out_dir: str | Path) -> Path:
    """= save_model: out_dir/model.safetensors (config also in its metadata) + out_dir/config.json."""
    return save_model(model, out_dir)


def export_open_clip(model: CLIP, path: str | Path) -> Path:
    """Write weights open_clip loads into its plain CLIP class (OpenAI key names; no buffers to add: its attn_mask
    is non-persistent). `path` ending in .safetensors or .pt/.pth/.bin -> that one file, to be loaded with
    open_clip.create_model(arch, pretrained=path) for a matching `arch` (see convert.open_clip_model_config).
    Any other path is a directory: open_clip_model.safetensors + open_clip_config.json, which
    open_clip.create_model("local-dir:" + path) loads without a registered arch. Returns the weights file."""
    model = getattr(model, "module", model)
    path = Path(path)
    tensors = _cpu_state(model)
    if path.suffix not in TORCH_SUFFIXES | {".safetensors"}:
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"model_cfg": convert.open_clip_model_config(model),
               "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD), "interpolation": "bicubic",
                                  "resize_mode": "shortest"}}
        atomic_write_json(path / OPEN_CLIP_CONFIG, cfg)
        path = path / OPEN_CLIP_WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    else:
        atomic_write(path, lambda tmp: torch.save(tensors, tmp))
    return path


def export_hf(model: CLIP, out_dir: str | Path | None = None) -> dict[str, torch.Tensor]:
    """-> state dict with transformers CLIPModel keys (ViT towers only). The matching transformers config is
    convert.clip_config_to_hf_config(model.config); with `out_dir`, both are written there as model.safetensors +
    config.json (a transformers-style dir that load_checkpoint reads back)."""
    model = getattr(model, "module", model)
    try:
        sd = convert.openai_to_hf(_cpu_state(model))
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg = convert.clip_config_to_hf_config(model.config)
        atomic_write(out_dir / WEIGHTS, lambda tmp: save_file(sd, tmp, metadata={"format": "pt"}))
        atomic_write_json(out_dir / CONFIG, cfg)
    return sd


def load_pretrained(path: str | Path, device="cpu", config: CLIPConfig | None = None, quick_gelu: bool | None = None):
    """-> (model, preprocess, tokenizer): preprocess(PIL) -> [3,S,S]; tokenizer(list[str]) -> LongTensor[B, ctx].
    `path`: anything load_checkpoint reads (a clipforge dir, an OpenAI / open_clip / HF weights file or dir)."""
    model = load_checkpoint(path, config=config, device=device, quick_gelu=quick_gelu)
    preprocess = image_transform(model.config.vision.image_size, train=False)
    context_length = model.config.text.context_length

    def tokenizer(texts) -> torch.Tensor:
        return tokenize(texts, context_length=context_length)

    return model, preprocess, tokenizer
