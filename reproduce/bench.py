"""``python -m reproduce bench``: forward latency and peak memory of HRViT against MiT-B1 (segmentation).

Each model runs in a fresh Python process so that its peak memory is its own. The peak is what the
forward passes add on top of the built model and input: on CPU, the resident-set high-water mark
(Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just before the passes, so the model
build's own peak does not hide the forward's; tracemalloc cannot see torch's allocator) minus the
resident set before them; on CUDA, ``torch.cuda.max_memory_allocated`` minus the allocation before. Latency is the median of ``--runs`` timed forward
passes after ``--warmup`` untimed ones, in eval mode under ``torch.inference_mode``, batch 1.
Achieved GMAC/s uses the ledger's torch count (2 FLOPs per MAC, SDPA included) halved.

``smp_mit_b1`` is SegFormer's own architecture as segmentation_models_pytorch builds it
(``smp.Segformer('mit_b1', encoder_weights=None)``), the reference architecture of the speed comparison.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SMP_MIT_B1 = "smp_mit_b1"
DEFAULT_MODELS = ("hrvit_b1", "hrvit_b2", "hrvit_b3", SMP_MIT_B1)
AMP_DTYPES = ("fp16", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                        help=f"suite model names (segmentation task) or {SMP_MIT_B1} (default: %(default)s)")
    parser.add_argument("--reference", default=SMP_MIT_B1, help="model the ratios are relative to (default %(default)s)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=AMP_DTYPES, help="CUDA autocast dtype (default: fp32, no autocast)")
    parser.add_argument("--runs", type=int, default=7, help="timed forward passes (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed forward passes first (default 2)")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, default=19)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def check_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the first bad option, before any model is built."""
    from models.factory import check_model_name

    for name in args.models:
        if name != SMP_MIT_B1:
            check_model_name(name)
    if args.runs < 1 or args.warmup < 0:
        raise ValueError(f"--runs must be >= 1 and --warmup >= 0; got {args.runs} and {args.warmup}")
    if min(args.size) < 1 or args.num_classes < 1:
        raise ValueError(f"--size and --num-classes must be positive; got {args.size} and {args.num_classes}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.amp and args.device != "cuda":
        raise ValueError("--amp is CUDA autocast; add --device cuda or drop --amp")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")


def _build(name: str, num_classes: int):
    if name == SMP_MIT_B1:
        import segmentation_models_pytorch as smp

        return smp.Segformer("mit_b1", encoder_weights=None, classes=num_classes), "mit"
    from models.factory import build_model, flop_family

    return build_model(name, "seg", num_classes), flop_family(name)


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def _reset_cpu_peak() -> int:
    """Reset this process's RSS high-water mark; return the current RSS in bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as err:
        raise RuntimeError(f"CPU peak memory needs Linux's /proc/self/clear_refs ({err}); use --device cuda") from err
    return _proc_status_bytes("VmRSS")


def bench_one(config: dict[str, Any]) -> dict[str, Any]:
    """Time one model in this process (see the module docstring); ``config`` holds the CLI options."""
    import torch

    from reproduce.flops import measure

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    model, family = _build(config["model"], config["num_classes"])
    model = model.eval().to(device)
    x = torch.randn(1, 3, *config["size"], device=device)
    autocast = torch.autocast("cuda", dtype=getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[config["amp"]])) if config["amp"] else None

    def forward() -> float:
        start = time.perf_counter()
        if autocast is None:
            model(x)
        else:
            with autocast:
                model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = _reset_cpu_peak()
    with torch.inference_mode():
        for _ in range(config["warmup"]):
            forward()
        times = [forward() for _ in range(config["runs"])]
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _proc_status_bytes("VmHWM") - before
    latency = statistics.median(times)
    # counted after timing so the counter's own allocations stay out of the memory peak
    gmacs = measure(model.cpu(), tuple(config["size"]), family, conventions=("torch",)).gflops["torch"] / 2
    return {
        "model": config["model"],
        "params": sum(p.numel() for p in model.parameters()),
        "gmacs": gmacs,
        "latency_s": latency,
        "latencies_s": times,
        "gmac_per_s": gmacs / latency,
        "forward_peak_mib": peak / 2**20,
    }


def _bench_in_subprocess(config: dict[str, Any]) -> dict[str, Any]:
    code = "import json, sys; from reproduce.bench import bench_one; print(json.dumps(bench_one(json.loads(sys.argv[1]))))"
    # run from the checkout holding this file, so the worker imports the same code as its parent
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(config)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1])
    if proc.returncode != 0:
        raise RuntimeError(f"benchmarking {config['model']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except ValueError as err:
        print(f"python -m reproduce bench: error: {err}", file=sys.stderr)
        return 2
    import torch

    options = {k: getattr(args, k) for k in ("device", "amp", "runs", "warmup", "size", "num_classes", "threads")}
    rows = [_bench_in_subprocess({"model": name, **options}) for name in args.models]
    reference = next((r for r in rows if r["model"] == args.reference), None)
    for row in rows:
        row["latency_vs_reference"] = row["latency_s"] / reference["latency_s"] if reference else None
        row["memory_vs_reference"] = row["forward_peak_mib"] / reference["forward_peak_mib"] if reference else None
    result = {"options": options, "reference": args.reference if reference else None, "results": rows,
              "torch": torch.__version__, "threads": args.threads or torch.get_num_threads()}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _print_table(result: dict[str, Any]) -> None:
    from tabulate import tabulate

    opts = result["options"]
    print(f"forward pass, batch 1, {opts['size'][0]}x{opts['size'][1]}, {opts['num_classes']} classes, "
          f"{opts['device']} {opts['amp'] or 'fp32'}, median of {opts['runs']} after {opts['warmup']} warm-up, "
          f"torch {result['torch']}, {result['threads']} threads; ratios vs {result['reference'] or '(no reference run)'}")
    rows = [[r["model"], f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.2f}", f"{r['latency_s'] * 1e3:.1f}",
             _ratio(r["latency_vs_reference"]), f"{r['gmac_per_s']:.1f}", f"{r['forward_peak_mib']:.0f}",
             _ratio(r["memory_vs_reference"])] for r in result["results"]]
    print(tabulate(rows, headers=["model", "params M", "GMAC", "latency ms", "latency ratio", "GMAC/s",
                                  "peak MiB", "memory ratio"], disable_numparse=True))
