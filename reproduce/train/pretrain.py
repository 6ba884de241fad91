"""``python -m reproduce pretrain``: ImageNet-layout classification pretraining.

The paper profile is the official HRViT/DeiT recipe (docs/recipes.md#imagenet-pretraining), assembled from timm's
pieces: ``create_transform`` (RandAugment, random erasing), ``Mixup`` with label smoothing,
``SoftTargetCrossEntropy``, ``create_optimizer_v2`` (AdamW, no decay on 1-D parameters) and
``create_scheduler_v2`` (cosine with warm-up and cool-down, stepped per epoch).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from models.factory import build_model
from reproduce.data import layouts
from reproduce.data.datasets import ImageClassDataset
from reproduce.train import distributed, engine
from reproduce.train.evaluation import evaluate_classification

DATASETS = ("synthetic", "imagenet")

# docs/recipes.md#imagenet-pretraining (official pretrain.py command and defaults); batch is global (32/GPU x 32 GPUs).
PAPER = {
    "image_size": 224, "epochs": 300, "cooldown_epochs": 10, "warmup_epochs": 20, "warmup_lr": 1e-6, "min_lr": 1e-5,
    "batch_size": 1024, "accum_steps": 1, "lr": 1e-3, "weight_decay": 0.05, "clip_grad": 1.0,
    "drop_path": 0.1, "head_drop": 0.1, "mixup": 0.8, "cutmix": 1.0, "smoothing": 0.1,
    "auto_augment": "rand-m9-mstd0.5-inc1", "reprob": 0.25, "color_jitter": 0.4, "train_interpolation": "random",
    "eval_crop_pct": 0.9, "eval_interpolation": "bicubic", "eval_batch_size": 128,
    "amp": True, "sync_bn": True, "deterministic": False, "seed": 42, "num_workers": 8,
    "checkpoint_every": 1000, "log_every": 100, "synthetic_size": 1000, "threads": None,
}
# Same recipe, scaled down to seconds on a CPU: 64 px, 32 generated images, 2 short epochs.
SMOKE = {
    **PAPER, "image_size": 64, "epochs": 2, "cooldown_epochs": 0, "warmup_epochs": 1, "batch_size": 8,
    "eval_batch_size": 16, "deterministic": True, "seed": 0, "num_workers": 0, "checkpoint_every": 0,
    "log_every": 1, "synthetic_size": 16, "threads": 1,
}
PROFILES = {"paper": PAPER, "smoke": SMOKE}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    engine.add_common_arguments(parser, default_dataset=None)
    parser.description = (parser.description or "") + f". Datasets: {', '.join(DATASETS)} (default: synthetic for smoke, imagenet for paper)."
    parser.add_argument("--epochs", type=int, help="epochs before cool-down (paper 300)")
    parser.add_argument("--warmup-epochs", type=int)
    parser.add_argument("--cooldown-epochs", type=int)
    parser.add_argument("--image-size", type=int, help="training/eval crop size in pixels (paper 224)")
    parser.add_argument("--mixup", type=float)
    parser.add_argument("--cutmix", type=float)


def validate(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], int]:
    """Recipe, model settings and per-rank micro-batch; every check runs before any data is read."""
    recipe = engine.resolve_recipe(PROFILES[args.profile], args)
    args.dataset = args.dataset or ("synthetic" if args.profile == "smoke" else "imagenet")
    if args.dataset not in DATASETS:
        raise engine.SettingsError(f"pretrain --dataset must be one of {', '.join(DATASETS)}, got {args.dataset!r}")
    if args.dataset == "imagenet" and args.data_root is None:
        raise engine.SettingsError("--dataset imagenet needs --data-root (the folder holding train/ and val/)")
    micro = engine.validate_common(args.model, recipe)
    engine.check_multiple_of_32("--image-size", recipe["image_size"])
    for key in ("epochs",):
        if recipe[key] < 1:
            raise engine.SettingsError(f"--{key} must be >= 1, got {recipe[key]}")
    if (recipe["mixup"] > 0 or recipe["cutmix"] > 0) and micro % 2:
        raise engine.SettingsError(f"Mixup/CutMix in batch mode needs an even per-rank micro-batch, got {micro}")
    settings = engine.model_settings(args, recipe["drop_path"])
    engine.model_kwargs(args.model, settings)  # rejects HRViT-only options on other models
    if args.dataset == "synthetic" and recipe["synthetic_size"] < 1:
        raise engine.SettingsError("--synthetic-size must be >= 1")
    return recipe, settings, micro


def data_root(args: argparse.Namespace, recipe: dict[str, Any], ctx: distributed.DistContext) -> Path:
    return engine.dataset_root(args, ctx, "cls", recipe["seed"], recipe["synthetic_size"], recipe["image_size"])


def index_data(root: Path) -> tuple[list[str], dict[str, list]]:
    """Class names and the ``(image, class)`` samples of both splits (validated layout)."""
    splits = layouts.index_imagenet(root)
    return splits["train"][0], {split: samples for split, (_, samples) in splits.items()}


def make_dataset(samples: list, recipe: dict[str, Any], augment: bool) -> ImageClassDataset:
    """Training augmentation (RandAugment, random erasing) or the evaluation resize + centre crop."""
    if augment:
        transform = create_transform(
            recipe["image_size"], is_training=True, auto_augment=recipe["auto_augment"], re_prob=recipe["reprob"],
            re_mode="pixel", re_count=1, interpolation=recipe["train_interpolation"], color_jitter=recipe["color_jitter"],
        )
    else:
        transform = create_transform(recipe["image_size"], interpolation=recipe["eval_interpolation"], crop_pct=recipe["eval_crop_pct"])
    return ImageClassDataset(samples, transform)


def run(args: argparse.Namespace) -> int:
    return engine.launch(args, validate, _train)


def _train(args, recipe, settings, micro, ctx, start) -> int:
    log = engine.Logger(ctx, "pretrain")
    engine.configure_determinism(recipe["deterministic"])
    engine.configure_threads(recipe["threads"])
    root = data_root(args, recipe, ctx)
    classes, samples = index_data(root)
    train_set, val_set = make_dataset(samples["train"], recipe, True), make_dataset(samples["val"], recipe, False)
    data_source = "generated" if args.dataset == "synthetic" else str(root)
    log.line(f"{args.model} on {args.dataset} ({data_source}): {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, world {ctx.world_size}")

    engine.seed_everything(recipe["seed"])  # identical initial weights on every rank
    model = build_model(args.model, "cls", num_classes=len(classes), drop_rate=recipe["head_drop"], **engine.model_kwargs(args.model, settings))
    amp, sync_bn = engine.use_amp(recipe, ctx), engine.use_sync_bn(recipe, ctx)
    model = engine.wrap_ddp(model, ctx, sync_bn)
    optimizer = create_optimizer_v2(engine.unwrap(model), opt="adamw", lr=recipe["lr"], weight_decay=recipe["weight_decay"])
    sched = engine.make_schedule(ctx, len(train_set), micro, recipe["accum_steps"], epochs=recipe["epochs"] + recipe["cooldown_epochs"])
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=recipe["epochs"], warmup_epochs=recipe["warmup_epochs"], warmup_lr=recipe["warmup_lr"],
        min_lr=recipe["min_lr"], cooldown_epochs=recipe["cooldown_epochs"], updates_per_epoch=sched.steps_per_epoch,
    )
    assert total_epochs * sched.steps_per_epoch == sched.total_steps

    mixup = None
    if recipe["mixup"] > 0 or recipe["cutmix"] > 0:
        mixup = Mixup(mixup_alpha=recipe["mixup"], cutmix_alpha=recipe["cutmix"], prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=recipe["smoothing"], num_classes=len(classes))
    soft_ce = SoftTargetCrossEntropy()

    def loss_fn(net, batch, step):
        images, targets = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        if mixup is not None:
            images, soft = mixup(images, targets)
            return soft_ce(net(images), soft)
        return F.cross_entropy(net(images), targets, label_smoothing=recipe["smoothing"])

    trainer = engine.Trainer(ctx, model, optimizer, scheduler, loss_fn, amp, recipe["clip_grad"], recipe["seed"], log, recipe["log_every"])
    identity = {"task": "cls", "model": args.model, "model_settings": settings, "recipe": recipe, "dataset": args.dataset, "data_source": data_source, "world_size": ctx.world_size}
    return engine.train_evaluate_record(
        args, ctx, log, trainer, train_set, sched, recipe, identity,
        checkpoint_extras={"num_classes": len(classes), "class_names": classes},
        evaluate=lambda: evaluate_classification(model, val_set, ctx, max(1, recipe["eval_batch_size"] // ctx.world_size), recipe["num_workers"], amp),
        summary=lambda result: f"val top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} loss {result['loss']:.4f}",
        effective={"amp": amp, "sync_bn": sync_bn, "device": str(ctx.device), "micro_batch": micro, "world_size": ctx.world_size},
        metrics_extras={"num_classes": len(classes), "steps_per_epoch": sched.steps_per_epoch},
        start=start,
    )
