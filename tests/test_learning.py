"""Learning gates: the training commands, as a user runs them, learn something on generated data.

Two optimizer steps (the smoke profile) prove that the pipeline runs, not that training works. These
gates train a little longer, with augmentation on, and require an accuracy far above what
a model that learned nothing gets. They catch image/label misalignment after augmentation, a wrong
ignore index, a broken schedule or optimizer, or labels scored against the wrong classes. Runs are
deterministic (smoke profile: deterministic kernels, seed 0, one thread), so the margins are fixed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Generated street scenes have 7 classes (sky, building, road, pole, wire, sign, light). A constant
# prediction scores one class's pixel share (at most about half the image) and 0 elsewhere: mIoU <= 1/14.
SEG_MIOU_MIN = 0.20  # measured 0.342 with the command below (margin 0.14)
SEG_COMMAND = ["--model", "mit_b0", "--synthetic-size", "16", "--crop-size", "64", "--iters", "40",
               "--warmup-iters", "5", "--batch-size", "4", "--lr", "0.0006"]

# Generated shapes have 10 balanced classes: chance top-1 is 10 %.
CLS_TOP1_MIN = 25.0  # measured 41.8 with the command below, twice (margin 16.8 points); 9.7 with shuffled train labels
# No suite model learns the shapes within a test's budget (measured, seed 0, 32 px): with augmentation OFF
# and 2000 images per split, MiT-B0 reached 12-15 % after 300-1500 steps of 20 images (lr 1e-4 to 3e-3),
# CSWin-Ti and HRViT-b1 9-10 % after 200 steps, while timm's 5M-parameter resnet10t reached 54 % in 300;
# MiT-B0 with the command below scores 9.0 %. Transformers from scratch need far more images than a test
# can afford, so this gate trains timm's tiny test ResNet through the same command: it checks the pretrain
# pipeline (augmentation, labels, schedule, optimizer, evaluation), not a suite model; the segmentation
# gate above trains a suite backbone.
CLS_COMMAND = ["--model", "timm:test_resnet", "--image-size", "32", "--synthetic-size", "1000", "--batch-size", "20",
               "--epochs", "8", "--warmup-epochs", "1", "--lr", "0.002", "--mixup", "0", "--cutmix", "0",
               "--auto-augment", "", "--reprob", "0", "--checkpoint-every", "0", "--eval-batch-size", "100"]


def run_cli(tmp_path: Path, command: str, args: list[str]) -> dict:
    """``python -m reproduce COMMAND ...`` in a fresh process; its metrics.json."""
    out = tmp_path / command
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "reproduce", command, *args, "--data-root", str(tmp_path / "data"),
                           "--output", str(out), "--log-every", "100"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def test_segmentation_on_generated_scenes_learns(tmp_path):
    """40 iterations of 4 random 64x64 crops (scale 0.5-2, flip, photometric distortion) of 16 scenes."""
    metrics = run_cli(tmp_path, "finetune", SEG_COMMAND)
    assert metrics["recipe"]["photometric"] and metrics["recipe"]["flip_prob"] > 0  # augmentation on
    assert metrics["miou"] >= SEG_MIOU_MIN, metrics["per_class_iou"]
    # the large classes are learned, not just one of them
    assert sum(iou > 0.5 for iou in metrics["per_class_iou"].values()) >= 3, metrics["per_class_iou"]


def test_classification_on_generated_shapes_learns(tmp_path):
    """400 steps of 20 random-resized crops (8-100 % of the area, bilinear or bicubic), horizontal flip and
    colour jitter 0.4 of 1000 shapes at 32 px; top-1 on the 1000 held-out shapes. RandAugment, random
    erasing, Mixup and CutMix are off: with them no model here learns within the budget."""
    metrics = run_cli(tmp_path, "pretrain", CLS_COMMAND)
    assert metrics["recipe"]["color_jitter"] > 0 and metrics["recipe"]["train_interpolation"] == "random"
    assert metrics["num_classes"] == 10 and metrics["steps"] == 400
    assert metrics["top1"] >= CLS_TOP1_MIN, (metrics["top1"], metrics["loss"])
