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
from models.weights import WeightsError, load_segmentation_weights
from reproduce.data.datasets import SEG_DATASETS
from reproduce.train import distributed, engine, finetune, pretrain, recipes
from reproduce.train.checkpointing import METRICS_NAME, load_run_state, write_metrics
from reproduce.train.evaluation import EvalOptions, SegTest, evaluate_classification, evaluate_segmentation
from reproduce.train.loop import autocast_dtype, precision_name
from reproduce.train.runlog import Logger

SUITE_FORMAT = "hrvit-repro"
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
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _settings(args: argparse.Namespace, state: dict) -> dict:
    settings = dict(state["model_settings"])
    if args.ablate is not None and sorted(args.ablate) != sorted(settings.get("ablate", [])):
        raise engine.SettingsError(f"--ablate {sorted(args.ablate)} does not match the checkpoint's {settings.get('ablate')} (ablations change the weights)")
    if args.window_sizes is not None:
        settings["window_sizes"] = list(args.window_sizes)
    engine.model_kwargs(state["model"], settings)
    return settings


def _load(args: argparse.Namespace) -> tuple[dict, recipes.CommonRecipe, dict]:
    """The run's state, its recipe with this command's overrides, and the model settings; all checked
    before any data is read."""
    try:
        state = load_run_state(args.checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise engine.SettingsError(f"--checkpoint {err}") from err
    task = state["task"]
    recipe = recipes.from_record("pretrain" if task == "cls" else "finetune", state["recipe"])
    recipe = recipes.resolve(recipe, _overrides(args))
    settings = _settings(args, state)
    args.dataset = args.dataset or state["dataset"]
    valid = pretrain.DATASETS if task == "cls" else tuple(SEG_DATASETS)
    if args.dataset not in valid:
        raise engine.SettingsError(f"a {task} checkpoint is evaluated on one of {', '.join(valid)}, got {args.dataset!r}")
    _check_data_root(args)
    if task == "seg" and args.dataset != state["dataset"] and SEG_DATASETS[args.dataset].num_classes != state["num_classes"]:
        raise engine.SettingsError(f"the checkpoint predicts {state['num_classes']} classes; {args.dataset} has {SEG_DATASETS[args.dataset].num_classes}")
    return state, recipe, settings


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {"synthetic_size": args.synthetic_size, "num_workers": args.num_workers, "eval_batch_size": args.batch_size, "amp": args.amp}
    return {k: v for k, v in overrides.items() if v is not None}


def _check_data_root(args: argparse.Namespace) -> None:
    if args.dataset != "synthetic" and args.data_root is None:
        raise engine.SettingsError(f"--dataset {args.dataset} needs --data-root")


def _load_weights(args: argparse.Namespace) -> tuple[nn.Module, dict, recipes.FinetuneRecipe, dict]:
    """``--weights``: the segmentation model with the file loaded whole, its init record, the paper's
    test recipe for the dataset and the model settings; all before any data is read."""
    if args.model is None:
        raise engine.SettingsError("--weights needs --model NAME (the suite model the weights are for, e.g. mit_b1)")
    args.dataset = args.dataset or "synthetic"
    if args.dataset not in SEG_DATASETS:
        raise engine.SettingsError(f"--weights are evaluated on one of {', '.join(SEG_DATASETS)}, got {args.dataset!r}")
    _check_data_root(args)
    classes = SEG_DATASETS[args.dataset].num_classes
    if args.num_classes is not None and args.num_classes != classes:
        raise engine.SettingsError(f"the weights predict {args.num_classes} classes; {args.dataset} has {classes}")
    recipe = finetune.with_test_window(recipes.resolve(finetune.profile_defaults("paper", args.dataset, args.model), _overrides(args)))
    settings = engine.model_settings(args, 0.0)
    try:
        check_model_name(args.model)
    except ValueError as err:
        raise engine.SettingsError(str(err)) from err
    if is_external(args.model):
        raise engine.SettingsError(f"--weights loads suite models only; {args.model} is built outside the suite")
    model = build_model(args.model, "seg", num_classes=classes, **engine.model_kwargs(args.model, settings))
    try:
        record = load_segmentation_weights(model, args.weights, args.model)
    except WeightsError as err:  # a file of another family or format, of another width, or unreadable
        raise finetune.weights_error("--weights", err) from err
    return model, record, recipe, settings


def _from_checkpoint(args: argparse.Namespace) -> tuple[nn.Module, dict, recipes.CommonRecipe, dict]:
    """``--checkpoint``: the run's model with its weights, the run state and recipe, and the model settings."""
    for flag, value in (("--model", args.model), ("--num-classes", args.num_classes)):
        if value is not None:
            raise engine.SettingsError(f"{flag} applies to --weights only; a --checkpoint names its own model and classes")
    state, recipe, settings = _load(args)
    kwargs = engine.model_kwargs(state["model"], {**settings, "drop_path_rate": 0.0})
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
        task, name, class_names, source = "seg", args.model, None, _weights_metrics(record)
        origin = f"{args.weights} ({record['format']})"
    else:
        model, state, recipe, settings = _from_checkpoint(args)
        task, name, class_names = state["task"], state["model"], state["class_names"]
        source = {"profile": state["profile"], "checkpoint": str(args.checkpoint), "checkpoint_step": state["step"],
                  "checkpoint_finished": state["finished"]}
        origin = f"step {state['step']}/{state['total_steps']}"
    ctx = distributed.setup(args.device)
    engine.configure_threads(recipe.threads)
    try:
        log = Logger(ctx, "evaluate")
        options = EvalOptions(0, recipe.num_workers, autocast_dtype(recipe.amp, ctx.device))
        if task == "cls":
            root = pretrain.data_root(args, recipe, ctx)
            classes, samples, _ = pretrain.index_data(ctx, root, args.output)
            if classes != class_names:
                raise engine.SettingsError(f"{args.dataset} at {root} has {len(classes)} classes that differ from the checkpoint's {len(class_names)}")
            dataset = pretrain.make_dataset(samples[args.split], recipe, augment=False)
            options = dataclasses.replace(options, batch_size=max(1, recipe.eval_batch_size // ctx.world_size))
        else:
            root = finetune.data_root(args, recipe, ctx)
            samples, _ = finetune.index_data(ctx, args.dataset, root, args.output)
            dataset = finetune.build_dataset(args.dataset, samples[args.split], recipe, augment=False)
            options = dataclasses.replace(options, batch_size=recipe.eval_batch_size)
        model = engine.wrap_model(model, ctx, sync_bn=False, compile_mode="default" if args.compile else None)
        data_source = "generated" if args.dataset == "synthetic" else str(root)
        log.line(f"{name} ({task}, {origin}) on {args.dataset} {args.split}: {len(dataset)} images, world {ctx.world_size}")
        if task == "cls":
            result = evaluate_classification(model, dataset, ctx, options)
            log.line(f"top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} loss {result['loss']:.4f}")
        else:
            test = SegTest(recipe.test_mode, recipe.test_crop, recipe.test_stride)
            result = evaluate_segmentation(model, dataset, ctx, SEG_DATASETS[args.dataset].class_names, test, options)
            log.line(f"mIoU {100 * result['miou']:.2f} pixel acc {100 * result['pixel_accuracy']:.2f}")
        if ctx.is_main:
            metrics = {
                **result, **source, "wall_time_s": time.time() - start, "task": task, "dataset": args.dataset,
                "split": args.split, "data_source": data_source, "model": name, "model_settings": settings, "recipe": dataclasses.asdict(recipe),
                "world_size": ctx.world_size, "precision": precision_name(options.dtype), "compile": args.compile, "git_commit": engine.git_commit(),
            }
            write_metrics(args.output / METRICS_NAME, metrics)
            log.line(f"wrote {args.output / METRICS_NAME}")
    finally:
        distributed.teardown(ctx)
    return 0
