"""Reproduction status of a training run, from the recipe it actually ran (its metrics.json).

A run is a *reproduction* only when every key that changes results equals the paper recipe, the data
is the real dataset, and (fine-tuning) the backbone starts from published weights or from a suite
pretrain run that is itself a reproduction. Anything else is ``partial`` (the paper profile with
deviations), or the profile it ran (``smoke``, ``proxy``); the deviations are listed for footnotes.
What each status means for a reader: docs/statuses.md.

The paper recipe is what the training tasks themselves resolve for the paper profile on the real
dataset, and the keys compared are the recipe fields marked ``result`` (``reproduce.recipes``), so
there is one source for both.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from reproduce.params import METRICS_NAME, REAL_DATASET, SUITE_FORMAT
from reproduce.recipes import result_keys

PUBLISHED = "published weights"  # the tables' label of a cell whose backbone started from published weights
PROFILE_STATUSES = ("smoke", "proxy")  # profiles that are never a reproduction, labelled by their own name
REPRODUCTION, PARTIAL = "reproduction", "partial"


@dataclass(frozen=True)
class RunStatus:
    status: str  # reproduction | partial | smoke | proxy
    deviations: tuple[str, ...] = ()  # "iters 1000 (paper 160000)", ...


@lru_cache(maxsize=None)
def paper_recipe(kind: str, model: str) -> dict[str, Any]:
    """The recipe ``pretrain``/``finetune --profile paper`` resolves for ``model`` on the real dataset of
    run kind ``kind`` (pretrain, cityscapes or ade20k)."""
    from reproduce.train.tasks import task_for_kind  # torch and the models: only when a run is on real data

    return dataclasses.asdict(task_for_kind(kind).recipe("paper", REAL_DATASET[kind], model))


def init_of(metrics: dict[str, Any]) -> dict[str, Any]:
    """The fine-tuning init as ``{"format", "file", ...}``, from either shape metrics.json has had:
    ``init: {"format", "file", "sha256"}``, or ``init: "pretrained" | "random"`` beside ``pretrained: {path}``."""
    init = metrics.get("init")
    if isinstance(init, dict):
        return init
    if init == "pretrained" or (init is None and metrics.get("pretrained")):
        return {"format": SUITE_FORMAT, "file": (metrics.get("pretrained") or {}).get("path")}
    return {"format": "random", "file": None}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-9 * max(1.0, abs(b))
    return (list(a) if isinstance(a, tuple) else a) == (list(b) if isinstance(b, tuple) else b)


def recipe_deviations(kind: str, recipe: dict[str, Any], paper: dict[str, Any]) -> list[str]:
    """``"key ours (paper value)"`` for every result-changing key that differs from the paper recipe."""
    out = []
    for key in result_keys(kind):
        if key not in paper:  # a key this version of the training commands does not have
            continue
        if key not in recipe:
            out.append(f"{key} not recorded (paper {paper.get(key)})")
        elif not _same(recipe[key], paper.get(key)):
            out.append(f"{key} {recipe[key]} (paper {paper.get(key)})")
    return out


def init_deviations(metrics: dict[str, Any]) -> list[str]:
    """Why a fine-tuning init is not reproduction-grade (empty when it is)."""
    init = init_of(metrics)
    if init["format"] == "random":
        return ["init random (paper: ImageNet-pretrained backbone)"]
    if init["format"] != SUITE_FORMAT:
        return []  # published weights
    source = Path(init.get("file") or "").parent / METRICS_NAME
    if not source.is_file():
        return [f"init {init.get('file')}: its pretrain metrics.json is missing"]
    upstream = run_status("pretrain", json.loads(source.read_text()))
    return [] if upstream.status == REPRODUCTION else [f"init from a {upstream.status} pretrain ({init.get('file')})"]


def run_status(kind: str, metrics: dict[str, Any]) -> RunStatus:
    """Status of one run (kind: pretrain, cityscapes or ade20k) from its metrics.json."""
    deviations = []
    if metrics.get("dataset") != REAL_DATASET[kind]:
        deviations.append(f"dataset {metrics.get('dataset')} (paper {REAL_DATASET[kind]})")
    else:
        deviations += recipe_deviations(kind, metrics.get("recipe") or {}, paper_recipe(kind, metrics["model"]))
    if kind != "pretrain":
        deviations += init_deviations(metrics)
    if not deviations:
        return RunStatus(REPRODUCTION)
    profile = metrics.get("profile")
    return RunStatus(profile if profile in PROFILE_STATUSES else PARTIAL, tuple(deviations))
