"""The optimizer step and the order of samples it reads.

Sample order. Epoch ``e`` is one seeded permutation of the training split, cut into global
batches of ``batch_size`` (the last partial batch is dropped). Global batch ``b`` is cut into
``world x accum`` micro-batches; rank ``r`` reads chunks ``a * world + r`` for accumulation steps
``a = 0 .. accum - 1``. The images of every optimizer step therefore depend only on (seed, epoch,
step, batch size), never on the number of processes: 2 ranks x 1 accumulation step and 1 rank x 2
accumulation steps read the same micro-batches, and a run may resume on another world size when
the global batch is unchanged. Every random draw (augmentation, mixup, drop-path) is seeded from
(seed, epoch or step, index), so a resumed run replays what an uninterrupted one would do.
"""
from __future__ import annotations

import contextlib
import math
import random
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from reproduce.errors import RunStopped, UsageError
from reproduce.data.datasets import SeededSamples, sample_seed
from reproduce.train.distributed import DistContext, any_rank

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


@dataclass(frozen=True)
class Schedule:
    """How a run is laid out in optimizer steps."""

    total_steps: int
    steps_per_epoch: int
    micro_batch: int
    accum_steps: int
    world_size: int

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.accum_steps * self.world_size


def make_schedule(ctx: DistContext, dataset_len: int, micro_batch: int, accum: int, total_steps: int | None = None, epochs: int | None = None) -> Schedule:
    """``total_steps`` given (fine-tuning) or ``epochs`` of full global batches (pretraining)."""
    batch = micro_batch * accum * ctx.world_size
    steps_per_epoch = dataset_len // batch
    if steps_per_epoch < 1:
        raise UsageError(
            f"the training split has {dataset_len} images: too few for one step of batch {batch}; "
            "lower --batch-size or use more data (--synthetic-size)"
        )
    total = total_steps if total_steps is not None else int(epochs) * steps_per_epoch
    return Schedule(total, steps_per_epoch, micro_batch, accum, ctx.world_size)


class StepSampler(Sampler):
    """``(epoch, index)`` keys of this rank's micro-batches of one epoch, from a given step on (see the
    module docstring). Lives in the main process, so ``set_epoch`` between epochs reaches a loader
    with persistent workers."""

    def __init__(self, dataset_len: int, sched: Schedule, rank: int, seed: int):
        self.n, self.sched, self.rank, self.seed = dataset_len, sched, rank, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip_steps: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_steps

    def __len__(self) -> int:
        return (self.sched.steps_per_epoch - self.skip) * self.sched.accum_steps * self.sched.micro_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        s = self.sched
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        for step in range(self.skip, s.steps_per_epoch):
            batch = order[step * s.global_batch : (step + 1) * s.global_batch]
            for a in range(s.accum_steps):
                chunk = a * s.world_size + self.rank
                yield from ((self.epoch, i) for i in batch[chunk * s.micro_batch : (chunk + 1) * s.micro_batch])


def step_batches(data: Dataset, ctx: DistContext, sched: Schedule, start_step: int, seed: int, num_workers: int) -> Iterator[tuple[int, list]]:
    """``(epoch, [micro-batches])`` for every optimizer step from ``start_step`` on, from one loader
    whose workers persist across epochs."""
    sampler = StepSampler(len(data), sched, ctx.rank, seed)
    loader = DataLoader(
        SeededSamples(data, seed), batch_size=sched.micro_batch, sampler=sampler, num_workers=num_workers,
        drop_last=True, pin_memory=ctx.device.type == "cuda", persistent_workers=num_workers > 0, worker_init_fn=ignore_stop_signals,
    )
    step = start_step
    while step < sched.total_steps:
        epoch, offset = divmod(step, sched.steps_per_epoch)
        sampler.set_epoch(epoch, offset)
        micro: list = []
        for batch in loader:
            micro.append(batch)
            if len(micro) == sched.accum_steps:
                yield epoch, micro
                micro, step = [], step + 1
                if step >= sched.total_steps:
                    return


# --------------------------------------------------------------------------- precision


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``--amp`` on ``device``: bf16 anywhere; fp16 on CUDA only (CPU fp16
    autocast is slow and needs loss scaling, so it runs in fp32); None for fp32."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


# --------------------------------------------------------------------------- signals


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader workers leave stop signals to the main process (a Ctrl-C reaches the whole process
    group; SIGUSR1 would kill them): it finishes the step, saves, and shuts them down."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class Preemption:
    """While active, SIGTERM / SIGUSR1 (SLURM's warning) / SIGINT only set ``signum``: the loop
    finishes its step, saves and stops. A second signal ends the process at once."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise SystemExit(128 + signum)
        self.signum = signum

    def __enter__(self) -> "Preemption":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def stopped(signum: int, step: int, total: int, saved_to: str) -> RunStopped:
    """The one line and exit status (128 + signal: 143 SIGTERM, 130 SIGINT) of a stopped run."""
    name = signal.Signals(signum).name
    return RunStopped(f"{name}: interrupted at step {step} of {total}; checkpoint saved to {saved_to}; rerun the same command to resume", 128 + signum)


# --------------------------------------------------------------------------- the optimizer step


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    stop: bool  # a stop signal reached some rank: every rank stops after this step


@dataclass
class Trainer:
    """One optimizer step over ``accum_steps`` micro-batches; ``loss_fn(model, batch)`` returns a
    micro-batch's loss. Non-finite losses and stop requests are OR-ed over ranks in one all-reduce
    per step, so every rank takes the same decision at the same step."""

    ctx: DistContext
    model: nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler: step(epoch) and step_update(num_updates)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    amp: str
    clip_grad: float | None
    seed: int
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = autocast_dtype(self.amp, self.ctx.device)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.dtype is torch.float16)

    def state(self) -> dict[str, Any]:
        return {"model_state": unwrap(self.model).state_dict(), "optimizer_state": self.optimizer.state_dict(), "scaler_state": self.scaler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scaler.load_state_dict(state["scaler_state"])

    def _seed_micro_step(self, step: int, micro: int) -> None:
        s = sample_seed(self.seed, -1 - step, micro * self.ctx.world_size + self.ctx.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def train_step(self, step: int, micro_batches: list, stop_requested: Callable[[], bool]) -> StepResult:
        """Forward/backward every micro-batch, then (after ``stop_requested()`` and the loss check are
        agreed over ranks) the optimizer step; a non-finite loss applies nothing and raises."""
        self.model.train()
        total, finite = 0.0, True
        for i, batch in enumerate(micro_batches):
            self._seed_micro_step(step, i)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            with sync:
                with autocast(self.ctx.device, self.dtype):
                    loss = self.loss_fn(self.model, batch)
                self.scaler.scale(loss / len(micro_batches)).backward()
            value = float(loss.detach())
            finite = finite and math.isfinite(value)
            total += value / len(micro_batches)
        nonfinite, stop = any_rank(self.ctx, [not finite, stop_requested()])
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            raise RunStopped(f"error: the loss is not finite at step {step} (checked on all {self.ctx.world_size} rank(s); "
                             "nothing of this step was applied, the last checkpoint is intact); lower --lr or check the data", 1)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(total, float(grad_norm), stop)


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
