"""Dataset descriptions and torch ``Dataset`` objects over the indexed layouts.

``SEG_DATASETS`` holds what the recipes need to know about each segmentation dataset (classes,
nominal scale, test mode) before any file is read, so settings can be validated up front.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from reproduce.data import layouts, synthetic
from reproduce.data.seg_transforms import IGNORE_INDEX

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)


@dataclass(frozen=True)
class SegDatasetInfo:
    """What the SegFormer recipes say about a segmentation dataset (baselines.md §4.1-4.4)."""

    name: str
    class_names: tuple[str, ...]
    splits: tuple[str, str]  # (train, val) folder names
    scale: tuple[int, int] | None  # nominal (w, h) resize scale; None: from the generated size
    test_mode: str  # "slide" or "whole"
    paper_crop: int | None
    paper_batch: int

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


SEG_DATASETS = {
    "cityscapes": SegDatasetInfo("cityscapes", CITYSCAPES_CLASSES, ("train", "val"), (2048, 1024), "slide", 1024, 8),
    "ade20k": SegDatasetInfo("ade20k", tuple(f"class_{i:03d}" for i in range(150)), ("training", "validation"), (2048, 512), "whole", 512, 16),
    "synthetic": SegDatasetInfo("synthetic", synthetic.SEG_CLASSES, ("train", "val"), None, "slide", None, 8),
}


def synthetic_seg_scale(size: int) -> tuple[int, int]:
    """Nominal (w, h) of generated scenes of height ``size``: their own size, as Cityscapes' (2048, 1024)."""
    return 2 * size, size


def cityscapes_label_lut() -> np.ndarray:
    """Label id -> train id (255 = ignore) from cityscapesscripts' official table."""
    try:
        from cityscapesscripts.helpers.labels import labels
    except ModuleNotFoundError as err:
        raise layouts.DataLayoutError(
            "this Cityscapes copy has only *_gtFine_labelIds.png; mapping them to train ids needs the official "
            "label table: pip install cityscapesscripts (or pip install -e '.[cityscapes]'), or create "
            "*_labelTrainIds.png with cityscapesscripts' createTrainIdLabelImgs",
            layouts.CITYSCAPES_LAYOUT,
        ) from err
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for label in labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < IGNORE_INDEX:
            lut[label.id] = label.trainId
    return lut


def ade_reduce_zero_label_lut() -> np.ndarray:
    """mmseg ``reduce_zero_label``: 0 -> 255, k -> k - 1, and 255 stays ignored."""
    lut = (np.arange(256, dtype=np.int64) - 1).astype(np.uint8)
    lut[0] = lut[255] = IGNORE_INDEX
    return lut


def label_lut(kind: str) -> np.ndarray | None:
    if kind == "trainIds":
        return None
    if kind == "labelIds":
        return cityscapes_label_lut()
    if kind == "ade":
        return ade_reduce_zero_label_lut()
    raise ValueError(f"unknown label kind {kind!r}")


def seg_layout(name: str) -> str:
    """The on-disk layout of segmentation dataset ``name`` (generated scenes use Cityscapes')."""
    return "ade20k" if name == "ade20k" else "cityscapes"


def index_segmentation(name: str, root: Path | str, split: str) -> list[layouts.SegSample]:
    """Samples of ``split`` ("train" or "val") of segmentation dataset ``name`` under ``root``."""
    folder = SEG_DATASETS[name].splits[("train", "val").index(split)]
    if name == "ade20k":
        return layouts.index_ade20k(root, folder)
    return layouts.index_cityscapes(root, folder)


def _load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


class ImageClassDataset(Dataset):
    """``(image tensor, class index)`` over indexed ``(path, class)`` pairs with a timm transform."""

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable):
        self.samples, self.transform = list(samples), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return self.transform(_load_rgb(path)), target


class SegmentationDataset(Dataset):
    """``(normalised image, label map)`` over indexed samples; label ids are mapped to train ids."""

    def __init__(self, samples: Sequence[layouts.SegSample], transform: Callable):
        self.samples, self.transform = list(samples), transform
        self._luts = {kind: label_lut(kind) for kind in {s.label_kind for s in self.samples}}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        sample = self.samples[index]
        image = np.asarray(_load_rgb(sample.image))
        with Image.open(sample.label) as img:
            label = np.asarray(img)
        if label.ndim != 2:
            raise ValueError(f"{sample.label}: label maps must be single-channel, got shape {label.shape}")
        lut = self._luts[sample.label_kind]
        if lut is not None:
            label = lut[label]
        return self.transform(image, label)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed that depends only on (run seed, epoch, sample index)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


class SeededSamples(Dataset):
    """Indexed by ``(epoch, index)``; seeds Python, NumPy and torch from those before the
    transforms run, so augmentation is the same whatever the worker count, rank layout or resume
    point."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        s = sample_seed(self.seed, epoch, index)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        return self.dataset[index]
