"""The shared training engine of ``pretrain`` and ``finetune``: command-line options, profile
recipes with explicit overrides, up-front validation, seeding, the step loop (DDP, AMP, gradient
accumulation, clipping), atomic checkpoints with resume, and the metrics JSON.

Training is a sequence of optimizer steps. Step ``s`` reads micro-batches from epoch
``s // steps_per_epoch`` at a fixed position, and every random draw (sample augmentation, mixup,
drop-path) is seeded from (seed, epoch or step, index, rank). A run resumed from the checkpoint of
step ``s`` therefore replays exactly what an uninterrupted run would have done from ``s`` on.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from timm.utils import dispatch_clip_grad
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from models.factory import check_model_name
from reproduce.data import synthetic
from reproduce.data.datasets import SeededSamples, sample_seed
from reproduce.train.checkpointing import CHECKPOINT_FORMAT, CHECKPOINT_NAME, METRICS_NAME, WEIGHTS_NAME, load_checkpoint, save_checkpoint, save_weights, write_metrics
from reproduce.train.distributed import DistContext, average_bn_stats, barrier, env_world_size, gather_digests, setup, teardown

PROFILES = ("smoke", "paper")
DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")
# Recipe keys that change how a run is executed but not its numbers (left out of the resume check).
_EXECUTION_KEYS = ("checkpoint_every", "num_workers", "log_every")


class SettingsError(ValueError):
    """A command-line setting that cannot work; raised before any data is read."""


# --------------------------------------------------------------------------- options and recipes


def add_common_arguments(parser: argparse.ArgumentParser, default_dataset: str | None) -> None:
    """Options shared by pretrain and finetune. Recipe options default to None: the profile fills them."""
    parser.add_argument("--model", required=True, help="model name, e.g. hrvit_b1 (see models.factory.available_models)")
    parser.add_argument("--profile", choices=PROFILES, default="smoke", help="recipe defaults: smoke (generated data, seconds) or paper (the paper's recipe)")
    parser.add_argument("--dataset", default=default_dataset, help="dataset name (see below)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset root; for 'synthetic' the cache folder of generated data (default data/synthetic)")
    parser.add_argument("--output", type=Path, required=True, help="run folder: checkpoint.pt and metrics.json are written here")
    parser.add_argument("--ablate", nargs="+", default=None, metavar="NAME", help="HRViT only: techniques to turn off (models.hrvit.ABLATIONS, or 'all')")
    parser.add_argument("--window-sizes", nargs=4, type=int, default=None, metavar=("A", "B", "C", "D"), help="HRViT only: stripe width per branch, e.g. 1 2 7 7")
    parser.add_argument("--batch-size", type=int, help="global batch size (all ranks and accumulation steps together)")
    parser.add_argument("--accum-steps", type=int, help="gradient accumulation steps (per-rank micro-batch = batch / (world * accum))")
    parser.add_argument("--lr", type=float, help="base learning rate")
    parser.add_argument("--weight-decay", type=float)
    parser.add_argument("--drop-path", type=float, help="backbone stochastic-depth rate")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--num-workers", type=int, help="data-loader worker processes per rank")
    parser.add_argument("--synthetic-size", type=int, help="generated data: images per split")
    parser.add_argument("--checkpoint-every", type=int, help="save checkpoint.pt every N optimizer steps (0: only at the end)")
    parser.add_argument("--log-every", type=int, help="one log line every N optimizer steps (and at every epoch end)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="mixed precision (used on CUDA only)")
    parser.add_argument("--sync-bn", action=argparse.BooleanOptionalAction, default=None, help="SyncBatchNorm across GPUs (torch's SyncBN is GPU-only)")
    parser.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=None, help="deterministic kernels (default on for smoke)")
    parser.add_argument("--threads", type=int, help="intra-op CPU threads per process (smoke: 1, faster for tiny models on shared cores; paper: torch's default)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if OUTPUT/checkpoint.pt exists")
    parser.add_argument("--kill-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self after K steps


def resolve_recipe(defaults: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The profile's defaults with every explicitly given command-line value laid over them."""
    recipe = dict(defaults)
    for key in defaults:
        value = getattr(args, key, None)
        if value is not None:
            recipe[key] = list(value) if isinstance(value, tuple) else value
    return recipe


def model_settings(args: argparse.Namespace, drop_path: float) -> dict[str, Any]:
    """The model options a run records and passes on: ablations, window sizes, drop-path."""
    return {"ablate": sorted(args.ablate) if args.ablate else [], "window_sizes": list(args.window_sizes) if args.window_sizes else None, "drop_path_rate": drop_path}


def model_kwargs(name: str, settings: dict[str, Any]) -> dict[str, Any]:
    """``build_model`` keyword arguments for ``settings``; ablations and windows exist only in HRViT."""
    from models.hrvit import option_kwargs

    try:
        options = option_kwargs(name, settings.get("ablate") or (), settings.get("window_sizes"))
    except ValueError as err:
        raise SettingsError(str(err)) from err
    return {"drop_path_rate": settings["drop_path_rate"], **options}


def validate_common(model: str, recipe: dict[str, Any]) -> int:
    """Checks every run needs; returns the per-rank micro-batch size."""
    try:
        check_model_name(model)
    except ValueError as err:
        raise SettingsError(str(err)) from err
    for key in ("lr", "batch_size", "accum_steps"):
        if not recipe[key] > 0:
            raise SettingsError(f"--{key.replace('_', '-')} must be positive, got {recipe[key]}")
    for key in ("weight_decay", "drop_path", "checkpoint_every", "num_workers", "synthetic_size", "threads"):
        if recipe.get(key) is not None and recipe[key] < 0:
            raise SettingsError(f"--{key.replace('_', '-')} must be >= 0, got {recipe[key]}")
    if not 0 <= recipe["drop_path"] < 1:
        raise SettingsError(f"--drop-path must be in [0, 1), got {recipe['drop_path']}")
    world, accum = env_world_size(), recipe["accum_steps"]
    if recipe["batch_size"] % (world * accum):
        raise SettingsError(
            f"--batch-size {recipe['batch_size']} is not divisible by world size {world} x accumulation steps {accum}; "
            f"use a multiple of {world * accum} or change --accum-steps / the number of processes"
        )
    return recipe["batch_size"] // (world * accum)


def check_multiple_of_32(flag: str, size: int) -> None:
    if size < 32 or size % 32:
        raise SettingsError(f"{flag} {size} must be a positive multiple of 32 (the backbones downsample by 32)")


# --------------------------------------------------------------------------- seeding and set-up


def dataset_root(args: argparse.Namespace, ctx: DistContext, kind: str, seed: int, count: int, pixels: int) -> Path:
    """The folder to read: ``--data-root`` for a real dataset; for ``synthetic`` the generated data of
    ``kind`` (cls|seg) in the real layout, made once per node by local rank 0 while the others wait."""
    if args.dataset != "synthetic":
        return Path(args.data_root)
    cache = Path(args.data_root) if args.data_root is not None else DEFAULT_SYNTHETIC_ROOT
    if ctx.local_rank == 0:
        synthetic.ensure_synthetic(cache, kind, seed, count, pixels)
    barrier(ctx)
    return synthetic.ensure_synthetic(cache, kind, seed, count, pixels)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_threads(threads: int | None) -> None:
    """Pin the intra-op thread count. At smoke sizes HRViT is op-overhead bound, and two threads per
    process spin against each other on a shared 2-core machine (measured 3x slower)."""
    if threads:
        torch.set_num_threads(threads)


def configure_determinism(deterministic: bool) -> None:
    """Deterministic kernels (CPU runs then repeat bit for bit); cuDNN autotuning only when off."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.backends.cudnn.benchmark = not deterministic


def use_amp(recipe: dict[str, Any], ctx: DistContext) -> bool:
    return bool(recipe["amp"]) and ctx.device.type == "cuda"


def use_sync_bn(recipe: dict[str, Any], ctx: DistContext) -> bool:
    return bool(recipe["sync_bn"]) and ctx.distributed and ctx.device.type == "cuda"


def wrap_ddp(model: nn.Module, ctx: DistContext, sync_bn: bool) -> nn.Module:
    """Move to the rank's device, convert BN to SyncBN when asked, and wrap in DDP when distributed."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


# --------------------------------------------------------------------------- logging


class Logger:
    """Rank 0 only: a tqdm bar on a terminal (nothing on a pipe) and plain lines for logs."""

    def __init__(self, ctx: DistContext, name: str):
        self.ctx, self.name, self.start = ctx, name, time.time()

    def line(self, text: str) -> None:
        if self.ctx.is_main:
            tqdm.write(f"[{self.name} {time.time() - self.start:7.1f}s] {text}", file=sys.stdout)
            sys.stdout.flush()

    def bar(self, total: int, initial: int, desc: str) -> tqdm:
        return tqdm(total=total, initial=initial, desc=desc, disable=None if self.ctx.is_main else True, dynamic_ncols=True, leave=False)


# --------------------------------------------------------------------------- checkpoints and metrics


def git_commit() -> str:
    """HEAD of the repository holding this code, '-dirty' if it has uncommitted changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


def run_fingerprint(identity: dict[str, Any]) -> str:
    """Hash of everything that determines a run's numbers, to refuse resuming a different run."""
    ident = dict(identity)
    ident["recipe"] = {k: v for k, v in ident["recipe"].items() if k not in _EXECUTION_KEYS}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- the step loop


@dataclass
class Schedule:
    """How a run is laid out in optimizer steps."""

    total_steps: int
    steps_per_epoch: int
    micro_batch: int
    accum_steps: int


def make_schedule(ctx: DistContext, dataset_len: int, micro_batch: int, accum: int, total_steps: int | None = None, epochs: int | None = None) -> Schedule:
    per_rank = dataset_len // ctx.world_size
    steps_per_epoch = per_rank // (micro_batch * accum)
    if steps_per_epoch < 1:
        raise SettingsError(
            f"the training split has {dataset_len} images: too few for one step of {micro_batch * accum} images per rank "
            f"on {ctx.world_size} rank(s); lower --batch-size or use more data (--synthetic-size)"
        )
    total = total_steps if total_steps is not None else int(epochs) * steps_per_epoch
    return Schedule(total, steps_per_epoch, micro_batch, accum)


def _epoch_loader(data: SeededSamples, ctx: DistContext, sched: Schedule, epoch: int, skip_steps: int, seed: int, num_workers: int) -> DataLoader:
    sampler = DistributedSampler(data, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    per_step = sched.micro_batch * sched.accum_steps
    indices = list(sampler)[skip_steps * per_step : sched.steps_per_epoch * per_step]
    return DataLoader(
        data, batch_size=sched.micro_batch, sampler=[(epoch, i) for i in indices], num_workers=num_workers,
        drop_last=True, pin_memory=ctx.device.type == "cuda",
    )


def step_batches(data: Dataset, ctx: DistContext, sched: Schedule, start_step: int, seed: int, num_workers: int) -> Iterator[tuple[int, list]]:
    """``(epoch, [micro-batches])`` for every optimizer step from ``start_step`` on."""
    seeded = SeededSamples(data, seed)
    step = start_step
    while step < sched.total_steps:
        epoch, offset = divmod(step, sched.steps_per_epoch)
        micro: list = []
        for batch in _epoch_loader(seeded, ctx, sched, epoch, offset, seed, num_workers):
            micro.append(batch)
            if len(micro) == sched.accum_steps:
                yield epoch, micro
                micro, step = [], step + 1
                if step >= sched.total_steps:
                    return


@dataclass
class Trainer:
    """Everything the step loop needs; ``loss_fn(model, batch, step)`` returns the micro-batch loss."""

    ctx: DistContext
    model: nn.Module  # DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scheduler: Any  # a timm scheduler: step(epoch) and step_update(num_updates)
    loss_fn: Callable[[nn.Module, Any, int], torch.Tensor]
    amp: bool
    clip_grad: float | None
    seed: int
    log: Logger
    log_every: int

    def __post_init__(self) -> None:
        self.scaler = torch.amp.GradScaler(self.ctx.device.type, enabled=self.amp)

    def state(self) -> dict[str, Any]:
        return {"model_state": unwrap(self.model).state_dict(), "optimizer_state": self.optimizer.state_dict(), "scaler_state": self.scaler.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        unwrap(self.model).load_state_dict(state["model_state"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        self.scaler.load_state_dict(state["scaler_state"])

    def _seed_step(self, step: int, micro: int) -> None:
        s = sample_seed(self.seed, -1 - step, micro * self.ctx.world_size + self.ctx.rank)
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)

    def train_step(self, step: int, micro_batches: list) -> float:
        """One optimizer step over ``accum_steps`` micro-batches (DDP syncs gradients on the last)."""
        self.model.train()
        total = 0.0
        for i, batch in enumerate(micro_batches):
            self._seed_step(step, i)
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not isinstance(self.model, DistributedDataParallel) else self.model.no_sync()
            with sync:
                with torch.autocast(self.ctx.device.type, dtype=torch.float16, enabled=self.amp):
                    loss = self.loss_fn(self.model, batch, step)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss.item()} at step {step}; lower --lr or check the data")
                self.scaler.scale(loss / len(micro_batches)).backward()
            total += float(loss.detach()) / len(micro_batches)
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), self.clip_grad, mode="norm")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    def fit(
        self, data: Dataset, sched: Schedule, start_step: int, num_workers: int,
        save: Callable[[int], None], checkpoint_every: int, kill_after_steps: int | None = None,
    ) -> dict[str, float]:
        """Run steps ``start_step .. total_steps - 1``; returns throughput figures of this process."""
        images_per_step = sched.micro_batch * sched.accum_steps * self.ctx.world_size
        epoch_now = None
        t0, steps_run, losses = time.time(), 0, []
        bar = self.log.bar(sched.total_steps, start_step, "train")
        step = start_step
        self.scheduler.step_update(step)
        for epoch, micro in step_batches(data, self.ctx, sched, start_step, self.seed, num_workers):
            if epoch != epoch_now:
                self.scheduler.step(epoch)
                epoch_now = epoch
            loss = self.train_step(step, micro)
            step += 1
            steps_run += 1
            losses.append(loss)
            self.scheduler.step_update(step)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            end_of_epoch = step % sched.steps_per_epoch == 0
            if step % self.log_every == 0 or end_of_epoch or step == sched.total_steps:
                lr = max(g["lr"] for g in self.optimizer.param_groups)
                rate = steps_run * images_per_step / max(time.time() - t0, 1e-9)
                self.log.line(f"epoch {epoch} step {step}/{sched.total_steps} loss {np.mean(losses):.4f} lr {lr:.3g} {rate:.1f} img/s")
                losses = []
            if checkpoint_every and step % checkpoint_every == 0 and step < sched.total_steps:
                save(step)
            if kill_after_steps is not None and step >= kill_after_steps:
                bar.close()
                self.log.line(f"--kill-after-steps {kill_after_steps}: killing this process (simulated crash)")
                os.kill(os.getpid(), signal.SIGKILL)
        bar.close()
        train_time = time.time() - t0
        return {"train_time_s": train_time, "images_per_s": steps_run * images_per_step / train_time if steps_run else 0.0, "steps_run": steps_run}


def resume_state(output: Path, fingerprint: str, no_resume: bool, log: Logger) -> dict[str, Any] | None:
    """The checkpoint in ``output`` to resume from, if any; refuses one from a different run."""
    path = output / CHECKPOINT_NAME
    if no_resume or not path.is_file():
        return None
    state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        raise SettingsError(
            f"{path} belongs to a run with different settings (fingerprint {state.get('fingerprint')} != {fingerprint}); "
            "use another --output, delete it, or pass --no-resume"
        )
    log.line(f"resuming from {path} at step {state['step']}")
    return state


def launch(args: argparse.Namespace, validate: Callable[[argparse.Namespace], tuple], train: Callable[..., int]) -> int:
    """Run a training command: ``validate(args)`` rejects bad settings before any data or process group
    is touched, then ``train(args, recipe, settings, micro, ctx, start)`` runs inside the process group."""
    recipe, settings, micro = validate(args)
    start = time.time()
    ctx = setup(args.device)
    try:
        return train(args, recipe, settings, micro, ctx, start)
    finally:
        teardown(ctx)


def train_evaluate_record(
    args: argparse.Namespace, ctx: DistContext, log: Logger, trainer: Trainer, train_set: Dataset, sched: Schedule,
    recipe: dict[str, Any], identity: dict[str, Any], checkpoint_extras: dict[str, Any],
    evaluate: Callable[[], dict[str, Any]], summary: Callable[[dict[str, Any]], str],
    effective: dict[str, Any], metrics_extras: dict[str, Any], start: float,
) -> int:
    """The sequence every training command shares: resume from ``args.output`` when a checkpoint of the
    same run (``identity``) is there, train to the end with periodic atomic checkpoints, synchronise BN
    statistics over ranks, evaluate, then write the final checkpoint and ``metrics.json`` on rank 0."""
    fingerprint = run_fingerprint(identity)
    ckpt_path = args.output / CHECKPOINT_NAME

    def checkpoint(step: int, finished: bool = False) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT, **identity, "profile": args.profile, **checkpoint_extras, "fingerprint": fingerprint,
            "step": step, "total_steps": sched.total_steps, "finished": finished, **trainer.state(),
        }

    def save(step: int) -> None:
        if ctx.is_main:
            save_checkpoint(ckpt_path, checkpoint(step))
            log.line(f"checkpoint at step {step} -> {ckpt_path}")

    state = resume_state(args.output, fingerprint, args.no_resume, log)
    start_step = 0
    if state is not None:
        trainer.load_state(state)
        start_step = state["step"]
    throughput = trainer.fit(train_set, sched, start_step, recipe["num_workers"], save, recipe["checkpoint_every"], args.kill_after_steps)
    average_bn_stats(ctx, unwrap(trainer.model))
    digests = gather_digests(ctx, unwrap(trainer.model))
    if ctx.is_main:  # before the evaluation, so that a failure there loses no training
        final = checkpoint(sched.total_steps, finished=True)
        save_checkpoint(ckpt_path, final)
        save_weights(args.output / WEIGHTS_NAME, final)
    result = evaluate()
    log.line(summary(result))
    if ctx.is_main:
        metrics = {
            **result, **throughput, "wall_time_s": time.time() - start, "profile": args.profile, "dataset": args.dataset,
            "data_source": identity["data_source"], "model": args.model, "model_settings": identity["model_settings"],
            "recipe": recipe, "effective": effective, "steps": sched.total_steps, **metrics_extras,
            "resumed_from_step": start_step or None,
            "ranks_identical": len(set(digests)) == 1 if ctx.distributed else None, "param_digests": digests,
            "checkpoint": str(ckpt_path), "weights": str(args.output / WEIGHTS_NAME), "git_commit": git_commit(),
        }
        write_metrics(args.output / METRICS_NAME, metrics)
        log.line(f"wrote {args.output / METRICS_NAME}")
    return 0
