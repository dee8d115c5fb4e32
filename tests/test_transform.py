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
