"""Data-loader throughput: how many training images per second the input pipeline delivers
(decode + the paper's training augmentation + collation), without any model, to tell whether
the loader or the GPU bounds a run and how many ``--num-workers`` it needs.

``root=None`` measures generated data in the real layout (ImageNet: 256 px images through the
224 px pretraining pipeline; Cityscapes: 512x1024 scenes through the fine-tuning pipeline at
512 px crops); a real root measures the paper pipeline on the real files.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from torch.utils.data import DataLoader, Dataset

from reproduce.data import layouts, synthetic
from reproduce.data.datasets import SEG_DATASETS, SeededSamples
from reproduce.data.pipelines import classification_set, segmentation_set
from reproduce.recipes import profile_recipe, resolve

DATASETS = ("imagenet", "cityscapes")
_GENERATED = {"imagenet": ("cls", 256), "cityscapes": ("seg", 512)}  # kind, pixels of generated data
_GENERATED_IMAGES = 64  # at most, per split; the benchmark cycles through them


def _training_dataset(dataset: str, root: Path, generated: bool) -> Dataset:
    """The training split of ``root`` with the paper profile's training pipeline (generated scenes are
    cropped at their own height, real Cityscapes at the paper's crop)."""
    if dataset == "imagenet":
        index = layouts.build_index("imagenet", root, ("train", "val"))
        return classification_set(layouts.class_samples(index, root, "train")[1], profile_recipe("pretrain", "paper"), augment=True)
    name = "synthetic" if generated else "cityscapes"
    crop = _GENERATED[dataset][1] if generated else SEG_DATASETS[name].paper_crop
    recipe = resolve(profile_recipe("finetune", "paper"), {"crop_size": crop})
    folder = "train"
    index = layouts.build_index("cityscapes", root, (folder,))
    return segmentation_set(name, layouts.seg_samples(index, root, folder), recipe, augment=True)


def _time_loader(data: Dataset, workers: int, batches: int, batch_size: int) -> tuple[int, float]:
    """Images delivered and seconds for ``batches`` batches after one warm-up batch (worker start-up)."""
    keys = [(epoch, i) for epoch in range(batches + 1) for i in range(len(data))][: (batches + 1) * batch_size]
    loader = DataLoader(SeededSamples(data, 0), batch_size=batch_size, sampler=keys, num_workers=workers, drop_last=True)
    it = iter(loader)
    next(it)
    start, images = time.perf_counter(), 0
    for batch in it:
        images += len(batch[0])
    return images, time.perf_counter() - start


def loader_benchmark(dataset: str, root: Path | None, workers: int, batches: int = 20, batch_size: int = 32) -> dict:
    """Training images per second of ``dataset``'s loader (``imagenet`` or ``cityscapes`` layout)
    with ``workers`` worker processes; keys: dataset, root, workers, batch_size, images, seconds,
    images_per_s."""
    if dataset not in DATASETS:
        raise ValueError(f"loader benchmark dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if workers < 0 or batches < 1 or batch_size < 1:
        raise ValueError(f"workers must be >= 0 and batches, batch size >= 1; got {workers}, {batches}, {batch_size}")
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        if root is None:
            kind, pixels = _GENERATED[dataset]
            count = max(batch_size, min(_GENERATED_IMAGES, (batches + 1) * batch_size))
            data_root = synthetic.ensure_synthetic(Path(tmp), kind, 0, count, pixels)
        else:
            data_root = Path(root)
        images, seconds = _time_loader(_training_dataset(dataset, data_root, root is None), workers, batches, batch_size)
    return {
        "dataset": dataset, "root": None if root is None else str(root), "workers": workers, "batch_size": batch_size,
        "images": images, "seconds": seconds, "images_per_s": images / seconds if seconds > 0 else 0.0,
    }
