"""What every training task and command shares: the common options and checks, the model settings
a run records, the set-up steps (seeding, threads, determinism, DDP/compile wrapping, the code's
git commit) and the data root and cached data index.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from models.factory import check_model_name
from models.hrvit import option_kwargs
from reproduce import recipes
from reproduce.data import layouts, synthetic
from reproduce.errors import SettingsError
from reproduce.params import env_world_size
from reproduce.train import compilation
from reproduce.train.checkpointing import atomic_write
from reproduce.train.distributed import DistContext, barrier, gather_objects

DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")
INDEX_DIR = ".data-index"
INDEX_VERSION = 1

# --------------------------------------------------------------------------- options and checks


def add_common_arguments(parser: argparse.ArgumentParser, kind: str, default_dataset: str | None) -> None:
    """Options shared by pretrain and finetune, then one flag per recipe field (None: the profile fills it)."""
    parser.add_argument("--model", required=True, help="model name, e.g. hrvit_b1 (see models.factory.available_models)")
    parser.add_argument("--profile", choices=recipes.PROFILES, default="smoke", help="recipe defaults: smoke (generated data, seconds), proxy (generated data, long enough to learn) or paper (the paper's recipe)")
    parser.add_argument("--dataset", default=default_dataset, help="dataset name (see below)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset root; for 'synthetic' the cache folder of generated data (default data/synthetic)")
    parser.add_argument("--output", type=Path, required=True, help="run folder: checkpoint.pt, model.safetensors, best.pt, metrics.json, dvclive/")
    parser.add_argument("--ablate", nargs="+", default=None, metavar="NAME", help="HRViT only: techniques to turn off (models.hrvit.ABLATIONS, or 'all')")
    parser.add_argument("--window-sizes", nargs=4, type=int, default=None, metavar=("A", "B", "C", "D"), help="HRViT only: stripe width per branch, e.g. 1 2 7 7")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    compilation.add_compile_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if OUTPUT/checkpoint.pt exists")
    recipes.add_recipe_arguments(parser, kind)


def model_settings(args: argparse.Namespace, drop_path: float) -> dict[str, Any]:
    """The model options a run records and passes on: ablations, window sizes, drop-path."""
    return {"ablate": sorted(args.ablate) if args.ablate else [], "window_sizes": list(args.window_sizes) if args.window_sizes else None, "drop_path_rate": drop_path}


def model_kwargs(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``build_model`` keyword arguments for ``settings``; ablations and windows exist only in HRViT."""
    try:
        options = option_kwargs(name, settings.get("ablate") or (), settings.get("window_sizes"))
    except ValueError as err:
        raise SettingsError(str(err)) from err
    return {"drop_path_rate": settings["drop_path_rate"], **options}


def validate_common(model: str, recipe: recipes.CommonRecipe) -> int:
    """Checks every run needs beyond the recipe's own; returns the per-rank micro-batch size."""
    try:
        check_model_name(model)
    except ValueError as err:
        raise SettingsError(str(err)) from err
    world, accum = env_world_size(), recipe.accum_steps
    if recipe.batch_size % (world * accum):
        raise SettingsError(
            f"--batch-size {recipe.batch_size} is not divisible by world size {world} x accumulation steps {accum}; "
            f"use a multiple of {world * accum} or change --accum-steps / the number of processes"
        )
    return recipe.batch_size // (world * accum)


def check_multiple_of_32(flag: str, size: int) -> None:
    if size < 32 or size % 32:
        raise SettingsError(f"{flag} {size} must be a positive multiple of 32 (the backbones downsample by 32)")


# --------------------------------------------------------------------------- set-up


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int | None) -> None:
    """Pin the intra-op thread count. At smoke sizes HRViT is op-overhead bound, and two threads per
    process spin against each other on a shared 2-core machine (measured 3x slower)."""
    if threads:
        torch.set_num_threads(threads)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels (CPU runs then repeat bit for bit); cuDNN autotuning only when off."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def use_sync_bn(recipe: recipes.CommonRecipe, ctx: DistContext) -> bool:
    """SyncBN when the recipe asks for it and it can run: several processes on GPUs."""
    return recipe.sync_bn and ctx.distributed and ctx.device.type == "cuda"


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool, compile_mode: str | None) -> nn.Module:
    """Move to the rank's device, convert BN to SyncBN when asked, compile in place (state-dict keys
    unchanged) with ``compile_mode`` unless None, and wrap in DDP when distributed."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if compile_mode is not None:
        model.compile(mode=compile_mode)
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


def git_commit() -> str:
    """HEAD of the repository holding this code, '-dirty' if it has uncommitted changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


# --------------------------------------------------------------------------- data


def dataset_root(dataset: str, data_root: Path | None, ctx: DistContext, kind: str, size: tuple[int, int, int]) -> Path:
    """The folder to read: ``data_root`` for a real dataset; for ``synthetic`` the generated data of
    ``kind`` (cls|seg; ``size`` = seed, images per split, pixels) in the real layout, made once per
    node by local rank 0 while the others wait."""
    if dataset != "synthetic":
        return Path(data_root)
    cache = Path(data_root) if data_root is not None else DEFAULT_SYNTHETIC_ROOT
    if ctx.local_rank == 0:
        synthetic.ensure_synthetic(cache, kind, *size)
    barrier(ctx)
    return synthetic.ensure_synthetic(cache, kind, *size)


def data_index(ctx: DistContext, layout: str, root: Path, splits: tuple[str, ...], cache: Path) -> dict:
    """The validated file index of ``root`` (see ``layouts.build_index``), built by the first process
    of each node and cached in ``cache/.data-index/`` under a key of (layout, absolute root); the
    other processes read it. A layout error on the builder is raised on every rank. To re-index a
    dataset that changed in place, delete that folder."""
    key = hashlib.sha256(f"{INDEX_VERSION}:{layout}:{root.resolve()}:{splits}".encode()).hexdigest()[:16]
    path = cache / INDEX_DIR / f"{layout}-{key}.json"
    error = None
    if ctx.local_rank == 0 and not path.is_file():
        try:
            index = layouts.build_index(layout, root, splits)
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(index)))
        except layouts.DataLayoutError as err:
            error = str(err)
    errors = [e for e in gather_objects(ctx, error) if e]
    if errors:
        raise layouts.DataLayoutError.from_message(errors[0])
    return json.loads(path.read_text())
