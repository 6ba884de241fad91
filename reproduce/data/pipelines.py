"""The input pipelines a recipe asks for: a split's samples with the training augmentation or the
test-time transform. Training, evaluation and the loader benchmark build their datasets here.
"""
from __future__ import annotations

from timm.data import create_transform

from reproduce.data.datasets import SEG_DATASETS, ImageClassDataset, SegmentationDataset, fix_posterize, synthetic_seg_scale
from reproduce.data.seg_transforms import SegTestTransform, SegTrainTransform
from reproduce.recipes import FinetuneRecipe, PretrainRecipe


def classification_set(samples: list, recipe: PretrainRecipe, augment: bool) -> ImageClassDataset:
    """Training augmentation (RandAugment, random erasing) or the evaluation resize + centre crop."""
    if augment:
        transform = fix_posterize(create_transform(
            recipe.image_size, is_training=True, auto_augment=recipe.auto_augment, re_prob=recipe.reprob,
            re_mode="pixel", re_count=1, interpolation=recipe.train_interpolation, color_jitter=recipe.color_jitter,
        ))
    else:
        transform = create_transform(recipe.image_size, interpolation=recipe.eval_interpolation, crop_pct=recipe.eval_crop_pct)
    return ImageClassDataset(samples, transform)


def segmentation_scale(name: str, crop: int) -> tuple[int, int]:
    """Nominal (w, h) resize scale of dataset ``name``; generated scenes are made at the crop height."""
    scale = SEG_DATASETS[name].scale
    return scale if scale is not None else synthetic_seg_scale(crop)


def segmentation_set(name: str, samples: list, recipe: FinetuneRecipe, augment: bool) -> SegmentationDataset:
    """One split's samples with the training pipeline (``augment``) or the test-time resize."""
    scale = segmentation_scale(name, recipe.crop_size)
    if augment:
        transform = SegTrainTransform(scale, recipe.crop_size, tuple(recipe.ratio_range), recipe.cat_max_ratio, recipe.flip_prob, recipe.photometric)
    else:
        transform = SegTestTransform(scale, align=32 if recipe.test_mode == "whole" else 1)
    return SegmentationDataset(samples, transform)
