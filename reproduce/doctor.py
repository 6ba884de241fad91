"""``python -m reproduce doctor --device cuda`` (also ``make gpu-check``): a GPU machine's self-check
before a paper-scale run is queued on it.

On all visible GPUs, under torchrun with NCCL: smoke pretraining with SyncBatchNorm in bf16 and in
fp16 (with its GradScaler), smoke fine-tuning in bf16 with SyncBN, one evaluation of the fine-tuned
model, and the speed benchmark on CUDA. Each part runs as its own process with a time limit; the
report (versions, GPUs, per-step time, peak memory, pass/fail per part) goes to stdout and to
``results/doctor.json``. Without CUDA it says so in one line and exits 2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reproduce.errors import UsageError

DEFAULT_OUTPUT = Path("results/doctor.json")
MODEL = "hrvit_b1"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda",), default="cuda", help="the device to check (CUDA only)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report (default %(default)s)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per part (default %(default)s)")


@dataclass(frozen=True)
class Part:
    """One check: a command line and the run folder whose metrics it writes (None: the bench)."""

    name: str
    argv: list[str]
    run_dir: Path | None


def torchrun(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "reproduce"]


def plan(gpus: int, work: Path) -> list[Part]:
    """The checks for ``gpus`` GPUs in folder ``work``: 16 images of 224 px per GPU and step, 4 steps."""
    data = str(work / "data")
    pre = ["--model", MODEL, "--profile", "smoke", "--device", "cuda", "--sync-bn", "--image-size", "224", "--batch-size", str(16 * gpus),
           "--synthetic-size", str(32 * gpus), "--epochs", "2", "--num-workers", "2", "--threads", "0", "--no-deterministic", "--data-root", data]
    ft = ["--model", MODEL, "--profile", "smoke", "--device", "cuda", "--sync-bn", "--amp", "bf16", "--crop-size", "512", "--batch-size", str(2 * gpus),
          "--synthetic-size", str(4 * gpus), "--iters", "4", "--num-workers", "2", "--threads", "0", "--no-deterministic", "--data-root", data]
    return [
        Part("pretrain bf16 + SyncBN", [*torchrun(gpus), "pretrain", *pre, "--amp", "bf16", "--output", str(work / "pre-bf16")], work / "pre-bf16"),
        Part("pretrain fp16 + SyncBN", [*torchrun(gpus), "pretrain", *pre, "--amp", "fp16", "--output", str(work / "pre-fp16")], work / "pre-fp16"),
        Part("finetune bf16 + SyncBN", [*torchrun(gpus), "finetune", *ft, "--output", str(work / "ft")], work / "ft"),
        Part("evaluate", [*torchrun(gpus), "evaluate", "--checkpoint", str(work / "ft" / "model.safetensors"), "--device", "cuda",
                          "--data-root", data, "--output", str(work / "eval")], work / "eval"),
        Part("bench (CUDA, bf16)", [sys.executable, "-m", "reproduce", "bench", "--device", "cuda", "--amp", "bf16", "--json"], None),
    ]


def summarise(part: Part, status: int, seconds: float, output: str) -> dict[str, Any]:
    """Pass/fail, time, and the figures a part's run folder (or the bench's JSON) holds."""
    result: dict[str, Any] = {"part": part.name, "passed": status == 0, "status": status, "seconds": round(seconds, 1), "command": shlex.join(part.argv)}
    if status != 0:
        result["tail"] = output[-2000:]
        return result
    if part.run_dir is None:
        try:
            result["bench"] = json.loads(output[output.index("{"):])
        except ValueError:
            result["bench"] = output[-2000:]
        return result
    metrics = json.loads((part.run_dir / "metrics.json").read_text())
    live = part.run_dir / "dvclive" / "metrics.json"
    if metrics.get("steps_run"):
        result["step_s"] = round(metrics["train_time_s"] / metrics["steps_run"], 4)
        result["images_per_s"] = round(metrics["images_per_s"], 1)
    if live.is_file():
        result["peak_memory_mb"] = round(json.loads(live.read_text())["train"]["memory_mb"], 1)
    for key in ("top1", "miou", "precision"):
        if key in metrics:
            result[key] = metrics[key]
    if "effective" in metrics:
        result["precision"], result["sync_bn"] = metrics["effective"]["precision"], metrics["effective"]["sync_bn"]
    if "ranks_identical" in metrics:
        result["ranks_identical"] = metrics["ranks_identical"]
        result["passed"] = result["passed"] and metrics["ranks_identical"] is not False
    return result


def environment() -> dict[str, Any]:
    import timm
    import torch

    gpus = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
    return {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None, "timm": timm.__version__,
        "gpus": [{"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}"} for p in gpus],
        "bf16_supported": torch.cuda.is_bf16_supported() if torch.cuda.is_available() else False, "host": platform.node(),
    }


def render(report: dict[str, Any]) -> str:
    """The one-page text report."""
    env = report["environment"]
    lines = [
        f"GPU self-check: {'PASS' if report['passed'] else 'FAIL'} ({report['gpus_used']} GPU(s), {report['seconds']:.0f} s)",
        f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}, timm {env['timm']}",
        *[f"GPU {i}: {g['name']}, {g['memory_gb']} GiB, sm {g['capability']}" for i, g in enumerate(env["gpus"])],
        "",
        f"{'part':<24} {'result':<6} {'time s':>7} {'step s':>7} {'img/s':>8} {'peak MB':>8}  notes",
    ]
    for r in report["parts"]:
        notes = ", ".join(f"{k} {r[k]}" for k in ("precision", "top1", "miou", "ranks_identical") if k in r)
        if not r["passed"]:
            notes = (notes + "; " if notes else "") + f"exit {r['status']}: " + (r.get("tail", "").strip().splitlines() or [""])[-1][:80]
        lines.append(
            f"{r['part']:<24} {'pass' if r['passed'] else 'FAIL':<6} {r['seconds']:>7.1f} {r.get('step_s', float('nan')):>7.3f} "
            f"{r.get('images_per_s', float('nan')):>8.1f} {r.get('peak_memory_mb', float('nan')):>8.0f}  {notes}"
        )
    lines.append(f"\nreport: {report['output']}")
    return "\n".join(lines)


def _run_part(part: Part, timeout: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.time()
    try:
        done = subprocess.run(part.argv, capture_output=True, text=True, timeout=timeout, env=env)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status, output = 124, f"{err.stdout or ''}{err.stderr or ''}\ntimed out after {timeout} s"
    return summarise(part, status, time.time() - start, output)


def run(args: argparse.Namespace) -> int:
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"no CUDA device is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); run the GPU self-check on a GPU machine")
    gpus = args.gpus or torch.cuda.device_count()
    if not 1 <= gpus <= torch.cuda.device_count():
        raise UsageError(f"--gpus must be in 1..{torch.cuda.device_count()}, got {gpus}")
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="hrvit-doctor-") as work:
        parts = [_run_part(part, args.timeout) for part in plan(gpus, Path(work))]
    report = {
        "passed": all(p["passed"] for p in parts), "gpus_used": gpus, "seconds": time.time() - start,
        "environment": environment(), "parts": parts, "output": str(args.output),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    return 0 if report["passed"] else 1
