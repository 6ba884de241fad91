"""DDP under torchrun (gloo, 2 CPU processes): the replicas end bit-identical, the mIoU that the
two ranks all-reduce equals a single process scoring the whole split, a failure on one rank ends
the job promptly, and a 2-rank checkpoint resumes on one process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from fault_hooks import hook_env

from reproduce.cli import main
from reproduce.train import checkpointing

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
    assert ft["ranks_identical"] is True and ft["init"]["format"] == "random" and ft["eval_images"] == 4

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran single-threaded; score the same way so logits match bit for bit
    try:
        assert main(["evaluate", "--checkpoint", str(tmp_path / "ft" / "checkpoint.pt"), "--data-root", data, "--output", str(tmp_path / "ev")]) == 0
    finally:
        torch.set_num_threads(threads)
    single = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert single["world_size"] == 1
    assert single["miou"] == ft["miou"] and single["per_class_iou"] == ft["per_class_iou"] and single["pixel_accuracy"] == ft["pixel_accuracy"]


def test_a_failure_on_one_rank_ends_the_job_and_the_run_resumes_on_one_process(tmp_path, capsys):
    """Rank 1 raises at step 2 (after the step-2 checkpoint): the whole job ends within seconds, not at
    a collective timeout; the checkpoint of the 2-rank run then resumes on 1 process with the same
    global batch (the sample order does not depend on the world size), and a changed batch is refused."""
    data, out = str(tmp_path / "data"), tmp_path / "run"
    argv = ["pretrain", "--model", "hrvit_b1", "--profile", "smoke", "--synthetic-size", "4", "--batch-size", "4", "--epochs", "4",
            "--image-size", "32", "--checkpoint-every", "2", "--data-root", data]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **hook_env("fail_at", "1:2")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "reproduce", *argv,
           "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    failed_at, lines = None, []
    for line in proc.stdout:
        lines.append(line)
        if "checkpoint at step 2" in line:
            failed_at = time.monotonic()  # rank 1 raises right after this step
    proc.wait(timeout=600)
    ended = time.monotonic()
    log = "".join(lines)
    assert proc.returncode != 0 and failed_at is not None, log[-4000:]
    assert "simulated failure on rank 1 at step 2" in log
    assert ended - failed_at < 30, f"the job took {ended - failed_at:.0f} s to end after the failure"
    assert checkpointing.load_checkpoint(out / "checkpoint.pt")["world_size"] == 2

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*argv, "--batch-size", "2", "--output", str(out)]) == 2  # another global batch: other samples per step
        assert "recipe.batch_size: 4 -> 2" in capsys.readouterr().err
        assert main([*argv, "--accum-steps", "2", "--output", str(out)]) == 0  # same micro-batches as the 2 ranks had
    finally:
        torch.set_num_threads(threads)
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["resumed_from_step"] == 2 and resumed["effective"]["world_size"] == 1 and resumed["effective"]["micro_batch"] == 2
    assert "world size 2 -> 1: same global batch 4 and sample order" in capsys.readouterr().out
