"""Segmentation scores from a confusion matrix accumulated over a whole split (mmseg's
``IoUMetric``/``total_intersect_and_union`` semantics), not averaged per image.

A class that appears in neither the predictions nor the ground truth has an empty union; its IoU is
undefined (NaN) and it is left out of the mean, as mmseg does (``np.nanmean``). ``smp.metrics``
would score it 1, which inflates mIoU.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from reproduce.data.seg_transforms import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction; ``ignore_index`` pixels dropped."""
    valid = target != ignore_index
    if valid.any() and int(target[valid].max()) >= num_classes:
        raise ValueError(f"label {int(target[valid].max())} >= num_classes {num_classes} (and not the ignore index {ignore_index})")
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over DDP ranks (a no-op in a single process)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def scores(confusion: torch.Tensor, class_names: list[str] | tuple[str, ...] | None = None) -> dict:
    """mIoU, per-class IoU (None where undefined), pixel accuracy and mean class accuracy."""
    conf = confusion.double()
    intersect = conf.diag()
    gt = conf.sum(1)
    union = gt + conf.sum(0) - intersect
    iou = intersect / union  # NaN where union == 0
    acc = intersect / gt
    names = list(class_names) if class_names is not None else [str(i) for i in range(len(iou))]

    def clean(values: torch.Tensor) -> dict[str, float | None]:
        return {n: (None if math.isnan(v) else float(v)) for n, v in zip(names, values.tolist())}

    return {
        "miou": float(torch.nanmean(iou)) if (union > 0).any() else float("nan"),
        "per_class_iou": clean(iou),
        "pixel_accuracy": float(intersect.sum() / conf.sum()) if conf.sum() > 0 else float("nan"),
        "mean_accuracy": float(torch.nanmean(acc)) if (gt > 0).any() else float("nan"),
        "classes_scored": int((union > 0).sum()),
    }
