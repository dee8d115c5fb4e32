"""CLIP: a ViT image tower and a causal text transformer trained contrastively (Radford et al., 2021).

One readable file, top to bottom. Shapes use B = batch, L = sequence length, D = width, E = embed_dim.
Parameter names follow the OpenAI layout (visual.conv1, visual.transformer.resblocks.N.attn.in_proj_weight,
token_embedding, ln_final, text_projection, logit_scale, ...) so external checkpoints can be mapped later.
This module is pure: no distributed, DeepSpeed or I/O imports. Activation checkpointing is applied from the
outside (trainer.parallel.apply_activation_checkpointing) so the state_dict keys never change.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------- config
@dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0


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
    # The paper's ViT-B/32 sizes. Names follow open_clip: "-quickgelu" is the OpenAI-weights activation.
    "ViT-B-32": CLIPConfig(embed_dim=512, vision=VisionConfig(224, 32, 768, 12, 12), text=TextConfig()),
    "ViT-B-32-quickgelu": CLIPConfig(
        embed_dim=512, vision=VisionConfig(224, 32, 768, 12, 12), text=TextConfig(), quick_gelu=True
    ),
    "ViT-B-16": CLIPConfig(embed_dim=512, vision=VisionConfig(224, 16, 768, 12, 12), text=TextConfig()),
    "ViT-L-14": CLIPConfig(
        embed_dim=768, vision=VisionConfig(224, 14, 1024, 24, 16), text=TextConfig(width=768, heads=12)
    ),
}


def get_config(name: str) -> CLIPConfig:
    if name not in PRESETS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(PRESETS)}")
    return CLIPConfig.from_dict(PRESETS[name].to_dict())  # a fresh copy, safe to mutate


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
class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, embed_dim: int, quick_gelu: bool):
        super().__init__()
        assert cfg.image_size % cfg.patch_size == 0, "image_size must be a multiple of patch_size"
        grid = cfg.image_size // cfg.patch_size
        scale = cfg.width**-0.5
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, cfg.width))
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
        x = self.ln_pre(x)
        x = self.transformer(x)  # [B, N+1, D]
        x = self.ln_post(x[:, 0, :])  # class token -> [B, D]
        return x @ self.proj  # [B, E]


class CLIP(nn.Module):
    def __init__(self, config: CLIPConfig | None = None):
        super().__init__()
        config = config or CLIPConfig()
        self.config = config
        t = config.text
        # image tower
        self.visual = VisionTransformer(config.vision, config.embed_dim, config.quick_gelu)
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
