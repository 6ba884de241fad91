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

from models.factory import build_model, is_external
from models.weights import FORMATS, SUITE_FORMATS, WeightsError, detect_format, load_backbone_weights, read_checkpoint
from reproduce.data import layouts
from reproduce.data.datasets import SEG_DATASETS, SegDatasetInfo, SegmentationDataset, seg_layout, synthetic_seg_scale
from reproduce.data.seg_transforms import IGNORE_INDEX, SegTestTransform, SegTrainTransform
from reproduce.train import compilation, distributed, engine, recipes
from reproduce.train.evaluation import EvalOptions, SegTest, evaluate_segmentation
from reproduce.train.loop import Trainer, make_schedule, optimizer_options, unwrap
from reproduce.train.runlog import Logger

# Backbone drop-path of the official configs (docs/recipes.md#segmentation-fine-tuning); other backbones keep MiT's 0.1.
DROP_PATH = {
    "ade20k": {"hrvit_b1": 0.1, "hrvit_b2": 0.2, "hrvit_b3": 0.3},
    "cityscapes": {"hrvit_b1": 0.15, "hrvit_b2": 0.2, "hrvit_b3": 0.3},
}
DEFAULT_DROP_PATH = 0.1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    engine.add_common_arguments(parser, "finetune", default_dataset="synthetic")
    parser.description = (parser.description or "") + f". Datasets: {', '.join(SEG_DATASETS)}."
    parser.add_argument("--pretrained", type=Path, default=None,
                        help=f"backbone weights: a pretrain run's checkpoint.pt / model.safetensors or a published checkpoint "
                             f"({', '.join(FORMATS)}; README 'Published weights'); heads are dropped. Omit for random init")


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


def with_test_window(recipe: recipes.FinetuneRecipe) -> recipes.FinetuneRecipe:
    """The sliding window a recipe leaves unset: the crop, at 3/4 stride (768 of 1024 on Cityscapes)."""
    test_crop = recipe.test_crop or recipe.crop_size
    return dataclasses.replace(recipe, test_crop=test_crop, test_stride=recipe.test_stride or test_crop * 3 // 4)


def validate(args: argparse.Namespace) -> tuple[recipes.FinetuneRecipe, dict[str, Any], int]:
    """Recipe, model settings and per-rank micro-batch; every check runs before any data is read."""
    if args.dataset not in SEG_DATASETS:
        raise engine.SettingsError(f"finetune --dataset must be one of {', '.join(SEG_DATASETS)}, got {args.dataset!r}")
    if args.dataset != "synthetic" and args.data_root is None:
        raise engine.SettingsError(f"--dataset {args.dataset} needs --data-root")
    recipe = with_test_window(engine.resolve_recipe(profile_defaults(args.profile, args.dataset, args.model), args))
    micro = engine.validate_common(args.model, recipe)
    compilation.check_arguments(args)
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
        raise engine.SettingsError(f"--pretrained {args.pretrained} does not exist (expected a pretrain run's checkpoint.pt or model.safetensors, or a downloaded checkpoint)")
    settings = engine.model_settings(args, recipe.drop_path)
    engine.model_kwargs(args.model, settings)
    if args.pretrained is not None:
        pretrain_run(read_pretrained(args.pretrained, args.model), args.pretrained, args.model, settings)
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


RANDOM_INIT = {"format": "random", "file": None, "sha256": None}


def weights_error(flag: str, err: WeightsError) -> engine.SettingsError:
    """A weights file's error as the command's one-line error (torch's unpickling messages span lines)."""
    return engine.SettingsError(f"{flag} {' '.join(str(err).split())}")


def read_pretrained(path: Path, name: str) -> dict[str, Any]:
    """The ``--pretrained`` file as ``models.weights.read_checkpoint`` returns it, read once per
    command step; a model built outside the suite or an unreadable file fails here."""
    if is_external(name):
        raise engine.SettingsError(f"--pretrained loads suite models only; {name} is built outside the suite, drop --pretrained")
    try:
        checkpoint = read_checkpoint(path)
        detect_format(checkpoint)
    except WeightsError as err:
        raise weights_error("--pretrained", err) from err
    return checkpoint


def pretrain_run(checkpoint: dict[str, Any], path: Path, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What a ``--pretrained`` file says about the run that wrote it: None for published weights (any
    format ``models.weights`` reads); for this suite's own files, the pretrain run, which must be a
    classification run of this model with this run's ablations. ``validate`` calls it so that a wrong
    file fails before any data is touched."""
    if checkpoint.get("format") not in SUITE_FORMATS:
        return None
    if checkpoint.get("task") != "cls":
        raise engine.SettingsError(f"--pretrained {path} is a {checkpoint.get('task')!r} checkpoint; expected a pretrain (classification) run")
    if checkpoint.get("model") != name:
        raise engine.SettingsError(f"--pretrained {path} holds {checkpoint.get('model')}, not {name}")
    model_settings = checkpoint.get("model_settings") or {}
    if sorted(model_settings.get("ablate", [])) != sorted(settings.get("ablate", [])):
        raise engine.SettingsError(f"--pretrained {path} was trained with --ablate {model_settings.get('ablate')}, this run uses {settings.get('ablate')}")
    return {"keys": list(checkpoint["model_state"]), "pretrain_profile": checkpoint.get("profile"),
            "pretrain_window_sizes": model_settings.get("window_sizes")}


def load_pretrained_backbone(model: nn.Module, path: Path, name: str, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load ``path`` into ``model.backbone`` through ``models.weights`` (every accepted format; no
    partial loads) and return the run's ``init`` record ``{format, file, sha256}`` and, for a suite
    pretrain run, the ``pretrained`` record (path, tensors loaded, model tensors left at init
    (``missing``), the classifier tensors dropped, the pretrain profile and window sizes)."""
    checkpoint = read_pretrained(path, name)
    run = pretrain_run(checkpoint, path, name, settings)
    try:
        record = load_backbone_weights(model, path, name, checkpoint=checkpoint)
    except WeightsError as err:
        raise weights_error("--pretrained", err) from err
    init = {key: record[key] for key in ("format", "file", "sha256")}
    if run is None:
        return init, None
    backbone = {key.removeprefix("model.") for key in model.backbone.state_dict()}  # timm's feature wrapper prefix
    pretrained = {
        "path": str(path), "loaded": record["loaded"], "missing": record["kept_init"],
        "shape_mismatch": [],  # kept for older readers: a mismatched tensor now fails the load
        "dropped": sorted(key for key in run.pop("keys") if key not in backbone), **run,
    }
    return init, pretrained


def run(args: argparse.Namespace) -> int:
    return engine.launch(args, validate, _train)


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr_mult: float) -> list[dict[str, Any]]:
    """mmseg paramwise_cfg of the SegFormer/HRViT configs: ``head`` lr x ``head_lr_mult``; no weight
    decay on the parameters its ``norm`` key matches, which in these backbones are the LayerNorms
    (BatchNorm and biases keep the decay, docs/recipes.md#segmentation-fine-tuning)."""
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
    # The model and its weights come first, so that a file that does not fit fails before any data is
    # made or indexed (the data is generated from its own seeds: the order leaves every number unchanged).
    engine.seed_everything(recipe.seed)
    model = build_model(args.model, "seg", num_classes=info.num_classes, **engine.model_kwargs(args.model, settings))
    init, pretrained = load_pretrained_backbone(model, args.pretrained, args.model, settings) if args.pretrained else (RANDOM_INIT, None)
    if args.pretrained:
        log.line(f"backbone initialised from {args.pretrained} ({init['format']}, sha256 {init['sha256'][:12]})")
    root = data_root(args, recipe, ctx)
    samples, digest = index_data(ctx, args.dataset, root, args.output)
    train_set, val_set = build_dataset(args.dataset, samples["train"], recipe, True), build_dataset(args.dataset, samples["val"], recipe, False)
    data_source = "generated" if args.dataset == "synthetic" else str(root)
    log.line(f"{args.model} on {args.dataset} ({data_source}): {len(train_set)} train / {len(val_set)} val images, {info.num_classes} classes, world {ctx.world_size}")
    sync_bn = engine.use_sync_bn(recipe, ctx)
    compiled = compilation.prepare(args.compile, args.compile_mode, args.profile, ctx.device, sync_bn, recipe.accum_steps, args.output, log.line)
    model = engine.wrap_model(model, ctx, sync_bn, compiled.mode)
    lr = engine.effective_lr(recipe, info.paper_batch)
    optimizer = create_optimizer_v2(param_groups(unwrap(model), lr, recipe.weight_decay, recipe.head_lr_mult), opt="adamw", lr=lr, weight_decay=recipe.weight_decay, **optimizer_options(ctx.device))
    scheduler = PolyLRScheduler(
        optimizer, t_initial=recipe.iters, power=recipe.poly_power, lr_min=recipe.min_lr,
        warmup_t=recipe.warmup_iters, warmup_lr_init=lr * recipe.warmup_ratio, t_in_epochs=False,
    )
    sched = make_schedule(ctx, len(train_set), micro, recipe.accum_steps, total_steps=recipe.iters)

    def loss_fn(net, batch):
        images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
        logits = F.interpolate(net(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

    trainer = Trainer(ctx, model, optimizer, scheduler, loss_fn, recipe.amp, None, recipe.seed, compiled)
    effective = engine.effective_settings(recipe, ctx, micro, sync_bn, compiled.mode is not None, lr)
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
        metrics_extras={"num_classes": info.num_classes, "init": init, "pretrained": pretrained, "effective": effective},
        eval_every_steps=recipe.eval_every,
        start=start,
    )
    return engine.run_training(spec, ctx, log)
