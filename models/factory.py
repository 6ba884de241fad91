"""Model construction by name for every family in the suite, for both tasks.

Classification models are plain timm registrations (``timm.create_model(name)``). Segmentation
models are the timm backbone with ``features_only=True`` plus the shared SegFormer head.

A suite model is a timm registration whose ``pretrained_cfg`` carries the suite's two per-variant
fields (timm's place for per-variant metadata): ``seg_embed_dim`` (the SegFormer head width) and
``flop_family`` (whose counting rule reproduces its published FLOPs, see ``reproduce.flops``).
The factory reads them from timm; it knows no family. Which families exist is decided in one place,
the top-level registration point ``hrvit_repro``, which the factory imports on first use so that
``models.build_model("mit_b1")`` works wherever the suite is installed.

Your own model needs no registration: ``timm:<name>`` is any timm model (its last four
``features_only`` maps feed the head), and ``PKG.MODULE:FACTORY`` is a callable returning either a
features-only backbone (with timm-style ``feature_info``) or a complete segmentation model.
"""
from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any, Literal

import timm
from timm.models import FeatureInfo, PretrainedCfg, get_pretrained_cfg
from torch import nn

from models.segmentation import SegmentationModel

Task = Literal["cls", "seg"]

_REGISTRATION_POINT = "hrvit_repro"
EXTERNAL_SEG_EMBED_DIM = 256  # SegFormer head width of an external backbone (SegFormer-B0/B1's)


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


def is_external(name: str) -> bool:
    """``timm:<name>`` or ``PKG.MODULE:FACTORY``: a model from outside the suite."""
    return ":" in name


def _external_factory(name: str) -> Any:
    """The ``PKG.MODULE:FACTORY`` callable (imported, checked callable) with one-line errors."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model {name!r}: cannot import {module_name!r} ({err}); give PKG.MODULE:FACTORY of an "
                         "importable module (on PYTHONPATH)") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"model {name!r}: {module_name} has no callable {attr!r}; give PKG.MODULE:FACTORY")
    return factory


def check_model_name(name: str) -> None:
    """Raise a ValueError that lists the valid names when ``name`` is unknown."""
    if is_external(name):
        source, _, target = name.partition(":")
        if source == "timm" and not timm.is_model(target):
            raise ValueError(f"timm has no model {target!r}; list candidates with timm.list_models('*{target}*')")
        if source != "timm":
            _external_factory(name)
        return
    _register_suite()
    if _suite_value(name, "seg_embed_dim") is None:  # one lookup; the full list only for the message
        raise ValueError(f"unknown model {name!r}; available models: {', '.join(available_models())}, or timm:<name>, "
                         "or PKG.MODULE:FACTORY")


def segmentation_embed_dim(name: str) -> int:
    check_model_name(name)
    return EXTERNAL_SEG_EMBED_DIM if is_external(name) else _suite_value(name, "seg_embed_dim")


def flop_family(name: str) -> str | None:
    """The paper-convention family whose counting rule reproduces ``name``'s published FLOPs (None
    for an external model: its caller states the rule)."""
    check_model_name(name)
    return None if is_external(name) else _suite_value(name, "flop_family")


def _external_backbone(name: str, **model_kwargs: Any) -> nn.Module:
    source, _, target = name.partition(":")
    if source != "timm":
        model = _external_factory(name)(**model_kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"model {name!r} returned a {type(model).__name__}, not a torch nn.Module; PKG.MODULE:FACTORY "
                             "must return a features-only backbone or a complete segmentation model")
        return model
    try:
        return timm.create_model(target, features_only=True, out_indices=(-4, -3, -2, -1), **model_kwargs)
    except (RuntimeError, AssertionError, TypeError, ValueError) as err:
        raise ValueError(f"timm model {target!r} cannot be a segmentation backbone: features_only failed ({err})") from err


def _segmentation_model(backbone: nn.Module, embed_dim: int, num_classes: int | None) -> SegmentationModel:
    if isinstance(backbone.feature_info, list):  # timm's raw form: one dict per map
        backbone.feature_info = FeatureInfo(backbone.feature_info, tuple(range(len(backbone.feature_info))))
    return SegmentationModel(backbone, embed_dim, 19 if num_classes is None else num_classes)


def build_model(
    name: str,
    task: Task = "cls",
    num_classes: int | None = None,
    embed_dim: int | None = None,
    **model_kwargs: Any,
) -> nn.Module:
    """Build ``name`` for ``task``: ``cls`` -> timm classifier (1000 classes by default);
    ``seg`` -> backbone + SegFormer head (19 classes by default, head width per family).

    A ``PKG.MODULE:FACTORY`` that returns a complete model (no ``feature_info``) is returned as built."""
    check_model_name(name)
    if task not in ("cls", "seg"):
        raise ValueError(f"unknown task {task!r}; use 'cls' or 'seg'")
    embed_dim = embed_dim or segmentation_embed_dim(name)
    if is_external(name):
        if task == "cls" and name.startswith("timm:"):
            return timm.create_model(name[len("timm:"):], num_classes=1000 if num_classes is None else num_classes,
                                     **model_kwargs)
        model = _external_backbone(name, **model_kwargs)
        if not hasattr(model, "feature_info"):
            return model
        if task == "cls":
            raise ValueError(f"{name} returns a features-only backbone; measure or train it with task 'seg'")
        return _segmentation_model(model, embed_dim, num_classes)
    if task == "cls":
        return timm.create_model(name, num_classes=1000 if num_classes is None else num_classes, **model_kwargs)
    return _segmentation_model(timm.create_model(name, features_only=True, **model_kwargs), embed_dim, num_classes)
