"""``python -m reproduce evaluate``: score a pretrain or finetune checkpoint on a dataset split.

The model, its settings and the test-time recipe (image size, crop, sliding window) come from the
checkpoint; ``--window-sizes`` may change the HRViT stripe widths at test time (they hold no
weights), while ``--ablate`` must match the checkpoint's. Runs under torchrun like training does
(each rank scores a shard, the sums are all-reduced).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from models.factory import build_model
from reproduce.data.datasets import SEG_DATASETS
from reproduce.train import distributed, engine, finetune, pretrain
from reproduce.train.checkpointing import METRICS_NAME, load_run_state
from reproduce.train.evaluation import evaluate_classification, evaluate_segmentation


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="checkpoint.pt, best.pt or model.safetensors of a pretrain or finetune run")
    parser.add_argument("--dataset", default=None, help="dataset to score on (default: the one the checkpoint was trained on)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset root; for 'synthetic' the cache folder (default data/synthetic)")
    parser.add_argument("--split", choices=("val", "train"), default="val")
    parser.add_argument("--output", type=Path, required=True, help="folder for metrics.json")
    parser.add_argument("--ablate", nargs="+", default=None, metavar="NAME", help="HRViT only: must match the checkpoint's ablations")
    parser.add_argument("--window-sizes", nargs=4, type=int, default=None, metavar=("A", "B", "C", "D"), help="HRViT only: stripe widths at test time")
    parser.add_argument("--batch-size", type=int, default=None, help="classification: global eval batch")
    parser.add_argument("--synthetic-size", type=int, default=None, help="generated data: images per split (default: the checkpoint's)")
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")


def _settings(args: argparse.Namespace, state: dict) -> dict:
    settings = dict(state["model_settings"])
    if args.ablate is not None and sorted(args.ablate) != sorted(settings.get("ablate", [])):
        raise engine.SettingsError(f"--ablate {sorted(args.ablate)} does not match the checkpoint's {settings.get('ablate')} (ablations change the weights)")
    if args.window_sizes is not None:
        settings["window_sizes"] = list(args.window_sizes)
    engine.model_kwargs(state["model"], settings)
    return settings


def run(args: argparse.Namespace) -> int:
    start = time.time()
    state = load_run_state(args.checkpoint)
    task, name, recipe = state["task"], state["model"], dict(state["recipe"])
    settings = _settings(args, state)
    args.dataset = args.dataset or state["dataset"]
    valid = pretrain.DATASETS if task == "cls" else tuple(SEG_DATASETS)
    if args.dataset not in valid:
        raise engine.SettingsError(f"a {task} checkpoint is evaluated on one of {', '.join(valid)}, got {args.dataset!r}")
    if args.dataset != "synthetic" and args.data_root is None:
        raise engine.SettingsError(f"--dataset {args.dataset} needs --data-root")
    for key in ("synthetic_size", "num_workers"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    ctx = distributed.setup(args.device)
    engine.configure_threads(recipe.get("threads"))
    try:
        log = engine.Logger(ctx, "evaluate")
        amp = engine.use_amp(recipe, ctx)
        kwargs = engine.model_kwargs(name, {**settings, "drop_path_rate": 0.0})
        if task == "cls":
            root = pretrain.data_root(args, recipe, ctx)
            classes, samples = pretrain.index_data(root)
            if classes != state["class_names"]:
                raise engine.SettingsError(f"{args.dataset} at {root} has {len(classes)} classes that differ from the checkpoint's {len(state['class_names'])}")
            dataset = pretrain.make_dataset(samples[args.split], recipe, augment=False)
            model = build_model(name, "cls", num_classes=state["num_classes"], **kwargs)
        else:
            if args.dataset != state["dataset"] and SEG_DATASETS[args.dataset].num_classes != state["num_classes"]:
                raise engine.SettingsError(f"the checkpoint predicts {state['num_classes']} classes; {args.dataset} has {SEG_DATASETS[args.dataset].num_classes}")
            root = finetune.data_root(args, recipe, ctx)
            dataset = finetune.build_dataset(args.dataset, root, args.split, recipe, augment=False)
            model = build_model(name, "seg", num_classes=state["num_classes"], **kwargs)
        model.load_state_dict(state["model_state"])
        model = engine.wrap_ddp(model, ctx, sync_bn=False)
        data_source = "generated" if args.dataset == "synthetic" else str(root)
        log.line(f"{name} ({task}, step {state['step']}/{state['total_steps']}) on {args.dataset} {args.split}: {len(dataset)} images, world {ctx.world_size}")
        if task == "cls":
            batch = max(1, (args.batch_size or recipe["eval_batch_size"]) // ctx.world_size)
            result = evaluate_classification(model, dataset, ctx, batch, recipe["num_workers"], amp)
            log.line(f"top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} loss {result['loss']:.4f}")
        else:
            info = SEG_DATASETS[args.dataset]
            result = evaluate_segmentation(model, dataset, ctx, info.num_classes, info.class_names, recipe["test_mode"], recipe["test_crop"], recipe["test_stride"], recipe["num_workers"], amp)
            log.line(f"mIoU {100 * result['miou']:.2f} pixel acc {100 * result['pixel_accuracy']:.2f}")
        if ctx.is_main:
            metrics = {
                **result, "wall_time_s": time.time() - start, "task": task, "profile": state["profile"], "dataset": args.dataset,
                "split": args.split, "data_source": data_source, "model": name, "model_settings": settings, "recipe": recipe,
                "checkpoint": str(args.checkpoint), "checkpoint_step": state["step"], "checkpoint_finished": state["finished"],
                "world_size": ctx.world_size, "git_commit": engine.git_commit(),
            }
            engine.write_metrics(args.output / METRICS_NAME, metrics)
            log.line(f"wrote {args.output / METRICS_NAME}")
    finally:
        distributed.teardown(ctx)
    return 0
