"""What a run reports while it runs, on rank 0 only: plain log lines (periodic, so a log file under
``dvc repro`` or SLURM stays readable), a tqdm bar only on a terminal, and DVCLive curves in
``OUTPUT/dvclive/`` (per step: train/loss, train/lr, train/grad_norm, train/images_per_s,
train/memory_mb; per evaluation: eval/top1 or eval/miou). The pipeline declares the plots itself,
so DVCLive writes no dvc.yaml and makes no experiment."""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from reproduce.params import DVCLIVE_DIR
from reproduce.train.distributed import DistContext

LIVE_SUMMARY = "metrics.json"  # DVCLive's summary of the latest step, in its folder (``Live.metrics_file``)


def memory_mb(device: torch.device) -> float:
    """Peak memory so far: CUDA memory allocated by torch, or the process's peak RSS on a CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def drop_torn_summary(path: Path) -> None:
    """Delete DVCLive's summary if it is not a JSON document: a run killed while DVCLive rewrote it leaves
    it empty or cut short, and DVCLive cannot resume over that. The summary is rewritten at the next
    logged step; the per-step history (``plots/metrics``) is kept."""
    try:
        json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (ValueError, UnicodeDecodeError):
        path.unlink()


class Logger:
    """Rank 0 only: log lines, a progress bar on a terminal, and DVCLive metrics once ``live`` is opened."""

    def __init__(self, ctx: DistContext, name: str):
        self.ctx, self.name, self.start = ctx, name, time.time()
        self.live = None

    def line(self, text: str) -> None:
        if self.ctx.is_main:
            tqdm.write(f"[{self.name} {time.time() - self.start:7.1f}s] {text}", file=sys.stdout)
            sys.stdout.flush()

    def bar(self, total: int, initial: int, desc: str) -> tqdm:
        """A bar on a terminal only (``disable=None``); the periodic log lines carry the progress otherwise."""
        return tqdm(total=total, initial=initial, desc=desc, disable=None if self.ctx.is_main else True, dynamic_ncols=True, leave=False)

    def open_live(self, output: Path, resume: bool) -> None:
        """Start DVCLive in ``output/dvclive`` (appending when the run resumes)."""
        if self.ctx.is_main:
            from dvclive import Live  # rank 0 only: the other ranks never load dvclive (and dvc's config machinery)

            if resume:
                drop_torn_summary(output / DVCLIVE_DIR / LIVE_SUMMARY)
            self.live = Live(dir=str(output / DVCLIVE_DIR), resume=resume, save_dvc_exp=False, dvcyaml=None)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Log ``values`` at optimizer step ``step`` (train/... per step, eval/... per evaluation)."""
        if self.live is not None:
            self.live.step = step
            for key, value in values.items():
                if math.isfinite(value):  # fp16 steps skipped for an inf gradient norm: JSON has no inf
                    self.live.log_metric(key, value)

    def flush(self) -> None:
        """Write DVCLive's summary for the step logged last."""
        if self.live is not None:
            self.live.make_summary()

    def close(self) -> None:
        if self.live is not None:
            self.live.end()
            self.live = None
