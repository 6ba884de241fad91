"""The optimizer step and the order of samples it reads.

Sample order. Epoch ``e`` is one seeded permutation of the training split, cut into global
batches of ``batch_size`` (the last partial batch is dropped). Global batch ``b`` is cut into
``world x accum`` micro-batches; rank ``r`` reads chunks ``a * world + r`` for accumulation steps
``a = 0 .. accum - 1``. The images of every optimizer step therefore depend only on (seed, epoch,
step, batch size), never on the number of processes: 2 ranks x 1 accumulation step and 1 rank x 2
accumulation steps read the same micro-batches, and a run may resume on another world size when
the global batch is unchanged. Every random draw (augmentation, mixup, drop-path) is seeded from
(seed, epoch or step, index), so a resumed run replays what an uninterrupted one would do.

Reads. A step leaves its loss, gradient norm and non-finite flags on the device; the caller reads
them (:meth:`Trainer.read`), and agrees a stop request over ranks, only every ``--log-every`` steps
and at checkpoints, evaluations and epoch ends, so on a GPU the CPU queues the next steps instead of
waiting for each one. A stop signal is honoured at the next read, at most ``--log-every`` steps late.
"""
from __future__ import annotations

import contextlib
import random
import signal
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, Sampler

from reproduce.errors import RunStopped, UsageError
from reproduce.data.datasets import SeededSamples, sample_seed
from reproduce.train.compilation import Compilation
from reproduce.train.distributed import DistContext

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
    whose workers persist across epochs; on a GPU the micro-batches arrive already on the device."""
    return prefetch_to_device(_loader_steps(data, ctx, sched, start_step, seed, num_workers), ctx.device)


def _loader_steps(data: Dataset, ctx: DistContext, sched: Schedule, start_step: int, seed: int, num_workers: int) -> Iterator[tuple[int, list]]:
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


def prefetch_to_device(steps: Iterator[tuple[int, list]], device: torch.device) -> Iterator[tuple[int, list]]:
    """Copy the next step's micro-batches (pinned by the loader) to the GPU on a side stream while
    the current step computes; the compute stream waits for that copy only. On a CPU: ``steps``."""
    if device.type != "cuda":
        yield from steps
        return
    copy_stream = torch.cuda.Stream(device)
    ahead = None
    for epoch, micro in steps:
        with torch.cuda.stream(copy_stream):
            moved = _to_device(micro, device)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        if ahead is not None:
            yield _ready(*ahead, device)
        ahead = epoch, moved, copied
    if ahead is not None:
        yield _ready(*ahead, device)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(item, device) for item in batch)
    return batch


def _ready(epoch: int, micro: list, copied: torch.cuda.Event, device: torch.device) -> tuple[int, list]:
    """Make the compute stream wait for the copy, and tell the allocator the copies are used there."""
    compute = torch.cuda.current_stream(device)
    compute.wait_event(copied)
    for tensor in _tensors(micro):
        tensor.record_stream(compute)
    return epoch, micro


def _tensors(batch: Any) -> Iterator[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        yield batch
    elif isinstance(batch, (list, tuple)):
        for item in batch:
            yield from _tensors(item)


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


def optimizer_options(device: torch.device) -> dict[str, Any]:
    """Fused AdamW on a GPU: one kernel for all parameters, and it skips a non-finite step on the
    device (see ``Trainer``); the CPU keeps torch's default implementation and its exact numbers."""
    return {"fused": True} if device.type == "cuda" else {}


IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable")


def keep_implementation(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint's optimizer state with ``optimizer``'s implementation flags, which say how this
    process computes the step (fused on a GPU), not what: a run saved on a CPU, or before the GPU
    used the fused kernel, resumes with it."""
    groups = [{**g, **{k: own[k] for k in IMPLEMENTATION_KEYS if k in own}} for g, own in zip(saved["param_groups"], optimizer.param_groups)]
    return {**saved, "param_groups": groups}


@dataclass
class StepResult:
    loss: float
    grad_norm: float
    stop: bool  # a stop signal reached some rank: every rank stops after this step


@dataclass
class PendingStep:
    """An optimizer step whose values are still on the device, read later by :meth:`Trainer.read`."""

    step: int
    losses: list[torch.Tensor]  # one per micro-batch, this rank's
    grad_norm: torch.Tensor
    flags: torch.Tensor  # [loss not finite, gradients not finite], OR-ed over ranks


@dataclass
class Trainer:
    """One optimizer step over ``accum_steps`` micro-batches; ``loss_fn(model, batch)`` returns a
    micro-batch's loss.

    :meth:`enqueue_step` runs a step without reading anything back from the device, so the CPU
    queues the next step while the GPU computes this one; :meth:`read` reads the queued steps' losses
    and gradient norms in one transfer and agrees a stop request over ranks in one all-reduce.
    A step whose loss (on any rank) or gradients are not finite applies nothing: fused optimizers
    skip it on the device (their ``found_inf`` input), others after the flag is read on the host
    (free on a CPU; a per-step wait on a GPU). The non-finite flags are OR-ed over ranks every step
    with a collective that NCCL runs without blocking the host, so every replica skips the same
    steps; ``read`` raises ``RunStopped`` naming the first such step. :meth:`train_step` is both
    at once (read every step)."""

    ctx: DistContext
    model: nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler: step(epoch) and step_update(num_updates)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    amp: str
    clip_grad: float | None
    seed: int
    compilation: Compilation = field(default_factory=Compilation.eager)  # how the model was compiled, for metrics.json
    scaler: torch.amp.GradScaler = field(init=False)

    def __post_init__(self) -> None:
        self.dtype = autocast_dtype(self.amp, self.ctx.device)
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.dtype is torch.float16)

    def state(self) -> dict[str, Any]:
        return {"model_state": unwrap(self.model).state_dict(), "optimizer_state": self.optimizer.state_dict(), "scaler_state": self.scaler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(keep_implementation(state["optimizer_state"], self.optimizer))
        self.scaler.load_state_dict(state["scaler_state"])

    def _seed_micro_step(self, step: int, micro: int) -> None:
        s = sample_seed(self.seed, -1 - step, micro * self.ctx.world_size + self.ctx.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def train_step(self, step: int, micro_batches: list, stop_requested: Callable[[], bool]) -> StepResult:
        """One step read back at once: its loss, gradient norm and the stop decision of all ranks."""
        return self.read([self.enqueue_step(step, micro_batches)], stop_requested())[0]

    def enqueue_step(self, step: int, micro_batches: list) -> PendingStep:
        """Forward/backward every micro-batch, then the optimizer step unless the loss or the gradients
        are not finite; nothing is read back from the device (see the class docstring)."""
        self.model.train()
        losses = []
        for i, batch in enumerate(micro_batches):
            if self.compilation.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # the previous replay's outputs are no longer needed
            self._seed_micro_step(step, i)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            with sync:
                with autocast(self.ctx.device, self.dtype):
                    loss = self.loss_fn(self.model, batch)
                self.scaler.scale(loss / len(micro_batches)).backward()
            losses.append(loss.detach())
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.clip_grad:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        flags = torch.stack([~torch.isfinite(torch.stack(losses)).all(), ~torch.isfinite(grad_norm)]).float()
        if self.ctx.distributed:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        self._apply(flags)
        return PendingStep(step, losses, grad_norm.detach(), flags)

    def _apply(self, flags: torch.Tensor) -> None:
        """The optimizer step, skipped when ``flags`` says the loss or the gradients are not finite.
        Under fp16 the scaler's own overflow check skips the step too and lowers the scale."""
        if getattr(self.optimizer, "_step_supports_amp_scaling", False):  # fused: the skip happens on the device
            self.optimizer.found_inf, self.optimizer.grad_scale = flags.amax(), None
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
        elif not flags.amax().item() or (self.scaler.is_enabled() and not flags[0].item()):
            self.scaler.step(self.optimizer)  # an fp16 overflow alone is the scaler's to skip
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def read(self, pending: list[PendingStep], stop_requested: bool) -> list[StepResult]:
        """The values of ``pending`` (in order) in one device-to-host transfer, the stop request OR-ed
        over ranks in one all-reduce (set on the last result); raises ``RunStopped`` for the first step
        whose loss or gradients were not finite (an fp16 overflow, skipped by the scaler, is not one)."""
        stop = torch.tensor([float(stop_requested)], device=self.ctx.device)
        if self.ctx.distributed:
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        rows = [torch.cat([torch.stack([*p.losses, p.grad_norm]), p.flags]).double() for p in pending]
        values = iter(torch.cat([*rows, stop.double()]).tolist())
        results = []
        for p in pending:
            losses = [next(values) for _ in p.losses]
            grad_norm, loss_bad, grads_bad = next(values), next(values), next(values)
            if loss_bad or (grads_bad and not self.scaler.is_enabled()):
                what = "loss" if loss_bad else "gradient norm"
                raise RunStopped(f"error: the {what} is not finite at step {p.step} (checked on all {self.ctx.world_size} rank(s); "
                                 "nothing of this step was applied, the last checkpoint is intact); lower --lr or check the data", 1)
            total = 0.0
            for value in losses:
                total += value / len(losses)
            results.append(StepResult(total, grad_norm, False))
        results[-1].stop = bool(next(values))
        return results


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model
