"""``python -m reproduce evaluate``: score a pretrain or finetune run, or published segmentation
weights, on a dataset split.

``--checkpoint`` reads a run's ``checkpoint.pt``, ``best.pt`` or ``model.safetensors``: the model,
its settings and the test-time recipe (image size, crop, sliding window) come from the file.
``--weights`` reads a fine-tuned segmentation checkpoint in any format ``models.weights`` loads
whole (SegFormer mmseg, official HRViT mmseg, this suite's) for ``--model``, scored with the paper's
test recipe for ``--dataset``: the reference rows' accuracy from published checkpoints, without
training. ``--window-sizes`` may change the HRViT stripe widths at test time (they hold no weights),
while ``--ablate`` must match the weights. Runs under torchrun like training does (each rank scores
a shard, the sums are all-reduced).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import Any

from torch import nn

from models.factory import build_model, check_model_name, is_external
from models.fuse import fuse_for_inference
from models.weights import WeightsError, load_segmentation_weights
from reproduce import recipes
from reproduce.data.datasets import SEG_DATASETS
from reproduce.errors import SettingsError
from reproduce.params import METRICS_NAME, SUITE_FORMAT
from reproduce.train import common, distributed
from reproduce.train.checkpointing import load_run_state, write_metrics
from reproduce.train.evaluation import EvalOptions
from reproduce.train.loop import autocast_dtype, precision_name
from reproduce.train.runlog import Logger
from reproduce.train.tasks import SEGMENTATION, TASKS, weights_error

PUBLISHED_SOURCE = "published weights, evaluated"  # metrics.json "source" of --weights in a published format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="checkpoint.pt, best.pt or model.safetensors of a pretrain or finetune run")
    source.add_argument("--weights", type=Path, help="a fine-tuned segmentation checkpoint (segformer-mmseg, hrvit-official-mmseg or this "
                                                     "suite's) of --model, scored with the paper's test recipe for --dataset")
    parser.add_argument("--model", default=None, help="--weights only: the suite model the weights are for (e.g. mit_b1)")
    parser.add_argument("--num-classes", type=int, default=None, help="--weights only: the classes the weights predict (default: the dataset's; must match it)")
    parser.add_argument("--dataset", default=None, help="dataset to score on (default: the one the checkpoint was trained on; --weights: synthetic)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset root; for 'synthetic' the cache folder (default data/synthetic)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--output", type=Path, required=True, help="folder for metrics.json")
    parser.add_argument("--ablate", nargs="+", default=None, metavar="NAME", help="HRViT only: must match the checkpoint's ablations")
    parser.add_argument("--window-sizes", nargs=4, type=int, default=None, metavar=("A", "B", "C", "D"), help="HRViT only: stripe widths at test time")
    parser.add_argument("--batch-size", "--eval-batch-size", dest="batch_size", type=int, default=None,
                        help="classification: global eval batch; segmentation: sliding windows per forward (default: the run's --eval-batch-size)")
    parser.add_argument("--synthetic-size", type=int, default=None, help="generated data: images per split (default: the checkpoint's)")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--amp", choices=recipes.AMP_MODES, default=None, help="precision of the evaluation (default: the run's)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default off)")
    parser.add_argument("--fuse-bn", action="store_true",
                        help="score the merged inference copy (models/fuse.py: BatchNorms folded, MixCFN and SegFormer-head "
                             "convolutions merged): the same function up to rounding, fewer operators (default off)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _settings(args: argparse.Namespace, state: dict) -> dict:
    settings = dict(state["model_settings"])
    if args.ablate is not None and sorted(args.ablate) != sorted(settings.get("ablate", [])):
        raise SettingsError(f"--ablate {sorted(args.ablate)} does not match the checkpoint's {settings.get('ablate')} (ablations change the weights)")
    if args.window_sizes is not None:
        settings["window_sizes"] = list(args.window_sizes)
    common.model_kwargs(state["model"], settings)
    return settings


def _load(args: argparse.Namespace) -> tuple[dict, recipes.CommonRecipe, dict]:
    """The run's state, its recipe with this command's overrides, and the model settings; all checked
    before any data is read."""
    try:
        state = load_run_state(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise SettingsError(f"--checkpoint {err}") from err
    task = TASKS[state["task"]]
    recipe = recipes.resolve(recipes.from_record(task.command, state["recipe"]), _overrides(args))
    settings = _settings(args, state)
    args.dataset = args.dataset or state["dataset"]
    if args.dataset not in task.datasets:
        raise SettingsError(f"a {task.task} checkpoint is evaluated on one of {', '.join(task.datasets)}, got {args.dataset!r}")
    task.check_data_root(args.dataset, args.data_root)
    if task is SEGMENTATION and args.dataset != state["dataset"] and SEG_DATASETS[args.dataset].num_classes != state["num_classes"]:
        raise SettingsError(f"the checkpoint predicts {state['num_classes']} classes; {args.dataset} has {SEG_DATASETS[args.dataset].num_classes}")
    return state, recipe, settings


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"synthetic_size": args.synthetic_size, "num_workers": args.num_workers, "eval_batch_size": args.batch_size, "amp": args.amp}
    return {k: v for k, v in overrides.items() if v is not None}


def _load_weights(args: argparse.Namespace) -> tuple[nn.Module, dict, recipes.FinetuneRecipe, dict]:
    """``--weights``: the segmentation model with the file loaded whole, its init record, the paper's
    test recipe for the dataset and the model settings; all before any data is read."""
    if args.model is None:
        raise SettingsError("--weights needs --model NAME (the suite model the weights are for, e.g. mit_b1)")
    args.dataset = args.dataset or "synthetic"
    if args.dataset not in SEG_DATASETS:
        raise SettingsError(f"--weights are evaluated on one of {', '.join(SEG_DATASETS)}, got {args.dataset!r}")
    SEGMENTATION.check_data_root(args.dataset, args.data_root)
    classes = SEG_DATASETS[args.dataset].num_classes
    if args.num_classes is not None and args.num_classes != classes:
        raise SettingsError(f"the weights predict {args.num_classes} classes; {args.dataset} has {classes}")
    recipe = SEGMENTATION.recipe("paper", args.dataset, args.model, _overrides(args))
    settings = common.model_settings(args, 0.0)
    try:
        check_model_name(args.model)
    except ValueError as err:
        raise SettingsError(str(err)) from err
    if is_external(args.model):
        raise SettingsError(f"--weights loads suite models only; {args.model} is built outside the suite")
    model = build_model(args.model, "seg", num_classes=classes, **common.model_kwargs(args.model, settings))
    try:
        record = load_segmentation_weights(model, args.weights, args.model)
    except WeightsError as err:  # a file of another family or format, of another width, or unreadable
        raise weights_error("--weights", err) from err
    return model, record, recipe, settings


def _from_checkpoint(args: argparse.Namespace) -> tuple[nn.Module, dict, recipes.CommonRecipe, dict]:
    """``--checkpoint``: the run's model with its weights, the run state and recipe, and the model settings."""
    for flag, value in (("--model", args.model), ("--num-classes", args.num_classes)):
        if value is not None:
            raise SettingsError(f"{flag} applies to --weights only; a --checkpoint names its own model and classes")
    state, recipe, settings = _load(args)
    kwargs = common.model_kwargs(state["model"], {**settings, "drop_path_rate": 0.0})
    model = build_model(state["model"], state["task"], num_classes=state["num_classes"], **kwargs)
    model.load_state_dict(state["model_state"])
    return model, state, recipe, settings


def _weights_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json says about ``--weights`` (the ``--checkpoint`` keys stay, empty)."""
    metrics = {"weights": record, "init": {key: record[key] for key in ("format", "file", "sha256")},
               "profile": "paper", "checkpoint": None, "checkpoint_step": None, "checkpoint_finished": None}
    if record["format"] != SUITE_FORMAT:
        metrics["source"] = PUBLISHED_SOURCE
    return metrics


def run(args: argparse.Namespace) -> int:
    start = time.time()
    if args.weights is not None:
        model, record, recipe, settings = _load_weights(args)
        task, name, class_names, source = SEGMENTATION, args.model, None, _weights_metrics(record)
        origin = f"{args.weights} ({record['format']})"
    else:
        model, state, recipe, settings = _from_checkpoint(args)
        task, name, class_names = TASKS[state["task"]], state["model"], state["class_names"]
        source = {"profile": state["profile"], "checkpoint": str(args.checkpoint), "checkpoint_step": state["step"],
                  "checkpoint_finished": state["finished"]}
        origin = f"step {state['step']}/{state['total_steps']}"
    ctx = distributed.setup(args.device)
    common.configure_threads(recipe.threads)
    try:
        log = Logger(ctx, "evaluate")
        data = task.load_data(args.dataset, args.data_root, recipe, ctx, args.output)
        if task is not SEGMENTATION and data.class_names != class_names:
            raise SettingsError(f"{args.dataset} at {data.root} has {len(data.class_names)} classes that differ from the checkpoint's {len(class_names)}")
        dataset = task.dataset(data, args.split, recipe, augment=False)
        options = EvalOptions(task.eval_batch(recipe, ctx), recipe.num_workers, autocast_dtype(recipe.amp, ctx.device))
        if args.fuse_bn:
            model = fuse_for_inference(model)
        model = common.wrap_model(model, ctx, sync_bn=False, compile_mode="default" if args.compile else None)
        log.line(f"{name} ({task.task}, {origin}) on {args.dataset} {args.split}: {len(dataset)} images, world {ctx.world_size}")
        result = task.score(model, dataset, ctx, data.class_names, recipe, options)
        log.line(task.summary(result))
        if ctx.is_main:
            metrics = {
                **result, **source, "wall_time_s": time.time() - start, "task": task.task, "dataset": args.dataset,
                "split": args.split, "data_source": data.source, "model": name, "model_settings": settings, "recipe": dataclasses.asdict(recipe),
                "world_size": ctx.world_size, "precision": precision_name(options.dtype), "compile": args.compile, "fused_bn": args.fuse_bn, "git_commit": common.git_commit(),
            }
            write_metrics(args.output / METRICS_NAME, metrics)
            log.line(f"wrote {args.output / METRICS_NAME}")
    finally:
        distributed.teardown(ctx)
    return 0
