"""Training tasks: what differs between ImageNet-layout classification and semantic segmentation.

A task owns its recipe defaults, command-line checks, datasets, model construction, optimizer and
schedule, loss and evaluation; :func:`reproduce.train.engine.fit` runs any task (set-up, loop,
checkpoints, logging, preemption), and ``evaluate`` scores a task's model. A new task (detection, or a
user's own) is one more :class:`Task` subclass with a recipe dataclass in ``reproduce.recipes``.

- :data:`CLASSIFICATION`: the official HRViT/DeiT pretraining recipe from timm's pieces
  (``create_transform`` with RandAugment and random erasing, ``Mixup`` with label smoothing,
  ``SoftTargetCrossEntropy``, ``create_optimizer_v2`` (AdamW, no decay on 1-D parameters),
  ``create_scheduler_v2`` (cosine with warm-up and cool-down, stepped per epoch)).
- :data:`SEGMENTATION`: the official SegFormer/HRViT mmseg fine-tuning recipe (AdamW, no decay on
  LayerNorm parameters, head lr x10, poly (power 1) with a 1500-iteration linear warm-up over 160k
  iterations, Cityscapes 1024 crops / batch 8 with sliding-window test (stride 768), ADE20K 512
  crops / batch 16 with whole-image test), the backbone optionally from ``--pretrained`` weights.
"""
from __future__ import annotations

import argparse
import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import PolyLRScheduler, create_scheduler_v2
from torch import nn
from torch.utils.data import Dataset

from models.factory import build_model, is_external
from models.weights import FORMATS, SUITE_FORMATS, WeightsError, detect_format, load_backbone_weights, read_checkpoint
from reproduce import recipes
from reproduce.data import layouts
from reproduce.data.datasets import SEG_DATASETS, seg_layout
from reproduce.data.pipelines import classification_set, segmentation_scale, segmentation_set
from reproduce.data.seg_transforms import IGNORE_INDEX
from reproduce.errors import SettingsError
from reproduce.train import common
from reproduce.train.distributed import DistContext
from reproduce.train.evaluation import EvalOptions, SegTest, evaluate_classification, evaluate_segmentation
from reproduce.train.loop import Schedule, make_schedule
from reproduce.train.runlog import Logger

LossFn = Callable[[nn.Module, Any], torch.Tensor]


@dataclass(frozen=True)
class Data:
    """A dataset as a task reads it: root, class names, the train/val samples and the data digest."""

    name: str
    root: Path
    class_names: list[str]
    samples: dict[str, list]
    digest: str

    @property
    def source(self) -> str:
        """What metrics.json and the weights file record as the data's origin."""
        return "generated" if self.name == "synthetic" else str(self.root)


@dataclass
class Prepared:
    """What a task sets up for :func:`engine.fit` before the model is wrapped: the (unwrapped) model,
    the data and datasets, the run identity keys and metrics.json keys that are the task's own."""

    model: nn.Module
    data: Data
    train_set: Dataset
    val_set: Dataset
    identity: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """The interface :func:`engine.fit` and ``evaluate`` run. ``command`` names the CLI subcommand and
    the recipe kind, ``task`` the value checkpoints record, ``metric`` what best.pt maximises."""

    command: str
    task: str
    metric: str
    datasets: tuple[str, ...]
    default_dataset: str | None = None

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        common.add_common_arguments(parser, self.command, self.default_dataset)

    def recipe(self, profile: str, dataset: str, model: str, overrides: dict[str, Any] | None = None) -> recipes.CommonRecipe:
        """The recipe ``profile`` resolves for ``model`` on ``dataset`` with ``overrides`` laid over it."""
        return recipes.resolve(recipes.profile_recipe(self.command, profile), overrides or {})

    @abstractmethod
    def validate(self, args: argparse.Namespace) -> tuple[recipes.CommonRecipe, dict[str, Any], int]:
        """Recipe, model settings and per-rank micro-batch; every check runs before any data is read."""

    @abstractmethod
    def load_data(self, name: str, data_root: Path | None, recipe: recipes.CommonRecipe, ctx: DistContext, cache: Path) -> Data:
        """Dataset ``name`` (generated when ``synthetic``), validated, indexed once and cached in ``cache``."""

    @abstractmethod
    def dataset(self, data: Data, split: str, recipe: recipes.CommonRecipe, augment: bool) -> Dataset:
        """One split of ``data`` with the training pipeline (``augment``) or the test-time transform."""

    def training_data(self, args: argparse.Namespace, recipe: recipes.CommonRecipe, ctx: DistContext, log: Logger) -> tuple[Data, Dataset, Dataset]:
        """The run's data with its training (augmented) and validation sets, described in one log line."""
        data = self.load_data(args.dataset, args.data_root, recipe, ctx, args.output)
        train_set, val_set = self.dataset(data, "train", recipe, True), self.dataset(data, "val", recipe, False)
        log.line(f"{args.model} on {args.dataset} ({data.source}): {len(train_set)} train / {len(val_set)} val images, "
                 f"{len(data.class_names)} classes, world {ctx.world_size}")
        return data, train_set, val_set

    @abstractmethod
    def prepare(self, args: argparse.Namespace, recipe: recipes.CommonRecipe, settings: dict[str, Any], ctx: DistContext, log: Logger) -> Prepared:
        """The model (seeded, with any initial weights) and the data of a run, in the order the task needs."""

    @abstractmethod
    def paper_batch(self, dataset: str) -> int:
        """The global batch the paper's learning rate is given at (``--lr-scale linear`` scales from it)."""

    @abstractmethod
    def optimizer(self, model: nn.Module, recipe: recipes.CommonRecipe, lr: float, **implementation: Any) -> torch.optim.Optimizer:
        """The optimizer over ``model``'s parameters at base learning rate ``lr``; ``implementation``
        (``loop.optimizer_options``) says how it computes the step, e.g. fused on a GPU."""

    @abstractmethod
    def schedule(self, ctx: DistContext, train_len: int, micro: int, recipe: recipes.CommonRecipe) -> Schedule:
        """The run laid out in optimizer steps."""

    @abstractmethod
    def scheduler(self, optimizer: torch.optim.Optimizer, recipe: recipes.CommonRecipe, sched: Schedule, lr: float) -> Any:
        """A timm scheduler: ``step(epoch)`` and ``step_update(num_updates)``."""

    @abstractmethod
    def loss(self, recipe: recipes.CommonRecipe, ctx: DistContext, num_classes: int) -> LossFn:
        """``loss_fn(model, batch)``: a micro-batch's loss, the batch moved to the rank's device."""

    @abstractmethod
    def eval_every_steps(self, recipe: recipes.CommonRecipe, sched: Schedule) -> int:
        """Optimizer steps between periodic evaluations (0: only the final one)."""

    @abstractmethod
    def eval_batch(self, recipe: recipes.CommonRecipe, ctx: DistContext) -> int:
        """Images (classification) or sliding windows (segmentation) per forward pass on each rank."""

    @abstractmethod
    def score(self, model: nn.Module, dataset: Dataset, ctx: DistContext, class_names: list[str], test_recipe: recipes.CommonRecipe,
              options: EvalOptions) -> dict[str, Any]:
        """The task's metrics of ``model`` on the whole of ``dataset`` (every rank scores a shard)."""

    @abstractmethod
    def summary(self, result: dict[str, Any]) -> str:
        """The evaluation's log line."""

    def fit_summary(self, result: dict[str, Any]) -> str:
        """The log line of an evaluation during training."""
        return f"val {self.summary(result)}"

    def check_data_root(self, dataset: str, data_root: Path | None) -> None:
        if dataset != "synthetic" and data_root is None:
            raise SettingsError(f"--dataset {dataset} needs --data-root")


# --------------------------------------------------------------------------- classification


class Classification(Task):
    command, task, metric = "pretrain", "cls", "top1"
    datasets = ("synthetic", "imagenet")

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.description = (parser.description or "") + f". Datasets: {', '.join(self.datasets)} (default: synthetic for smoke, imagenet for paper)."

    def validate(self, args: argparse.Namespace) -> tuple[recipes.PretrainRecipe, dict[str, Any], int]:
        recipe = self.recipe(args.profile, args.dataset, args.model, recipes.overrides_from_args(args, self.command))
        args.dataset = args.dataset or ("imagenet" if args.profile == "paper" else "synthetic")
        if args.dataset not in self.datasets:
            raise SettingsError(f"pretrain --dataset must be one of {', '.join(self.datasets)}, got {args.dataset!r}")
        if args.dataset == "imagenet" and args.data_root is None:
            raise SettingsError("--dataset imagenet needs --data-root (the folder holding train/ and val/)")
        if args.dataset == "imagenet" and not args.data_root.is_dir():
            raise SettingsError(f"--data-root {args.data_root} does not exist (expected the folder holding train/ and val/)")
        micro = common.validate_common(args.model, recipe)
        common.check_multiple_of_32("--image-size", recipe.image_size)
        if (recipe.mixup > 0 or recipe.cutmix > 0) and micro % 2:
            raise SettingsError(f"Mixup/CutMix in batch mode needs an even per-rank micro-batch, got {micro}")
        settings = common.model_settings(args, recipe.drop_path)
        common.model_kwargs(args.model, settings)  # rejects HRViT-only options on other models
        if args.dataset == "synthetic" and not recipe.synthetic_size:
            raise SettingsError("--synthetic-size must be >= 1")
        return recipe, settings, micro

    def load_data(self, name: str, data_root: Path | None, recipe: recipes.PretrainRecipe, ctx: DistContext, cache: Path) -> Data:
        root = common.dataset_root(name, data_root, ctx, "cls", (recipe.seed, recipe.synthetic_size, recipe.image_size))
        index = common.data_index(ctx, "imagenet", root, ("train", "val"), cache)
        classes, train = layouts.class_samples(index, root, "train")
        return Data(name, root, classes, {"train": train, "val": layouts.class_samples(index, root, "val")[1]}, index["digest"])

    def dataset(self, data: Data, split: str, recipe: recipes.PretrainRecipe, augment: bool) -> Dataset:
        return classification_set(data.samples[split], recipe, augment)

    def prepare(self, args: argparse.Namespace, recipe: recipes.PretrainRecipe, settings: dict[str, Any], ctx: DistContext, log: Logger) -> Prepared:
        data, train_set, val_set = self.training_data(args, recipe, ctx, log)
        common.seed_everything(recipe.seed)  # identical initial weights on every rank
        model = build_model(args.model, "cls", num_classes=len(data.class_names), drop_rate=recipe.head_drop, **common.model_kwargs(args.model, settings))
        return Prepared(model, data, train_set, val_set)

    def paper_batch(self, dataset: str) -> int:
        return recipes.PretrainRecipe().batch_size

    def optimizer(self, model: nn.Module, recipe: recipes.PretrainRecipe, lr: float, **implementation: Any) -> torch.optim.Optimizer:
        return create_optimizer_v2(model, opt="adamw", lr=lr, weight_decay=recipe.weight_decay, **implementation)

    def schedule(self, ctx: DistContext, train_len: int, micro: int, recipe: recipes.PretrainRecipe) -> Schedule:
        return make_schedule(ctx, train_len, micro, recipe.accum_steps, epochs=recipe.epochs + recipe.cooldown_epochs)

    def scheduler(self, optimizer: torch.optim.Optimizer, recipe: recipes.PretrainRecipe, sched: Schedule, lr: float) -> Any:
        scheduler, total_epochs = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=recipe.epochs, warmup_epochs=recipe.warmup_epochs, warmup_lr=recipe.warmup_lr,
            min_lr=recipe.min_lr, cooldown_epochs=recipe.cooldown_epochs, updates_per_epoch=sched.steps_per_epoch,
        )
        assert total_epochs * sched.steps_per_epoch == sched.total_steps
        return scheduler

    def loss(self, recipe: recipes.PretrainRecipe, ctx: DistContext, num_classes: int) -> LossFn:
        """Soft-target cross-entropy on Mixup/CutMix batches (label smoothing inside Mixup), else
        cross-entropy with label smoothing."""
        mixup = None
        if recipe.mixup > 0 or recipe.cutmix > 0:
            mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=1.0, switch_prob=0.5, mode="batch",
                          label_smoothing=recipe.smoothing, num_classes=num_classes)
        soft_ce = SoftTargetCrossEntropy()

        def loss_fn(net: nn.Module, batch: Any) -> torch.Tensor:
            images, targets = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
            if mixup is not None:
                images, soft = mixup(images, targets)
                return soft_ce(net(images).float(), soft)
            return F.cross_entropy(net(images).float(), targets, label_smoothing=recipe.smoothing)

        return loss_fn

    def eval_every_steps(self, recipe: recipes.PretrainRecipe, sched: Schedule) -> int:
        return recipe.eval_every * sched.steps_per_epoch

    def eval_batch(self, recipe: recipes.PretrainRecipe, ctx: DistContext) -> int:
        """``--eval-batch-size`` is global: each rank scores its share."""
        return max(1, recipe.eval_batch_size // ctx.world_size)

    def score(self, model: nn.Module, dataset: Dataset, ctx: DistContext, class_names: list[str], test_recipe: recipes.PretrainRecipe,
              options: EvalOptions) -> dict[str, Any]:
        return evaluate_classification(model, dataset, ctx, options)

    def summary(self, result: dict[str, Any]) -> str:
        return f"top-1 {result['top1']:.2f} top-5 {result['top5']:.2f} loss {result['loss']:.4f}"


# --------------------------------------------------------------------------- segmentation

# Backbone drop-path of the official configs (docs/recipes.md#segmentation-fine-tuning); other backbones keep MiT's 0.1.
DROP_PATH = {
    "ade20k": {"hrvit_b1": 0.1, "hrvit_b2": 0.2, "hrvit_b3": 0.3},
    "cityscapes": {"hrvit_b1": 0.15, "hrvit_b2": 0.2, "hrvit_b3": 0.3},
}
DEFAULT_DROP_PATH = 0.1
RANDOM_INIT = {"format": "random", "file": None, "sha256": None}


def weights_error(flag: str, err: WeightsError) -> SettingsError:
    """A weights file's error as the command's one-line error (torch's unpickling messages span lines)."""
    return SettingsError(f"{flag} {' '.join(str(err).split())}")


def read_pretrained(path: Path, name: str) -> dict[str, Any]:
    """The ``--pretrained`` file as ``models.weights.read_checkpoint`` returns it, read once per
    command step; a model built outside the suite or an unreadable file fails here."""
    if is_external(name):
        raise SettingsError(f"--pretrained loads suite models only; {name} is built outside the suite, drop --pretrained")
    try:
        checkpoint = read_checkpoint(path)
        detect_format(checkpoint)
    except WeightsError as err:
        raise weights_error("--pretrained", err) from err
    return checkpoint


def pretrain_run(checkpoint: dict[str, Any], path: Path, name: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """What a ``--pretrained`` file says about the run that wrote it: None for published weights (any
    format ``models.weights`` reads); for this suite's own files, the run that wrote it (a pretrain run,
    or a fine-tuning run whose backbone is taken), which must be of this model with this run's
    ablations. Validation calls it so that a wrong file fails before any data is touched."""
    if checkpoint.get("format") not in SUITE_FORMATS:
        return None
    if checkpoint.get("task") not in ("cls", "seg"):
        raise SettingsError(f"--pretrained {path} is a {checkpoint.get('task')!r} checkpoint; expected a pretrain or finetune run")
    if checkpoint.get("model") != name:
        raise SettingsError(f"--pretrained {path} holds {checkpoint.get('model')}, not {name}")
    model_settings = checkpoint.get("model_settings") or {}
    if sorted(model_settings.get("ablate", [])) != sorted(settings.get("ablate", [])):
        raise SettingsError(f"--pretrained {path} was trained with --ablate {model_settings.get('ablate')}, this run uses {settings.get('ablate')}")
    return {"keys": list(checkpoint["model_state"]), "source_task": checkpoint["task"], "pretrain_profile": checkpoint.get("profile"),
            "pretrain_window_sizes": model_settings.get("window_sizes")}


def load_pretrained_backbone(model: nn.Module, path: Path, name: str, settings: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Load ``path`` into ``model.backbone`` through ``models.weights`` (every accepted format; no
    partial loads) and return the run's ``init`` record ``{format, file, sha256}`` and, for a suite
    pretrain run, the ``pretrained`` record (path, tensors loaded, model tensors left at init
    (``missing``), the classifier or decode-head tensors dropped, the source run's task, profile and
    window sizes)."""
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
        "shape_mismatch": [],  # read by older tools; a mismatched tensor fails the load
        "dropped": sorted(key for key in run.pop("keys") if key.removeprefix("backbone.").removeprefix("model.") not in backbone),
        **run,
    }
    return init, pretrained


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


class Segmentation(Task):
    command, task, metric = "finetune", "seg", "miou"
    datasets = tuple(SEG_DATASETS)
    default_dataset = "synthetic"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        super().add_arguments(parser)
        parser.description = (parser.description or "") + f". Datasets: {', '.join(self.datasets)}."
        parser.add_argument("--pretrained", type=Path, default=None,
                            help=f"backbone weights: a pretrain or finetune run's checkpoint.pt / model.safetensors or a published checkpoint "
                                 f"({', '.join(FORMATS)}; README 'Published weights'); heads are dropped. Omit for random init")

    def recipe(self, profile: str, dataset: str, model: str, overrides: dict[str, Any] | None = None) -> recipes.FinetuneRecipe:
        """The profile's recipe with what it leaves to the dataset (crop, batch, test mode) and the model
        (drop-path), the overrides, then the sliding window the recipe leaves unset: the crop, at 3/4
        stride (768 of 1024 on Cityscapes)."""
        info = SEG_DATASETS[dataset]
        base = recipes.profile_recipe(self.command, profile)
        base = dataclasses.replace(
            base, crop_size=base.crop_size or info.paper_crop or 64, batch_size=base.batch_size or info.paper_batch,
            test_mode=info.test_mode, drop_path=DROP_PATH.get(dataset, DROP_PATH["cityscapes"]).get(model, DEFAULT_DROP_PATH),
        )
        recipe = recipes.resolve(base, overrides or {})
        test_crop = recipe.test_crop or recipe.crop_size
        return dataclasses.replace(recipe, test_crop=test_crop, test_stride=recipe.test_stride or test_crop * 3 // 4)

    def validate(self, args: argparse.Namespace) -> tuple[recipes.FinetuneRecipe, dict[str, Any], int]:
        if args.dataset not in self.datasets:
            raise SettingsError(f"finetune --dataset must be one of {', '.join(self.datasets)}, got {args.dataset!r}")
        self.check_data_root(args.dataset, args.data_root)
        recipe = self.recipe(args.profile, args.dataset, args.model, recipes.overrides_from_args(args, self.command))
        micro = common.validate_common(args.model, recipe)
        common.check_multiple_of_32("--crop-size", recipe.crop_size)
        common.check_multiple_of_32("--test-crop", recipe.test_crop)
        if not 0 < recipe.test_stride <= recipe.test_crop:
            raise SettingsError(f"--test-stride must be in 1..test crop ({recipe.test_crop}), got {recipe.test_stride}")
        scale = segmentation_scale(args.dataset, recipe.crop_size)
        for flag, size in (("--crop-size", recipe.crop_size), ("--test-crop", recipe.test_crop)):
            if size > min(scale):
                raise SettingsError(
                    f"{flag} {size} is larger than {args.dataset}'s images at the pipeline scale {scale[0]}x{scale[1]} "
                    f"(short side {min(scale)}); use at most {min(scale)}"
                )
        if args.dataset != "synthetic" and not args.data_root.is_dir():
            raise SettingsError(f"--data-root {args.data_root} does not exist (expected the {args.dataset} root)")
        if args.pretrained is not None and not args.pretrained.is_file():
            raise SettingsError(f"--pretrained {args.pretrained} does not exist (expected a run's checkpoint.pt or model.safetensors, or a downloaded checkpoint)")
        settings = common.model_settings(args, recipe.drop_path)
        common.model_kwargs(args.model, settings)
        if args.pretrained is not None:
            pretrain_run(read_pretrained(args.pretrained, args.model), args.pretrained, args.model, settings)
        return recipe, settings, micro

    def load_data(self, name: str, data_root: Path | None, recipe: recipes.FinetuneRecipe, ctx: DistContext, cache: Path) -> Data:
        root = common.dataset_root(name, data_root, ctx, "seg", (recipe.seed, recipe.synthetic_size, recipe.crop_size))
        info = SEG_DATASETS[name]
        index = common.data_index(ctx, seg_layout(name), root, info.splits, cache)
        samples = {split: layouts.seg_samples(index, root, folder) for split, folder in zip(("train", "val"), info.splits)}
        return Data(name, root, list(info.class_names), samples, index["digest"])

    def dataset(self, data: Data, split: str, recipe: recipes.FinetuneRecipe, augment: bool) -> Dataset:
        return segmentation_set(data.name, data.samples[split], recipe, augment)

    def prepare(self, args: argparse.Namespace, recipe: recipes.FinetuneRecipe, settings: dict[str, Any], ctx: DistContext, log: Logger) -> Prepared:
        # The model and its weights come first, so that a file that does not fit fails before any data is
        # made or indexed (the data is generated from its own seeds: the order leaves every number unchanged).
        common.seed_everything(recipe.seed)
        num_classes = SEG_DATASETS[args.dataset].num_classes
        model = build_model(args.model, "seg", num_classes=num_classes, **common.model_kwargs(args.model, settings))
        init, pretrained = load_pretrained_backbone(model, args.pretrained, args.model, settings) if args.pretrained else (RANDOM_INIT, None)
        if args.pretrained:
            log.line(f"backbone initialised from {args.pretrained} ({init['format']}, sha256 {init['sha256'][:12]})")
        data, train_set, val_set = self.training_data(args, recipe, ctx, log)
        return Prepared(model, data, train_set, val_set, identity={"pretrained": str(args.pretrained) if args.pretrained else None},
                        metrics={"init": init, "pretrained": pretrained})

    def paper_batch(self, dataset: str) -> int:
        return SEG_DATASETS[dataset].paper_batch

    def optimizer(self, model: nn.Module, recipe: recipes.FinetuneRecipe, lr: float, **implementation: Any) -> torch.optim.Optimizer:
        groups = param_groups(model, lr, recipe.weight_decay, recipe.head_lr_mult)
        return create_optimizer_v2(groups, opt="adamw", lr=lr, weight_decay=recipe.weight_decay, **implementation)

    def schedule(self, ctx: DistContext, train_len: int, micro: int, recipe: recipes.FinetuneRecipe) -> Schedule:
        return make_schedule(ctx, train_len, micro, recipe.accum_steps, total_steps=recipe.iters)

    def scheduler(self, optimizer: torch.optim.Optimizer, recipe: recipes.FinetuneRecipe, sched: Schedule, lr: float) -> Any:
        return PolyLRScheduler(
            optimizer, t_initial=recipe.iters, power=recipe.poly_power, lr_min=recipe.min_lr,
            warmup_t=recipe.warmup_iters, warmup_lr_init=lr * recipe.warmup_ratio, t_in_epochs=False,
        )

    def loss(self, recipe: recipes.FinetuneRecipe, ctx: DistContext, num_classes: int) -> LossFn:
        """Pixel cross-entropy of the logits resized to the labels, ignoring unlabelled pixels."""

        def loss_fn(net: nn.Module, batch: Any) -> torch.Tensor:
            images, labels = batch[0].to(ctx.device, non_blocking=True), batch[1].to(ctx.device, non_blocking=True)
            logits = F.interpolate(net(images), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)

        return loss_fn

    def eval_every_steps(self, recipe: recipes.FinetuneRecipe, sched: Schedule) -> int:
        return recipe.eval_every

    def eval_batch(self, recipe: recipes.FinetuneRecipe, ctx: DistContext) -> int:
        """``--eval-batch-size`` counts sliding windows per forward on each rank."""
        return recipe.eval_batch_size

    def score(self, model: nn.Module, dataset: Dataset, ctx: DistContext, class_names: list[str], test_recipe: recipes.FinetuneRecipe,
              options: EvalOptions) -> dict[str, Any]:
        test = SegTest(test_recipe.test_mode, test_recipe.test_crop, test_recipe.test_stride)
        return evaluate_segmentation(model, dataset, ctx, class_names, test, options)

    def summary(self, result: dict[str, Any]) -> str:
        return f"mIoU {100 * result['miou']:.2f} pixel acc {100 * result['pixel_accuracy']:.2f}"

    def fit_summary(self, result: dict[str, Any]) -> str:
        return f"val {self.summary(result)} ({result['classes_scored']} classes scored)"


CLASSIFICATION, SEGMENTATION = Classification(), Segmentation()
TASKS: dict[str, Task] = {t.task: t for t in (CLASSIFICATION, SEGMENTATION)}  # by the "task" a checkpoint records


def task_for_kind(kind: str) -> Task:
    """The task of a recipe kind (``pretrain``, ``finetune``, or a params.yaml fine-tuning dataset)."""
    return CLASSIFICATION if recipes.recipe_class(kind) is recipes.PretrainRecipe else SEGMENTATION
