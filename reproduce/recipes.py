"""Training recipes: one typed dataclass per kind, the single source of truth.

The dataclass defaults are the paper recipe; ``SMOKE`` and ``PROXY`` hold the few values the smoke
and proxy profiles change. The same fields give the command-line flags (``batch_size`` -> ``--batch-size``), the
checks every value must pass, and the validation of a recipe written elsewhere (params.yaml) with
:func:`validate_recipe`, which names an unknown or ill-typed key together with what is accepted.
Fields marked ``execution`` change how a run executes, not its numbers: they may differ when a run
resumes. Fields marked ``result`` are the ones a reader compares with the paper: a run is a
reproduction only when all of them equal the paper recipe (``reproduce.tables.status``). Neither
mark: seed, precision, SyncBN, determinism and the size of generated data, which change a run's
numbers without making it another recipe.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args, get_origin

from reproduce.errors import SettingsError

PROFILES = ("smoke", "paper", "proxy")
AMP_MODES = ("bf16", "fp16", "none")
LR_SCALES = ("none", "linear")


def _f(default: Any, help: str, *, check: str | None = None, execution: bool = False, result: bool = False,
       flags: tuple[str, ...] = ()) -> Any:
    """A recipe field: its help text, its range check ("positive", "nonneg", "fraction"), whether it is
    an execution setting, and whether it is a ``result`` key. ``flags`` are extra command-line aliases."""
    return field(default=default, metadata={"help": help, "check": check, "execution": execution, "result": result, "flags": flags})


@dataclass(frozen=True)
class CommonRecipe:
    """Settings every training kind has; a ``None`` default is filled per dataset or model."""

    batch_size: int | None = _f(None, "global batch size (all ranks and accumulation steps together)", check="positive", result=True)
    accum_steps: int = _f(1, "gradient accumulation steps (per-rank micro-batch = batch / (world x accum)); BatchNorm then sees the micro-batch", check="positive", execution=True)
    lr: float = _f(1e-3, "base learning rate at the paper's global batch", check="positive", result=True)
    lr_scale: Literal["none", "linear"] = _f("none", "none: --lr as given; linear: --lr x batch / the paper's batch (the linear scaling rule)", result=True)
    weight_decay: float = _f(0.05, "AdamW weight decay", check="nonneg", result=True)
    drop_path: float | None = _f(None, "backbone stochastic-depth rate", check="fraction", result=True)
    seed: int = _f(0, "seed of initialisation, sample order and augmentation")
    amp: Literal["bf16", "fp16", "none"] = _f("fp16", "mixed precision: bf16 (CUDA and CPU), fp16 (CUDA only, with a GradScaler) or none; --amp alone = fp16")
    sync_bn: bool = _f(True, "SyncBatchNorm across GPUs (torch's SyncBN is GPU-only)")
    deterministic: bool = _f(False, "deterministic kernels (CPU runs then repeat bit for bit)")
    num_workers: int = _f(4, "data-loader worker processes per rank (persistent)", check="nonneg", execution=True)
    synthetic_size: int | None = _f(None, "generated data: images per split", check="positive")
    checkpoint_every: int = _f(1000, "save checkpoint.pt every N optimizer steps (0: only at the end and on a signal)", check="nonneg", execution=True)
    log_every: int = _f(50, "one log line every N optimizer steps", check="positive", execution=True)
    eval_batch_size: int = _f(128, "evaluation batch (classification: global images; segmentation: sliding windows per forward)", check="positive", execution=True)
    threads: int | None = _f(None, "intra-op CPU threads per process (default: torch's; smoke 1: faster for tiny models on shared cores)", check="nonneg", execution=True)


@dataclass(frozen=True)
class PretrainRecipe(CommonRecipe):
    """ImageNet pretraining, the official HRViT/DeiT recipe (batch is global: 32/GPU x 32 GPUs)."""

    batch_size: int | None = _f(1024, "global batch size (all ranks and accumulation steps together)", check="positive", result=True)
    image_size: int = _f(224, "training/eval crop size in pixels (multiple of 32)", check="positive", result=True)
    epochs: int = _f(300, "epochs before cool-down", check="positive", result=True)
    warmup_epochs: int = _f(20, "linear warm-up epochs", check="nonneg", result=True)
    cooldown_epochs: int = _f(10, "epochs at the minimum learning rate after the cosine", check="nonneg", result=True)
    warmup_lr: float = _f(1e-6, "learning rate at the start of warm-up", check="nonneg", result=True)
    min_lr: float = _f(1e-5, "cosine floor", check="nonneg", result=True)
    clip_grad: float | None = _f(1.0, "gradient-norm clipping (None: off)", check="positive", result=True)
    drop_path: float | None = _f(0.1, "backbone stochastic-depth rate", check="fraction", result=True)
    head_drop: float = _f(0.1, "dropout before the classifier", check="fraction", result=True)
    mixup: float = _f(0.8, "Mixup alpha (0: off)", check="nonneg", result=True)
    cutmix: float = _f(1.0, "CutMix alpha (0: off)", check="nonneg", result=True)
    smoothing: float = _f(0.1, "label smoothing", check="fraction", result=True)
    auto_augment: str = _f("rand-m9-mstd0.5-inc1", "timm RandAugment policy", result=True)
    reprob: float = _f(0.25, "random-erasing probability", check="fraction", result=True)
    color_jitter: float = _f(0.4, "colour jitter", check="nonneg", result=True)
    train_interpolation: str = _f("random", "training resize interpolation", result=True)
    eval_crop_pct: float = _f(0.9, "evaluation centre-crop fraction", check="positive", result=True)
    eval_interpolation: str = _f("bicubic", "evaluation resize interpolation", result=True)
    eval_every: int = _f(1, "evaluate every N epochs and keep best.pt by top-1 (0: only at the end)", check="nonneg", execution=True)
    seed: int = _f(42, "seed of initialisation, sample order and augmentation")
    num_workers: int = _f(8, "data-loader worker processes per rank (persistent)", check="nonneg", execution=True)
    synthetic_size: int | None = _f(1000, "generated data: images per split", check="positive")
    log_every: int = _f(100, "one log line every N optimizer steps", check="positive", execution=True)


@dataclass(frozen=True)
class FinetuneRecipe(CommonRecipe):
    """Segmentation fine-tuning, the official SegFormer/HRViT mmseg recipe; crop, batch and test mode
    come from the dataset, drop-path from the model, when left at None."""

    crop_size: int | None = _f(None, "training crop (Cityscapes 1024, ADE20K 512; generated scenes are crop x 2*crop)", check="positive", result=True)
    iters: int = _f(160000, "training iterations", check="positive", flags=("--steps",), result=True)
    warmup_iters: int = _f(1500, "linear warm-up iterations", check="nonneg", result=True)
    warmup_ratio: float = _f(1e-6, "warm-up starts at lr x this", check="nonneg", result=True)
    lr: float = _f(6e-5, "base learning rate at the paper's global batch", check="positive", result=True)
    head_lr_mult: float = _f(10.0, "decode-head learning-rate multiplier", check="positive", result=True)
    weight_decay: float = _f(0.01, "AdamW weight decay (none on LayerNorm)", check="nonneg", result=True)
    poly_power: float = _f(1.0, "poly schedule power", check="positive", result=True)
    min_lr: float = _f(0.0, "poly floor", check="nonneg", result=True)
    ratio_range: tuple[float, float] = _f((0.5, 2.0), "random resize ratio range", check="positive", result=True)
    cat_max_ratio: float = _f(0.75, "largest share of one class in a crop", check="fraction", result=True)
    flip_prob: float = _f(0.5, "horizontal flip probability", check="fraction", result=True)
    photometric: bool = _f(True, "photometric distortion", result=True)
    test_mode: Literal["slide", "whole"] | None = _f(None, "test-time inference: slide (Cityscapes) or whole (ADE20K)", result=True)
    test_crop: int | None = _f(None, "sliding-window size (default: the crop size)", check="positive", result=True)
    test_stride: int | None = _f(None, "sliding-window stride (default: 3/4 of the window, Cityscapes' 768 for 1024)", check="positive", result=True)
    eval_every: int = _f(16000, "evaluate every N iterations and keep best.pt by mIoU (0: only at the end)", check="nonneg", execution=True)
    eval_batch_size: int = _f(4, "evaluation batch (classification: global images; segmentation: sliding windows per forward)", check="positive", execution=True)
    synthetic_size: int | None = _f(200, "generated data: images per split", check="positive")
    checkpoint_every: int = _f(4000, "save checkpoint.pt every N optimizer steps (0: only at the end and on a signal)", check="nonneg", execution=True)


RECIPES: dict[str, type[CommonRecipe]] = {"pretrain": PretrainRecipe, "finetune": FinetuneRecipe}
# params.yaml names fine-tuning recipes by dataset.
KIND_ALIASES = {"cityscapes": "finetune", "ade20k": "finetune"}
# What the smoke profile changes: seconds on a CPU, two optimizer steps each.
_SMOKE_RUN = {"amp": "none", "sync_bn": False, "deterministic": True, "num_workers": 0, "checkpoint_every": 1, "log_every": 1, "eval_every": 0, "threads": 1}
SMOKE: dict[str, dict[str, Any]] = {
    "pretrain": {**_SMOKE_RUN, "image_size": 64, "epochs": 1, "warmup_epochs": 0, "cooldown_epochs": 0, "batch_size": 8,
                 "eval_batch_size": 16, "seed": 0, "synthetic_size": 16},
    "finetune": {**_SMOKE_RUN, "crop_size": 64, "iters": 2, "warmup_iters": 0, "batch_size": 2, "synthetic_size": 4},
}
# What the proxy profile changes: generated data, long enough to learn on a CPU (docs/statuses.md#proxy).
# Mixup/CutMix are off (they stall learning on a few hundred images); lr 5e-4 (1e-3 diverged at 32 px);
# fine-tuning lr 10x the paper's for 80 iterations instead of 160k.
_PROXY_RUN = {**_SMOKE_RUN, "checkpoint_every": 20, "log_every": 20}
PROXY: dict[str, dict[str, Any]] = {
    "pretrain": {**_PROXY_RUN, "image_size": 32, "epochs": 4, "warmup_epochs": 1, "cooldown_epochs": 0, "batch_size": 30,
                 "lr": 5e-4, "mixup": 0.0, "cutmix": 0.0, "seed": 0, "synthetic_size": 300},
    "finetune": {**_PROXY_RUN, "crop_size": 64, "iters": 80, "warmup_iters": 5, "batch_size": 4, "lr": 6e-4, "synthetic_size": 32},
}
_OVERLAYS = {"smoke": SMOKE, "proxy": PROXY}


def recipe_class(kind: str) -> type[CommonRecipe]:
    kind = KIND_ALIASES.get(kind, kind)
    if kind not in RECIPES:
        raise SettingsError(f"unknown recipe kind {kind!r}; accepted: {', '.join([*RECIPES, *KIND_ALIASES])}")
    return RECIPES[kind]


def profile_recipe(kind: str, profile: str) -> CommonRecipe:
    """The recipe of ``profile`` (paper = the dataclass defaults)."""
    if profile not in PROFILES:
        raise SettingsError(f"unknown profile {profile!r}; accepted: {', '.join(PROFILES)}")
    cls = recipe_class(kind)
    overlay = _OVERLAYS.get(profile)
    return cls(**overlay[KIND_ALIASES.get(kind, kind)]) if overlay else cls()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _hint(cls: type, name: str) -> tuple[type, tuple, bool]:
    """(base type, allowed literal values or (), optional) of a field's annotation."""
    hint = typing.get_type_hints(cls)[name]
    args = get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    if get_origin(hint) is Literal:
        return str, get_args(hint), optional
    return hint, (), optional


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _check_value(cls: type, name: str, value: Any) -> Any:
    """``value`` for field ``name`` after type and range checks (a bool for amp maps to fp16/none)."""
    base, choices, optional = _hint(cls, name)
    meta = next(f.metadata for f in fields(cls) if f.name == name)
    where = flag(name)
    if value is None:
        if optional:
            return None
        raise SettingsError(f"{where} must not be null")
    if name == "amp" and isinstance(value, bool):
        value = "fp16" if value else "none"
    if get_origin(base) is tuple:
        elem = get_args(base)
        if not isinstance(value, (list, tuple)) or len(value) != len(elem) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            raise SettingsError(f"{where} must be a list of {len(elem)} numbers, got {value!r}")
        value = tuple(float(v) for v in value)
        numbers = value
    else:
        ok = {bool: lambda v: isinstance(v, bool), int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), str: lambda v: isinstance(v, str)}[base](value)
        if not ok:
            kind = ", ".join(choices) if choices else _TYPE_NAMES[base]
            raise SettingsError(f"{where} must be {'one of ' if choices else ''}{kind}{' or null' if optional else ''}, got {value!r}")
        if choices and value not in choices:
            raise SettingsError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        value = float(value) if base is float else value
        numbers = (value,) if base in (int, float) else ()
    check = meta["check"]
    for v in numbers:
        if check == "positive" and not v > 0 or check == "nonneg" and v < 0 or check == "fraction" and not 0 <= v < 1:
            rule = {"positive": "positive", "nonneg": ">= 0", "fraction": "in [0, 1)"}[check]
            raise SettingsError(f"{where} must be {rule}, got {value!r}")
    return value


def validate_recipe(kind: str, mapping: dict[str, Any]) -> dict[str, Any]:
    """Check a recipe mapping keyed by command-line flag names (``batch-size``, as params.yaml writes
    them) or field names, for ``kind`` pretrain, finetune, cityscapes or ade20k. Returns it keyed by
    field names with checked values; a null value means "the profile's default" and is dropped.
    Raises :class:`SettingsError` naming the key and what it accepts."""
    try:
        return _checked(recipe_class(kind), mapping)
    except SettingsError as err:
        raise SettingsError(f"{kind} recipe: {err}") from None


def _checked(cls: type[CommonRecipe], mapping: dict[str, Any]) -> dict[str, Any]:
    names = [f.name for f in fields(cls)]
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = str(key).replace("-", "_")
        if name not in names:
            raise SettingsError(f"unknown key {key!r}; accepted keys: {', '.join(n.replace('_', '-') for n in names)}")
        if value is not None:
            out[name] = _check_value(cls, name, value)
    return out


def resolve(defaults: CommonRecipe, overrides: dict[str, Any]) -> CommonRecipe:
    """``defaults`` with checked ``overrides``; the result's own values are checked too (a default
    of None may stay None only where the field allows it)."""
    recipe = dataclasses.replace(defaults, **_checked(type(defaults), overrides))
    for f in fields(recipe):
        _check_value(type(recipe), f.name, getattr(recipe, f.name))
    return recipe


def from_record(kind: str, record: dict[str, Any]) -> CommonRecipe:
    """The recipe a checkpoint or metrics.json recorded (keys of older versions that no field holds
    any more are dropped; their values are checked like any other)."""
    cls = recipe_class(kind)
    names = {f.name for f in fields(cls)}
    return resolve(cls(), {k: v for k, v in record.items() if k in names})


def execution_keys(kind: str) -> tuple[str, ...]:
    return tuple(f.name for f in fields(recipe_class(kind)) if f.metadata["execution"])


def result_keys(kind: str) -> tuple[str, ...]:
    """The fields that make a recipe the paper's or another one, in field order."""
    return tuple(f.name for f in fields(recipe_class(kind)) if f.metadata["result"])


def add_recipe_arguments(parser: argparse.ArgumentParser, kind: str) -> None:
    """One command-line flag per recipe field, defaulting to None (the profile fills it)."""
    cls = recipe_class(kind)
    for f in fields(cls):
        base, choices, _ = _hint(cls, f.name)
        names = (flag(f.name), *f.metadata["flags"])
        if f.name == "amp":
            parser.add_argument(*names, nargs="?", const="fp16", choices=AMP_MODES, help=f.metadata["help"])
            parser.add_argument("--no-amp", dest="amp", action="store_const", const="none", help="same as --amp none")
        elif base is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=None, help=f.metadata["help"])
        elif get_origin(base) is tuple:
            parser.add_argument(*names, type=float, nargs=len(get_args(base)), help=f.metadata["help"])
        else:
            parser.add_argument(*names, type=base, choices=choices or None, help=f.metadata["help"])


def overrides_from_args(args: argparse.Namespace, kind: str) -> dict[str, Any]:
    """The recipe values given explicitly on the command line."""
    return {f.name: getattr(args, f.name) for f in fields(recipe_class(kind)) if getattr(args, f.name, None) is not None}
