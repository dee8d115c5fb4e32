"""CLIP: an image tower (ViT or the paper's ModifiedResNet) and a causal text transformer trained
contrastively (Radford et al., 2021).

One readable file, top to bottom (the ResNet tower lives in trainer/clip/resnet.py). Shapes use B = batch,
L = sequence length, D = width, E = embed_dim. Parameter names follow the OpenAI layout (visual.conv1,
visual.transformer.resblocks.N.attn.in_proj_weight, visual.layer1.0.conv1, visual.attnpool.q_proj,
token_embedding, ln_final, text_projection, logit_scale, ...) so OpenAI / open_clip checkpoints load unrenamed.
This module is pure: no distributed, DeepSpeed or I/O imports (configs, presets and config files live in
trainer/clip/configs.py and are re-exported here). Activation checkpointing is applied from the outside
(trainer.parallel.apply_activation_checkpointing) so the state_dict keys never change.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from trainer.clip.configs import PRESETS, CLIPConfig, TextConfig, VisionConfig, get_config, load_config_file  # noqa: F401
from trainer.clip.resnet import ModifiedResNet


# ----------------------------------------------------------------------------------------------- blocks
class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in the input's dtype. torch's bf16/fp16 layer_norm kernels (CUDA and CPU) compute the mean, the
    variance and the affine transform in fp32 and round once at the end, which is what an explicit fp32 upcast
    would do, but without keeping an fp32 copy of the input for backward (under activation checkpointing that
    copy was the largest tensor of the block being recomputed: 2x the bf16 input, twice per block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


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
