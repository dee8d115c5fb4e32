"""Preprocessing matches open_clip's (torchvision) eval transform tensor for tensor; training augmentation is
configurable."""

import random

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from trainer.clip.transform import TrainAugment, image_transform, random_resized_crop


@pytest.mark.parametrize("size", [224, 336, 64])
def test_eval_transform_equals_open_clip(size):
    pre = open_clip.image_transform(size, is_train=False)
    ours = image_transform(size)
    rng = np.random.default_rng(size)
    for w, h in [(300, 200), (225, 401), (640, 480), (101, 333), (size, size), (500, 223), (77, 50), (227, 500)]:
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        a, b = pre(img), ours(img)
        assert a.shape == b.shape == (3, size, size)
        assert torch.equal(a, b), (w, h, (a - b).abs().max())


def test_rgba_and_grayscale_become_rgb():
    t = image_transform(32)
    assert t(Image.new("RGBA", (40, 50), (255, 0, 0, 0))).shape == (3, 32, 32)
    assert t(Image.new("L", (40, 50), 128)).shape == (3, 32, 32)


def test_train_augment_is_configurable():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    full = random_resized_crop(img, 64, scale=(1.0, 1.0), ratio=(160 / 120, 160 / 120), rng=random.Random(0))
    assert np.array_equal(np.asarray(full), np.asarray(img.resize((64, 64), Image.Resampling.BICUBIC)))
    t = image_transform(64, train=True, augment=TrainAugment(scale=(0.2, 0.3)))
    random.seed(0)
    x1, x2 = t(img), t(img)
    assert x1.shape == (3, 64, 64) and not torch.equal(x1, x2)  # random crops differ


def test_colour_augment_is_seeded_and_off_by_default():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (80, 80, 3), dtype=np.uint8))
    plain = image_transform(64, train=True)
    jitter = image_transform(64, train=True, augment=TrainAugment(colour=0.4))
    gray = image_transform(64, train=True, augment=TrainAugment(grayscale=1.0))
    # off: exactly the crop alone (the colour step draws nothing, so existing runs replay bit for bit)
    assert torch.equal(plain(img, random.Random(3)), image_transform(64, train=True)(img, random.Random(3)))
    a, b = jitter(img, random.Random(3)), jitter(img, random.Random(3))
    assert torch.equal(a, b) and not torch.equal(a, plain(img, random.Random(3)))  # seeded, and it changes colour
    g = gray(img, random.Random(3))
    mean, std = torch.tensor((0.48145466, 0.4578275, 0.40821073)), torch.tensor((0.26862954, 0.26130258, 0.27577711))
    raw = g * std.view(3, 1, 1) + mean.view(3, 1, 1)  # back to [0, 1]: grayscale -> equal channels
    assert torch.allclose(raw[0], raw[1], atol=1e-5) and torch.allclose(raw[1], raw[2], atol=1e-5)
    with pytest.raises(ValueError):
        TrainAugment(colour=1.5)


def test_blur_augment_smooths():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    sharp = image_transform(64, train=True, augment=TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    blurred = image_transform(64, train=True, augment=TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), blur=1.0))
    a, b = sharp(img, random.Random(0)), blurred(img, random.Random(0))
    assert b.std() < a.std()  # a blur of white noise lowers its variance
    assert torch.equal(b, blurred(img, random.Random(0)))  # seeded


def test_randconv_changes_style_keeps_shapes_and_is_seeded():
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((200, 30, 30), (16, 16, 48, 48))  # a red square on white
    plain = image_transform(64, train=True, augment=TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    conv = image_transform(64, train=True, augment=TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), randconv=1.0))
    a = plain(img, random.Random(3))
    outs = [conv(img, random.Random(s)) for s in range(6)]
    assert all(o.shape == a.shape and torch.isfinite(o).all() for o in outs)
    assert all(not torch.allclose(o, a, atol=1e-3) for o in outs)  # the style changed
    assert torch.equal(outs[2], conv(img, random.Random(2)))  # seeded: resume stays exact
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[20:44, 20:44] = True
    for o in outs:  # the square is still there: inside and outside differ in some channel
        gap = (o[:, inside].mean(1) - o[:, ~inside].mean(1)).abs().max()
        assert gap > 0.25 * (a[:, inside].mean(1) - a[:, ~inside].mean(1)).abs().max()
    rng_a, rng_b = random.Random(9), random.Random(9)
    image_transform(64, train=True, augment=TrainAugment(randconv=0.0))(img, rng_a)
    plain_default = image_transform(64, train=True)
    plain_default(img, rng_b)
    assert rng_a.random() == rng_b.random()  # off: no draw, so earlier runs replay exactly
    with pytest.raises(ValueError):
        TrainAugment(randconv=1.5)


def test_stroke_augment_thins_or_thickens_outlines_keeps_fills_and_is_seeded():
    img = Image.new("RGB", (64, 64), (255, 255, 255))
    img.paste((0, 0, 0), (14, 14, 50, 50))
    img.paste((230, 40, 40), (16, 16, 48, 48))  # a red square with a 2-px black outline, on white
    plain = image_transform(64, train=True, augment=TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0)))
    stroke = image_transform(64, train=True, augment=TrainAugment(scale=(1.0, 1.0), ratio=(1.0, 1.0), stroke=1.0))
    a = plain(img, random.Random(0))
    dark = lambda x: int((x.mean(0) < -1.5).sum())  # noqa: E731 -- black pixels after CLIP normalisation
    outs = [stroke(img, random.Random(s)) for s in range(12)]
    assert any(dark(o) < dark(a) // 2 for o in outs)   # thinned or gone
    assert any(dark(o) > dark(a) for o in outs)        # thickened
    for o in outs:  # the red fill stays red in the middle
        assert o[0, 28:36, 28:36].mean() > o[1, 28:36, 28:36].mean() + 1.0
    assert torch.equal(outs[5], stroke(img, random.Random(5)))  # seeded
    rng_a, rng_b = random.Random(4), random.Random(4)
    image_transform(64, train=True, augment=TrainAugment(stroke=0.0))(img, rng_a)
    image_transform(64, train=True)(img, rng_b)
    assert rng_a.random() == rng_b.random()  # off: nothing drawn
    with pytest.raises(ValueError):
        TrainAugment(stroke=-0.1)
