"""The CLIP paper's ModifiedResNet image tower (Radford et al., 2021, section 2.4).

Differences from a torchvision ResNet:
  * a 3-conv stem (3x3 convs, the first with stride 2) followed by a 2x2 average pool instead of one 7x7 conv
    and a max pool;
  * anti-aliased strided convs: a block with stride s > 1 runs its 3x3 conv at stride 1 and then an s x s
    average pool; its shortcut is AvgPool(s) + 1x1 conv + BatchNorm;
  * global average pooling is replaced by attention pooling: one multi-head attention query (the mean of the
    final feature map) attends over the whole map (+ learned positional embeddings).

Parameter and buffer names follow the OpenAI state dict (visual.conv1/bn1..3, visual.layerK.N.convM/bnM,
visual.layerK.N.downsample.0 (conv) / .1 (bn), visual.attnpool.{positional_embedding, q_proj, k_proj, v_proj,
c_proj}) so OpenAI and open_clip RN checkpoints load without renaming. The shortcut's AvgPool is the Sequential
entry "-1" exactly so that the conv and BN keep the indices 0 and 1.

Shapes: B = batch, C = channels, H x W = spatial size, E = embed_dim. Pure torch: no I/O, no distributed imports.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> (AvgPool(stride)) -> 1x1 expand (x4), plus a shortcut; ReLU after the sum."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu3 = nn.ReLU(inplace=True)
        self.downsample = None
        if stride > 1 or inplanes != out:
            self.downsample = nn.Sequential(
                OrderedDict(
                    [
                        ("-1", nn.AvgPool2d(stride)),  # parameter-free; "-1" keeps conv/bn at indices 0/1
                        ("0", nn.Conv2d(inplanes, out, 1, stride=1, bias=False)),
                        ("1", nn.BatchNorm2d(out)),
                    ]
                )
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, Cin, H, W] -> [B, 4*planes, H/s, W/s]
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.relu2(self.bn2(self.conv2(y)))
        y = self.avgpool(y)  # anti-aliased stride
        y = self.bn3(self.conv3(y))
        return self.relu3(y + identity)


class AttentionPool2d(nn.Module):
    """Multi-head attention pooling: the mean token is the only query, keys/values are mean + all positions."""

    def __init__(self, spatial: int, width: int, heads: int, output_dim: int):
        super().__init__()
        assert width % heads == 0, f"attention-pool width {width} not divisible by heads {heads}"
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(spatial * spatial + 1, width) / width**0.5)
        self.k_proj = nn.Linear(width, width)
        self.q_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.c_proj = nn.Linear(width, output_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, C, H, W] -> [B, E]
        B, C = x.shape[:2]
        x = x.flatten(2).transpose(1, 2)  # [B, HW, C]
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)  # [B, HW+1, C], mean token first
        x = x + self.positional_embedding.to(x.dtype)
        L, Dh = x.shape[1], C // self.heads
        q = self.q_proj(x[:, :1]).view(B, 1, self.heads, Dh).transpose(1, 2)  # [B, h, 1, Dh]
        k = self.k_proj(x).view(B, L, self.heads, Dh).transpose(1, 2)  # [B, h, L, Dh]
        v = self.v_proj(x).view(B, L, self.heads, Dh).transpose(1, 2)  # [B, h, L, Dh]
        y = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(Dh)) v, [B, h, 1, Dh]
        y = y.transpose(1, 2).reshape(B, C)  # [B, C]
        return self.c_proj(y)  # [B, E]


class ModifiedResNet(nn.Module):
    """Stem (3 convs + avgpool 2) -> layer1..layer4 (strides 1, 2, 2, 2) -> attention pool.

    `width` is the stem width (64 for RN50/RN101); the final feature map has width * 32 channels at
    image_size / 32 resolution, and the attention pool projects it to `output_dim`.
    """

    def __init__(self, layers: tuple[int, int, int, int], output_dim: int, heads: int, image_size: int = 224,
                 width: int = 64):
        super().__init__()
        assert len(layers) == 4, f"ResNet needs 4 stage depths, got {layers}"
        assert image_size % 32 == 0, f"ResNet image_size must be a multiple of 32, got {image_size}"
        # stem: [B, 3, S, S] -> [B, width, S/4, S/4]
        self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width // 2)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width // 2)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu3 = nn.ReLU(inplace=True)
        self.avgpool = nn.AvgPool2d(2)
        # residual stages: channels 4w, 8w, 16w, 32w at S/4, S/8, S/16, S/32
        self._inplanes = width
        self.layer1 = self._make_layer(width, layers[0])
        self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
        self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)
        self.init_weights()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        layers = [Bottleneck(self._inplanes, planes, stride)]
        self._inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def init_weights(self) -> None:
        # attention pool projections: std C^-0.5; convs keep PyTorch's default init.
        std = self.attnpool.c_proj.in_features**-0.5
        for proj in (self.attnpool.q_proj, self.attnpool.k_proj, self.attnpool.v_proj, self.attnpool.c_proj):
            nn.init.normal_(proj.weight, std=std)
        # zero the last BN of every residual branch: each block starts as (almost) the identity.
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, 3, S, S] -> [B, E]
        x = x.to(self.conv1.weight.dtype)
        x = self.relu1(self.bn1(self.conv1(x)))  # [B, w/2, S/2, S/2]
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))  # [B, w, S/2, S/2]
        x = self.avgpool(x)  # [B, w, S/4, S/4]
        x = self.layer1(x)  # [B, 4w, S/4, S/4]
        x = self.layer2(x)  # [B, 8w, S/8, S/8]
        x = self.layer3(x)  # [B, 16w, S/16, S/16]
        x = self.layer4(x)  # [B, 32w, S/32, S/32]
        return self.attnpool(x)  # [B, E]
