"""Joint image/label transforms of the mmseg (SegFormer/HRViT) pipelines, as small functions on
uint8 numpy arrays (H, W, 3) and (H, W).

They draw from Python's global ``random`` so that the per-sample seeding of
:class:`reproduce.data.datasets.SeededSamples` makes every crop reproducible and resumable.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

IGNORE_INDEX = 255


def keep_ratio_size(height: int, width: int, scale: tuple[int, int]) -> tuple[int, int]:
    """mmseg ``Resize(keep_ratio=True)``: the largest (h, w) with the image's aspect ratio whose long
    side fits max(scale) and short side fits min(scale)."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]):
    """Bilinear for the image, nearest for the label; ``size`` is (h, w)."""
    h, w = size
    image = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
    if label is not None:
        label = np.asarray(Image.fromarray(label).resize((w, h), Image.NEAREST))
    return image, label


def random_rescale(image, label, scale: tuple[int, int], ratio_range: tuple[float, float]):
    """Resize with a ratio drawn from ``ratio_range`` applied to the nominal (w, h) ``scale``."""
    ratio = random.uniform(*ratio_range)
    target = (int(scale[0] * ratio), int(scale[1] * ratio))
    return resize(image, label, keep_ratio_size(*label.shape, target))


def random_crop(image, label, crop: int, cat_max_ratio: float = 0.75, tries: int = 10):
    """mmseg ``RandomCrop``: re-draw (up to ``tries`` times) while one class covers more than
    ``cat_max_ratio`` of the crop's labelled pixels."""
    h, w = label.shape

    def draw() -> tuple[int, int]:
        return random.randint(0, max(h - crop, 0)), random.randint(0, max(w - crop, 0))

    top, left = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            window = label[top : top + crop, left : left + crop]
            counts = np.bincount(window[window != IGNORE_INDEX].ravel())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return image[top : top + crop, left : left + crop], label[top : top + crop, left : left + crop]


def random_flip(image, label, prob: float = 0.5):
    if random.random() < prob:
        return image[:, ::-1], label[:, ::-1]
    return image, label


def photometric_distortion(image: np.ndarray) -> np.ndarray:
    """mmseg ``PhotoMetricDistortion``: brightness +-32, contrast 0.5-1.5 (before or after the HSV
    steps), saturation 0.5-1.5 and hue +-18 (OpenCV degrees/2), each applied with probability 0.5."""
    img = image.astype(np.float32)

    def contrast(x):
        return np.clip(x * random.uniform(0.5, 1.5), 0, 255) if random.randint(0, 1) else x

    if random.randint(0, 1):
        img = np.clip(img + random.uniform(-32, 32), 0, 255)
    contrast_first = random.randint(0, 1)
    if contrast_first:
        img = contrast(img)
    hsv = np.asarray(Image.fromarray(img.astype(np.uint8)).convert("HSV")).astype(np.float32)
    if random.randint(0, 1):
        hsv[..., 1] = np.clip(hsv[..., 1] * random.uniform(0.5, 1.5), 0, 255)
    if random.randint(0, 1):  # PIL hue is 0..255 for 360 degrees; OpenCV's is 0..180
        hsv[..., 0] = (hsv[..., 0] + random.randint(-18, 18) * 256.0 / 180.0) % 256
    img = np.asarray(Image.fromarray(hsv.astype(np.uint8), "HSV").convert("RGB")).astype(np.float32)
    if not contrast_first:
        img = contrast(img)
    return img.astype(np.uint8)


def to_tensors(image: np.ndarray, label: np.ndarray | None, pad_to: int | None = None):
    """Normalise with the ImageNet mean/std (mmseg's 123.675/58.395... on 0-255) and pad the bottom
    and right to ``pad_to`` (image 0 after normalisation, label 255), as mmseg's Pad after Normalize."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)
    x = (x - mean) / std
    y = None if label is None else torch.from_numpy(np.array(label, dtype=np.int64))
    if pad_to is not None:
        ph, pw = max(pad_to - x.shape[1], 0), max(pad_to - x.shape[2], 0)
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), value=0.0)
        if y is not None:
            y = torch.nn.functional.pad(y, (0, pw, 0, ph), value=IGNORE_INDEX)
    return x, y


@dataclass(frozen=True)
class SegTrainTransform:
    """Resize (ratio range) -> RandomCrop (cat_max_ratio) -> flip -> PhotoMetricDistortion ->
    Normalize -> Pad, the SegFormer/HRViT training pipeline."""

    scale: tuple[int, int]  # nominal (w, h), e.g. (2048, 1024) for Cityscapes
    crop: int
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True

    def __call__(self, image: np.ndarray, label: np.ndarray):
        image, label = random_rescale(image, label, self.scale, self.ratio_range)
        image, label = random_crop(image, label, self.crop, self.cat_max_ratio)
        image, label = random_flip(image, label, self.flip_prob)
        if self.photometric:
            image = photometric_distortion(image)
        return to_tensors(image, label, pad_to=self.crop)


@dataclass(frozen=True)
class SegTestTransform:
    """Test-time resize to the nominal scale (keep ratio, optionally both sides multiples of 32 as
    mmseg's ``AlignedResize``); the label stays at its original resolution for scoring."""

    scale: tuple[int, int]
    align: int = 1

    def __call__(self, image: np.ndarray, label: np.ndarray):
        h, w = keep_ratio_size(*label.shape, self.scale)
        h, w = -(-h // self.align) * self.align, -(-w // self.align) * self.align  # ceil, as AlignedResize
        if (h, w) != label.shape:
            image, _ = resize(image, None, (h, w))
        return to_tensors(image, label)
