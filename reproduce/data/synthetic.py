"""Seeded generated stand-ins for ImageNet and Cityscapes, written to disk in the real layouts so
that the real loaders (``reproduce.data.layouts``) read them.

* classification: 10 shape classes (disc, square, ... checker; the first ``count`` of them when
  fewer images are asked for) on noisy backgrounds with thin clutter, as ``train/<class>/*.JPEG``
  and ``val/<class>/*.JPEG``;
* segmentation: street-like scenes (sky, buildings, road) with thin structures (1-2 px poles and
  wires) and small objects (3-7 px signs and lights; signs and lights share a colour, so only
  their shape tells them apart), as Cityscapes ``leftImg8bit``/``gtFine *_labelTrainIds.png``
  with 7 classes (train ids 0..6), 255 on an ignored strip at the bottom (the "ego vehicle").
  Images are ``size`` x ``2 * size`` (Cityscapes' 1:2 aspect).

The files depend only on (kind, seed, count, size), are generated once into a cache folder
(atomically: a temporary folder renamed into place), and reused when complete.
"""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLS_CLASSES = ("disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "dstripes", "dots", "checker")
SEG_CLASSES = ("sky", "building", "road", "pole", "wire", "sign", "light")
SEG_IGNORE_ROWS = 2
_COMPLETE = "COMPLETE"
_SPLITS = ("train", "val")


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, _SPLITS.index(split), index])


def _color(rng: np.random.Generator, base: tuple[int, int, int] | None = None, jitter: int = 25) -> tuple[int, int, int]:
    if base is None:
        return tuple(int(c) for c in rng.integers(0, 256, 3))
    return tuple(int(np.clip(c + rng.integers(-jitter, jitter + 1), 0, 255)) for c in base)


def _noisy(image: Image.Image, rng: np.random.Generator, sigma: float) -> Image.Image:
    arr = np.asarray(image).astype(np.float32) + rng.normal(0, sigma, (image.height, image.width, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def draw_classification_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One ``size`` x ``size`` image of shape class ``label`` (see ``CLS_CLASSES``)."""
    image = Image.new("RGB", (size, size), _color(rng))
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # thin clutter, so the class is not readable from colour statistics alone
        draw.line([tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)], fill=_color(rng), width=1)
    extent = int(size * rng.uniform(0.35, 0.7))
    x0, y0 = (int(v) for v in rng.integers(0, size - extent + 1, 2))
    x1, y1 = x0 + extent, y0 + extent
    fg = _color(rng)
    name = CLS_CLASSES[label]
    step = max(3, extent // 5)
    if name == "disc":
        draw.ellipse([x0, y0, x1, y1], fill=fg)
    elif name == "square":
        draw.rectangle([x0, y0, x1, y1], fill=fg)
    elif name == "triangle":
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fg)
    elif name == "ring":
        draw.ellipse([x0, y0, x1, y1], outline=fg, width=max(2, extent // 8))
    elif name == "cross":
        w = max(2, extent // 6)
        cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle([cx - w, y0, cx + w, y1], fill=fg)
        draw.rectangle([x0, cy - w, x1, cy + w], fill=fg)
    elif name == "hstripes":
        for y in range(y0, y1, step):
            draw.line([(x0, y), (x1, y)], fill=fg, width=max(1, step // 2))
    elif name == "vstripes":
        for x in range(x0, x1, step):
            draw.line([(x, y0), (x, y1)], fill=fg, width=max(1, step // 2))
    elif name == "dstripes":
        for d in range(-extent, extent, step):
            draw.line([(x0 + d, y0), (x0 + d + extent, y1)], fill=fg, width=max(1, step // 2))
    elif name == "dots":
        r = max(1, step // 3)
        for y in range(y0, y1, step):
            for x in range(x0, x1, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    elif name == "checker":
        for i, y in enumerate(range(y0, y1, step)):
            for j, x in enumerate(range(x0, x1, step)):
                if (i + j) % 2 == 0:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=fg)
    return _noisy(image, rng, 8.0)


def draw_segmentation_scene(size: int, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """One ``size`` x ``2 * size`` street-like scene and its train-id label map (see ``SEG_CLASSES``)."""
    h, w = size, 2 * size
    ids = {name: i for i, name in enumerate(SEG_CLASSES)}
    image, label = Image.new("RGB", (w, h)), Image.new("L", (w, h), 0)
    di, dl = ImageDraw.Draw(image), ImageDraw.Draw(label)

    def paint(kind: str, shape: str, xy, color, width: int = 1) -> None:
        if shape == "line":
            di.line(xy, fill=color, width=width)
            dl.line(xy, fill=ids[kind], width=width)
        else:
            getattr(di, shape)(xy, fill=color)
            getattr(dl, shape)(xy, fill=ids[kind])

    horizon = int(h * rng.uniform(0.55, 0.7))
    paint("sky", "rectangle", [0, 0, w, horizon], _color(rng, (120, 170, 230)))
    paint("road", "rectangle", [0, horizon, w, h], _color(rng, (90, 90, 95)))
    for _ in range(int(rng.integers(2, 5))):
        bw, bh = int(rng.integers(w // 10, w // 4)), int(rng.integers(h // 5, horizon))
        x = int(rng.integers(0, w - bw))
        paint("building", "rectangle", [x, horizon - bh, x + bw, horizon], _color(rng, (150, 110, 90), 40))
    pole_color = _color(rng, (40, 40, 40), 10)
    tops = []
    for _ in range(int(rng.integers(2, 5))):
        x, top = int(rng.integers(2, w - 2)), int(rng.integers(2, horizon // 2))
        paint("pole", "line", [(x, top), (x, int(rng.integers(horizon, h - SEG_IGNORE_ROWS)))], pole_color, int(rng.integers(1, 3)))
        tops.append((x, top))
    for (xa, ya), (xb, yb) in zip(tops, tops[1:]):
        paint("wire", "line", [(xa, ya), (xb, yb + int(rng.integers(-2, 3)))], pole_color, 1)
    small_color = _color(rng, (230, 200, 40), 15)  # signs and lights share it: only shape differs
    for _ in range(int(rng.integers(2, 6))):
        x, y, r = int(rng.integers(4, w - 4)), int(rng.integers(4, h - 6)), int(rng.integers(2, 4))
        paint("sign", "ellipse", [x - r, y - r, x + r, y + r], small_color)
    for _ in range(int(rng.integers(2, 6))):
        x, y, s = int(rng.integers(2, w - 6)), int(rng.integers(2, h - 8)), int(rng.integers(3, 5))
        paint("light", "rectangle", [x, y, x + s - 1, y + s - 1], small_color)
    di.rectangle([0, h - SEG_IGNORE_ROWS, w, h], fill=(0, 0, 0))
    dl.rectangle([0, h - SEG_IGNORE_ROWS, w, h], fill=255)
    return _noisy(image, rng, 6.0), label


def _write_classification(root: Path, seed: int, count: int, size: int) -> None:
    """``count`` images per split, round-robin over the first min(count, 10) classes (no empty class folders)."""
    num_classes = min(count, len(CLS_CLASSES))
    for split in _SPLITS:
        for name_index, name in enumerate(CLS_CLASSES[:num_classes]):
            (root / split / f"{name_index:02d}_{name}").mkdir(parents=True)
        for i in range(count):
            label = i % num_classes
            image = draw_classification_image(label, size, _rng(seed, split, i))
            image.save(root / split / f"{label:02d}_{CLS_CLASSES[label]}" / f"{split}_{i:06d}.JPEG", quality=95)


def _write_segmentation(root: Path, seed: int, count: int, size: int) -> None:
    for split in _SPLITS:
        for i in range(count):
            city = f"synth{i % 2}"
            stem = f"{city}_{i:06d}_000019"
            image, label = draw_segmentation_scene(size, _rng(seed, split, i))
            for folder in ("leftImg8bit", "gtFine"):
                (root / folder / split / city).mkdir(parents=True, exist_ok=True)
            image.save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            label.save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")


_WRITERS = {"cls": _write_classification, "seg": _write_segmentation}


def synthetic_dir(cache_root: Path | str, kind: str, seed: int, count: int, size: int) -> Path:
    return Path(cache_root) / f"{kind}-seed{seed}-n{count}-{size}px"


def ensure_synthetic(cache_root: Path | str, kind: str, seed: int, count: int, size: int) -> Path:
    """The folder of generated ``kind`` data ("cls" or "seg"), generating it if not yet complete.

    ``count`` images per split (train and val), ``size`` pixels (cls: square side; seg: height).
    Concurrent callers are safe: each writes its own temporary folder and one rename wins.
    """
    if kind not in _WRITERS:
        raise ValueError(f"unknown synthetic kind {kind!r}; use 'cls' or 'seg'")
    target = synthetic_dir(cache_root, kind, seed, count, size)
    if (target / _COMPLETE).is_file():
        return target
    if target.exists():
        raise FileExistsError(f"{target} exists but is not a complete generated dataset (no {_COMPLETE} marker); delete it")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        _WRITERS[kind](tmp, seed, count, size)
        (tmp / _COMPLETE).write_text(f"kind={kind} seed={seed} count={count} size={size}\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _COMPLETE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
