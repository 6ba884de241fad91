"""``python -m reproduce bench``: latency, throughput, efficiency and peak memory of suite models
against SMP's SegFormer MiT-B1, for inference or a training step, in eager mode or compiled.

Each model runs in a fresh Python process so that its peak memory is its own. The peak is what the
timed passes add on top of the built model and input (the whole step in ``--mode train``): on CPU,
the resident-set high-water mark (Linux ``VmHWM``, reset through ``/proc/self/clear_refs`` just
before the passes, so the model build's own peak does not hide them; tracemalloc cannot see torch's
allocator) minus the resident set before them; on CUDA, ``torch.cuda.max_memory_allocated`` minus
the allocation before. Latency is the median of ``--runs`` timed passes after ``--warmup`` untimed
ones: ``infer`` is a forward in eval mode under ``torch.inference_mode``; ``train`` is forward,
cross-entropy on random labels, backward and an AdamW step in train mode.

GMAC is the FLOP ledger's torch count (``FlopCounterMode``, 2 FLOPs per multiply-accumulate, SDPA
included) halved, for one image's forward pass; a training step is counted as 3x that (backward =
2x forward, the usual convention). Achieved GMAC/s is also given as a percentage of the machine's
fp32 (or ``--amp`` dtype) matmul peak, measured in the same run with the same threads.

``--compile`` times the eager model first, then ``torch.compile(fullgraph=True)``: it reports the
compile time (the first compiled call) and the speed-up over eager. ``--channels-last`` converts
model and input to the channels-last memory format. ``--fuse-bn`` (``--mode infer``) times the models' merged
inference copies (``models/fuse.py``: every BatchNorm folded into the layer before it, HRViT's MixCFN
convolutions merged, the SegFormer head's projections composed); the rows say ``fused_bn``, and
``params`` stays the count of the model as built.

``--variants`` times each model in several forms, each its own row (``NAME+VARIANT``) in the same
alternating rounds: ``eager``; ``compile`` (``torch.compile``); ``reduce-overhead`` (``torch.compile``
with inductor's CUDA graphs); ``cuda-graphs`` (CUDA only: the whole eager pass, training step
included, captured once with ``torch.cuda.graph`` and replayed, so the CPU launches one graph per
pass). Every row has ``first_step_s``, the first pass (cuDNN autotuning and lazy kernel loading in
eager mode; compiling, then ``compile_s``, or warm-up and capture). On CUDA the training step's AdamW
is the fused one and cuDNN autotunes (static shapes).

One more pass runs under ``torch.profiler``: ``profiled_aten_ops`` counts the aten operators it
dispatched (the profiler's CPU events, nested calls included, on every device); on CUDA ``kernels_per_pass`` counts the GPU kernels it
launched (memory copies and sets left out) and ``gpu_busy_s`` is the time the GPU spent in them
(union of their intervals), so ``gpu_busy_fraction`` = ``gpu_busy_s`` / the median latency of the
unprofiled passes. On CPU the two kernel fields are null. ``peak_total_mib`` is the absolute peak
(CUDA: ``max_memory_allocated``; CPU: ``VmHWM``); for ``cuda-graphs`` the peak spans the capture,
whose private memory pool the replays reuse.

``--same-process`` runs every row in this process (faster: lazy loading and autotuning are paid
once; on CUDA the peak is still per row, since the allocator's peak is reset). ``--jsonl FILE``
appends each row as one JSON line the moment it is measured (and one line per failed or skipped
row), so a run cut short still leaves its figures; a row that fails is reported and the others go
on. ``--budget-s S`` starts no row after S seconds (each skipped row gets a line saying so) and, in
subprocesses, stops a row still running then.

Besides wall-clock latency, each pass's process CPU time is recorded (``cpu_s``, and the "CPU
ratio" column): on a shared, busy machine, wall time swings with the other load, while the CPU
time of a single-threaded (``--threads 1``) run stays close to the work done.

On a shared machine one run proves little: ``--rounds N`` repeats the whole set N times, in
alternating order, and reports per model the median latency over rounds and the median (and range)
of its ratio to the reference measured in the same round. ``--against CHECKOUT`` also times every
suite model as implemented in another checkout of this project (e.g. ``git worktree add /tmp/old
939eb5d``), labelled ``NAME@REV``, in the same rounds, so ``--reference hrvit_b1@939eb5d`` gives the
speed-up of the current code over that commit side by side.

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
from typing import Any, Callable

SMP_MIT_B1 = "smp_mit_b1"
DEFAULT_MODELS = ("hrvit_b1", "hrvit_b2", "hrvit_b3", SMP_MIT_B1)
AMP_DTYPES = ("fp16", "bf16")
DATASETS = ("imagenet", "cityscapes")
TRAIN_MAC_FACTOR = 3  # forward + backward (2x forward) per training step
GMACS_COUNT = "torch FlopCounterMode FLOPs / 2 (SDPA included), forward pass per image"
VARIANTS = ("eager", "compile", "reduce-overhead", "cuda-graphs")
COMPILE_MODES = {"compile": "default", "reduce-overhead": "reduce-overhead"}  # variant -> torch.compile mode
GRAPH_WARMUP_PASSES = 3  # eager passes on a side stream before capture (lazy init, autotuning, optimizer state)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                        help=f"suite model names or {SMP_MIT_B1} (segmentation only) (default: %(default)s)")
    parser.add_argument("--reference", default=SMP_MIT_B1, help="model the ratios are relative to (default %(default)s)")
    parser.add_argument("--mode", choices=("infer", "train"), default="infer",
                        help="forward in eval mode, or a training step: forward + backward + AdamW step (default infer)")
    parser.add_argument("--task", choices=("cls", "seg"), default="seg", help="classifier or segmentation model (default seg)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--amp", choices=AMP_DTYPES, help="CUDA autocast dtype (default: fp32, no autocast)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(fullgraph=True): compile time, speed-up")
    parser.add_argument("--channels-last", action="store_true", help="model and input in channels-last memory format")
    parser.add_argument("--fuse-bn", action="store_true",
                        help="--mode infer: time (or --count-ops: count) the merged inference copy: BatchNorms folded, "
                             "MixCFN and SegFormer-head convolutions merged (models/fuse.py)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["eager"], metavar="VARIANT",
                        help=f"forms of each model to time, one row each, alternating: {', '.join(VARIANTS)} "
                             "(cuda-graphs: CUDA only) (default: eager)")
    parser.add_argument("--same-process", action="store_true",
                        help="run every row in this process instead of one fresh process per row")
    parser.add_argument("--jsonl", type=Path, metavar="FILE", help="append one JSON line per row as it is measured")
    parser.add_argument("--budget-s", type=float, metavar="S", help="start no row after S seconds; skipped rows say so")
    parser.add_argument("--runs", type=int, default=7, help="timed passes (default 7)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="repeat the whole set in alternating order; report medians over rounds (default 1)")
    parser.add_argument("--against", metavar="CHECKOUT",
                        help="also time each suite model from another checkout of this project, as NAME@REV")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    parser.add_argument("--size", type=int, nargs=2, default=[512, 512], metavar=("H", "W"))
    parser.add_argument("--num-classes", type=int, help="classes (default: 19 for seg, 1000 for cls)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data", choices=DATASETS, help="benchmark the training data loader instead of the models")
    parser.add_argument("--data-root", help="dataset root for --data (default: generated data)")
    parser.add_argument("--workers", type=int, default=4, help="loader worker processes for --data (default 4)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--count-ops", action="store_true",
                        help="count the dispatched ATen operators of one pass on the CPU (--mode infer: forward; train: "
                             "forward + backward) per model instead of timing (deterministic; reproduce/opcount.py)")


def check_args(args: argparse.Namespace) -> None:
    """Raise a ValueError naming the first bad option, before any model is built."""
    from models.factory import check_model_name

    if args.data:
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        return
    for name in args.models:
        if name == SMP_MIT_B1:
            if args.task != "seg":
                raise ValueError(f"{SMP_MIT_B1} is a segmentation model; use --task seg or drop it from --models")
        else:
            check_model_name(name)
    if args.runs < 1 or args.warmup < 0 or args.rounds < 1:
        raise ValueError(f"--runs and --rounds must be >= 1 and --warmup >= 0; got {args.runs}, {args.rounds} and {args.warmup}")
    if args.against and not (Path(args.against) / "models" / "factory.py").is_file():
        raise ValueError(f"--against {args.against}: not a checkout of this project (no models/factory.py); "
                         f"make one with `git worktree add DIR COMMIT`")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if min(args.size) < 1 or (args.num_classes is not None and args.num_classes < 1):
        raise ValueError(f"--size and --num-classes must be positive; got {args.size} and {args.num_classes}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.amp and args.device != "cuda":
        raise ValueError("--amp is CUDA autocast; add --device cuda or drop --amp")
    if args.budget_s is not None and args.budget_s <= 0:
        raise ValueError(f"--budget-s must be > 0, got {args.budget_s}")
    if "cuda-graphs" in args.variants and args.device != "cuda":
        raise ValueError("--variants cuda-graphs captures CUDA graphs; add --device cuda or drop that variant")
    if args.compile and set(args.variants) != {"eager"}:
        raise ValueError("--compile pairs eager with torch.compile in one row; use it with --variants eager, "
                         "or drop it and list --variants eager compile")
    if args.fuse_bn and args.mode != "infer":
        raise ValueError("--fuse-bn folds BatchNorm for inference only; use it with --mode infer")
    if args.same_process and args.against:
        raise ValueError("--against runs the other checkout's models in their own processes; drop --same-process")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is visible to torch; use --device cpu")


def _build(name: str, task: str, num_classes: int):
    if name == SMP_MIT_B1:
        import segmentation_models_pytorch as smp

        return smp.Segformer("mit_b1", encoder_weights=None, classes=num_classes), "mit"
    from models.factory import build_model, flop_family
    from reproduce.measure import DEFAULT_FLOP_FAMILY

    return build_model(name, task, num_classes), flop_family(name) or DEFAULT_FLOP_FAMILY  # rule unused by the torch count


def _proc_status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024  # reported in kB


def _reset_cpu_peak() -> None:
    """Reset this process's RSS high-water mark."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
    except OSError as err:
        raise RuntimeError(f"CPU peak memory needs Linux's /proc/self/clear_refs ({err}); use --device cuda") from err


def _memory_in_use(cuda: bool) -> int:
    """Bytes held now: the CUDA allocator's, or this process's resident set."""
    import torch

    if not cuda:
        return _proc_status_bytes("VmRSS")
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _reset_peak(cuda: bool) -> None:
    """Reset the memory high-water mark (CUDA allocator, or this process's RSS)."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_cpu_peak()


def _amp_dtype(amp: str | None):
    import torch

    return {None: torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def matmul_peak_gmacs(device: str, amp: str | None, threads: int | None, size: int = 2048, runs: int = 5) -> float:
    """The best GMAC/s of a square matmul in the benchmark's dtype: the yardstick for '% of peak'."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    size = size if device == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=_amp_dtype(amp)) for _ in range(2))
    best = 0.0
    for _ in range(runs + 1):  # the first is a warm-up
        start = time.perf_counter()
        a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, size**3 / 1e9 / (time.perf_counter() - start))
    return best


def _random_labels(model, x):
    """Random class labels shaped like the model's logits (per image, or per pixel at stride 4)."""
    import torch

    with torch.no_grad():
        shape = model(x).shape
    return torch.randint(0, shape[1], (shape[0], *shape[2:]), device=x.device)


def _make_step(model, x, labels, config: dict[str, Any]) -> Callable[[], None]:
    """One timed pass: inference forward, or forward + cross-entropy + backward + AdamW step (fused on
    CUDA; with its state on the device when the step is to be captured in a CUDA graph)."""
    import torch
    import torch.nn.functional as F

    graphed = config.get("variant") == "cuda-graphs"
    autocast = torch.autocast("cuda", dtype=_amp_dtype(config["amp"]), enabled=config["amp"] is not None,
                              cache_enabled=not graphed)  # a graph cannot replay autocast's cast cache
    if config["mode"] == "infer":
        def step() -> None:
            with torch.inference_mode(), autocast:
                model(x)
        return step
    cuda = x.device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda or None, capturable=graphed)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x).float(), labels)
        loss.backward()
        optimizer.step()
    return step


def _capture(step: Callable[[], None]) -> Callable[[], None]:
    """``step`` captured in a CUDA graph after warm-up passes on a side stream; returns the replay.
    Gradients are None at capture, so backward allocates them in the graph's pool and each replay
    overwrites them."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(GRAPH_WARMUP_PASSES):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _time(step: Callable[[], None], runs: int, cuda: bool) -> tuple[list[float], list[float]]:
    """Wall-clock and process CPU seconds of each pass."""
    import torch

    walls, cpus = [], []
    for _ in range(runs):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu_start)
    return walls, cpus


def _busy_seconds(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of (start, end) intervals in microseconds, in seconds: overlapping kernels count once."""
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e6


def _profile(step: Callable[[], None], cuda: bool) -> dict[str, Any]:
    """One pass under torch.profiler: aten operators dispatched and, on CUDA, kernels launched and GPU busy time."""
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]
    try:
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize()
        events = prof.events()
    except RuntimeError as err:  # the profiler's failure costs its own figures, not the row's timings
        return {"profiled_aten_ops": None, "kernels_per_pass": None, "gpu_busy_s": None, "profile_error": str(err)[-500:]}
    ops = sum(e.device_type == DeviceType.CPU and e.name.startswith("aten::") for e in events)
    kernels = [e for e in events if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))]
    return {"profiled_aten_ops": ops, "kernels_per_pass": len(kernels) if cuda else None,
            "gpu_busy_s": _busy_seconds([(e.time_range.start, e.time_range.end) for e in kernels]) if cuda else None}


def _first_pass(step: Callable[[], None], cuda: bool) -> float:
    """Seconds of one pass, synchronised."""
    import torch

    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_one(config: dict[str, Any]) -> dict[str, Any]:
    """Time one model in this process (see the module docstring); ``config`` holds the CLI options."""
    import torch

    from reproduce.flops import measure

    if config["threads"]:
        torch.set_num_threads(config["threads"])
    device = torch.device(config["device"])
    cuda = device.type == "cuda"
    variant = config.get("variant", "eager")
    if cuda:
        torch.backends.cudnn.benchmark = True  # static shapes: autotuned once, in the first pass
    model, family = _build(config["model"], config["task"], config["num_classes"])
    memory_format = torch.channels_last if config["channels_last"] else torch.contiguous_format
    params = sum(p.numel() for p in model.parameters())  # of the model as built, also when its BatchNorms are folded
    if config.get("fuse_bn"):
        from models.fuse import fuse_for_inference

        model = fuse_for_inference(model)
    model = model.train(config["mode"] == "train").to(device, memory_format=memory_format)
    x = torch.randn(config["batch_size"], 3, *config["size"], device=device).contiguous(memory_format=memory_format)

    labels = _random_labels(model, x) if config["mode"] == "train" else None
    compiled: dict[str, Any] = {}
    if config["compile"]:  # eager first (the speed-up's baseline), then the compiled model
        eager = _time(_make_step(model, x, labels, config), config["warmup"] + config["runs"], cuda)[0][config["warmup"]:]
        compiled["eager_latency_s"] = statistics.median(eager)
        model = torch.compile(model, fullgraph=True)
    elif variant in COMPILE_MODES:
        model = torch.compile(model, mode=COMPILE_MODES[variant])
    step = _make_step(model, x, labels, config)
    before = _memory_in_use(cuda)  # the peak counts what the passes add, optimizer state included
    if variant == "cuda-graphs":  # the peak spans the capture: the graph's pool holds the pass's memory
        _reset_peak(cuda)
        start = time.perf_counter()
        step = _capture(step)
        first = time.perf_counter() - start
    else:
        first = _first_pass(step, cuda)  # the first compiled call compiles; autotuning's workspaces stay out of the peak
        _reset_peak(cuda)
    if config["compile"] or variant in COMPILE_MODES:
        compiled["compile_s"] = first
    _time(step, config["warmup"], cuda)
    times, cpu_times = _time(step, config["runs"], cuda)
    peak_total = torch.cuda.max_memory_allocated() if cuda else _proc_status_bytes("VmHWM")
    latency = statistics.median(times)
    profiled = _profile(step, cuda)
    # counted after timing so the counter's own allocations stay out of the memory peak
    plain = getattr(model, "_orig_mod", model)
    gmacs = measure(plain.cpu(), tuple(config["size"]), family, conventions=("torch",)).gflops["torch"] / 2
    row = {  # raw measurements; rates and ratios are derived once, over rounds, in run()
        "model": config["model"],
        "variant": variant,
        "params": params,
        "fused_bn": bool(config.get("fuse_bn")),
        "gmacs": gmacs,
        "latency_s": latency,
        "latencies_s": times,
        "cpu_s": statistics.median(cpu_times),
        "forward_peak_mib": (peak_total - before) / 2**20,
        "peak_total_mib": peak_total / 2**20,
        "first_step_s": first,
        **profiled,
    }
    if compiled:
        if config["compile"]:
            compiled["compile_speedup"] = compiled["eager_latency_s"] / latency
        row.update(compiled)
    return row


_WORKER = (
    "import importlib.util, json, sys\n"
    "spec = importlib.util.spec_from_file_location('suite_bench', sys.argv[1])\n"
    "bench = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(bench)\n"
    "print(json.dumps(bench.bench_one(json.loads(sys.argv[2]))))\n"
)


def _bench_in_subprocess(config: dict[str, Any], checkout: Path, timeout: float | None) -> dict[str, Any]:
    """``bench_one`` of this file in a fresh process whose models (and FLOP ledger) come from ``checkout``."""
    try:
        proc = subprocess.run([sys.executable, "-c", _WORKER, __file__, json.dumps(config)], capture_output=True,
                              text=True, cwd=checkout, timeout=timeout)  # the worker's sys.path starts at its working directory
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"stopped after {err.timeout:.0f} s: --budget-s spent") from err
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        raise RowFailed(f"benchmarking {config['model']} ({checkout}) failed: {last}", proc.stderr[-4000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


class RowFailed(RuntimeError):
    """A row its worker process could not measure: the message is the worker's last error line, ``traceback``
    its stderr (kept in the ``--jsonl`` record, not printed)."""

    def __init__(self, message: str, traceback: str):
        super().__init__(message)
        self.traceback = traceback


def _bench_here(config: dict[str, Any]) -> dict[str, Any]:
    """``bench_one`` in this process; the row's model, graphs and compiled code are released afterwards."""
    import gc

    import torch

    try:
        return bench_one(config)
    except Exception as err:  # noqa: BLE001 - one failed row is reported, the others still run
        raise RuntimeError(f"benchmarking {config['model']} failed: {type(err).__name__}: {err}") from err
    finally:
        torch._dynamo.reset()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _revision(checkout: Path) -> str:
    proc = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() if proc.returncode == 0 else checkout.name


def _jobs(args: argparse.Namespace) -> list[tuple[str, str, Path, str]]:
    """(label, model, checkout, variant) of every row: per variant, the models from this checkout, then
    those of ``--against`` (labelled NAME+VARIANT, eager as plain NAME)."""
    here = Path(__file__).resolve().parents[1]
    models = [(name, name, here) for name in args.models]
    if args.against:
        other = Path(args.against).resolve()
        rev = _revision(other)
        models += [(f"{name}@{rev}", name, other) for name in args.models if name != SMP_MIT_B1]
    return [(label if variant == "eager" else f"{label}+{variant}", name, checkout, variant)
            for variant in args.variants for label, name, checkout in models]  # every model's first variant first


MEDIAN_KEYS = ("latency_s", "cpu_s", "forward_peak_mib", "eager_latency_s", "compile_s", "compile_speedup",
               "peak_total_mib", "first_step_s", "profiled_aten_ops", "kernels_per_pass", "gpu_busy_s")


def _median(values: list[float | None]) -> float | None:
    """Median of the measured values (None: not measured on this device)."""
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def _derive(row: dict[str, Any], batch_size: int, mac_factor: int) -> dict[str, Any]:
    """Add the rates of the row's latency: images/s, GMAC/s and the GPU-busy share of a pass."""
    row["images_per_s"] = batch_size / row["latency_s"]
    row["gmac_per_s"] = row["gmacs"] * batch_size * mac_factor / row["latency_s"]
    busy = row.get("gpu_busy_s")
    row["gpu_busy_fraction"] = None if busy is None else busy / row["latency_s"]
    return row


def _merge_rounds(rounds: list[dict[str, Any]], batch_size: int, mac_factor: int) -> dict[str, Any]:
    """One row from the same model's rows of every round: medians, all timed passes, and the rates
    (images/s, GMAC/s) of the median latency."""
    row = dict(rounds[0])
    for key in MEDIAN_KEYS:
        if key in row:
            row[key] = _median([r[key] for r in rounds])
    row["latencies_s"] = [t for r in rounds for t in r["latencies_s"]]
    return _derive(row, batch_size, mac_factor)


def _ratios(rounds: list[list[dict[str, Any] | None]], index: int, ref: int | None, key: str) -> list[float] | None:
    """Per round, the row's ``key`` over the reference's, for the rounds where both were measured."""
    if ref is None:
        return None
    return [r[index][key] / r[ref][key] for r in rounds if r[index] is not None and r[ref] is not None] or None


def _append_jsonl(path: Path | None, record: dict[str, Any]) -> None:
    """Append one JSON line, flushed at once, so that a run cut short keeps what it measured."""
    if path is not None:
        with path.open("a") as out:
            out.write(json.dumps(record) + "\n")


def _loader_batches(workers: int) -> int:
    """Batches timed: enough for every worker to deliver several, so start-up is amortised."""
    return max(20, 8 * workers)


def _run_data(args: argparse.Namespace) -> int:
    from reproduce.data.throughput import loader_benchmark  # the engine's loader, imported only here

    result = loader_benchmark(args.data, args.data_root, args.workers, batches=_loader_batches(args.workers))
    _append_jsonl(args.jsonl, {"bench": "loader", **result})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['dataset']} loader ({result['root'] or 'generated data'}), {result['workers']} workers, "
              f"batch {result['batch_size']}: {result['images']} images in {result['seconds']:.2f} s = "
              f"{result['images_per_s']:.1f} images/s")
    return 0


OPTION_KEYS = ("mode", "task", "batch_size", "device", "amp", "compile", "channels_last", "fuse_bn", "runs", "warmup",
               "size", "num_classes", "threads")  # what each worker is told (--rounds and --against shape the set of runs)


def _measure_rounds(args: argparse.Namespace, jobs: list[tuple[str, str, Path, str]], options: dict[str, Any],
                    mac_factor: int) -> tuple[list[list[dict[str, Any] | None]], dict[int, str]]:
    """Every job in every round, alternating (odd rounds in reverse order); rounds[r][j] is job j's row
    in round r, None where it failed or the budget was spent (the reason in the second value)."""
    deadline = None if args.budget_s is None else time.perf_counter() + args.budget_s
    rounds, problems = [], {}
    for r in range(args.rounds):
        done: dict[int, dict[str, Any] | None] = {}
        for j in (range(len(jobs)) if r % 2 == 0 else reversed(range(len(jobs)))):
            label, model, checkout, variant = jobs[j]
            left = None if deadline is None else deadline - time.perf_counter()
            done[j] = None
            try:
                if left is not None and left <= 0:
                    raise RuntimeError(f"skipped: --budget-s {args.budget_s:g} spent before it started")
                config = {"model": model, "variant": variant, **options}
                row = _bench_here(config) if args.same_process else _bench_in_subprocess(config, checkout, left)
            except RuntimeError as err:
                problems[j] = str(err)
                print(f"bench: {label} (round {r + 1}): {err}", file=sys.stderr, flush=True)
                _append_jsonl(args.jsonl, {"bench": "failed", "model": label, "variant": variant, "round": r + 1,
                                           "options": options, "error": str(err)[-2000:],
                                           "traceback": getattr(err, "traceback", "")[-4000:]})
                continue
            done[j] = row
            _append_jsonl(args.jsonl, {"bench": "row", **_derive(dict(row), args.batch_size, mac_factor),
                                       "model": label, "round": r + 1, "options": options})
        rounds.append([done[j] for j in range(len(jobs))])
    return rounds, problems


def run(args: argparse.Namespace) -> int:
    try:
        check_args(args)
    except ValueError as err:
        print(f"python -m reproduce bench: error: {err}", file=sys.stderr)
        return 2
    if args.data:
        return _run_data(args)
    import torch

    if args.num_classes is None:
        args.num_classes = 19 if args.task == "seg" else 1000
    if args.count_ops:
        from reproduce.opcount import run as count_ops

        return count_ops(args)
    options = {k: getattr(args, k) for k in OPTION_KEYS}
    peak = matmul_peak_gmacs(args.device, args.amp, args.threads)
    jobs = _jobs(args)
    mac_factor = TRAIN_MAC_FACTOR if args.mode == "train" else 1
    rounds, problems = _measure_rounds(args, jobs, options, mac_factor)
    labels = [label for label, _, _, _ in jobs]
    ref = labels.index(args.reference) if args.reference in labels else None
    if ref is not None and all(rnd[ref] is None for rnd in rounds):
        ref = None
    rows, failed = [], []
    for j, label in enumerate(labels):
        measured = [rnd[j] for rnd in rounds if rnd[j] is not None]
        if not measured:
            failed.append({"model": label, "variant": jobs[j][3], "error": problems[j],
                           "skipped": problems[j].startswith("skipped")})
            continue
        row = _merge_rounds(measured, args.batch_size, mac_factor)
        row["model"], row["checkout"] = label, str(jobs[j][2])
        row["percent_of_peak"] = 100 * row["gmac_per_s"] / peak
        for name, key in (("latency", "latency_s"), ("cpu", "cpu_s"), ("memory", "forward_peak_mib")):
            ratios = _ratios(rounds, j, ref, key)
            row[f"{name}_vs_reference"] = None if ratios is None else statistics.median(ratios)
        row["latency_vs_reference_rounds"] = _ratios(rounds, j, ref, "latency_s")
        rows.append(row)
    result = {"options": options, "reference": args.reference if ref is not None else None, "results": rows,
              "failed": failed, "variants": args.variants,
              "rounds": args.rounds, "torch": torch.__version__, "threads": args.threads or torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "matmul_peak_gmac_per_s": peak, "gmacs_count": GMACS_COUNT,
              "step_macs": f"{TRAIN_MAC_FACTOR}x forward per image" if args.mode == "train" else "forward per image"}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print_table(result)
    return 1 if not rows or any(not row["skipped"] for row in failed) else 0


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _print_table(result: dict[str, Any]) -> None:
    from tabulate import tabulate

    opts = result["options"]
    what = "forward pass" if opts["mode"] == "infer" else "training step (fwd + bwd + AdamW)"
    print(f"{opts['task']} {what}, batch {opts['batch_size']}, {opts['size'][0]}x{opts['size'][1]}, "
          f"{opts['num_classes']} classes, {opts['device']} {opts['amp'] or 'fp32'}"
          f"{', channels-last' if opts['channels_last'] else ''}{', compiled' if opts['compile'] else ''}"
          f"{', merged inference copy' if opts.get('fuse_bn') else ''}, "
          f"median of {opts['runs']} after {opts['warmup']} warm-up"
          f"{f' per round, medians over {rounds} alternating rounds' if (rounds := result['rounds']) > 1 else ''}, "
          f"torch {result['torch']}, {result['threads']} threads; "
          f"ratios vs {result['reference'] or '(no reference run)'}")
    print(f"GMAC/img = {result['gmacs_count']}; GMAC/s counts {result['step_macs']}; "
          f"% peak = of the {result['matmul_peak_gmac_per_s']:.1f} GMAC/s square matmul measured in this run")
    headers = ["model", "params M", "GMAC/img", "latency ms", "latency ratio", "CPU ratio", "img/s", "GMAC/s",
               "% peak", "peak MiB", "memory ratio"]
    rows = [[r["model"], f"{r['params'] / 1e6:.2f}", f"{r['gmacs']:.2f}", f"{r['latency_s'] * 1e3:.1f}",
             _ratio(r["latency_vs_reference"]), _ratio(r["cpu_vs_reference"]), f"{r['images_per_s']:.2f}", f"{r['gmac_per_s']:.1f}",
             f"{r['percent_of_peak']:.0f}", f"{r['forward_peak_mib']:.0f}", _ratio(r["memory_vs_reference"])]
            for r in result["results"]]
    if result["rounds"] > 1:
        headers.insert(5, "ratio range")
        for line, r in zip(rows, result["results"]):
            spread = r["latency_vs_reference_rounds"]
            line.insert(5, "-" if spread is None else f"{min(spread):.2f}-{max(spread):.2f}")
    if opts["compile"]:
        headers += ["compile s", "vs eager"]
        for line, r in zip(rows, result["results"]):
            line += [f"{r['compile_s']:.1f}", _ratio(r["compile_speedup"])]
    headers.append("first pass s")
    for line, r in zip(rows, result["results"]):
        line.append(f"{r['first_step_s']:.1f}")
    if opts["device"] == "cuda":
        headers += ["kernels/pass", "GPU busy %"]
        for line, r in zip(rows, result["results"]):
            busy = r["gpu_busy_fraction"]
            line += [str(r["kernels_per_pass"]), "-" if busy is None else f"{100 * busy:.0f}"]
    print(tabulate(rows, headers=headers, disable_numparse=True))
    for row in result["failed"]:
        print(f"{row['model']}: not measured: {row['error'].strip().splitlines()[-1]}")
