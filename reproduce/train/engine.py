"""The run of a training command, shared by ``pretrain`` and ``finetune``: options and up-front
validation, set-up (seeding, threads, DDP, compile), the data index, and :func:`run_training`,
which resumes, trains with periodic checkpoints and evaluations, survives signals, and records.

The pieces live beside it: ``recipes`` (typed recipes, the single source of truth), ``loop`` (the
optimizer step and the sample order), ``checkpointing`` (files and the resume rule),
``distributed`` (process group) and ``runlog`` (log lines and DVCLive).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset

from models.factory import check_model_name
from reproduce.data import layouts, synthetic
from reproduce.train import compilation, recipes
from reproduce.train.checkpointing import (
    BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME, METRICS_NAME, WEIGHTS_NAME, atomic_write, identity_diff, load_checkpoint, run_fingerprint,
    save_checkpoint, save_weights, write_metrics,
)
from reproduce.train.distributed import DistContext, average_bn_stats, barrier, env_world_size, gather_digests, gather_objects, setup, teardown
from reproduce.train.loop import PendingStep, Preemption, Schedule, Trainer, precision_name, step_batches, stopped, unwrap
from reproduce.train.recipes import SettingsError
from reproduce.train.runlog import Logger, memory_mb

DEFAULT_SYNTHETIC_ROOT = Path("data/synthetic")
INDEX_DIR = ".data-index"
INDEX_VERSION = 1

# --------------------------------------------------------------------------- options and validation


def add_common_arguments(parser: argparse.ArgumentParser, kind: str, default_dataset: str | None) -> None:
    """Options shared by pretrain and finetune, then one flag per recipe field (None: the profile fills it)."""
    parser.add_argument("--model", required=True, help="model name, e.g. hrvit_b1 (see models.factory.available_models)")
    parser.add_argument("--profile", choices=recipes.PROFILES, default="smoke", help="recipe defaults: smoke (generated data, seconds), proxy (generated data, long enough to learn) or paper (the paper's recipe)")
    parser.add_argument("--dataset", default=default_dataset, help="dataset name (see below)")
    parser.add_argument("--data-root", type=Path, default=None, help="dataset root; for 'synthetic' the cache folder of generated data (default data/synthetic)")
    parser.add_argument("--output", type=Path, required=True, help="run folder: checkpoint.pt, model.safetensors, best.pt, metrics.json, dvclive/")
    parser.add_argument("--ablate", nargs="+", default=None, metavar="NAME", help="HRViT only: techniques to turn off (models.hrvit.ABLATIONS, or 'all')")
    parser.add_argument("--window-sizes", nargs=4, type=int, default=None, metavar=("A", "B", "C", "D"), help="HRViT only: stripe width per branch, e.g. 1 2 7 7")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    compilation.add_compile_arguments(parser)
    parser.add_argument("--no-resume", action="store_true", help="start from scratch even if OUTPUT/checkpoint.pt exists")
    parser.add_argument("--kill-after-steps", type=int, default=None, help=argparse.SUPPRESS)  # tests: SIGKILL self after K steps
    parser.add_argument("--inject-failure", default=None, metavar="RANK:STEP", help=argparse.SUPPRESS)  # tests: raise on RANK at STEP
    recipes.add_recipe_arguments(parser, kind)


def resolve_recipe(defaults: recipes.CommonRecipe, args: argparse.Namespace) -> recipes.CommonRecipe:
    """The profile's recipe with every explicitly given command-line value laid over it."""
    kind = "pretrain" if isinstance(defaults, recipes.PretrainRecipe) else "finetune"
    return recipes.resolve(defaults, recipes.overrides_from_args(args, kind))


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


def validate_common(model: str, recipe: recipes.CommonRecipe) -> int:
    """Checks every run needs beyond the recipe's own; returns the per-rank micro-batch size."""
    try:
        check_model_name(model)
    except ValueError as err:
        raise SettingsError(str(err)) from err
    world, accum = env_world_size(), recipe.accum_steps
    if recipe.batch_size % (world * accum):
        raise SettingsError(
            f"--batch-size {recipe.batch_size} is not divisible by world size {world} x accumulation steps {accum}; "
            f"use a multiple of {world * accum} or change --accum-steps / the number of processes"
        )
    return recipe.batch_size // (world * accum)


def check_multiple_of_32(flag: str, size: int) -> None:
    if size < 32 or size % 32:
        raise SettingsError(f"{flag} {size} must be a positive multiple of 32 (the backbones downsample by 32)")


def effective_lr(recipe: recipes.CommonRecipe, paper_batch: int) -> float:
    """``--lr`` itself, or with ``--lr-scale linear`` scaled by batch / the paper's batch."""
    return recipe.lr * recipe.batch_size / paper_batch if recipe.lr_scale == "linear" else recipe.lr


def parse_injected_failure(spec: str | None) -> tuple[int, int] | None:
    if spec is None:
        return None
    rank, step = spec.split(":")
    return int(rank), int(step)


# --------------------------------------------------------------------------- set-up


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


def use_sync_bn(recipe: recipes.CommonRecipe, ctx: DistContext) -> bool:
    return recipe.sync_bn and ctx.distributed and ctx.device.type == "cuda"


def wrap_model(model: nn.Module, ctx: DistContext, sync_bn: bool, compile_mode: str | None) -> nn.Module:
    """Move to the rank's device, convert BN to SyncBN when asked, compile in place (state-dict keys
    unchanged) with ``compile_mode`` unless None, and wrap in DDP when distributed."""
    if sync_bn:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    if compile_mode is not None:
        model.compile(mode=compile_mode)
    if ctx.distributed:
        model = DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
    return model


def git_commit() -> str:
    """HEAD of the repository holding this code, '-dirty' if it has uncommitted changes."""
    repo = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}-dirty" if dirty else head


# --------------------------------------------------------------------------- data


def dataset_root(args: argparse.Namespace, ctx: DistContext, kind: str, size: tuple[int, int, int]) -> Path:
    """The folder to read: ``--data-root`` for a real dataset; for ``synthetic`` the generated data of
    ``kind`` (cls|seg; ``size`` = seed, images per split, pixels) in the real layout, made once per
    node by local rank 0 while the others wait."""
    if args.dataset != "synthetic":
        return Path(args.data_root)
    cache = Path(args.data_root) if args.data_root is not None else DEFAULT_SYNTHETIC_ROOT
    if ctx.local_rank == 0:
        synthetic.ensure_synthetic(cache, kind, *size)
    barrier(ctx)
    return synthetic.ensure_synthetic(cache, kind, *size)


def data_index(ctx: DistContext, layout: str, root: Path, splits: tuple[str, ...], cache: Path) -> dict:
    """The validated file index of ``root`` (see ``layouts.build_index``), built by the first process
    of each node and cached in ``cache/.data-index/`` under a key of (layout, absolute root); the
    other processes read it. A layout error on the builder is raised on every rank. To re-index a
    dataset that changed in place, delete that folder."""
    key = hashlib.sha256(f"{INDEX_VERSION}:{layout}:{root.resolve()}:{splits}".encode()).hexdigest()[:16]
    path = cache / INDEX_DIR / f"{layout}-{key}.json"
    error = None
    if ctx.local_rank == 0 and not path.is_file():
        try:
            index = layouts.build_index(layout, root, splits)
            atomic_write(path, lambda tmp: tmp.write_text(json.dumps(index)))
        except layouts.DataLayoutError as err:
            error = str(err)
    errors = [e for e in gather_objects(ctx, error) if e]
    if errors:
        raise layouts.DataLayoutError.from_message(errors[0])
    return json.loads(path.read_text())


# --------------------------------------------------------------------------- the run


@dataclass
class RunSpec:
    """What :func:`run_training` needs from pretrain or finetune.

    ``identity``: everything that determines the run's numbers besides the recipe (task, model,
    settings, dataset, data digest, init); ``description``: what the weights file also records
    (num_classes, class_names, data_source); ``evaluate()`` scores the current model; ``metric`` is
    the key of its result that best.pt maximises; ``summary(result)`` is its log line."""

    args: argparse.Namespace
    trainer: Trainer
    train_set: Dataset
    sched: Schedule
    recipe: recipes.CommonRecipe
    identity: dict[str, Any]
    description: dict[str, Any]
    evaluate: Callable[[], dict[str, Any]]
    metric: str
    summary: Callable[[dict[str, Any]], str]
    metrics_extras: dict[str, Any]
    eval_every_steps: int  # 0: only the final evaluation
    start: float


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


def resume_identity(spec: RunSpec) -> dict[str, Any]:
    """The settings a checkpoint must share to be resumed: identity plus every non-execution recipe
    value. World size and accumulation may differ (see ``loop``: same global batch, same samples)."""
    kind = "pretrain" if isinstance(spec.recipe, recipes.PretrainRecipe) else "finetune"
    execution = recipes.execution_keys(kind)
    recipe = {f"recipe.{k}": v for k, v in dataclasses.asdict(spec.recipe).items() if k not in execution}
    return json.loads(json.dumps({**spec.identity, **recipe, "profile": spec.args.profile}, default=str))


def resume_state(spec: RunSpec, identity: dict[str, Any], log: Logger) -> dict[str, Any] | None:
    """The checkpoint in OUTPUT to resume from, if any; one from a different run is refused with
    every differing setting as ``name: old -> new``."""
    path = spec.args.output / CHECKPOINT_NAME
    if spec.args.no_resume or not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except ValueError as err:
        raise SettingsError(f"{err}; or pass --no-resume to start over") from err
    if "identity" not in state:
        raise SettingsError(f"{path} was written by an older version of this suite and cannot be resumed; use another --output or pass --no-resume")
    diff = identity_diff(state["identity"], identity)
    if diff:
        raise SettingsError(
            f"{path} belongs to a run with different settings ({'; '.join(diff)}); use the same settings to resume, "
            "another --output, or --no-resume to start over"
        )
    log.line(f"resuming from {path} at step {state['step']} of {state['total_steps']}")
    if state.get("world_size") != spec.sched.world_size:
        log.line(f"world size {state.get('world_size')} -> {spec.sched.world_size}: same global batch {spec.sched.global_batch} and sample order")
    return state


class _Run:
    """The mutable state of :func:`run_training`: step, evaluations, best, DVCLive."""

    def __init__(self, spec: RunSpec, ctx: DistContext, log: Logger):
        self.spec, self.ctx, self.log = spec, ctx, log
        self.identity = resume_identity(spec)
        self.fingerprint = run_fingerprint(self.identity)
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] | None = None
        self.step = 0

    def checkpoint(self, finished: bool = False) -> dict[str, Any]:
        s = self.spec
        return {
            "format": CHECKPOINT_FORMAT, **s.identity, **s.description, "recipe": dataclasses.asdict(s.recipe),
            "profile": s.args.profile, "world_size": s.sched.world_size, "fingerprint": self.fingerprint, "identity": self.identity,
            "step": self.step, "total_steps": s.sched.total_steps, "finished": finished, "eval_history": self.history, "best": self.best,
            **s.trainer.state(),
        }

    def save(self, finished: bool = False) -> Path:
        path = self.spec.args.output / CHECKPOINT_NAME
        if self.ctx.is_main:
            state = self.checkpoint(finished)
            save_checkpoint(path, state)
            if finished:
                save_weights(self.spec.args.output / WEIGHTS_NAME, state)
            self.log.line(f"checkpoint at step {self.step} -> {path}")
        barrier(self.ctx)
        return path

    def evaluate(self) -> dict[str, Any]:
        """Score the model now (BN statistics averaged over ranks first); keep best.pt when it improves
        and periodic evaluation is on."""
        s = self.spec
        average_bn_stats(self.ctx, unwrap(s.trainer.model))
        result = s.evaluate()
        self.log.line(f"step {self.step}: {s.summary(result)}")
        value = float(result[s.metric])
        self.history.append({"step": self.step, s.metric: value})
        self.log.metrics(self.step, {f"eval/{s.metric}": value})
        if self.best is None or value > self.best["value"]:
            self.best = {"metric": s.metric, "value": value, "step": self.step, "path": None}
            if s.eval_every_steps and self.ctx.is_main:
                self.best["path"] = str(s.args.output / BEST_NAME)
                state = {k: v for k, v in self.checkpoint(self.step == s.sched.total_steps).items() if k not in ("optimizer_state", "scaler_state")}
                save_checkpoint(s.args.output / BEST_NAME, state)
                self.log.line(f"best {s.metric} {value:.4g} at step {self.step} -> {s.args.output / BEST_NAME}")
        return result


def _line_due(run: _Run, step: int) -> bool:
    s = run.spec
    return step % s.recipe.log_every == 0 or step % s.sched.steps_per_epoch == 0 or step == s.sched.total_steps


def _log_step(run: _Run, step: int, epoch: int, lr: float, loss: float, grad_norm: float, rate: float) -> None:
    s = run.spec
    mem = memory_mb(run.ctx.device)
    run.log.metrics(step, {"train/loss": loss, "train/lr": lr, "train/grad_norm": grad_norm, "train/images_per_s": rate, "train/memory_mb": mem})
    if _line_due(run, step):
        run.log.line(f"epoch {epoch} step {step}/{s.sched.total_steps} loss {loss:.4f} lr {lr:.3g} grad-norm {grad_norm:.3g} {rate:.1f} img/s {mem:.0f} MB")


def _fit(run: _Run, start_step: int) -> dict[str, float]:
    """Steps ``start_step .. total - 1`` with periodic checkpoints and evaluations; a stop signal saves
    and raises ``RunStopped``. Returns this process's throughput.

    The device's values (losses, gradient norms, non-finite flags) are read, and a stop request agreed
    over ranks, only at steps that log a line, evaluate, checkpoint or end: between them the CPU queues
    steps without waiting for the GPU. A stop signal is therefore honoured at the next such step (at
    most ``--log-every`` steps later), and a non-finite step, which applied nothing, is reported there."""
    s, ctx = run.spec, run.ctx
    sched, trainer = s.sched, s.trainer
    failure = parse_injected_failure(s.args.inject_failure)
    t0, steps_run, epoch_now = time.time(), 0, None
    pending: list[tuple[int, float, float, PendingStep]] = []  # epoch, lr, images/s, the step
    bar = run.log.bar(sched.total_steps, start_step, "train")
    trainer.scheduler.step_update(start_step)
    with Preemption() as signals:
        for epoch, micro in step_batches(s.train_set, ctx, sched, start_step, s.recipe.seed, s.recipe.num_workers):
            if epoch != epoch_now:
                trainer.scheduler.step(epoch)
                epoch_now = epoch
            if failure == (ctx.rank, run.step):
                raise RuntimeError(f"--inject-failure: simulated failure on rank {ctx.rank} at step {run.step}")
            queued = trainer.enqueue_step(run.step, micro)
            run.step += 1
            steps_run += 1
            trainer.scheduler.step_update(run.step)
            bar.update(1)
            rate = steps_run * sched.global_batch / max(time.time() - t0, 1e-9)
            pending.append((epoch, max(g["lr"] for g in trainer.optimizer.param_groups), rate, queued))
            evaluate = s.eval_every_steps and run.step % s.eval_every_steps == 0 and run.step < sched.total_steps
            save = s.recipe.checkpoint_every and run.step % s.recipe.checkpoint_every == 0 and run.step < sched.total_steps
            kill = s.args.kill_after_steps is not None and run.step >= s.args.kill_after_steps
            if not (_line_due(run, run.step) or evaluate or save or kill):
                continue
            results = trainer.read([p for *_, p in pending], signals.signum is not None)
            for (epoch_i, lr, rate_i, p), result in zip(pending, results):
                _log_step(run, p.step + 1, epoch_i, lr, result.loss, result.grad_norm, rate_i)
            breaks = trainer.compilation.breaks_line() if steps_run == len(pending) else None  # first read: the graphs exist now
            if breaks:
                run.log.line(breaks)
            pending.clear()
            if evaluate:
                run.evaluate()
            run.log.flush()
            if results[-1].stop:
                bar.close()
                path = run.save()
                raise stopped(signals.signum or signal.SIGTERM, run.step, sched.total_steps, str(path))
            if save:
                run.save()
            if kill:
                bar.close()
                run.log.line(f"--kill-after-steps {s.args.kill_after_steps}: killing this process (simulated crash)")
                os.kill(os.getpid(), signal.SIGKILL)
    bar.close()
    train_time = time.time() - t0
    return {"train_time_s": train_time, "images_per_s": steps_run * sched.global_batch / train_time if steps_run else 0.0, "steps_run": steps_run}


def run_training(spec: RunSpec, ctx: DistContext, log: Logger) -> int:
    """Resume from OUTPUT when a checkpoint of the same run is there, train to the end (periodic
    checkpoints and evaluations, stop on a signal), average BN statistics over ranks, write the
    final checkpoint and model.safetensors, then evaluate and write metrics.json (rank 0)."""
    run = _Run(spec, ctx, log)
    state = resume_state(spec, run.identity, log)
    start_step = 0
    if state is not None:
        spec.trainer.load_state(state)
        start_step = run.step = state["step"]
        run.history, run.best = list(state.get("eval_history") or []), state.get("best")
    log.open_live(spec.args.output, resume=state is not None)
    try:
        throughput = _fit(run, start_step)
        average_bn_stats(ctx, unwrap(spec.trainer.model))
        digests = gather_digests(ctx, unwrap(spec.trainer.model))
        run.save(finished=True)  # before the evaluation, so that a failure there loses no training
        result = run.evaluate()
        log.flush()
    finally:
        log.close()
    if ctx.is_main:
        metrics = {
            **result, **throughput, "wall_time_s": time.time() - spec.start, "profile": spec.args.profile, "dataset": spec.args.dataset,
            "data_source": spec.description["data_source"], "data_digest": spec.identity["data_digest"], "model": spec.args.model,
            "model_settings": spec.identity["model_settings"], "recipe": dataclasses.asdict(spec.recipe), "steps": spec.sched.total_steps,
            **spec.metrics_extras, "resumed_from_step": start_step or None, "eval_history": run.history, "best": run.best,
            "ranks_identical": len(set(digests)) == 1 if ctx.distributed else None, "param_digests": digests,
            "checkpoint": str(spec.args.output / CHECKPOINT_NAME), "weights": str(spec.args.output / WEIGHTS_NAME), "git_commit": git_commit(),
            **spec.trainer.compilation.metrics(),
        }
        write_metrics(spec.args.output / METRICS_NAME, metrics)
        log.line(f"wrote {spec.args.output / METRICS_NAME}")
    return 0


def effective_settings(spec_recipe: recipes.CommonRecipe, ctx: DistContext, micro: int, sync_bn: bool, compiled: bool, lr: float) -> dict[str, Any]:
    """What actually ran, for metrics.json ``effective`` (the recipe may ask for more than the device allows)."""
    from reproduce.train.loop import autocast_dtype

    dtype = autocast_dtype(spec_recipe.amp, ctx.device)
    return {
        "amp": dtype is not None, "precision": precision_name(dtype), "sync_bn": sync_bn, "device": str(ctx.device), "micro_batch": micro,
        "world_size": ctx.world_size, "accum_steps": spec_recipe.accum_steps, "bn_batch": micro * (ctx.world_size if sync_bn else 1),
        "lr": lr, "compile": compiled,
    }


def note_accumulation(log: Logger, effective: dict[str, Any], batch: int) -> None:
    """Say plainly that BatchNorm sees the micro-batch when accumulating, not the per-GPU batch."""
    if effective["accum_steps"] > 1:
        log.line(
            f"gradient accumulation x{effective['accum_steps']}: the optimizer sees the global batch {batch}, but BatchNorm "
            f"statistics see {effective['bn_batch']} images per forward (batch / (world x accum){' x world with SyncBN' if effective['sync_bn'] else ''})"
        )
