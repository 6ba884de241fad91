"""Index and validate the on-disk dataset layouts before any training starts.

Each ``index_*`` function walks a dataset root, checks it against the standard layout, and returns
the sample list. A missing or malformed tree raises :class:`DataLayoutError` naming the expected
layout and the first offending path, so a wrong ``--data-root`` fails in seconds, not after the
model is built.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reproduce.errors import UsageError

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")

IMAGENET_LAYOUT = """\
ImageNet-style folders:
  <root>/train/<class>/<image>.JPEG   (one folder per class, e.g. n01440764)
  <root>/val/<class>/<image>.JPEG     (validation images moved into the same class folders)"""

CITYSCAPES_LAYOUT = """\
Cityscapes:
  <root>/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
  <root>/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png   (19 train ids, 255 = ignore)
  (or <name>_gtFine_labelIds.png, mapped to train ids with cityscapesscripts' label table)"""

ADE20K_LAYOUT = """\
ADE20K (SceneParsing release):
  <root>/ADEChallengeData2016/images/<training|validation>/<name>.jpg
  <root>/ADEChallengeData2016/annotations/<training|validation>/<name>.png   (0 = other, 1..150)
  (<root> may also be the ADEChallengeData2016 folder itself)"""


class DataLayoutError(UsageError):
    """A dataset root that does not match the layout the loader expects: the problem and the first
    offending path on one line, then the expected layout."""

    def __init__(self, problem: str, layout: str, offending: Path | str | None = None):
        where = f"; first offending path: {offending}" if offending is not None else ""
        super().__init__(f"{problem}{where}\nexpected layout:\n{layout}")

    @classmethod
    def from_message(cls, message: str) -> "DataLayoutError":
        """The same error re-raised on another rank from its message."""
        err = cls.__new__(cls)
        UsageError.__init__(err, message)
        return err


@dataclass(frozen=True)
class SegSample:
    image: Path
    label: Path
    label_kind: str  # "trainIds" (already 0..K-1/255), "labelIds" (Cityscapes ids) or "ade" (0..150)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _require_dir(path: Path, what: str, layout: str) -> Path:
    if not path.is_dir():
        raise DataLayoutError(f"missing {what} folder", layout, path)
    return path


def index_image_folder(root: Path | str, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes (sorted folder names) and ``(image, class index)`` pairs of ``<root>/<split>``."""
    split_dir = _require_dir(Path(root) / split, f"ImageNet '{split}'", IMAGENET_LAYOUT)
    stray = sorted(p for p in split_dir.iterdir() if p.is_file())
    if stray:
        raise DataLayoutError(f"files directly under '{split}/' (images must sit in class folders)", IMAGENET_LAYOUT, stray[0])
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataLayoutError(f"no class folders in '{split}/'", IMAGENET_LAYOUT, split_dir)
    samples: list[tuple[Path, int]] = []
    for index, name in enumerate(classes):
        images = sorted(p for p in (split_dir / name).iterdir() if _is_image(p))
        if not images:
            raise DataLayoutError(f"class folder without images ({', '.join(IMAGE_EXTENSIONS)})", IMAGENET_LAYOUT, split_dir / name)
        samples.extend((p, index) for p in images)
    return classes, samples


def index_imagenet(root: Path | str) -> dict[str, tuple[list[str], list[tuple[Path, int]]]]:
    """Both splits of an ImageNet-layout root; the val classes must be the train classes."""
    if not Path(root).is_dir():
        raise DataLayoutError("dataset root does not exist", IMAGENET_LAYOUT, root)
    splits = {split: index_image_folder(root, split) for split in ("train", "val")}
    train_classes, val_classes = splits["train"][0], splits["val"][0]
    if train_classes != val_classes:
        odd = sorted(set(train_classes) ^ set(val_classes))[0]
        side = "val" if odd in val_classes else "train"
        raise DataLayoutError("train/ and val/ have different class folders", IMAGENET_LAYOUT, Path(root) / side / odd)
    return splits


def index_cityscapes(root: Path | str, split: str) -> list[SegSample]:
    """Image/label pairs of one Cityscapes split; train-id PNGs are preferred over label-id PNGs."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError("dataset root does not exist", CITYSCAPES_LAYOUT, root)
    image_dir = _require_dir(root / "leftImg8bit" / split, "leftImg8bit/<split>", CITYSCAPES_LAYOUT)
    label_dir = _require_dir(root / "gtFine" / split, "gtFine/<split>", CITYSCAPES_LAYOUT)
    images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DataLayoutError("no <city>/*_leftImg8bit.png images", CITYSCAPES_LAYOUT, image_dir)
    samples = []
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        base = label_dir / image.parent.name / stem
        for suffix, kind in (("_gtFine_labelTrainIds.png", "trainIds"), ("_gtFine_labelIds.png", "labelIds")):
            if Path(f"{base}{suffix}").is_file():
                samples.append(SegSample(image, Path(f"{base}{suffix}"), kind))
                break
        else:
            raise DataLayoutError("image without a gtFine label", CITYSCAPES_LAYOUT, Path(f"{base}_gtFine_labelTrainIds.png"))
    return samples


def index_ade20k(root: Path | str, split: str) -> list[SegSample]:
    """Image/annotation pairs of one ADE20K split (``training`` or ``validation``)."""
    root = Path(root)
    if not root.is_dir():
        raise DataLayoutError("dataset root does not exist", ADE20K_LAYOUT, root)
    if (root / "ADEChallengeData2016").is_dir():
        root = root / "ADEChallengeData2016"
    image_dir = _require_dir(root / "images" / split, "images/<split>", ADE20K_LAYOUT)
    label_dir = _require_dir(root / "annotations" / split, "annotations/<split>", ADE20K_LAYOUT)
    images = sorted(p for p in image_dir.iterdir() if _is_image(p))
    if not images:
        raise DataLayoutError("no images", ADE20K_LAYOUT, image_dir)
    samples = []
    for image in images:
        label = label_dir / f"{image.stem}.png"
        if not label.is_file():
            raise DataLayoutError("image without an annotation", ADE20K_LAYOUT, label)
        samples.append(SegSample(image, label, "ade"))
    return samples


# --------------------------------------------------------------------------- file index and data identity

LAYOUTS = ("imagenet", "cityscapes", "ade20k")


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def build_index(layout: str, root: Path | str, splits: tuple[str, ...]) -> dict:
    """The validated file list of ``splits`` under ``root`` as JSON-able data, with ``digest``: a hash
    of every file's path relative to the root and its size. The digest is the data's identity (a
    moved copy has the same one) and the index is what other ranks and later launches read instead
    of walking and stat-ing the tree again."""
    root = Path(root)
    index: dict = {"layout": layout, "splits": {}}
    h = hashlib.sha256(layout.encode())
    if layout == "imagenet":
        for split, (classes, samples) in index_imagenet(root).items():
            index["splits"][split] = {"classes": classes, "samples": [[_relative(p, root), c] for p, c in samples]}
            files = [p for p, _ in samples]
            h.update(f"{split}:{len(classes)}:{','.join(classes)}".encode())
            _hash_files(h, files, root)
    elif layout in ("cityscapes", "ade20k"):
        index_split = index_cityscapes if layout == "cityscapes" else index_ade20k
        for split in splits:
            samples = index_split(root, split)
            index["splits"][split] = {"samples": [[_relative(s.image, root), _relative(s.label, root), s.label_kind] for s in samples]}
            h.update(f"{split}:".encode())
            _hash_files(h, [p for s in samples for p in (s.image, s.label)], root)
    else:
        raise ValueError(f"unknown layout {layout!r}; one of {', '.join(LAYOUTS)}")
    index["digest"] = h.hexdigest()[:16]
    return index


def _hash_files(h: Any, files: list[Path], root: Path) -> None:
    for path in files:
        h.update(f"{_relative(path, root)}\0{os.stat(path).st_size}\n".encode())


def class_samples(index: dict, root: Path | str, split: str) -> tuple[list[str], list[tuple[Path, int]]]:
    """Classes and ``(image, class)`` pairs of an ImageNet-layout split from its index."""
    entry = index["splits"][split]
    return list(entry["classes"]), [(Path(root) / rel, int(c)) for rel, c in entry["samples"]]


def seg_samples(index: dict, root: Path | str, split: str) -> list[SegSample]:
    """Image/label pairs of a segmentation split from its index."""
    return [SegSample(Path(root) / image, Path(root) / label, kind) for image, label, kind in index["splits"][split]["samples"]]
