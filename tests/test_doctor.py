"""The GPU self-check's CPU-testable parts: one line and exit 2 without CUDA, the checks it plans
for N GPUs, and how a part's run folder becomes a line of the report. The CUDA run itself needs a
GPU machine (``make gpu-check`` there)."""
from __future__ import annotations

import argparse
import importlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

from reproduce import doctor
from reproduce.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_exits_2(tmp_path, capsys):
    assert main(["doctor", "--device", "cuda", "--output", str(tmp_path / "doctor.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m reproduce doctor: error: no CUDA device is visible") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "doctor.json").exists()


def test_make_gpu_check_runs_the_doctor():
    dry = subprocess.run(["make", "-n", "gpu-check", "VENV=/nonexistent"], cwd=REPO, capture_output=True, text=True)
    assert "-m reproduce doctor --device cuda" in dry.stdout, dry.stdout + dry.stderr


def test_the_plan_covers_syncbn_bf16_fp16_evaluation_and_bench_on_all_gpus(tmp_path):
    parts = doctor.plan(4, tmp_path)
    assert [p.name for p in parts] == ["pretrain bf16 + SyncBN", "pretrain fp16 + SyncBN", "finetune bf16 + SyncBN", "evaluate", "bench (CUDA, bf16)"]
    for part in parts[:4]:
        assert "--nproc_per_node=4" in part.argv and part.argv[part.argv.index("--device") + 1] == "cuda"
    for part, amp in zip(parts[:3], ("bf16", "fp16", "bf16")):
        assert "--sync-bn" in part.argv and part.argv[part.argv.index("--amp") + 1] == amp
        batch = int(part.argv[part.argv.index("--batch-size") + 1])
        assert batch % 4 == 0 and batch // 4 % 2 == 0  # whole, even micro-batches per GPU (mixup)
    assert parts[3].argv[parts[3].argv.index("--checkpoint") + 1] == str(tmp_path / "ft" / "model.safetensors")
    for part in parts:  # every planned command parses with the real option parsers
        name = part.argv[part.argv.index("reproduce") + 1]
        parser = argparse.ArgumentParser()
        importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
        parser.parse_args(part.argv[part.argv.index("reproduce") + 2 :])


def test_a_run_folder_becomes_a_report_line(tmp_path):
    run = tmp_path / "pre"
    (run / "dvclive").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({
        "train_time_s": 2.0, "steps_run": 4, "images_per_s": 128.0, "top1": 12.5, "ranks_identical": True,
        "effective": {"precision": "bf16", "sync_bn": True},
    }))
    (run / "dvclive" / "metrics.json").write_text(json.dumps({"train": {"memory_mb": 2048.4}, "step": 4}))
    part = doctor.Part("pretrain bf16 + SyncBN", ["torchrun", "pretrain"], run)
    ok = doctor.summarise(part, 0, 10.0, "")
    assert ok["passed"] and ok["step_s"] == 0.5 and ok["peak_memory_mb"] == 2048.4 and ok["precision"] == "bf16" and ok["top1"] == 12.5
    failed = doctor.summarise(doctor.Part("evaluate", ["x"], tmp_path / "none"), 1, 3.0, "Traceback ...\nRuntimeError: NCCL error")
    assert not failed["passed"] and "NCCL error" in failed["tail"]
    env = {"python": "3", "torch": "2", "cuda": "12", "cudnn": 9, "nccl": "2.2", "timm": "1", "gpus": [{"name": "H100", "memory_gb": 80.0, "capability": "9.0"}]}
    text = doctor.render({"passed": False, "gpus_used": 1, "seconds": 13.0, "environment": env, "parts": [ok, failed], "output": "r.json"})
    assert text.splitlines()[0].startswith("GPU self-check: FAIL (1 GPU(s)")
    assert "pretrain bf16 + SyncBN   pass" in text and "FAIL" in text and "RuntimeError: NCCL error" in text
