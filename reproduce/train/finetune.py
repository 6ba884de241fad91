"""``python -m reproduce finetune``: semantic-segmentation fine-tuning, the segmentation task
(``tasks.SEGMENTATION``: the official SegFormer/HRViT mmseg recipe, backbone from ``--pretrained``
weights or random) run by the engine's ``fit``."""
from __future__ import annotations

import argparse

from reproduce.train.engine import fit
from reproduce.train.tasks import SEGMENTATION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    SEGMENTATION.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return fit(SEGMENTATION, args)
