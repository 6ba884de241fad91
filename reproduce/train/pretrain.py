"""``python -m reproduce pretrain``: ImageNet-layout classification pretraining.

The paper profile is the official HRViT/DeiT recipe (``recipes.PretrainRecipe``), assembled from timm's
pieces: ``create_transform`` (RandAugment, random erasing), ``Mixup`` with label smoothing,
``SoftTargetCrossEntropy``, ``create_optimizer_v2`` (AdamW, no decay on 1-D parameters) and
``create_scheduler_v2`` (cosine with warm-up and cool-down, stepped per epoch).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2

from models.factory import build_model
from reproduce.data import layouts
from reproduce.data.datasets import ImageClassDataset, fix_posterize
from reproduce.train import compilation, distributed, engine, recipes
from reproduce.train.evaluation import EvalOptions, evaluate_classification
from reproduce.train.loop import Trainer, make_schedule, optimizer_options, unwrap
from reproduce.train.runlog import Logger

DATASETS = ("synthetic", "imagenet")
PAPER_BATCH = recipes.PretrainRecipe().batch_size  # the batch the paper's lr is given at


def add_arguments(parser: argparse.ArgumentParser) -> None:
    engine.add_common_arguments(parser, "pretrain", default_dataset=None)
    parser.description = (parser.description or "") + f". Datasets: {', '.join(DATASETS)} (default: synthetic for smoke, imagenet for paper)."


def validate(args: argparse.Namespace) -> tuple[recipes.PretrainRecipe, dict[str, Any], int]:
    """Recipe, model settings and per-rank micro-batch; every check runs before any data is read."""
    recipe = engine.resolve_recipe(recipes.profile_recipe("pretrain", args.profile), args)
    args.dataset = args.dataset or ("imagenet" if args.profile == "paper" else "synthetic")
    if args.dataset not in DATASETS:
        raise engine.SettingsError(f"pretrain --dataset must be one of {', '.join(DATASETS)}, got {args.dataset!r}")
    if args.dataset == "imagenet" and args.data_root is None:
        raise engine.SettingsError("--dataset imagenet needs --data-root (the folder holding train/ and val/)")
    if args.dataset == "imagenet" and not args.data_root.is_dir():
        raise engine.SettingsError(f"--data-root {args.data_root} does not exist (expected the folder holding train/ and val/)")
    micro = engine.validate_common(args.model, recipe)
    compilation.check_arguments(args)
    engine.check_multiple_of_32("--image-size", recipe.image_size)
    if (recipe.mixup > 0 or recipe.cutmix > 0) and micro % 2:
        raise engine.SettingsError(f"Mixup/CutMix in batch mode needs an even per-rank micro-batch, got {micro}")
    settings = engine.model_settings(args, recipe.drop_path)
    engine.model_kwargs(args.model, settings)  # rejects HRViT-only options on other models
    if args.dataset == "synthetic" and not recipe.synthetic_size:
        raise engine.SettingsError("--synthetic-size must be >= 1")
    return recipe, settings, micro


def data_root(args: argparse.Namespace, recipe: recipes.PretrainRecipe, ctx: distributed.DistContext) -> Path:
    return engine.dataset_root(args, ctx, "cls", (recipe.seed, recipe.synthetic_size, recipe.image_size))


def index_data(ctx: distributed.DistContext, root: Path, cache: Path) -> tuple[list[str], dict[str, list], str]:
    """Class names, the ``(image, class)`` samples of both splits (validated layout, indexed once and
    cached in ``cache``) and the data digest."""
    index = engine.data_index(ctx, "imagenet", root, ("train", "val"), cache)
    classes, train = layouts.class_samples(index, root, "train")
    return classes, {"train": train, "val": layouts.class_samples(index, root, "val")[1]}, index["digest"]


def make_dataset(samples: list, recipe: recipes.PretrainRecipe, augment: bool) -> ImageClassDataset:
    """Training augmentation (RandAugment, random erasing) or the evaluation resize + centre crop."""
    if augment:
        transform = fix_posterize(create_transform(
            recipe.image_size, is_training=True, auto_augment=recipe.auto_augment, re_prob=recipe.reprob,
            re_mode="pixel", re_count=1, interpolation=recipe.train_interpolation, color_jitter=recipe.color_jitter,
        ))
    else:
        transform = create_transform(recipe.image_size, interpolation=recipe.eval_interpolation, crop_pct=recipe.eval_crop_pct)
    return ImageClassDataset(samples, transform)


def run(args: argparse.Namespace) -> int:
    return engine.launch(args, validate, _train)


def _train(args, recipe, settings, micro, ctx, start) -> int:
    log = Logger(ctx, "pretrain")
    engine.configure_determinism(recipe.deterministic)
    engine.configure_threads(recipe.threads)
    root = data_root(args, recipe, ctx)
    classes, samples, digest = index_data(ctx, root, args.output)
    train_set, val_set = make_dataset(samples["train"], recipe, True), make_dataset(samples["val"], recipe, False)
    data_source = "generated" if args.dataset == "synthetic" else str(root)
    log.line(f"{args.model} on {args.dataset} ({data_source}): {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes, world {ctx.world_size}")

    engine.seed_everything(recipe.seed)  # identical initial weights on every rank
    model = build_model(args.model, "cls", num_classes=len(classes), drop_rate=recipe.head_drop, **engine.model_kwargs(args.model, settings))
    sync_bn = engine.use_sync_bn(recipe, ctx)
    compiled = compilation.prepare(args.compile, args.compile_mode, args.profile, ctx.device, sync_bn, recipe.accum_steps, args.output, log.line)
    model = engine.wrap_model(model, ctx, sync_bn, compiled.mode)
    lr = engine.effective_lr(recipe, PAPER_BATCH)
    optimizer = create_optimizer_v2(unwrap(model), opt="adamw", lr=lr, weight_decay=recipe.weight_decay, **optimizer_options(ctx.device))
    sched = make_schedule(ctx, len(train_set), micro, recipe.accum_steps, epochs=recipe.epochs + recipe.cooldown_epochs)
    scheduler, total_epochs = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs, warmup_lr=recipe.warmup_lr,
        min_lr=recipe.min_lr, cooldown_epochs=recipe.cooldown_epochs, updates_per_epoch=sched.steps_per_epoch,
    )
    assert total_epochs * sched.steps_per_epoch == sched.total_steps

    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0, switch_prob=0.5, mode="batch", label_smoothing=recipe.smoothing, num_classes=len(classes))
    soft_ce = SoftTargetCrossEntropy()

    def loss_fn(net, batch):
        images, targets = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        if mixup is not None:
            images, soft = mixup(images, targets)
            return soft_ce(net(images).float(), soft)
        return F.cross_entropy(net(images).float(), targets, label_smoothing=recipe.smoothing)

    trainer = Trainer(ctx, model, optimizer, scheduler, loss_fn, recipe.amp, recipe.clip_grad, recipe.seed, compiled)
    effective = engine.effective_settings(recipe, ctx, micro, sync_bn, compiled.mode is not None, lr)
    engine.note_accumulation(log, effective, recipe.batch_size)
    spec = engine.RunSpec(
        args, trainer, train_set, sched, recipe,
        identity={"task": "cls", "model": args.model, "model_settings": settings, "dataset": args.dataset, "data_digest": digest},
        description={"num_classes": len(classes), "class_names": classes, "data_source": data_source},
        evaluate=lambda: evaluate_classification(model, val_set, ctx, EvalOptions(max(1, recipe.eval_batch_size // ctx.world_size), recipe.num_workers, trainer.dtype)),
        metric="top1",
        summary=lambda result: f"val top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} loss {result['loss']:.4f}",
        metrics_extras={"num_classes": len(classes), "steps_per_epoch": sched.steps_per_epoch, "effective": effective},
        eval_every_steps=recipe.eval_every * sched.steps_per_epoch,
        start=start,
    )
    return engine.run_training(spec, ctx, log)
