"""``python -m reproduce doctor --device cuda`` (also ``make gpu-check``): a GPU machine's self-check
before a paper-scale run is queued on it.

On all visible GPUs, under torchrun with NCCL: smoke pretraining with SyncBatchNorm in bf16 and in
fp16 (with its GradScaler), smoke fine-tuning in bf16 with SyncBN, one evaluation of the fine-tuned
model, and the speed benchmark on CUDA. Then, on one GPU: the HRViT-b1 training step at the paper's
batch (cls 224, 128 images, bf16), its first step (cuDNN autotuning, lazy kernel loading) reported
apart from the steady-state step; the same step under ``torch.compile`` (compile time and compiled
step); and a learning check: HRViT-b1 pretrained for about two minutes at batch 128 on generated
shapes must reach a top-1 far above chance.

Each part runs as its own process with a time limit; ``--parts`` (or ``--quick``: step time,
learning, compile) chooses the parts and ``--budget-s`` caps the total: a part that would start
after it is skipped and said so, and a running part is stopped when it runs out. The report
(versions, GPUs, per-step time, peak memory, pass/fail per part) goes to stdout and to
``results/doctor.json``. Without CUDA it says so in one line and exits 2; ``--device cpu`` runs the
device-independent parts (step time, compile, learning), with ``--tiny`` at sizes that finish in
seconds, to check the doctor itself.
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
from typing import Any, Iterator

from reproduce.errors import UsageError

DEFAULT_OUTPUT = Path("results/doctor.json")
MODEL = "hrvit_b1"
PARTS = ("pretrain-bf16", "pretrain-fp16", "finetune", "evaluate", "bench", "step-time", "compile", "learn")
CPU_PARTS = ("step-time", "compile", "learn")  # the others are torchrun + NCCL + SyncBN checks
QUICK_PARTS = ("step-time", "learn", "compile")  # compile last: it takes what the budget leaves
# Generated shapes have 10 balanced classes: chance top-1 is 10 %. The CPU learning gate
# (tests/test_learning.py) holds a trained model to 25 %, a margin its shuffled-label run (9.7 %) justifies.
LEARN_TOP1_MIN = 25.0


@dataclass(frozen=True)
class Scale:
    """Sizes of the single-GPU parts: the paper's batch, or a CPU smoke test of the doctor itself."""

    step_size: int  # pixels of the timed training step (cls)
    step_batch: int
    step_runs: int
    learn_size: int  # pixels of the learning check's shapes
    learn_batch: int
    learn_images: int  # generated images per split
    learn_epochs: int


FULL = Scale(step_size=224, step_batch=128, step_runs=10, learn_size=224, learn_batch=128, learn_images=1280, learn_epochs=40)
TINY = Scale(step_size=32, step_batch=2, step_runs=1, learn_size=32, learn_batch=8, learn_images=16, learn_epochs=1)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help=f"the device to check (cpu: only {', '.join(CPU_PARTS)}, to check the doctor itself)")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all visible)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON report (default %(default)s)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds allowed per part (default %(default)s)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--parts", nargs="+", choices=PARTS, metavar="PART",
                        help=f"parts to run, in the order given: {', '.join(PARTS)} (default: all, in this order; on cpu: {', '.join(CPU_PARTS)})")
    chosen.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK_PARTS)} (fits a ~5 minute slot)")
    parser.add_argument("--budget-s", type=float, metavar="S",
                        help="total seconds: a part that would start later is skipped, a running one stopped then")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of the doctor itself, figures mean nothing")


@dataclass(frozen=True)
class Part:
    """One check: a command line and the run folder whose metrics it writes (None: the bench)."""

    name: str
    argv: list[str]
    run_dir: Path | None
    key: str = ""  # its name in --parts
    min_top1: float | None = None  # passes only at this top-1 or above


def torchrun(gpus: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}", "-m", "reproduce"]


def plan(gpus: int, work: Path, device: str = "cuda", scale: Scale = FULL) -> list[Part]:
    """Every check for ``gpus`` GPUs in folder ``work``: the multi-GPU smoke runs (16 images of 224 px
    per GPU and step, 4 steps) and the single-device parts at ``scale``."""
    data = str(work / "data")
    pre = ["--model", MODEL, "--profile", "smoke", "--device", "cuda", "--sync-bn", "--image-size", "224", "--batch-size", str(16 * gpus),
           "--synthetic-size", str(32 * gpus), "--epochs", "2", "--num-workers", "2", "--threads", "0", "--no-deterministic", "--data-root", data]
    ft = ["--model", MODEL, "--profile", "smoke", "--device", "cuda", "--sync-bn", "--amp", "bf16", "--crop-size", "512", "--batch-size", str(2 * gpus),
          "--synthetic-size", str(4 * gpus), "--iters", "4", "--num-workers", "2", "--threads", "0", "--no-deterministic", "--data-root", data]
    return [
        Part("pretrain bf16 + SyncBN", [*torchrun(gpus), "pretrain", *pre, "--amp", "bf16", "--output", str(work / "pre-bf16")], work / "pre-bf16", "pretrain-bf16"),
        Part("pretrain fp16 + SyncBN", [*torchrun(gpus), "pretrain", *pre, "--amp", "fp16", "--output", str(work / "pre-fp16")], work / "pre-fp16", "pretrain-fp16"),
        Part("finetune bf16 + SyncBN", [*torchrun(gpus), "finetune", *ft, "--output", str(work / "ft")], work / "ft", "finetune"),
        Part("evaluate", [*torchrun(gpus), "evaluate", "--checkpoint", str(work / "ft" / "model.safetensors"), "--device", "cuda",
                          "--data-root", data, "--output", str(work / "eval")], work / "eval", "evaluate"),
        Part("bench (CUDA, bf16)", [sys.executable, "-m", "reproduce", "bench", "--device", "cuda", "--amp", "bf16", "--json"], None, "bench"),
        *single_device_parts(work, device, scale),
    ]


def single_device_parts(work: Path, device: str, scale: Scale) -> list[Part]:
    """The training step's first and steady-state time, the compiled step, and the learning check."""
    amp = ["--amp", "bf16"] if device == "cuda" else []
    step = [sys.executable, "-m", "reproduce", "bench", "--device", device, *amp, "--mode", "train", "--task", "cls",
            "--size", str(scale.step_size), str(scale.step_size), "--batch-size", str(scale.step_batch), "--models", MODEL,
            "--same-process", "--runs", str(scale.step_runs), "--warmup", "1", "--json"]
    learn = [sys.executable, "-m", "reproduce", "pretrain", "--model", MODEL, "--profile", "smoke", "--device", device,
             "--amp", "bf16" if device == "cuda" else "none", "--image-size", str(scale.learn_size),
             "--batch-size", str(scale.learn_batch), "--synthetic-size", str(scale.learn_images),
             "--epochs", str(scale.learn_epochs), "--warmup-epochs", "1" if scale.learn_epochs > 1 else "0",
             "--lr", "0.001", "--drop-path", "0", "--mixup", "0", "--cutmix", "0", "--auto-augment", "", "--reprob", "0",
             "--eval-every", "0", "--checkpoint-every", "0", "--log-every", "50", "--eval-batch-size", str(2 * scale.learn_batch),
             "--num-workers", "8" if device == "cuda" else "0", "--threads", "0", "--no-deterministic",
             "--data-root", str(work / "data"), "--output", str(work / "learn")]
    return [
        Part("step time (bench)", step, None, "step-time"),
        Part("compile (bench)", [*step, "--variants", "compile"], None, "compile"),
        Part(f"learning (top-1 >= {LEARN_TOP1_MIN:g})", learn, work / "learn", "learn", LEARN_TOP1_MIN),
    ]


def select(parts: list[Part], keys: tuple[str, ...] | list[str]) -> list[Part]:
    """The parts named in ``keys``, in that order (evaluation, which reads the fine-tuned model, after finetune)."""
    keys = list(dict.fromkeys(keys))
    if "evaluate" in keys and ("finetune" not in keys or keys.index("finetune") > keys.index("evaluate")):
        raise UsageError("--parts evaluate reads the model that finetune writes; put finetune before it")
    by_key = {part.key: part for part in parts}
    return [by_key[key] for key in keys]


def summarise(part: Part, status: int, seconds: float, output: str) -> dict[str, Any]:
    """Pass/fail, time, and the figures a part's run folder (or the bench's JSON) holds."""
    result: dict[str, Any] = {"part": part.name, "passed": status == 0, "status": status, "seconds": round(seconds, 1), "command": shlex.join(part.argv)}
    if status != 0:
        result["tail"] = output[-2000:]
        return result
    if part.run_dir is None:
        try:
            result["bench"] = json.JSONDecoder().raw_decode(output, output.index("{"))[0]  # stderr may follow
        except ValueError:
            result["bench"] = output[-2000:]
            return result
        rows = result["bench"]["results"]
        if len(rows) == 1:  # one model: its step, as the run folders' parts report theirs
            row = rows[0]
            result.update(first_step_s=round(row["first_step_s"], 3), step_s=round(row["latency_s"], 4),
                          images_per_s=round(row["images_per_s"], 1), peak_memory_mb=round(row["peak_total_mib"], 1))
            if "compile_s" in row:
                result["compile_s"] = round(row["compile_s"], 1)
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
    if part.min_top1 is not None:
        result["min_top1"] = part.min_top1
        result["passed"] = result["passed"] and metrics.get("top1", 0.0) >= part.min_top1
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
    skipped = ", ".join(r["part"] for r in report["parts"] if r.get("skipped"))
    lines = [
        f"{'GPU' if report['gpus_used'] else 'CPU'} self-check: {'PASS' if report['passed'] else 'FAIL'} ({report['gpus_used']} GPU(s), {report['seconds']:.0f} s"
        f"{f'; skipped for the time budget: {skipped}' if skipped else ''})",
        f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, cuDNN {env['cudnn']}, NCCL {env['nccl']}, timm {env['timm']}",
        *[f"GPU {i}: {g['name']}, {g['memory_gb']} GiB, sm {g['capability']}" for i, g in enumerate(env["gpus"])],
        "",
        f"{'part':<24} {'result':<6} {'time s':>7} {'first s':>7} {'step s':>7} {'img/s':>8} {'peak MB':>8}  notes",
    ]
    for r in report["parts"]:
        if r.get("skipped"):
            lines.append(f"{r['part']:<24} {'skip':<6}  {r['reason']}")
            continue
        notes = ", ".join(f"{k} {r[k]}" for k in ("precision", "top1", "min_top1", "compile_s", "miou", "ranks_identical") if k in r)
        if not r["passed"] and r["status"] != 0:
            notes = (notes + "; " if notes else "") + f"exit {r['status']}: " + (r.get("tail", "").strip().splitlines() or [""])[-1][:80]
        lines.append(
            f"{r['part']:<24} {'pass' if r['passed'] else 'FAIL':<6} {r['seconds']:>7.1f} {r.get('first_step_s', float('nan')):>7.1f} "
            f"{r.get('step_s', float('nan')):>7.3f} {r.get('images_per_s', float('nan')):>8.1f} {r.get('peak_memory_mb', float('nan')):>8.0f}  {notes}"
        )
    lines.append(f"\nreport: {report['output']}")
    return "\n".join(lines)


def _run_part(part: Part, timeout: float) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.time()
    try:
        done = subprocess.run(part.argv, capture_output=True, text=True, timeout=timeout, env=env)
        status, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as err:
        status, output = 124, f"{_text(err.stdout)}{_text(err.stderr)}\ntimed out after {timeout:.0f} s"
    return summarise(part, status, time.time() - start, output)


def _text(stream: bytes | str | None) -> str:
    """A timed-out process's captured output (bytes, even in text mode)."""
    return stream.decode(errors="replace") if isinstance(stream, bytes) else stream or ""


def run_parts(parts: list[Part], timeout: float, budget_s: float | None) -> Iterator[dict[str, Any]]:
    """Each part's result in turn, the part stopped at ``timeout`` seconds or when ``budget_s`` in all
    is spent; the parts that would start after that are skipped, each with a line saying so."""
    deadline = None if budget_s is None else time.time() + budget_s
    for part in parts:
        left = timeout if deadline is None else min(timeout, deadline - time.time())
        if left <= 0:
            yield {"part": part.name, "passed": False, "skipped": True, "reason": f"--budget-s {budget_s:g} spent before it started"}
        else:
            yield _run_part(part, left)


def _outcome(result: dict[str, Any]) -> str:
    """One line: the part, and whether it passed, failed or was skipped."""
    if result.get("skipped"):
        return f"{result['part']}: skipped ({result['reason']})"
    return f"{result['part']}: {'pass' if result['passed'] else 'FAIL'} in {result['seconds']:.0f} s"


def run(args: argparse.Namespace) -> int:
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UsageError(f"no CUDA device is visible (torch {torch.__version__}, built for CUDA {torch.version.cuda}); run the GPU self-check on a GPU machine")
    keys = QUICK_PARTS if args.quick else args.parts or (PARTS if cuda else CPU_PARTS)
    if not cuda and set(keys) - set(CPU_PARTS):
        raise UsageError(f"--device cpu runs only {', '.join(CPU_PARTS)}; the others need CUDA (got {', '.join(keys)})")
    if args.budget_s is not None and args.budget_s <= 0:
        raise UsageError(f"--budget-s must be > 0, got {args.budget_s}")
    gpus = (args.gpus or torch.cuda.device_count()) if cuda else 0
    if cuda and not 1 <= gpus <= torch.cuda.device_count():
        raise UsageError(f"--gpus must be in 1..{torch.cuda.device_count()}, got {gpus}")
    start = time.time()
    report = {"passed": False, "complete": False, "gpus_used": gpus, "seconds": 0.0, "environment": environment(), "parts": [],
              "output": str(args.output)}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="hrvit-doctor-") as work:
        chosen = select(plan(max(gpus, 1), Path(work), args.device, TINY if args.tiny else FULL), keys)
        for result in run_parts(chosen, args.timeout, args.budget_s):
            report["parts"].append(result)
            report["seconds"] = time.time() - start
            report["complete"] = len(report["parts"]) == len(chosen)
            report["passed"] = report["complete"] and all(p["passed"] for p in report["parts"] if not p.get("skipped"))
            args.output.write_text(json.dumps(report, indent=2) + "\n")  # after every part: a cut-off run keeps its results
            print(f"doctor: {_outcome(result)}", file=sys.stderr, flush=True)
    print(render(report))
    return 0 if report["passed"] else 1
