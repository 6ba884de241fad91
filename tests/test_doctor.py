"""The GPU self-check's CPU-testable parts: one line and exit 2 without CUDA, the checks it plans
for N GPUs, and how a part's run folder becomes a line of the report. The CUDA run itself needs a
GPU machine (``make gpu-check`` there)."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
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


def test_the_plan_covers_syncbn_bf16_fp16_evaluation_bench_step_time_compile_and_learning(tmp_path):
    parts = doctor.plan(4, tmp_path)
    assert [p.name for p in parts] == ["pretrain bf16 + SyncBN", "pretrain fp16 + SyncBN", "finetune bf16 + SyncBN", "evaluate", "bench (CUDA, bf16)",
                                       "step time (bench)", "compile (bench)", "learning (top-1 >= 25)"]
    assert [p.key for p in parts] == list(doctor.PARTS)
    for part in parts[:4]:
        assert "--nproc_per_node=4" in part.argv and part.argv[part.argv.index("--device") + 1] == "cuda"
    for part, amp in zip(parts[:3], ("bf16", "fp16", "bf16")):
        assert "--sync-bn" in part.argv and part.argv[part.argv.index("--amp") + 1] == amp
        batch = int(part.argv[part.argv.index("--batch-size") + 1])
        assert batch % 4 == 0 and batch // 4 % 2 == 0  # whole, even micro-batches per GPU (mixup)
    assert parts[3].argv[parts[3].argv.index("--checkpoint") + 1] == str(tmp_path / "ft" / "model.safetensors")
    step, compiled, learn = parts[5:]
    assert "--same-process" in step.argv and step.argv[step.argv.index("--batch-size") + 1] == "128"
    assert compiled.argv[compiled.argv.index("--variants") + 1] == "compile"
    assert learn.argv[learn.argv.index("--batch-size") + 1] == "128" and learn.min_top1 == doctor.LEARN_TOP1_MIN
    for part in parts:  # every planned command parses with the real option parsers
        name = part.argv[part.argv.index("reproduce") + 1]
        parser = argparse.ArgumentParser()
        importlib.import_module(SUBCOMMANDS[name][0]).add_arguments(parser)
        parser.parse_args(part.argv[part.argv.index("reproduce") + 2 :])


def test_quick_selects_step_time_learning_and_compile_and_evaluate_needs_finetune(tmp_path):
    parts = doctor.plan(1, tmp_path)
    assert [p.key for p in doctor.select(parts, doctor.QUICK_PARTS)] == ["step-time", "learn", "compile"]
    for keys in (["evaluate"], ["evaluate", "finetune"]):
        with pytest.raises(doctor.UsageError, match="put finetune before it"):
            doctor.select(parts, keys)


def test_cpu_runs_only_the_device_independent_parts(tmp_path, capsys):
    assert main(["doctor", "--device", "cpu", "--parts", "pretrain-bf16", "--output", str(tmp_path / "d.json")]) == 2
    assert "--device cpu runs only step-time, compile, learn" in capsys.readouterr().err


def test_the_budget_stops_a_running_part_and_skips_the_rest(tmp_path):
    sleep = [sys.executable, "-c", "import time; time.sleep(30)"]
    parts = [doctor.Part("slow", sleep, None, "a"), doctor.Part("next", sleep, None, "b")]
    slow, skipped = doctor.run_parts(parts, timeout=900, budget_s=1.0)
    assert slow["status"] == 124 and not slow["passed"] and "timed out after 1 s" in slow["tail"]
    assert skipped == {"part": "next", "passed": False, "skipped": True, "reason": "--budget-s 1 spent before it started"}


def test_the_learning_check_passes_only_above_its_top1(tmp_path):
    run = tmp_path / "learn"
    run.mkdir()
    part = doctor.Part("learning", ["pretrain"], run, "learn", min_top1=25.0)
    for top1, passed in ((24.9, False), (25.0, True)):
        (run / "metrics.json").write_text(json.dumps({"train_time_s": 120.0, "steps_run": 400, "images_per_s": 426.7, "top1": top1}))
        result = doctor.summarise(part, 0, 130.0, "")
        assert result["passed"] is passed and result["top1"] == top1 and result["min_top1"] == 25.0


def test_a_bench_part_reports_first_and_steady_step():
    row = {"model": "hrvit_b1", "first_step_s": 31.5, "latency_s": 0.25, "images_per_s": 512.0, "peak_total_mib": 15000.0, "compile_s": 95.0}
    output = json.dumps({"options": {"mode": "train"}, "results": [row]}) + "\nwarning printed on stderr {"
    result = doctor.summarise(doctor.Part("compile (bench)", ["bench"], None, "compile"), 0, 140.0, output)
    assert (result["first_step_s"], result["step_s"], result["images_per_s"], result["compile_s"]) == (31.5, 0.25, 512.0, 95.0)


def test_the_tiny_cpu_doctor_runs_the_learning_check_end_to_end(tmp_path):
    """The learning check's pretraining command as the doctor runs it, at tiny size on CPU (two steps:
    it cannot learn, so it fails its threshold); the report is written. The bench parts' rows are
    covered by the bench tests."""
    out = tmp_path / "doctor.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "reproduce", "doctor", "--device", "cpu", "--tiny", "--parts", "learn",
                           "--output", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    (learn,) = json.loads(out.read_text())["parts"]
    assert learn["status"] == 0 and learn["passed"] == (learn["top1"] >= doctor.LEARN_TOP1_MIN), proc.stderr[-3000:]
    assert learn["step_s"] > 0 and learn["min_top1"] == doctor.LEARN_TOP1_MIN
    assert proc.returncode == (0 if learn["passed"] else 1) and "CPU self-check" in proc.stdout
    assert f"doctor: {learn['part']}: " in proc.stderr


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
