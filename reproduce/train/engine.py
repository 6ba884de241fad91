"""The engine that runs any training task: :func:`fit` validates, sets up (threads, determinism,
process group, DDP, compile), builds what the task asks for, and :func:`run_training` resumes,
trains with periodic checkpoints and evaluations, survives signals, and records.

The pieces live beside it: ``tasks`` (what classification and segmentation do differently),
``common`` (options, checks and set-up steps the tasks and commands share), ``reproduce.recipes``
(typed recipes, the single source of truth), ``loop`` (the optimizer step and the sample order),
``checkpointing`` (files and the resume rule), ``distributed`` (process group) and ``runlog`` (log
lines and DVCLive).

A step hook is a callable ``hook(step, rank)`` run after every optimizer step (after that step's
checkpoint, if any): ``fit(..., step_hooks=...)`` takes them in-process, and :data:`STEP_HOOK_ENV`
names one as ``module:function`` for a process started from outside (e.g. a test that simulates a
crash); production runs set neither.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch.utils.data import Dataset

from reproduce import recipes
from reproduce.errors import SettingsError
from reproduce.params import BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME, METRICS_NAME, WEIGHTS_NAME
from reproduce.train import compilation
from reproduce.train.checkpointing import identity_diff, load_checkpoint, run_fingerprint, save_checkpoint, save_weights, write_metrics
from reproduce.train.common import configure_determinism, configure_threads, git_commit, use_sync_bn, wrap_model
from reproduce.train.distributed import DistContext, average_bn_stats, barrier, gather_digests, setup, teardown
from reproduce.train.evaluation import EvalOptions
from reproduce.train.loop import PendingStep, Preemption, Schedule, Trainer, autocast_dtype, optimizer_options, precision_name, step_batches, stopped, unwrap
from reproduce.train.runlog import Logger, memory_mb
from reproduce.train.tasks import Task

STEP_HOOK_ENV = "REPRODUCE_STEP_HOOK"
StepHook = Callable[[int, int], None]

# --------------------------------------------------------------------------- learning rate and step hooks


def effective_lr(recipe: recipes.CommonRecipe, paper_batch: int) -> float:
    """``--lr`` itself, or with ``--lr-scale linear`` scaled by batch / the paper's batch."""
    return recipe.lr * recipe.batch_size / paper_batch if recipe.lr_scale == "linear" else recipe.lr


def step_hook_from_env() -> StepHook | None:
    """The step hook :data:`STEP_HOOK_ENV` names as ``module:function``, if any."""
    spec = os.environ.get(STEP_HOOK_ENV)
    if not spec:
        return None
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise SettingsError(f"{STEP_HOOK_ENV}={spec!r} does not name a function as module:function ({err}); unset it") from err


# --------------------------------------------------------------------------- the run


@dataclass
class RunSpec:
    """What :func:`run_training` needs; :func:`fit` assembles it from a task.

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
    step_hooks: tuple[StepHook, ...] = ()
    checkpoint: dict[str, Any] | None = None  # OUTPUT's checkpoint.pt, read by fit before any data (resume_checkpoint)


def fit(task: Task, args: argparse.Namespace, step_hooks: Sequence[StepHook] = ()) -> int:
    """Run ``task`` as its training command with the options in ``args``: every check runs before any
    data or process group is touched; then, inside the process group, the task's model and data, the
    wrapped model, optimizer, schedules and loss, and :func:`run_training`."""
    recipe, settings, micro = task.validate(args)
    compilation.check_arguments(args)
    env_hook = step_hook_from_env()
    hooks = (*step_hooks, *([env_hook] if env_hook else []))
    checkpoint = resume_checkpoint(args)
    start = time.time()
    ctx = setup(args.device)
    try:
        log = Logger(ctx, task.command)
        configure_determinism(recipe.deterministic)
        configure_threads(recipe.threads)
        prepared = task.prepare(args, recipe, settings, ctx, log)
        data, num_classes = prepared.data, len(prepared.data.class_names)
        sync_bn = use_sync_bn(recipe, ctx)
        compiled = compilation.prepare(args.compile, args.compile_mode, args.profile, ctx.device, sync_bn, recipe.accum_steps, args.output, log.line)
        model = wrap_model(prepared.model, ctx, sync_bn, compiled.mode)
        lr = effective_lr(recipe, task.paper_batch(args.dataset))
        optimizer = task.optimizer(unwrap(model), recipe, lr, **optimizer_options(ctx.device))
        sched = task.schedule(ctx, len(prepared.train_set), micro, recipe)
        scheduler = task.scheduler(optimizer, recipe, sched, lr)
        clip_grad = getattr(recipe, "clip_grad", None)  # a recipe without the field does not clip
        trainer = Trainer(ctx, model, optimizer, scheduler, task.loss(recipe, ctx, num_classes), recipe.amp, clip_grad, recipe.seed, compiled)
        effective = effective_settings(recipe, ctx, micro, sync_bn, compiled.mode is not None, lr)
        note_accumulation(log, effective, recipe.batch_size)
        options = EvalOptions(task.eval_batch(recipe, ctx), recipe.num_workers, trainer.dtype)
        spec = RunSpec(
            args, trainer, prepared.train_set, sched, recipe,
            identity={"task": task.task, "model": args.model, "model_settings": settings, "dataset": args.dataset,
                      "data_digest": data.digest, **prepared.identity},
            description={"num_classes": num_classes, "class_names": data.class_names, "data_source": data.source},
            evaluate=lambda: task.score(model, prepared.val_set, ctx, data.class_names, recipe, options),
            metric=task.metric,
            summary=task.fit_summary,
            metrics_extras={"num_classes": num_classes, "steps_per_epoch": sched.steps_per_epoch, "effective": effective, **prepared.metrics},
            eval_every_steps=task.eval_every_steps(recipe, sched),
            start=start,
            step_hooks=hooks,
            checkpoint=checkpoint,
        )
        del checkpoint  # spec holds it until run_training has loaded it, then lets it go
        return run_training(spec, ctx, log)
    finally:
        teardown(ctx)


def resume_identity(spec: RunSpec) -> dict[str, Any]:
    """The settings a checkpoint must share to be resumed: identity plus every non-execution recipe
    value. World size and accumulation may differ (see ``loop``: same global batch, same samples)."""
    kind = "pretrain" if isinstance(spec.recipe, recipes.PretrainRecipe) else "finetune"
    execution = recipes.execution_keys(kind)
    recipe = {f"recipe.{k}": v for k, v in dataclasses.asdict(spec.recipe).items() if k not in execution}
    return json.loads(json.dumps({**spec.identity, **recipe, "profile": spec.args.profile}, default=str))


def resume_checkpoint(args: argparse.Namespace) -> dict[str, Any] | None:
    """OUTPUT's checkpoint.pt, read (safely) before any data is prepared, so that an unreadable one is
    refused before that work; None without one or with ``--no-resume``."""
    path = args.output / CHECKPOINT_NAME
    if args.no_resume or not path.is_file():
        return None
    try:
        state = load_checkpoint(path)
    except ValueError as err:
        raise SettingsError(f"{err}; or pass --no-resume to start over") from err
    missing = [k for k in ("optimizer_state", "scaler_state") if k not in state]
    if missing:
        raise SettingsError(f"{path} lacks {', '.join(missing)}, so training cannot resume from it (a best.pt copied over it?); "
                            "move it away or pass --no-resume to start over")
    return state


def resume_state(spec: RunSpec, identity: dict[str, Any], log: Logger) -> dict[str, Any] | None:
    """The checkpoint in OUTPUT to resume from, if any; one from a different run is refused with
    every differing setting as ``name: old -> new``."""
    state, path = spec.checkpoint, spec.args.output / CHECKPOINT_NAME
    if state is None:
        return None
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
    most ``--log-every`` steps later), and a non-finite step, which applied nothing, is reported there.
    Step hooks run after every step once its values are read and logged, so a run with hooks reads
    every step."""
    s, ctx = run.spec, run.ctx
    sched, trainer = s.sched, s.trainer
    t0, steps_run, epoch_now = time.time(), 0, None
    pending: list[tuple[int, float, float, PendingStep]] = []  # epoch, lr, images/s, the step
    bar = run.log.bar(sched.total_steps, start_step, "train")
    trainer.scheduler.step_update(start_step)
    with Preemption() as signals:
        for epoch, micro in step_batches(s.train_set, ctx, sched, start_step, s.recipe.seed, s.recipe.num_workers):
            if epoch != epoch_now:
                trainer.scheduler.step(epoch)
                epoch_now = epoch
            queued = trainer.enqueue_step(run.step, micro)
            run.step += 1
            steps_run += 1
            trainer.scheduler.step_update(run.step)
            bar.update(1)
            rate = steps_run * sched.global_batch / max(time.time() - t0, 1e-9)
            pending.append((epoch, max(g["lr"] for g in trainer.optimizer.param_groups), rate, queued))
            evaluate = s.eval_every_steps and run.step % s.eval_every_steps == 0 and run.step < sched.total_steps
            save = s.recipe.checkpoint_every and run.step % s.recipe.checkpoint_every == 0 and run.step < sched.total_steps
            if not (_line_due(run, run.step) or evaluate or save or s.step_hooks):
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
            for hook in s.step_hooks:
                hook(run.step, ctx.rank)
    bar.close()
    train_time = time.time() - t0
    return {"train_time_s": train_time, "images_per_s": steps_run * sched.global_batch / train_time if steps_run else 0.0, "steps_run": steps_run}


def run_training(spec: RunSpec, ctx: DistContext, log: Logger) -> int:
    """Resume from OUTPUT when a checkpoint of the same run is there, train to the end (periodic
    checkpoints and evaluations, stop on a signal), average BN statistics over ranks, write the
    final checkpoint and model.safetensors, then evaluate and write metrics.json (rank 0)."""
    run = _Run(spec, ctx, log)
    state = resume_state(spec, run.identity, log)
    resumed, start_step = state is not None, 0
    if resumed:
        spec.trainer.load_state(state)
        start_step = run.step = state["step"]
        run.history, run.best = list(state.get("eval_history") or []), state.get("best")
    spec.checkpoint = state = None  # the loaded copy is not kept while the run trains
    log.open_live(spec.args.output, resume=resumed)
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
