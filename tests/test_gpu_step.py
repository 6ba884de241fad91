"""The training step that does not wait on the device: values read at the log cadence, non-finite
steps skipped without a host read, stop requests agreed at the cadence, batches prefetched to the
GPU; and the compile options (mode, fallbacks, the cache in the run folder)."""
from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

from reproduce.cli import RunStopped, UsageError, main
from reproduce.train import compilation, loop
from reproduce.train.checkpointing import load_checkpoint
from reproduce.train.distributed import DistContext
from reproduce.train.engine import fit
from reproduce.train.loop import Trainer, prefetch_to_device
from reproduce.train.tasks import CLASSIFICATION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
# HRViT-b1 on 8 generated 32 px images, batch 2: 4 steps per epoch; reads only where the cadence says.
TINY = ["--model", "hrvit_b1", "--profile", "smoke", "--synthetic-size", "8", "--batch-size", "2", "--image-size", "32", "--checkpoint-every", "0"]


# ------------------------------------------------------------------ the deferred read


def _square_loss(net, batch):
    """Mean squared output; ``poison`` 'loss' adds a NaN to a loss whose gradients stay finite (a
    segmentation batch of ignored pixels), 'gradients' makes the gradients infinite under a finite loss."""
    x, poison = batch
    out = net(x)
    if poison == "gradients":
        out.register_hook(lambda grad: grad * float("inf"))
    loss = out.pow(2).mean()
    return loss + float("nan") if poison == "loss" else loss


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.1),  # weight decay: a zero-gradient step would still move
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),  # skipped on the device (found_inf)
}


def _trainer(optimizer: str) -> Trainer:
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    return Trainer(DistContext(0, 1, 0, CPU), model, OPTIMIZERS[optimizer](model.parameters()), None, _square_loss, "none", None, 0)


def _state(trainer: Trainer) -> list[torch.Tensor]:
    optim = trainer.optimizer.state_dict()["state"]
    return [*trainer.model.state_dict().values(), *(t for s in optim.values() for t in s.values() if isinstance(t, torch.Tensor))]


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("poison, what", [("loss", "loss"), ("gradients", "gradient norm")])
def test_a_non_finite_step_applies_nothing_and_is_reported_at_the_next_read(optimizer, poison, what):
    batches = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    trainer, reference = _trainer(optimizer), _trainer(optimizer)
    pending = [trainer.enqueue_step(i, [(x, poison if i == 1 else None)]) for i, x in enumerate(batches)]  # no error yet
    for i in (0, 2):
        reference.enqueue_step(i, [(batches[i], None)])
    with pytest.raises(RunStopped, match=f"the {what} is not finite at step 1 ") as err:
        trainer.read(pending, stop_requested=False)
    assert err.value.status == 1
    assert all(torch.equal(a, b) for a, b in zip(_state(trainer), _state(reference), strict=True))  # steps 0 and 2 only


def test_a_read_returns_what_a_step_by_step_run_returns():
    batches = [[(torch.randn(2, 4, generator=torch.Generator().manual_seed(10 * i + j)), None) for j in range(2)] for i in range(3)]
    deferred, stepwise = _trainer("adamw"), _trainer("adamw")
    results = deferred.read([deferred.enqueue_step(i, micro) for i, micro in enumerate(batches)], stop_requested=True)
    expected = [stepwise.train_step(i, micro, lambda: False) for i, micro in enumerate(batches)]
    assert [(r.loss, r.grad_norm) for r in results] == [(r.loss, r.grad_norm) for r in expected]
    assert [r.stop for r in results] == [False, False, True]  # the stop decision belongs to the read, after its last step
    assert all(torch.equal(a, b) for a, b in zip(_state(deferred), _state(stepwise), strict=True))


def test_a_checkpoint_of_the_unfused_optimizer_resumes_with_the_fused_one():
    saved = _trainer("adamw")
    saved.enqueue_step(0, [(torch.ones(2, 4), None)])
    fused, reference = _trainer("adamw-fused"), _trainer("adamw")
    for trainer in (fused, reference):
        trainer.load_state(saved.state())
        trainer.enqueue_step(1, [(torch.ones(2, 4), "loss")])  # skipped: the fused one on the device
    assert all(g["fused"] for g in fused.optimizer.param_groups)
    assert all(torch.equal(a, b) for a, b in zip(_state(fused), _state(reference), strict=True))


def test_batches_pass_through_unchanged_on_a_cpu():
    steps = [(0, [[torch.ones(2), torch.zeros(2)]]), (1, [[torch.ones(3), torch.zeros(3)]])]
    assert list(prefetch_to_device(iter(steps), CPU)) == steps  # the same objects: nothing copied


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batches_arrive_on_the_gpu_with_their_values():
    steps = [(e, [[(torch.arange(6.0) + e).pin_memory(), torch.tensor([e]).pin_memory()]]) for e in range(3)]
    for (epoch, micro), (want_epoch, want) in zip(prefetch_to_device(iter(steps), torch.device("cuda")), steps, strict=True):
        assert epoch == want_epoch and all(t.is_cuda and torch.equal(t.cpu(), w) for t, w in zip(micro[0], want[0]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_queued_steps_never_wait_for_the_gpu():
    """No host synchronisation from the prefetch to the optimizer step, a skipped non-finite step included."""
    cuda = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(cuda)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, **loop.optimizer_options(cuda))
    trainer = Trainer(DistContext(0, 1, 0, cuda), model, optimizer, None, _square_loss, "bf16", 1.0, 0)
    steps = [(0, [(torch.randn(2, 4).pin_memory(), "loss" if i == 1 else None)]) for i in range(3)]
    torch.cuda.set_sync_debug_mode("error")  # a synchronising call raises
    try:
        pending = [trainer.enqueue_step(i, micro) for i, (_, micro) in enumerate(prefetch_to_device(iter(steps), cuda))]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(RunStopped, match="the loss is not finite at step 1 "):
        trainer.read(pending, stop_requested=False)


# ------------------------------------------------------------------ the run


def _curve(run: Path, name: str) -> list[str]:
    return (run / "dvclive" / "plots" / "metrics" / "train" / f"{name}.tsv").read_text().splitlines()


def test_reading_every_third_step_logs_the_same_curves_and_ends_with_the_same_weights(tmp_path):
    runs = {}
    for every in (1, 3):
        runs[every] = tmp_path / f"every-{every}"
        argv = ["pretrain", *TINY, "--epochs", "1", "--log-every", str(every), "--data-root", str(tmp_path / "data"), "--output", str(runs[every])]
        assert main(argv) == 0
    for name in ("loss", "grad_norm", "lr"):
        assert _curve(runs[1], name) == _curve(runs[3], name) and len(_curve(runs[3], name)) == 1 + 4, name  # header + 4 steps
    first, second = (json.loads((runs[e] / "metrics.json").read_text()) for e in (1, 3))
    assert first["param_digests"] == second["param_digests"] and first["loss"] == second["loss"]
    assert second["compile_mode"] is None and second["compile_s"] is None and second["effective"]["compile"] is False  # eager


def test_a_stop_signal_is_honoured_at_the_next_read(tmp_path, monkeypatch, capsys):
    enqueue = Trainer.enqueue_step

    def signal_during_step_0(self, step, micro_batches):
        if step == 0:
            os.kill(os.getpid(), signal.SIGUSR1)  # the Preemption handler only records it
        return enqueue(self, step, micro_batches)

    monkeypatch.setattr(Trainer, "enqueue_step", signal_during_step_0)
    run = tmp_path / "run"
    argv = ["pretrain", *TINY, "--epochs", "2", "--log-every", "3", "--data-root", str(tmp_path / "data"), "--output", str(run)]
    assert main(argv) == 128 + signal.SIGUSR1
    assert "SIGUSR1: interrupted at step 3 of 8" in capsys.readouterr().err
    assert load_checkpoint(run / "checkpoint.pt")["step"] == 3


def test_a_step_hook_runs_once_its_step_is_read_and_logged(tmp_path):
    """Between log lines too: a hook (a simulated crash, say) acts on a step whose values are logged."""
    parser = argparse.ArgumentParser()
    CLASSIFICATION.add_arguments(parser)
    run = tmp_path / "run"
    args = parser.parse_args([*TINY, "--epochs", "1", "--log-every", "100", "--data-root", str(tmp_path / "data"), "--output", str(run)])
    logged = []  # (step, DVCLive loss rows when its hook ran)
    assert fit(CLASSIFICATION, args, step_hooks=[lambda step, rank: logged.append((step, len(_curve(run, "loss")) - 1))]) == 0
    assert logged == [(1, 1), (2, 2), (3, 3), (4, 4)]  # without the hook only step 4 (the epoch end) would be read


# ------------------------------------------------------------------ compile


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    compilation.add_compile_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("argv, profile, device, preset, mode", [
    ((), "smoke", "cpu", None, None),
    (("--compile",), "smoke", "cpu", None, "default"),
    (("--compile-mode", "reduce-overhead"), "smoke", "cpu", None, "reduce-overhead"),  # implies --compile
    ((), "paper", "cuda", None, None),  # no measured default yet: eager
    ((), "paper", "cuda", "max-autotune", "max-autotune"),
    (("--compile",), "paper", "cuda", "max-autotune", "max-autotune"),
    ((), "paper", "cpu", "max-autotune", None),  # the preset is for CUDA only
    ((), "proxy", "cuda", "max-autotune", None),
    (("--no-compile",), "paper", "cuda", "max-autotune", None),
    (("--compile-mode", "default"), "paper", "cuda", "max-autotune", "default"),
])
def test_the_compile_mode_comes_from_the_flags_then_the_paper_cuda_preset(monkeypatch, argv, profile, device, preset, mode):
    monkeypatch.setattr(compilation, "PAPER_CUDA_MODE", preset)
    args = _args(*argv)
    assert compilation.resolve_mode(args.compile, args.compile_mode, profile, torch.device(device)) == mode


def test_no_compile_with_a_compile_mode_is_refused(tmp_path, capsys):
    with pytest.raises(UsageError, match="--no-compile contradicts --compile-mode max-autotune"):
        compilation.check_arguments(_args("--no-compile", "--compile-mode", "max-autotune"))
    assert main(["pretrain", *TINY, "--no-compile", "--compile-mode", "default", "--output", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("mode, sync_bn, accum, used", [
    ("reduce-overhead", True, 1, "default"), ("max-autotune", True, 1, "max-autotune-no-cudagraphs"),
    ("reduce-overhead", False, 2, "default"), ("max-autotune", False, 1, "max-autotune"), ("default", True, 2, "default"),
])
def test_cuda_graph_modes_fall_back_without_graphs_under_sync_bn_or_accumulation(mode, sync_bn, accum, used):
    chosen, note = compilation.capturable_mode(mode, sync_bn, accum)
    assert chosen == used and (note is not None) == (used != mode)
    assert note is None or note.startswith(f"compile mode {mode}: ") and note.endswith(f"compiling with {used} instead")


def test_the_run_compiles_with_the_mode_and_records_it(tmp_path, monkeypatch, capsys):
    """Wiring only: the recorded ``Module.compile`` call does not compile (HRViT takes minutes)."""
    calls, graph_steps = [], []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: graph_steps.append(1))
    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    run = tmp_path / "run"
    argv = ["pretrain", *TINY, "--epochs", "1", "--compile-mode", "reduce-overhead", "--data-root", str(tmp_path / "data"), "--output", str(run)]
    assert main(argv) == 0
    assert calls == [{"mode": "reduce-overhead"}] and len(graph_steps) == 4  # each step starts a new CUDA-graph generation
    assert os.environ[compilation.CACHE_ENV] == str((run / compilation.CACHE_DIR).resolve())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["compile_mode"] == "reduce-overhead" and metrics["compile_s"] >= 0 and metrics["effective"]["compile"] is True
    assert f"torch.compile mode reduce-overhead (the first steps compile); cache {run.resolve() / compilation.CACHE_DIR}" in capsys.readouterr().out


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_a_second_compile_reads_inductor_code_from_the_run_folder(tmp_path, monkeypatch, fresh_dynamo):
    """Real inductor, on a graph without generated C++ (a linear layer: one library GEMM), so it takes seconds."""
    from torch._dynamo.utils import counters

    monkeypatch.delenv(compilation.CACHE_ENV, raising=False)
    cache = compilation.use_cache_dir(tmp_path)
    compiled = compilation.Compilation.start("default")

    def forward() -> None:
        layer = nn.Linear(4, 2)
        layer.compile(mode=compiled.mode)
        with torch.no_grad():
            layer(torch.ones(3, 4))

    forward()
    assert cache == (tmp_path / compilation.CACHE_DIR).resolve() and any(cache.rglob("*")) and compiled.seconds() > 0
    torch._dynamo.reset()  # what a new process (a requeued job) starts from
    counters["inductor"].clear()
    forward()
    assert counters["inductor"]["fxgraph_cache_hit"] == 1 and counters["inductor"]["fxgraph_cache_miss"] == 0


def test_graph_breaks_are_counted_and_said_in_one_line(fresh_dynamo):
    compiled = compilation.Compilation.start("default")
    assert compiled.breaks_line() is None

    def with_a_break(x):
        x = x + 1
        torch._dynamo.graph_break()
        return x * 2

    torch.compile(with_a_break, backend="eager")(torch.ones(2))
    line = compiled.breaks_line()
    assert line.startswith("torch.compile: 1 graph break(s)") and "\n" not in line
    assert compiled.metrics()["compile_graph_breaks"] == 1
