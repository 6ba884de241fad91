"""``python -m reproduce finetune``: semantic-segmentation fine-tuning with the SegFormer head.

The paper profile is the official SegFormer/HRViT mmseg recipe (``recipes.FinetuneRecipe``): AdamW
6e-5, weight decay 0.01 except on LayerNorm parameters, head lr x10, poly (power 1) with a
1500-iteration linear warm-up over 160k iterations, Cityscapes 1024 crops / batch 8 with
sliding-window test (stride 768), ADE20K 512 crops / batch 16 with whole-image test.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler
from torch import nn

from models.factory import build_model
from reproduce.data import layouts
from reproduce.data.datasets import SEG_DATASETS, SegDatasetInfo, SegmentationDataset, seg_layout, synthetic_seg_scale
from reproduce.data.seg_transforms import IGNORE_INDEX, SegTestTransform, SegTrainTransform
from reproduce.train import distributed, engine, recipes
from reproduce.train.checkpointing import load_run_state
from reproduce.train.evaluation import EvalOptions, SegTest, evaluate_segmentation
from reproduce.train.loop import Trainer, make_schedule, unwrap
from reproduce.train.runlog import Logger

# Backbone drop-path of the official configs (hrvit.md §3.2); other backbones keep MiT's 0.1.
DROP_PATH = {
    "ade20k": {"hrvit_b1": 0.1, "hrvit_b2": 0.2, "hrvit_b3": 0.3},
    "cityscapes": {"hrvit_b1": 0.15, "hrvit_b2": 0.2, "hrvit_b3": 0.3},
}
DEFAULT_DROP_PATH = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    engine.add_common_arguments(parser, "finetune", default_dataset="synthetic")
    parser.description = (parser.description or "") + f". Datasets: {', '.join(SEG_DATASETS)}."
    parser.add_argument("--pretrained", type=Path, default=None, help="checkpoint.pt or model.safetensors of a pretrain run (backbone weights; head dropped). Omit for random init")


def dataset_scale(info: SegDatasetInfo, crop: int) -> tuple[int, int]:
    """Nominal (w, h) resize scale; generated scenes are made at the crop height."""
    return info.scale if info.scale is not None else synthetic_seg_scale(crop)


def profile_defaults(profile: str, dataset: str, model: str) -> recipes.FinetuneRecipe:
    """The profile's recipe with what it leaves to the dataset (crop, batch, test mode) and the model (drop-path)."""
    info = SEG_DATASETS[dataset]
    recipe = recipes.profile_recipe("finetune", profile)
    return dataclasses.replace(
        recipe, crop_size=recipe.crop_size or info.paper_crop or 64, batch_size=recipe.batch_size or info.paper_batch,
        test_mode=info.test_mode, drop_path=DROP_PATH.get(dataset, DROP_PATH["cityscapes"]).get(model, DEFAULT_DROP_PATH),
    )


def validate(args: argparse.Namespace) -> tuple[recipes.FinetuneRecipe, dict[str, Any], int]:
    """Recipe, model settings and per-rank micro-batch; every check runs before any data is read."""
    if args.dataset not in SEG_DATASETS:
        raise engine.SettingsError(f"finetune --dataset must be one of {', '.join(SEG_DATASETS)}, got {args.dataset!r}")
    if args.dataset != "synthetic" and args.data_root is None:
        raise engine.SettingsError(f"--dataset {args.dataset} needs --data-root")
    recipe = engine.resolve_recipe(profile_defaults(args.profile, args.dataset, args.model), args)
    test_crop = recipe.test_crop or recipe.crop_size
    recipe = dataclasses.replace(recipe, test_crop=test_crop, test_stride=recipe.test_stride or test_crop * 3 // 4)
    micro = engine.validate_common(args.model, recipe)
    engine.check_multiple_of_32("--crop-size", recipe.crop_size)
    engine.check_multiple_of_32("--test-crop", recipe.test_crop)
    if not 0 < recipe.test_stride <= recipe.test_crop:
        raise engine.SettingsError(f"--test-stride must be in 1..test crop ({recipe.test_crop}), got {recipe.test_stride}")
    scale = dataset_scale(SEG_DATASETS[args.dataset], recipe.crop_size)
    for flag, size in (("--crop-size", recipe.crop_size), ("--test-crop", recipe.test_crop)):
        if size > min(scale):
            raise engine.SettingsError(
                f"{flag} {size} is larger than {args.dataset}'s images at the pipeline scale {scale[0]}x{scale[1]} "
                f"(short side {min(scale)}); use at most {min(scale)}"
            )
    if args.dataset != "synthetic" and not args.data_root.is_dir():
        raise engine.SettingsError(f"--data-root {args.data_root} does not exist (expected the {args.dataset} root)")
    if args.pretrained is not None and not args.pretrained.is_file():
        raise engine.SettingsError(f"--pretrained {args.pretrained} does not exist (expected a pretrain run's checkpoint.pt or model.safetensors)")
    settings = engine.model_settings(args, recipe.drop_path)
    engine.model_kwargs(args.model, settings)
    return recipe, settings, micro


def data_root(args: argparse.Namespace, recipe: recipes.FinetuneRecipe, ctx: distributed.DistContext) -> Path:
    return engine.dataset_root(args, ctx, "seg", (recipe.seed, recipe.synthetic_size, recipe.crop_size))


def index_data(ctx: distributed.DistContext, name: str, root: Path, cache: Path) -> tuple[dict[str, list], str]:
    """The train/val samples of dataset ``name`` (validated layout, indexed once and cached in ``cache``) and the data digest."""
    folders = SEG_DATASETS[name].splits
    index = engine.data_index(ctx, seg_layout(name), root, folders, cache)
    return {split: layouts.seg_samples(index, root, folder) for split, folder in zip(("train", "val"), folders)}, index["digest"]


def build_dataset(name: str, samples: list, recipe: recipes.FinetuneRecipe, augment: bool) -> SegmentationDataset:
    """One split's samples with the training pipeline (``augment``) or the test-time resize."""
    scale = dataset_scale(SEG_DATASETS[name], recipe.crop_size)
    if augment:
        transform = SegTrainTransform(scale, recipe.crop_size, tuple(recipe.ratio_range), recipe.cat_max_ratio, recipe.flip_prob, recipe.photometric)
    else:
        transform = SegTestTransform(scale, align=32 if recipe.test_mode == "whole" else 1)
    return SegmentationDataset(samples, transform)


def load_pretrained_backbone(model: nn.Module, path: Path, name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Copy a pretrain checkpoint's weights into ``model.backbone``; the classifier head is dropped.

    Keys are matched after removing feature-wrapper prefixes (timm's ``model.``) and treating '_'
    and '.' alike (timm's flattened feature modules); what did not match is reported. This is the
    one place that reads pretrained weights."""
    try:
        state = load_run_state(path)
    except ValueError as err:
        raise engine.SettingsError(f"--pretrained {err}") from err
    if state.get("task") != "cls":
        raise engine.SettingsError(f"--pretrained {path} is a {state.get('task')!r} checkpoint; expected a pretrain (classification) run")
    if state["model"] != name:
        raise engine.SettingsError(f"--pretrained {path} holds {state['model']}, not {name}")
    if sorted(state["model_settings"].get("ablate", [])) != sorted(settings.get("ablate", [])):
        raise engine.SettingsError(f"--pretrained {path} was trained with --ablate {state['model_settings'].get('ablate')}, this run uses {settings.get('ablate')}")

    def norm(key: str) -> str:
        return key.removeprefix("model.").replace("_", ".")

    source: dict[str, list[str]] = {}
    for key in state["model_state"]:
        source.setdefault(norm(key), []).append(key)
    target = model.backbone.state_dict()
    loaded, missing, mismatched, used = {}, [], [], set()
    for key, value in target.items():
        candidates = source.get(norm(key), [])
        if len(candidates) != 1:
            missing.append(key)
            continue
        tensor = state["model_state"][candidates[0]]
        if tensor.shape != value.shape:
            mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {tuple(value.shape)}")
            continue
        loaded[key] = tensor
        used.add(candidates[0])
    if not loaded:
        raise engine.SettingsError(f"--pretrained {path}: no parameter matched the {name} backbone; is it a checkpoint of this model?")
    model.backbone.load_state_dict(loaded, strict=False)
    dropped = sorted(k for k in state["model_state"] if k not in used)
    return {
        "path": str(path), "loaded": len(loaded), "missing": missing, "shape_mismatch": mismatched,
        "dropped": dropped, "pretrain_profile": state.get("profile"), "pretrain_window_sizes": state["model_settings"].get("window_sizes"),
    }


def run(args: argparse.Namespace) -> int:
    return engine.launch(args, validate, _train)


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """mmseg paramwise_cfg of the SegFormer/HRViT configs: ``head`` lr x ``head_lr_mult``; no weight
    decay on the parameters its ``norm`` key matches, which in these backbones are the LayerNorms
    (BatchNorm and biases keep the decay, hrvit.md §3.2)."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.GroupNorm)) for p in m.parameters(recurse=False)}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for pname, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((pname.startswith("decode_head."), id(p) in no_decay), []).append(p)
    return [
        {"params": ps, "lr": lr * (head_lr_mult if head else 1.0), "weight_decay": 0.0 if nd else weight_decay}
        for (head, nd), ps in sorted(groups.items())
    ]


def _train(args, recipe, settings, micro, ctx, start) -> int:
    log = Logger(ctx, "finetune")
    engine.configure_determinism(recipe.deterministic)
    engine.configure_threads(recipe.threads)
    info = SEG_DATASETS[args.dataset]
    root = data_root(args, recipe, ctx)
    samples, digest = index_data(ctx, args.dataset, root, args.output)
    train_set, val_set = build_dataset(args.dataset, samples["train"], recipe, True), build_dataset(args.dataset, samples["val"], recipe, False)
    data_source = "generated" if args.dataset == "synthetic" else str(root)
    log.line(f"{args.model} on {args.dataset} ({data_source}): {len(train_set)} train / {len(val_set)} val images, {info.num_classes} classes, world {ctx.world_size}")

    engine.seed_everything(recipe.seed)
    model = build_model(args.model, "seg", num_classes=info.num_classes, **engine.model_kwargs(args.model, settings))
    pretrained = load_pretrained_backbone(model, args.pretrained, args.model, settings) if args.pretrained else None
    if pretrained:
        log.line(f"pretrained backbone from {args.pretrained}: {pretrained['loaded']} tensors loaded, {len(pretrained['missing'])} missing, "
                 f"{len(pretrained['shape_mismatch'])} shape mismatches, {len(pretrained['dropped'])} dropped (classifier head)")
        for line in pretrained["missing"][:10] + pretrained["shape_mismatch"][:10]:
            log.line(f"  not loaded: {line}")
    sync_bn = engine.use_sync_bn(recipe, ctx)
    model = engine.wrap_model(model, ctx, sync_bn, args.compile)
    lr = engine.effective_lr(recipe, info.paper_batch)
    optimizer = create_optimizer_v2(param_groups(unwrap(model), lr, recipe.weight_decay, recipe.head_lr_mult), opt="adamw", lr=lr, weight_decay=recipe.weight_decay)
    scheduler = PolyLRScheduler(
        optimizer, t_initial=recipe.iters, power=recipe.poly_power, lr_min=recipe.min_lr,
        warmup_t=recipe.warmup_iters, warmup_lr_init=lr * recipe.warmup_ratio, t_in_epochs=False,
    )
    sched = make_schedule(ctx, len(train_set), micro, recipe.accum_steps, total_steps=recipe.iters)

    def loss_fn(net, batch):
        images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        logits = F.interpolate(net(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    trainer = Trainer(ctx, model, optimizer, scheduler, loss_fn, recipe.amp, None, recipe.seed)
    effective = engine.effective_settings(recipe, ctx, micro, sync_bn, args.compile, lr)
    engine.note_accumulation(log, effective, recipe.batch_size)
    test = SegTest(recipe.test_mode, recipe.test_crop, recipe.test_stride)
    spec = engine.RunSpec(
        args, trainer, train_set, sched, recipe,
        identity={"task": "seg", "model": args.model, "model_settings": settings, "dataset": args.dataset, "data_digest": digest,
                  "pretrained": str(args.pretrained) if args.pretrained else None},
        description={"num_classes": info.num_classes, "class_names": list(info.class_names), "data_source": data_source},
        evaluate=lambda: evaluate_segmentation(model, val_set, ctx, info.class_names, test, EvalOptions(recipe.eval_batch_size, recipe.num_workers, trainer.dtype)),
        metric="miou",
        summary=lambda result: f"val mIoU {100 * result['miou']:.2f} pixel acc {100 * result['pixel_accuracy']:.2f} ({result['classes_scored']} classes scored)",
        metrics_extras={"num_classes": info.num_classes, "init": "pretrained" if pretrained else "random", "pretrained": pretrained, "effective": effective},
        eval_every_steps=recipe.eval_every,
        start=start,
    )
    return engine.run_training(spec, ctx, log)
