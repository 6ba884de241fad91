"""``python -m reproduce pretrain``: ImageNet-layout classification pretraining, the classification
task (``tasks.CLASSIFICATION``: the official HRViT/DeiT recipe) run by the engine's ``fit``."""
from __future__ import annotations

import argparse

from reproduce.train.engine import fit
from reproduce.train.tasks import CLASSIFICATION


def add_arguments(parser: argparse.ArgumentParser) -> None:
    CLASSIFICATION.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    return fit(CLASSIFICATION, args)
