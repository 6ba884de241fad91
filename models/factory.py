"""Model construction by name for every family in the suite, for both tasks.

Classification models are plain timm registrations (``timm.create_model(name)``). Segmentation
models are the timm backbone with ``features_only=True`` plus the shared SegFormer head.

A suite model is a timm registration whose ``pretrained_cfg`` carries the suite's two per-variant
fields (timm's place for per-variant metadata): ``seg_embed_dim`` (the SegFormer head width) and
``flop_family`` (whose counting rule reproduces its published FLOPs, see ``reproduce.flops``).
The factory reads them from timm; it knows no family. Which families exist is decided in one place,
the top-level registration point ``hrvit_repro``, which the factory imports on first use so that
``models.build_model("mit_b1")`` works wherever the suite is installed.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Literal

import timm
from timm.models import PretrainedCfg, get_pretrained_cfg
from torch import nn

from models.segmentation import SegmentationModel

Task = Literal["cls", "seg"]

_REGISTRATION_POINT = "hrvit_repro"


@dataclass
class SuiteCfg(PretrainedCfg):
    """timm's pretrained cfg plus the suite's per-variant fields (``generate_default_cfgs`` keeps
    the subclass, and ``model.pretrained_cfg`` then carries both fields)."""

    seg_embed_dim: int | None = None  # SegFormer head width E of the variant's segmentation model
    flop_family: str | None = None  # reproduce.flops.PAPER_RULES key of its published FLOPs


@functools.cache
def _register_suite() -> None:
    importlib.import_module(_REGISTRATION_POINT)


def _suite_value(name: str, key: str) -> Any:
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    return None if cfg is None else getattr(cfg, key, None)


def available_models() -> list[str]:
    """Every model name the suite builds (for both --task cls and --task seg)."""
    _register_suite()
    return sorted(n for n in timm.list_models() if _suite_value(n, "seg_embed_dim") is not None)


def check_model_name(name: str) -> None:
    """Raise a ValueError that lists the valid names when ``name`` is unknown."""
    names = available_models()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(names)}")


def segmentation_embed_dim(name: str) -> int:
    check_model_name(name)
    return _suite_value(name, "seg_embed_dim")


def flop_family(name: str) -> str:
    """The paper-convention family whose counting rule reproduces ``name``'s published FLOPs."""
    check_model_name(name)
    return _suite_value(name, "flop_family")


def build_model(
    name: str,
    task: Task = "cls",
    num_classes: int | None = None,
    embed_dim: int | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build ``name`` for ``task``: ``cls`` -> timm classifier (1000 classes by default);
    ``seg`` -> backbone + SegFormer head (19 classes by default, head width per family)."""
    check_model_name(name)
    if task == "cls":
        return timm.create_model(name, num_classes=1000 if num_classes is None else num_classes, **model_kwargs)
    if task == "seg":
        backbone = timm.create_model(name, features_only=True, **model_kwargs)
        return SegmentationModel(backbone, embed_dim or segmentation_embed_dim(name), 19 if num_classes is None else num_classes)
    raise ValueError(f"unknown task {task!r}; use 'cls' or 'seg'")
