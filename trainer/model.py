"""CLIP: an image tower (ViT or the paper's ModifiedResNet) and a causal text transformer trained
contrastively (Radford et al., 2021).

One readable file, top to bottom (the ResNet tower lives in trainer/resnet.py). Shapes use B = batch,
L = sequence length, D = width, E = embed_dim. Parameter names follow the OpenAI layout (visual.conv1,
visual.transformer.resblocks.N.attn.in_proj_weight, visual.layer1.0.conv1, visual.attnpool.q_proj,
token_embedding, ln_final, text_projection, logit_scale, ...) so OpenAI / open_clip checkpoints load unrenamed.
This module is pure: no distributed, DeepSpeed or I/O imports (load_config_file reads one JSON file with the
standard library). Activation checkpointing is applied from the outside
(trainer.parallel.apply_activation_checkpointing) so the state_dict keys never change.
"""
from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from trainer.resnet import ModifiedResNet


# ----------------------------------------------------------------------------------------------- config
@dataclass
class VisionConfig:
    """One dataclass for both image towers; the type of `layers` picks the tower.

    ViT:    layers = int (transformer depth), width = transformer width, heads = attention heads,
            patch_size = patch side in pixels.
    ResNet: layers = 4 ints (Bottleneck blocks per stage, e.g. (3, 4, 6, 3) for RN50), width = stem width
            (64; the last stage has width * 32 channels), heads = attention-pool heads (width * 32 // 64),
            patch_size = None (set automatically), patch_dropout must be 0.
    A list for `layers` (JSON has no tuples) is normalised to a tuple, so configs round-trip through JSON.
    """

    image_size: int = 224
    patch_size: int | None = 32
    width: int = 768
    layers: int | tuple[int, int, int, int] = 12
    heads: int = 12
    mlp_ratio: float = 4.0  # ViT only
    patch_dropout: float = 0.0  # ViT only (FLIP): fraction of patch tokens dropped while training

    def __post_init__(self):
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if isinstance(self.layers, (list, tuple)):
            self.layers = tuple(int(n) for n in self.layers)
            if len(self.layers) != 4:
                raise ValueError(f"ResNet layers must be 4 stage depths, got {self.layers}")
            if self.patch_dropout:
                raise ValueError("patch_dropout is only supported by the ViT tower")
            if self.image_size % 32:
                raise ValueError(f"ResNet image_size must be a multiple of 32, got {self.image_size}")
            self.patch_size = None  # meaningless for a ResNet
        else:
            if not self.patch_size or self.image_size % self.patch_size:
                raise ValueError(f"ViT image_size {self.image_size} must be a multiple of patch_size "
                                 f"{self.patch_size}")

    @property
    def is_resnet(self) -> bool:
        return isinstance(self.layers, (tuple, list))


@dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0


@dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    quick_gelu: bool = False  # OpenAI weights use QuickGELU; it is saved with the weights (config.json)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPConfig":
        def pick(klass, sub: dict):
            names = {f.name for f in fields(klass)}
            unknown = set(sub) - names
            if unknown:
                raise ValueError(f"unknown {klass.__name__} keys: {sorted(unknown)}")
            return klass(**sub)

        d = dict(d)
        vision = pick(VisionConfig, d.pop("vision", {}))
        text = pick(TextConfig, d.pop("text", {}))
        top = pick(cls, {k: v for k, v in d.items() if k in {"embed_dim", "quick_gelu"}})
        return cls(embed_dim=top.embed_dim, vision=vision, text=text, quick_gelu=top.quick_gelu)

    @classmethod
    def from_open_clip_dict(cls, d: dict) -> "CLIPConfig":
        """Read open_clip's model-config layout ({"embed_dim", "quick_gelu", "vision_cfg", "text_cfg"}).

        Options clipforge does not implement raise ValueError unless they hold open_clip's default value.
        """
        d = dict(d.get("model_cfg", d))  # open_clip_config.json on the HF hub wraps it in "model_cfg"
        v, t = dict(d.pop("vision_cfg", {})), dict(d.pop("text_cfg", {}))
        _check_neutral("model", d, {"embed_dim", "quick_gelu", "custom_text"}, _OC_TOP_DEFAULTS)
        _check_neutral("vision_cfg", v, {"image_size", "layers", "width", "patch_size", "head_width", "mlp_ratio",
                                         "patch_dropout"}, _OC_VISION_DEFAULTS)
        _check_neutral("text_cfg", t, {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"},
                       _OC_TEXT_DEFAULTS)
        size = v.get("image_size", 224)
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square images are supported, got image_size {size}")
            size = size[0]
        layers, width = v.get("layers", 12), v.get("width", 768)
        head_width = v.get("head_width", 64)
        resnet = isinstance(layers, (list, tuple))
        vision = VisionConfig(
            image_size=size, patch_size=None if resnet else v.get("patch_size", 16), width=width, layers=layers,
            heads=(width * 32 if resnet else width) // head_width, mlp_ratio=v.get("mlp_ratio", 4.0),
            patch_dropout=v.get("patch_dropout", 0.0),
        )
        text = TextConfig(**{k: t[k] for k in ("context_length", "vocab_size", "width", "heads", "layers",
                                                "mlp_ratio") if k in t})
        return cls(embed_dim=d["embed_dim"], vision=vision, text=text, quick_gelu=bool(d.get("quick_gelu", False)))


# open_clip options accepted only at these (default) values; any other value changes the architecture.
_OFF = (None, False)
_OC_BLOCK = {k: _OFF for k in ("ls_init_value", "final_ln_after_pool", "output_tokens", "act_kwargs", "norm_kwargs",
                                "qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn",
                                "scale_fc")} | {"block_type": (None, "default")}
_OC_TOP_DEFAULTS = {"init_logit_bias": _OFF, "nonscalar_logit_scale": _OFF, "cast_dtype": _OFF}
_OC_VISION_DEFAULTS = _OC_BLOCK | {k: _OFF for k in ("attentional_pool", "no_ln_pre", "timm_model_name")} | {
    "pos_embed_type": ("learnable",), "pool_type": ("tok",)}
_OC_TEXT_DEFAULTS = _OC_BLOCK | {k: _OFF for k in ("hf_model_name", "hf_tokenizer_name", "tokenizer_mode",
                                                   "tokenizer_kwargs", "embed_cls", "no_causal_mask", "proj_bias")} | {
    "pad_id": (0,), "pool_type": ("argmax",), "proj_type": ("linear", None)}


def _check_neutral(where: str, d: dict, supported: set, accepted: dict[str, tuple]) -> None:
    for k, value in d.items():
        if k in supported:
            continue
        if k not in accepted:
            raise ValueError(f"unknown open_clip {where} option {k!r}")
        if value not in accepted[k]:
            raise ValueError(f"open_clip {where} option {k}={value!r} is not supported by clipforge")


def _vit(image_size: int, patch_size: int, width: int, layers: int, heads: int) -> VisionConfig:
    return VisionConfig(image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads)


def _resnet(layers: tuple[int, int, int, int], image_size: int = 224, width: int = 64) -> VisionConfig:
    return VisionConfig(image_size=image_size, patch_size=None, width=width, layers=layers, heads=width * 32 // 64)


PRESETS: dict[str, CLIPConfig] = {
    # CPU-fast: 64 px images, 8 px patches -> 64 tokens + class token; 32-token captions.
    "tiny": CLIPConfig(
        embed_dim=128,
        vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=4, heads=4),
        text=TextConfig(context_length=32, width=128, layers=4, heads=4),
    ),
    "small": CLIPConfig(
        embed_dim=256,
        vision=VisionConfig(image_size=128, patch_size=16, width=384, layers=6, heads=6),
        text=TextConfig(context_length=77, width=256, layers=6, heads=4),
    ),
    # The paper's sizes. Names follow open_clip: "-quickgelu" is the OpenAI-weights activation.
    "RN50": CLIPConfig(embed_dim=1024, vision=_resnet((3, 4, 6, 3)), text=TextConfig()),
    "RN101": CLIPConfig(embed_dim=512, vision=_resnet((3, 4, 23, 3)), text=TextConfig()),
    "ViT-B-32": CLIPConfig(embed_dim=512, vision=_vit(224, 32, 768, 12, 12), text=TextConfig()),
    "ViT-B-16": CLIPConfig(embed_dim=512, vision=_vit(224, 16, 768, 12, 12), text=TextConfig()),
    "ViT-L-14": CLIPConfig(
        embed_dim=768, vision=_vit(224, 14, 1024, 24, 16), text=TextConfig(width=768, heads=12)
    ),
    "ViT-L-14-336": CLIPConfig(
        embed_dim=768, vision=_vit(336, 14, 1024, 24, 16), text=TextConfig(width=768, heads=12)
    ),
}
for _name in ("RN50", "RN101", "ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-L-14-336"):
    _d = PRESETS[_name].to_dict()
    PRESETS[f"{_name}-quickgelu"] = CLIPConfig.from_dict({**_d, "quick_gelu": True})
del _name, _d


def load_config_file(path: str | Path) -> CLIPConfig:
    """A user-defined config from JSON: clipforge's to_dict layout (a checkpoint's config.json works too) or
    open_clip's model-config layout ({"embed_dim", "quick_gelu", "vision_cfg": {...}, "text_cfg": {...}})."""
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if "vision_cfg" in d or "text_cfg" in d or "model_cfg" in d:
        return CLIPConfig.from_open_clip_dict(d)
    d.pop("format", None)  # clipforge checkpoint marker
    return CLIPConfig.from_dict(d)


def get_config(name_or_path: str | Path) -> CLIPConfig:
    """A fresh (safe to mutate) copy of a preset, or the config in a JSON file (see load_config_file)."""
    name = str(name_or_path)
    if name in PRESETS:
        return CLIPConfig.from_dict(PRESETS[name].to_dict())
    if name.endswith(".json") or Path(name).is_file():
        return load_config_file(name)  # FileNotFoundError if it does not exist
    raise KeyError(f"unknown model {name!r}; choose one of {sorted(PRESETS)} or pass a .json config file")


# ----------------------------------------------------------------------------------------------- blocks
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 (stable under bf16/fp16), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(dtype)


class Attention(nn.Module):
    """Multi-head self-attention with nn.MultiheadAttention's parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        assert width % heads == 0, f"width {width} not divisible by heads {heads}"
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, D = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)  # [B, L, 3D]
        q, k, v = qkv.view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # each [B, H, L, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # [B, H, L, D/H]
        y = y.transpose(1, 2).reshape(B, L, D)  # [B, L, D]
        return self.out_proj(y)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block: x + attn(ln_1(x)); x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, quick_gelu: bool):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(width, hidden),
                gelu=QuickGELU() if quick_gelu else nn.GELU(),
                c_proj=nn.Linear(hidden, width),
            )
        )

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        x = x + self.attn(self.ln_1(x), causal=causal)
        x = x + self.mlp(self.ln_2(x))
        return x


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, quick_gelu: bool, causal: bool):
        super().__init__()
        self.width, self.layers, self.causal = width, layers, causal
        self.resblocks = nn.ModuleList(
            [ResidualAttentionBlock(width, heads, mlp_ratio, quick_gelu) for _ in range(layers)]
        )

    def init_weights(self) -> None:
        # OpenAI-style: std width^-0.5 for attention/fc inputs; residual outputs scaled down by (2*layers)^-0.5.
        attn_std = self.width**-0.5
        proj_std = self.width**-0.5 * (2 * self.layers) ** -0.5
        fc_std = (2 * self.width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.zeros_(block.attn.in_proj_bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.zeros_(block.mlp.c_fc.bias)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
            nn.init.zeros_(block.mlp.c_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, L, D] -> [B, L, D]
        for block in self.resblocks:
            x = block(x, causal=self.causal)
        return x


# ----------------------------------------------------------------------------------------------- towers
class PatchDropout(nn.Module):
    """FLIP (Li et al., 2023): while training, keep a random subset of the patch tokens (never the class token).

    Applied after the positional embeddings are added, so each kept token still knows where it came from.
    Identity in eval mode or when p == 0.
    """

    def __init__(self, p: float):
        super().__init__()
        assert 0.0 <= p < 1.0, f"patch dropout must be in [0, 1), got {p}"
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 1+N, D] -> [B, 1+K, D], K = max(1, N*(1-p))
        if not self.training or self.p == 0.0:
            return x
        cls, patches = x[:, :1], x[:, 1:]
        B, N, D = patches.shape
        keep = max(1, int(N * (1.0 - self.p)))
        idx = torch.rand(B, N, device=x.device).topk(keep, dim=-1).indices  # a random subset per image, [B, K]
        patches = patches.gather(1, idx.unsqueeze(-1).expand(B, keep, D))  # [B, K, D]
        return torch.cat([cls, patches], dim=1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool):
        super().__init__()
        assert not cfg.is_resnet and cfg.image_size % cfg.patch_size == 0, "image_size % patch_size != 0"
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
        self.patch_dropout = PatchDropout(cfg.patch_dropout)  # no parameters: state_dict unchanged
        self.ln_pre = LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads, cfg.mlp_ratio, quick_gelu, causal=False)
        self.ln_post = LayerNorm(cfg.width)
        self.proj = nn.Parameter(scale * torch.randn(cfg.width, embed_dim))
        self.transformer.init_weights()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [B, 3, H, W] -> [B, D, H/p, W/p]
        x = x.flatten(2).transpose(1, 2)  # [B, N, D] with N = (H/p)*(W/p)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1)  # [B, N+1, D]
        x = x + self.positional_embedding.to(x.dtype)
        x = self.patch_dropout(x)  # training with p > 0: [B, K+1, D], K < N
        x = self.ln_pre(x)
        x = self.transformer(x)  # [B, N+1, D] (K+1 under patch dropout)
        x = self.ln_post(x[:, 0, :])  # class token -> [B, D]
        return x @ self.proj  # [B, E]


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        config = config or CLIPConfig()
        self.config = config
        t = config.text
        # image tower: ViT, or the paper's ModifiedResNet when vision.layers is 4 stage depths
        v = config.vision
        if v.is_resnet:
            self.visual = ModifiedResNet(v.layers, config.embed_dim, v.heads, v.image_size, v.width)  # ReLU only
        else:
            self.visual = VisionTransformer(v, config.embed_dim, config.quick_gelu)
        # text tower (attributes at the top level, as in the OpenAI layout)
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        self.positional_embedding = nn.Parameter(torch.empty(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio, config.quick_gelu, causal=True)
        self.ln_final = LayerNorm(t.width)
        self.text_projection = nn.Parameter(torch.empty(t.width, config.embed_dim))
        # temperature: logits = exp(logit_scale) * cos_sim, initialised at 1/0.07
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.init_text_weights()

    def init_text_weights(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        self.transformer.init_weights()
        nn.init.normal_(self.text_projection, std=self.config.text.width**-0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.visual(images.to(self.dtype))  # [B, 3, H, W] -> [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        L = tokens.shape[1]
        assert L <= self.config.text.context_length, f"{L} tokens > context {self.config.text.context_length}"
        x = self.token_embedding(tokens).to(self.dtype)  # [B, L] -> [B, L, D]
        x = x + self.positional_embedding[:L].to(x.dtype)
        x = self.transformer(x)  # causal self-attention, [B, L, D]
        x = self.ln_final(x)
        eot = tokens.argmax(dim=-1)  # end-of-text has the largest id (49407) -> its position, [B]
        x = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, D]
        x = x @ self.text_projection  # [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, images: torch.Tensor, tokens: torch.Tensor):
        image_features = self.encode_image(images, normalize=True)  # [B, E]
        text_features = self.encode_text(tokens, normalize=True)  # [B, E]
        return image_features, text_features, self.logit_scale.exp().clamp(max=100)
