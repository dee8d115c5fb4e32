"""State-dict layouts and config inference for CLIP checkpoints from other tools. Pure: no file I/O.

Three layouts are understood; all end up in clipforge's, which *is* the OpenAI layout (visual.conv1,
visual.transformer.resblocks.N.attn.in_proj_weight, token_embedding, ln_final, text_projection, logit_scale):
  - "openai":   OpenAI's state dicts and open_clip's plain CLIP class (identical names);
  - "open_clip_custom_text": open_clip's CustomTextCLIP with a built-in text transformer (text tower under `text.`);
  - "hf":       Hugging Face transformers CLIPModel (text_model.*, vision_model.*, separate q/k/v projections).
When no config is given it is inferred from tensor shapes. Attention heads and the activation leave no trace in
the weights: heads come from a matching preset (else width // 64, as in OpenAI's build_model); QuickGELU is the
caller's decision (trainer.clip.checkpoint resolves it and saves it with the model).
"""
from __future__ import annotations

import logging
import math
import re

import torch
import torch.nn.functional as F

from trainer.clip.model import CLIP, PRESETS, CLIPConfig, TextConfig, VisionConfig

log = logging.getLogger("trainer.clip.checkpoint")

# Entries that are not weights: OpenAI JIT scalars, open_clip's causal mask (persistent in old versions),
# transformers' position-id buffers.
_DROP = {"input_resolution", "context_length", "vocab_size", "attn_mask", "text.attn_mask",
         "text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"}
HF_ACTS = {"quick_gelu": True, "gelu": False}


# ----------------------------------------------------------------------------------------------- layouts
def strip_prefixes(sd: dict) -> dict:
    """Drop DDP ("module.") and torch.compile ("_orig_mod.") wrappers, wherever they sit in a key."""
    out = {}
    for k, v in sd.items():
        while k.startswith(("module.", "_orig_mod.")):
            k = k.split(".", 1)[1]
        out[k.replace("._orig_mod.", ".")] = v  # compiled submodules
    return out


def detect_layout(sd: dict) -> str:
    if any(k.startswith(("text_model.", "vision_model.")) for k in sd):
        return "hf"
    if "text.token_embedding.weight" in sd:
        return "open_clip_custom_text"
    if "token_embedding.weight" in sd and "visual.conv1.weight" in sd:
        return "openai"
    raise ValueError(f"not a CLIP state dict (unknown layout); first keys: {sorted(sd)[:5]}")


def to_clipforge(sd: dict) -> tuple[dict, str]:
    """Any supported layout -> clipforge/OpenAI keys. Returns (state_dict, layout)."""
    sd = {k: v for k, v in strip_prefixes(sd).items() if k not in _DROP}
    layout = detect_layout(sd)
    if layout == "hf":
        sd = hf_to_openai(sd)
    elif layout == "open_clip_custom_text":
        sd = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in sd.items()}
    return sd, layout


_HF_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
_HF_TOP = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: HF spells it "layrnorm"
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
_HF_TOWERS = {"text_model.encoder.layers.": "transformer.resblocks.",
              "vision_model.encoder.layers.": "visual.transformer.resblocks."}


def hf_to_openai(sd: dict) -> dict:
    """transformers CLIPModel keys -> OpenAI keys (q/k/v fused into in_proj, projections transposed)."""
    out, qkv = {}, {}
    for k, v in sd.items():
        if k in _HF_TOP:
            out[_HF_TOP[k]] = v
        elif k in ("visual_projection.weight", "text_projection.weight"):
            out["visual.proj" if k.startswith("visual") else "text_projection"] = v.t().contiguous()
        else:
            src = next((p for p in _HF_TOWERS if k.startswith(p)), None)
            if src is None:
                raise ValueError(f"unexpected key in a transformers CLIP state dict: {k}")
            idx, rest = k[len(src):].split(".", 1)
            prefix = f"{_HF_TOWERS[src]}{idx}."
            m = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if m:
                qkv.setdefault((prefix, m.group(2)), {})[m.group(1)] = v
                continue
            mod, leaf = rest.rsplit(".", 1)
            if mod not in _HF_BLOCK:
                raise ValueError(f"unexpected key in a transformers CLIP state dict: {k}")
            out[f"{prefix}{_HF_BLOCK[mod]}.{leaf}"] = v
    for (prefix, leaf), parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise ValueError(f"incomplete q/k/v projections under {prefix}")
        out[f"{prefix}attn.in_proj_{leaf}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def openai_to_hf(sd: dict) -> dict:
    """clipforge/OpenAI keys (ViT image tower) -> transformers CLIPModel keys. Inverse of hf_to_openai."""
    if "visual.proj" not in sd:
        raise ValueError("transformers' CLIPModel has no ResNet image tower; only ViT models export to HF")
    top = {v: k for k, v in _HF_TOP.items()}
    towers = {v: k for k, v in _HF_TOWERS.items()}
    block = {v: k for k, v in _HF_BLOCK.items()}
    out = {}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
        elif k in ("visual.proj", "text_projection"):
            out["visual_projection.weight" if k == "visual.proj" else "text_projection.weight"] = v.t().contiguous()
        else:
            src = next(p for p in towers if k.startswith(p))
            idx, rest = k[len(src):].split(".", 1)
            prefix = f"{towers[src]}{idx}."
            mod, leaf = rest.rsplit(".", 1)
            if mod == "attn" and leaf.startswith("in_proj_"):
                for name, part in zip("qkv", v.chunk(3, dim=0)):
                    out[f"{prefix}self_attn.{name}_proj.{leaf[len('in_proj_'):]}"] = part.contiguous()
            else:
                out[f"{prefix}{block[mod]}.{leaf}"] = v
    return out


# ----------------------------------------------------------------------------------------------- configs
def _count_blocks(sd: dict, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pat.match(k))})


def _preset_heads(cfg: CLIPConfig) -> CLIPConfig:
    """Heads leave no trace in the weights: take them from a preset with the same widths/layers if one exists."""
    def shape_key(c: CLIPConfig):
        v, t = c.vision, c.text
        return (c.embed_dim, v.patch_size, v.width, v.layers, v.mlp_ratio, t.width, t.layers, t.mlp_ratio)

    for name, preset in PRESETS.items():
        if not preset.vision.is_resnet and shape_key(preset) == shape_key(cfg):
            log.info("inferred config matches preset %r: using its attention heads", name)
            cfg.vision.heads, cfg.text.heads = preset.vision.heads, preset.text.heads
            break
    return cfg


def _infer_text(sd: dict) -> TextConfig:
    width = sd["ln_final.weight"].shape[0]
    return TextConfig(context_length=sd["positional_embedding"].shape[0],
                      vocab_size=sd["token_embedding.weight"].shape[0], width=width,
                      layers=_count_blocks(sd, "transformer.resblocks."), heads=max(1, width // 64),
                      mlp_ratio=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)


def _infer_resnet(sd: dict) -> VisionConfig:
    layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
    grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
    width = sd["visual.layer1.0.conv1.weight"].shape[0]
    return VisionConfig(image_size=grid * 32, patch_size=None, width=width, layers=layers, heads=width * 32 // 64)


def infer_config(sd: dict, quick_gelu: bool = False) -> CLIPConfig:
    """Rebuild a CLIPConfig from a clipforge/OpenAI-keyed state dict's shapes (cf. OpenAI's build_model)."""
    if "visual.attnpool.positional_embedding" in sd:
        return CLIPConfig(embed_dim=sd["text_projection"].shape[1], vision=_infer_resnet(sd), text=_infer_text(sd),
                          quick_gelu=quick_gelu)
    if "visual.proj" not in sd:
        raise ValueError("cannot tell the image tower: neither visual.proj (ViT) nor visual.attnpool (ResNet)")
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    tokens = sd["visual.positional_embedding"].shape[0] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"visual.positional_embedding has {tokens} patch positions: not a square grid")
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width,
                          layers=_count_blocks(sd, "visual.transformer.resblocks."), heads=max(1, width // 64),
                          mlp_ratio=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width)
    cfg = CLIPConfig(embed_dim=sd["visual.proj"].shape[1], vision=vision, text=_infer_text(sd), quick_gelu=quick_gelu)
    return _preset_heads(cfg)


def _act(hidden_act: str) -> bool:
    if hidden_act not in HF_ACTS:
        raise ValueError(f"unsupported hidden_act {hidden_act!r} (clipforge has quick_gelu and gelu)")
    return HF_ACTS[hidden_act]


def hf_config_to_clip_config(hf) -> CLIPConfig:
    """transformers CLIPConfig (object or its config.json dict) -> CLIPConfig."""
    d = hf.to_dict() if hasattr(hf, "to_dict") else dict(hf)
    t, v = d.get("text_config") or {}, d.get("vision_config") or {}
    acts = {_act(t.get("hidden_act", "quick_gelu")), _act(v.get("hidden_act", "quick_gelu"))}
    if len(acts) != 1:
        raise ValueError("text and vision towers use different activations; clipforge has one switch")
    tw, vw = t.get("hidden_size", 512), v.get("hidden_size", 768)
    return CLIPConfig(
        embed_dim=d.get("projection_dim", 512),
        vision=VisionConfig(image_size=v.get("image_size", 224), patch_size=v.get("patch_size", 32), width=vw,
                            layers=v.get("num_hidden_layers", 12), heads=v.get("num_attention_heads", 12),
                            mlp_ratio=v.get("intermediate_size", 4 * vw) / vw),
        text=TextConfig(context_length=t.get("max_position_embeddings", 77), vocab_size=t.get("vocab_size", 49408),
                        width=tw, layers=t.get("num_hidden_layers", 12), heads=t.get("num_attention_heads", 8),
                        mlp_ratio=t.get("intermediate_size", 4 * tw) / tw),
        quick_gelu=acts.pop())


def clip_config_to_hf_config(cfg: CLIPConfig) -> dict:
    """CLIPConfig (ViT) -> a transformers CLIPConfig dict (`transformers.CLIPConfig(**d)` or config.json)."""
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    v, t = cfg.vision, cfg.text
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "text_config": {"hidden_size": t.width, "intermediate_size": int(t.width * t.mlp_ratio),
                        "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
                        "max_position_embeddings": t.context_length, "vocab_size": t.vocab_size,
                        "hidden_act": act, "projection_dim": cfg.embed_dim,
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 0},
        "vision_config": {"hidden_size": v.width, "intermediate_size": int(v.width * v.mlp_ratio),
                          "num_hidden_layers": v.layers, "num_attention_heads": v.heads,
                          "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": act,
                          "projection_dim": cfg.embed_dim},
    }


def open_clip_model_config(model: CLIP) -> dict:
    """The open_clip architecture JSON (plain CLIP class) for a clipforge model."""
    cfg, t, v = model.config, model.config.text, model.config.vision
    text_cfg = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width,
                "heads": t.heads, "layers": t.layers, "mlp_ratio": t.mlp_ratio}
    if v.is_resnet:  # open_clip derives the attention-pool heads as width * 32 // 64
        if v.heads != v.width * 32 // 64:
            raise ValueError(f"open_clip's ResNet has {v.width * 32 // 64} attention-pool heads, not {v.heads}")
        vision_cfg = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width, "patch_size": None}
    else:
        vision_cfg = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers,
                      "head_width": v.width // v.heads, "mlp_ratio": v.mlp_ratio}
    return {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, "vision_cfg": vision_cfg, "text_cfg": text_cfg}


# ----------------------------------------------------------------------------------------------- fitting
def resize_grid_pos_embed(pe: torch.Tensor, new_len: int) -> torch.Tensor:
    """[1 + g*g, D] -> [1 + G*G, D]: the leading (class / mean-query) token kept, the grid resized bicubically."""
    old, new = math.isqrt(pe.shape[0] - 1), math.isqrt(new_len - 1)
    if old * old != pe.shape[0] - 1 or new * new != new_len - 1:
        raise ValueError(f"position embedding {tuple(pe.shape)} -> {new_len} rows: not square grids")
    grid = pe[1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)  # [1, D, g, g]
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(pe.dtype)
    return torch.cat([pe[:1], grid], dim=0)


def fit_state_dict(sd: dict, expected: dict[str, torch.Size]) -> dict:
    """Adapt a clipforge-keyed state dict to a model's shapes: image position embeddings are interpolated to the
    model's grid, the text context is truncated. Any other difference raises ValueError."""
    missing, unexpected = sorted(expected.keys() - sd.keys()), sorted(sd.keys() - expected.keys())
    if missing or unexpected:
        raise ValueError(f"keys differ from the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    out = dict(sd)
    for k, want in expected.items():
        have = sd[k].shape
        if have == want:
            continue
        if k in ("visual.positional_embedding", "visual.attnpool.positional_embedding") and have[1:] == want[1:]:
            out[k] = resize_grid_pos_embed(sd[k], want[0])
            log.warning("%s: interpolated %d -> %d image positions (grid %d -> %d, bicubic)", k, have[0], want[0],
                        math.isqrt(have[0] - 1), math.isqrt(want[0] - 1))
        elif k == "logit_scale" and sd[k].numel() == 1:  # some tools store it as a [1] tensor
            out[k] = sd[k].reshape(want)
        elif k == "positional_embedding" and have[1:] == want[1:] and have[0] > want[0]:
            out[k] = sd[k][: want[0]].clone()
            log.warning("text context length %d -> %d: positional_embedding truncated", have[0], want[0])
        else:
            raise ValueError(f"{k}: checkpoint shape {tuple(have)} != model shape {tuple(want)}")
    return out
