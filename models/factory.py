"""Model construction by name for every family in the suite, for both tasks.

Classification models are plain timm registrations (``timm.create_model(name)``). Segmentation
models are the timm backbone with ``features_only=True`` plus the shared SegFormer head, whose
embedding width each family declares here with ``register_segmentation_backbone``.
"""
from __future__ import annotations

import importlib
from typing import Any, Literal

import timm
from torch import nn

from models.segmentation import SegmentationModel

Task = Literal["cls", "seg"]

_SEG_EMBED_DIM: dict[str, int] = {}
_FLOP_FAMILY: dict[str, str] = {}
_FAMILY_MODULES = ("models.hrvit", "baselines")  # importing these registers every model name


def register_segmentation_backbone(name: str, embed_dim: int, flop_family: str) -> None:
    """Declare that ``name`` (a timm-registered model) gets a SegFormer head of width ``embed_dim``,
    and that its published FLOPs follow the counting rule of ``flop_family`` (see reproduce.flops)."""
    _SEG_EMBED_DIM[name] = embed_dim
    _FLOP_FAMILY[name] = flop_family


def refuse_pretrained(variant: str, pretrained: bool) -> None:
    """No checkpoint of any model in the suite can be downloaded (the official HRViT repo publishes
    none, and this suite runs offline): fail clearly instead of silently returning random weights."""
    if pretrained:
        raise ValueError(
            f"{variant}: no pretrained weights are available (none are published or reachable offline); "
            "use pretrained=False and load a checkpoint of your own with `finetune --pretrained PATH`"
        )


def _load_families() -> None:
    for module in _FAMILY_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:  # a family not present in this checkout
            if err.name != module:
                raise


def available_models() -> list[str]:
    """Every model name the suite builds (for both --task cls and --task seg)."""
    _load_families()
    return sorted(_SEG_EMBED_DIM)


def check_model_name(name: str) -> None:
    """Raise a ValueError that lists the valid names when ``name`` is unknown."""
    names = available_models()
    if name not in names:
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(names)}")


def segmentation_embed_dim(name: str) -> int:
    check_model_name(name)
    return _SEG_EMBED_DIM[name]


def flop_family(name: str) -> str:
    """The paper-convention family whose counting rule reproduces ``name``'s published FLOPs."""
    check_model_name(name)
    return _FLOP_FAMILY[name]


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
        return SegmentationModel(backbone, embed_dim or _SEG_EMBED_DIM[name], 19 if num_classes is None else num_classes)
    raise ValueError(f"unknown task {task!r}; use 'cls' or 'seg'")
