"""DDP under torchrun (gloo, 2 CPU processes): the replicas end bit-identical, and the mIoU that the
two ranks all-reduce equals a single process scoring the whole split."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from reproduce.cli import main

REPO = Path(__file__).resolve().parents[1]


def _torchrun(args: list[str]) -> dict:
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reproduce", *args]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return json.loads((Path(args[args.index("--output") + 1]) / "metrics.json").read_text())


def test_two_rank_training_keeps_replicas_identical_and_all_reduces_miou(tmp_path):
    data = str(tmp_path / "data")
    pre = _torchrun(["pretrain", "--model", "hrvit_b1", "--profile", "smoke", "--synthetic-size", "4", "--batch-size", "4",
                     "--epochs", "2", "--image-size", "32", "--data-root", data, "--output", str(tmp_path / "pre")])
    assert pre["effective"]["world_size"] == 2 and pre["effective"]["micro_batch"] == 2 and pre["steps"] == 2
    assert len(pre["param_digests"]) == 2 and pre["ranks_identical"] is True

    ft = _torchrun(["finetune", "--model", "hrvit_b1", "--profile", "smoke", "--dataset", "synthetic", "--synthetic-size", "4",
                    "--batch-size", "2", "--iters", "2", "--data-root", data, "--output", str(tmp_path / "ft")])
    assert ft["ranks_identical"] is True and ft["init"] == "random" and ft["eval_images"] == 4

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran single-threaded; score the same way so logits match bit for bit
    try:
        assert main(["evaluate", "--checkpoint", str(tmp_path / "ft" / "checkpoint.pt"), "--data-root", data, "--output", str(tmp_path / "ev")]) == 0
    finally:
        torch.set_num_threads(threads)
    single = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert single["world_size"] == 1
    assert single["miou"] == ft["miou"] and single["per_class_iou"] == ft["per_class_iou"] and single["pixel_accuracy"] == ft["pixel_accuracy"]
