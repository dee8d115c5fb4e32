"""Image preprocessing for CLIP (PIL + torch only; no torchvision dependency).

eval:  RGB -> bicubic resize of the short side to S -> center crop S x S -> [0,1] tensor -> CLIP mean/std.
train: RGB -> random resized crop (TrainAugment: area 90-100%, aspect 3/4-4/3 by default) to S x S, bicubic
       -> colour jitter (brightness, contrast, saturation, each by a factor in [1 - c, 1 + c], in random order)
       -> grayscale with probability g -> Gaussian blur with probability b -> tensor -> mean/std -> with
       probability r a random convolution mixed into the image (all off by default). The eval path matches
       OpenAI's / open_clip's preprocessing tensor for tensor.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))  # transparent -> white
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def _to_tensor(img: Image.Image) -> torch.Tensor:
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy())  # [S, S, 3] uint8
    x = x.permute(2, 0, 1).float().div_(255.0)  # [3, S, S] in [0, 1]
    mean = torch.tensor(MEAN).view(3, 1, 1)
    std = torch.tensor(STD).view(3, 1, 1)
    return (x - mean) / std


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Short side -> size (long side truncated, as OpenAI's / open_clip's preprocessing does), then the centre
    size x size crop with the same rounding of the offsets, so tensors match theirs exactly."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def random_resized_crop(
    img: Image.Image, size: int, scale=(0.9, 1.0), ratio=(3 / 4, 4 / 3), rng: random.Random | None = None
) -> Image.Image:
    rng = rng or random
    w, h = img.size
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    return resize_center_crop(img, size)  # fallback for extreme aspect ratios


@dataclass
class TrainAugment:
    """Training augmentation. The CLIP paper uses only a random square crop of the resized image; the defaults
    here are a mild random resized crop. Every draw comes from the rng the caller passes (one per sample)."""
    scale: tuple[float, float] = (0.9, 1.0)  # fraction of the image area kept by the crop
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # crop aspect ratio range
    colour: float = 0.0  # colour jitter strength c: brightness, contrast, saturation factors in [1 - c, 1 + c]
    grayscale: float = 0.0  # probability of a grayscale image
    blur: float = 0.0  # probability of a Gaussian blur, radius uniform in [0.2, 2] % of the image side
    randconv: float = 0.0  # probability of a random convolution (random_convolution) mixed into the image
    stroke: float = 0.0  # probability of a stroke-width change of a drawing (stroke_augment)

    def __post_init__(self):
        probs = (self.grayscale, self.blur, self.randconv, self.stroke)
        if not 0 <= self.colour < 1 or not all(0 <= p <= 1 for p in probs):
            raise ValueError(f"colour jitter must be in [0, 1), grayscale, blur, randconv and stroke in [0, 1], "
                             f"got {self.colour}, {self.grayscale}, {self.blur}, {self.randconv}, {self.stroke}")


_ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)


def stroke_augment(img: Image.Image, rng) -> Image.Image:
    """A drawing's strokes made thinner or thicker: a 3 x 3 max filter (70 %: per channel, so dark outlines on a
    light ground shrink or vanish and the fills they enclose spread over them, the look of a flat, outline-free
    design) or a 3 x 3 min filter (30 %: outlines grow). A style change of line art that keeps its colours and its
    shapes (a 5 x 5 max filter already erases thin details at 64 px). Every draw comes from rng."""
    return img.filter(ImageFilter.MaxFilter(3) if rng.random() < 0.7 else ImageFilter.MinFilter(3))


def colour_augment(img: Image.Image, aug: TrainAugment, rng) -> Image.Image:
    """Stroke width, colour jitter, grayscale, then blur, as TrainAugment says (a no-op, drawing nothing, when all
    are off)."""
    if aug.stroke > 0 and rng.random() < aug.stroke:
        img = stroke_augment(img, rng)
    if aug.colour > 0:
        order = list(range(len(_ENHANCERS)))
        rng.shuffle(order)
        for i in order:
            img = _ENHANCERS[i](img).enhance(rng.uniform(1 - aug.colour, 1 + aug.colour))
    if aug.grayscale > 0 and rng.random() < aug.grayscale:
        img = img.convert("L").convert("RGB")
    if aug.blur > 0 and rng.random() < aug.blur:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.002, 0.02) * img.size[0]))
    return img


RANDCONV_KERNELS = (1, 3, 5, 7)


def random_convolution(x: torch.Tensor, rng) -> torch.Tensor:
    """RandConv (Xu et al., ICLR 2021): a 3 -> 3 channel convolution with a random k x k kernel (k drawn from
    RANDCONV_KERNELS, weights N(0, 1 / (3 k^2))) keeps shapes and changes colour and local texture -- a style
    change; the output, rescaled to x's standard deviation, is mixed in as a x + (1 - a) conv(x), a ~ U(0, 1).
    x: the normalised [3, S, S] image; every draw comes from rng."""
    k = RANDCONV_KERNELS[rng.randrange(len(RANDCONV_KERNELS))]
    g = torch.Generator().manual_seed(rng.getrandbits(63))
    w = torch.randn(3, 3, k, k, generator=g) / math.sqrt(3 * k * k)                   # [out, in, k, k]
    y = torch.nn.functional.conv2d(x[None], w, padding=k // 2)[0]                      # [3, S, S]
    y = (y - y.mean()) * (x.std() / y.std().clamp_min(1e-6)) + x.mean()
    a = rng.random()
    return a * x + (1 - a) * y


def image_transform(image_size: int, train: bool = False,
                    augment: TrainAugment | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """-> fn(PIL image) -> FloatTensor[3, image_size, image_size] normalised with the CLIP mean/std."""
    aug = augment or TrainAugment()

    def eval_fn(img: Image.Image) -> torch.Tensor:
        return _to_tensor(resize_center_crop(_to_rgb(img), image_size))

    def train_fn(img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:  # rng: None -> `random`
        rng = rng or random
        crop = random_resized_crop(_to_rgb(img), image_size, scale=aug.scale, ratio=aug.ratio, rng=rng)
        x = _to_tensor(colour_augment(crop, aug, rng))
        return random_convolution(x, rng) if aug.randconv > 0 and rng.random() < aug.randconv else x

    return train_fn if train else eval_fn
