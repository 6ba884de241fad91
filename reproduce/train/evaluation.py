"""Evaluation loops shared by pretrain/finetune (end of training) and ``evaluate``.

Each rank scores a disjoint shard of the split (no padding duplicates, unlike
``DistributedSampler``), and the sums are all-reduced, so the figures are those of the whole split.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from timm.utils import accuracy
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from reproduce.train.distributed import DistContext
from reproduce.train.loop import autocast, ignore_stop_signals, unwrap
from reproduce.train.seg_metrics import all_reduce_sum, confusion_matrix, scores


@dataclass(frozen=True)
class EvalOptions:
    """How to run an evaluation: images (classification) or sliding windows (segmentation) per
    forward pass on each rank, loader workers, and the autocast dtype (None: fp32).

    The whole split runs in one autocast region: autocast keeps the low-precision copy of each weight
    until its outermost region ends, so the weights (which do not change during an evaluation) are cast
    once per evaluation instead of once per forward pass (on a GPU, one copy kernel per conv and linear
    layer per pass saved)."""

    batch_size: int
    num_workers: int
    dtype: torch.dtype | None


@dataclass(frozen=True)
class SegTest:
    """Test-time inference of a segmentation recipe: "slide" (window ``crop``, ``stride``) or "whole"."""

    mode: str
    crop: int
    stride: int


def shard_loader(dataset: Dataset, ctx: DistContext, batch_size: int, num_workers: int) -> tqdm:
    """This rank's shard in batches, with a progress bar on rank 0 when it writes to a terminal."""
    indices = list(range(ctx.rank, len(dataset), ctx.world_size))
    loader = DataLoader(dataset, batch_size=batch_size, sampler=indices, num_workers=num_workers, pin_memory=ctx.device.type == "cuda", worker_init_fn=ignore_stop_signals)
    return tqdm(loader, desc="eval", disable=None if ctx.is_main else True, dynamic_ncols=True, leave=False)


@torch.no_grad()
def evaluate_classification(model: nn.Module, dataset: Dataset, ctx: DistContext, options: EvalOptions) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy over the whole split."""
    model.eval()
    net = unwrap(model)  # no DDP forward: shards may differ in batch count
    sums = torch.zeros(4, dtype=torch.float64)  # loss sum, top-1 hits, top-5 hits, images
    with autocast(ctx.device, options.dtype):  # one region for the split: each weight is cast once (see ``EvalOptions``)
        for images, targets in shard_loader(dataset, ctx, options.batch_size, options.num_workers):
            images, targets = images.to(ctx.device), targets.to(ctx.device)
            logits = net(images).float()
            num_classes = logits.shape[1]
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, num_classes)))
            n = images.shape[0]
            sums += torch.tensor([float(F.cross_entropy(logits, targets, reduction="sum")), float(top1) * n / 100, float(top5) * n / 100, n], dtype=torch.float64)
    sums = all_reduce_sum(sums.to(ctx.device)).cpu()
    n = sums[3].item()
    return {"loss": sums[0].item() / n, "top1": 100 * sums[1].item() / n, "top5": 100 * sums[2].item() / n, "eval_images": int(n)}


def slide_logits(model: nn.Module, image: torch.Tensor, num_classes: int, crop: int, stride: int, batch: int | None = None) -> torch.Tensor:
    """mmseg ``slide_inference``: crop windows with ``stride`` (the last one aligned to the border),
    each predicted at the crop size, logits averaged where windows overlap. ``image``: (1, 3, H, W).
    The windows go through the model ``batch`` at a time (all at once when None), so memory stays
    bounded on large images (the model is in eval mode: the chunking does not change the result)."""
    _, _, h, w = image.shape
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * stride + crop, h), min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    # images smaller than a window are padded at the bottom/right, as mmseg does
    windows = torch.cat([F.pad(image[:, :, y1:y2, x1:x2], (0, crop - (x2 - x1), 0, crop - (y2 - y1))) for y1, y2, x1, x2 in boxes])
    step = batch or len(windows)
    out = torch.cat([model.predict(windows[i : i + step]).float() for i in range(0, len(windows), step)])
    logits = image.new_zeros((1, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for k, (y1, y2, x1, x2) in enumerate(boxes):
        logits[:, :, y1:y2, x1:x2] += out[k : k + 1, :, : y2 - y1, : x2 - x1]
        count[:, :, y1:y2, x1:x2] += 1
    return logits / count


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, dataset: Dataset, ctx: DistContext, class_names: Sequence[str], test: SegTest, options: EvalOptions) -> dict:
    """mIoU / per-class IoU / pixel accuracy on the confusion matrix summed over the split and ranks.

    ``test.mode`` "slide" (Cityscapes) or "whole" (ADE20K); one image per step, logits resized to
    the label's original size before the argmax, as mmseg does."""
    num_classes = len(class_names)
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=ctx.device)
    net = unwrap(model)  # no DDP forward: shards may differ in batch count
    with autocast(ctx.device, options.dtype):  # one region for the split: each weight is cast once (see ``EvalOptions``)
        for image, label in shard_loader(dataset, ctx, 1, options.num_workers):
            image, label = image.to(ctx.device), label.to(ctx.device)
            logits = slide_logits(net, image, num_classes, test.crop, test.stride, options.batch_size) if test.mode == "slide" else net.predict(image).float()
            if logits.shape[-2:] != label.shape[-2:]:
                logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
            conf += confusion_matrix(logits.argmax(1), label, num_classes)
    conf = all_reduce_sum(conf)
    result = scores(conf.cpu(), class_names)
    result["eval_images"] = len(dataset)
    if math.isnan(result["miou"]):
        raise ValueError("no labelled pixels in the evaluation split: check the label files")
    return result
