"""``torch.compile`` for training runs: the ``--compile`` / ``--compile-mode`` options, the mode a run
uses, what cannot be captured, the compile cache in the run folder, and the compile time it cost.

The modes are torch's: ``default`` (inductor kernels), ``reduce-overhead`` (plus CUDA graphs, which
replay a step's kernels with one launch), ``max-autotune`` (plus autotuned GEMM/conv kernels, and CUDA
graphs) and ``max-autotune-no-cudagraphs``. Graph breaks are allowed: the parts dynamo cannot trace
run eagerly between compiled graphs, and the run says how many there were. The CUDA-graph modes fall
back to their variant without graphs where graphs would be wrong: with SyncBatchNorm (collectives
inside its forward and backward are not captured) and with gradient accumulation (a replay rewrites
the memory of the previous micro-batch's gradients, which accumulation still adds to).

Inductor caches its generated code and autotuning results under ``TORCHINDUCTOR_CACHE_DIR``, by
default node-local ``/tmp``; a run points it at ``OUTPUT/compile-cache`` (unless the variable is set
already), so a resumed or requeued run reuses the compiled kernels instead of generating them again.
"""
from __future__ import annotations

import argparse
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from reproduce.errors import UsageError

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
WITHOUT_CUDA_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}
# The mode of a paper-profile run on CUDA given neither --compile nor --no-compile (None: eager);
# chosen from the GPU measurements in docs/speed.md.
PAPER_CUDA_MODE: str | None = None
CACHE_DIR = "compile-cache"
CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def add_compile_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the model (default: off; on for the paper profile on CUDA when a default mode is set there)")
    parser.add_argument("--compile-mode", choices=MODES, default=None,
                        help="torch.compile mode (implies --compile; default 'default'); reduce-overhead and max-autotune add CUDA graphs")


def check_arguments(args: argparse.Namespace) -> None:
    """Reject ``--no-compile`` with ``--compile-mode`` before any work."""
    if args.compile is False and args.compile_mode is not None:
        raise UsageError(f"--no-compile contradicts --compile-mode {args.compile_mode}; give one of them")


def resolve_mode(compile_flag: bool | None, mode: str | None, profile: str, device: torch.device) -> str | None:
    """The compile mode a run uses, or None for eager: ``--compile-mode``, else ``--compile``'s
    default, else the paper profile's CUDA default (``--no-compile``: eager)."""
    if compile_flag is False:
        return None
    preset = PAPER_CUDA_MODE if profile == "paper" and device.type == "cuda" else None
    if mode is not None:
        return mode
    if compile_flag:
        return preset or "default"
    return preset


def capturable_mode(mode: str, sync_bn: bool, accum_steps: int) -> tuple[str, str | None]:
    """``mode`` itself, or (SyncBN, gradient accumulation) the same mode without CUDA graphs and the line that says so."""
    if mode not in WITHOUT_CUDA_GRAPHS or not (sync_bn or accum_steps > 1):
        return mode, None
    fallback = WITHOUT_CUDA_GRAPHS[mode]
    why = "SyncBatchNorm's collectives are not captured into CUDA graphs" if sync_bn else \
        f"gradient accumulation (x{accum_steps}) would add to gradients that the next graph replay overwrites"
    return fallback, f"compile mode {mode}: {why}; compiling with {fallback} instead"


def use_cache_dir(output: Path) -> Path:
    """Point inductor's cache at ``output/compile-cache`` unless ``TORCHINDUCTOR_CACHE_DIR`` is set; return the one used."""
    if CACHE_ENV not in os.environ:
        os.environ[CACHE_ENV] = str((output / CACHE_DIR).resolve())
    return Path(os.environ[CACHE_ENV])


def _seconds_so_far() -> float:
    """Dynamo's compile time in this process so far (tracing and backend, forward and backward)."""
    from torch._dynamo.utils import calculate_time_spent

    return float(calculate_time_spent().get("total_wall_time", 0.0))


def _graph_breaks_so_far() -> Counter:
    from torch._dynamo.utils import counters

    return Counter(counters["graph_break"])


@dataclass
class Compilation:
    """The compile set-up of one run (``mode`` None: eager) and the compile work done since it began."""

    mode: str | None
    seconds_before: float = 0.0
    breaks_before: Counter = field(default_factory=Counter)

    @property
    def cuda_graphs(self) -> bool:
        return self.mode in WITHOUT_CUDA_GRAPHS

    @classmethod
    def eager(cls) -> "Compilation":
        return cls(None)

    @classmethod
    def start(cls, mode: str) -> "Compilation":
        return cls(mode, _seconds_so_far(), _graph_breaks_so_far())

    def seconds(self) -> float | None:
        return None if self.mode is None else _seconds_so_far() - self.seconds_before

    def graph_breaks(self) -> Counter:
        return Counter() if self.mode is None else _graph_breaks_so_far() - self.breaks_before

    def breaks_line(self) -> str | None:
        """One line on the graph breaks so far (None without any): where dynamo fell back to eager."""
        breaks = self.graph_breaks()
        if not breaks:
            return None
        first = next(iter(breaks)).splitlines()[0]
        return f"torch.compile: {sum(breaks.values())} graph break(s); those parts run eagerly between compiled graphs (first: {first})"

    def metrics(self) -> dict[str, object]:
        """metrics.json keys: the mode (None: eager), its compile seconds and graph breaks."""
        return {"compile_mode": self.mode, "compile_s": self.seconds(), "compile_graph_breaks": sum(self.graph_breaks().values()) if self.mode else None}


def prepare(compile_flag: bool | None, mode: str | None, profile: str, device: torch.device, sync_bn: bool, accum_steps: int,
            output: Path, log: Callable[[str], None]) -> Compilation:
    """Resolve the run's compile mode, fall back from CUDA graphs where they would be wrong, point the
    cache at the run folder, and say what was chosen; the model is compiled by ``common.wrap_model``."""
    resolved = resolve_mode(compile_flag, mode, profile, device)
    if resolved is None:
        return Compilation.eager()
    resolved, note = capturable_mode(resolved, sync_bn, accum_steps)
    if note:
        log(note)
    cache = use_cache_dir(output)
    log(f"torch.compile mode {resolved} (the first steps compile); cache {cache}")
    return Compilation.start(resolved)
