"""Engine parts: recipes as the one source of truth (and of the keys the status compares), the
world-size independent sample order, bf16 on a CPU, non-finite losses, step hooks, one-line layout
errors, the loader benchmark and the layers' import order. Runs that are interrupted and resumed are
in test_train.py, multi-process cases in test_ddp.py."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from models.weights import FORMATS, SUITE_FORMATS
from reproduce import params as suite_params
from reproduce import recipes
from reproduce.cli import RunStopped, main
from reproduce.data.pipelines import classification_set
from reproduce.data.throughput import loader_benchmark
from reproduce.tables.status import paper_recipe, recipe_deviations
from reproduce.train.distributed import DistContext
from reproduce.train.engine import STEP_HOOK_ENV, fit
from reproduce.train.loop import Schedule, StepSampler, Trainer
from reproduce.train.tasks import CLASSIFICATION, SEGMENTATION

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[1]
# HRViT-b1 on 4 generated 32 px images, batch 2: 2 steps per epoch.
TINY = ["--model", "hrvit_b1", "--profile", "smoke", "--synthetic-size", "4", "--batch-size", "2", "--image-size", "32"]
CPU = torch.device("cpu")


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize("profile", ["smoke", "proxy"])
def test_params_yaml_cpu_recipes_are_the_cli_profile_defaults(profile):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for kind in ("pretrain", "cityscapes", "ade20k"):
        given = recipes.validate_recipe(kind, params["recipes"][profile][kind])
        defaults = recipes.profile_recipe(kind, profile)
        numbers = set(given) - set(recipes.execution_keys(kind)) - {"test_mode"}  # test mode: per dataset
        assert {k: given[k] for k in numbers} == {k: getattr(defaults, k) for k in numbers}, kind
    assert recipes.profile_recipe("pretrain", "smoke").epochs == 1 and recipes.profile_recipe("finetune", "smoke").iters == 2


@pytest.mark.parametrize(
    "mapping, message",
    [
        ({"batch-sise": 8}, "unknown key 'batch-sise'; accepted keys: batch-size, "),
        ({"batch-size": "eight"}, "--batch-size must be an integer or null, got 'eight'"),
        ({"amp": "fp8"}, "--amp must be one of bf16, fp16, none, got 'fp8'"),
        ({"lr": 0}, "--lr must be positive"),
        ({"drop-path": 1.5}, "--drop-path must be in [0, 1)"),
        ({"sync-bn": "yes"}, "--sync-bn must be true or false"),
    ],
)
def test_recipe_validation_names_the_key_and_what_it_accepts(mapping, message):
    with pytest.raises(recipes.SettingsError) as err:
        recipes.validate_recipe("pretrain", mapping)
    assert message in str(err.value) and str(err.value).startswith("pretrain recipe: ")


def test_amp_accepts_the_old_booleans_and_the_new_modes():
    assert recipes.validate_recipe("cityscapes", {"amp": True, "num-workers": None}) == {"amp": "fp16"}
    assert recipes.validate_recipe("pretrain", {"amp": False})["amp"] == "none"
    assert recipes.validate_recipe("pretrain", {"amp": "bf16"})["amp"] == "bf16"


def test_status_compares_exactly_the_recipe_fields_marked_result():
    for kind, cls in (("pretrain", recipes.PretrainRecipe), ("cityscapes", recipes.FinetuneRecipe)):
        paper = paper_recipe(kind, "hrvit_b1")
        marked = recipes.result_keys(kind)
        assert marked and set(marked) <= set(paper) and not set(marked) & set(recipes.execution_keys(kind))
        for f in dataclasses.fields(cls):
            changed = {**paper, f.name: "changed"}
            assert bool(recipe_deviations(kind, changed, paper)) == (f.name in marked), f.name


def test_the_paper_recipe_is_what_the_commands_resolve_without_a_command_line(tmp_path):
    parser = argparse.ArgumentParser()
    SEGMENTATION.add_arguments(parser)
    args = parser.parse_args(["--model", "hrvit_b2", "--profile", "paper", "--dataset", "ade20k", "--data-root", str(tmp_path),
                              "--output", str(tmp_path / "out")])
    recipe, _, _ = SEGMENTATION.validate(args)
    assert dataclasses.asdict(recipe) == paper_recipe("ade20k", "hrvit_b2")
    assert (recipe.crop_size, recipe.batch_size, recipe.test_mode, recipe.drop_path) == (512, 16, "whole", 0.2)


# ------------------------------------------------------------------ sample order


def _micro_batches(n: int, batch: int, world: int, accum: int, epoch: int) -> list[list[list[int]]]:
    """Per step, the micro-batches of every (rank, accumulation step) in DDP-averaging order."""
    sched = Schedule(total_steps=n // batch, steps_per_epoch=n // batch, micro_batch=batch // (world * accum), accum_steps=accum, world_size=world)
    per_rank = []
    for rank in range(world):
        sampler = StepSampler(n, sched, rank, seed=3)
        sampler.set_epoch(epoch)
        keys = [i for _, i in sampler]
        per_rank.append([keys[k : k + sched.micro_batch] for k in range(0, len(keys), sched.micro_batch)])
    steps = []
    for s in range(sched.steps_per_epoch):
        steps.append([per_rank[r][s * accum + a] for a in range(accum) for r in range(world)])
    return steps


def test_the_samples_of_a_step_do_not_depend_on_the_number_of_ranks():
    two_ranks = _micro_batches(24, 8, world=2, accum=1, epoch=1)
    one_rank = _micro_batches(24, 8, world=1, accum=2, epoch=1)
    assert two_ranks == one_rank  # same micro-batches: same BN batches and mixup seeds too
    flat = [sorted(i for m in step for i in m) for step in _micro_batches(24, 8, world=4, accum=1, epoch=1)]
    assert flat == [sorted(i for m in step for i in m) for step in two_ranks]
    assert _micro_batches(24, 8, 2, 1, epoch=2) != two_ranks  # another epoch, another order


def test_sampler_resumes_mid_epoch_at_the_same_samples():
    sched = Schedule(6, 3, 2, 1, 1)
    full, resumed = StepSampler(7, sched, 0, 0), StepSampler(7, sched, 0, 0)
    resumed.set_epoch(0, 2)
    assert list(resumed) == list(full)[4:] and len(resumed) == 2


# ------------------------------------------------------------------ the optimizer step


class _Linear(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x)


def _trainer(loss_fn, amp: str = "none") -> Trainer:
    torch.manual_seed(0)
    model = _Linear()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return Trainer(DistContext(0, 1, 0, CPU), model, optimizer, scheduler=None, loss_fn=loss_fn, amp=amp, clip_grad=None, seed=0)


def test_a_non_finite_loss_stops_before_the_optimizer_step():
    trainer = _trainer(lambda net, batch: net(batch).sum() * float("nan"))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(RunStopped, match="loss is not finite at step 5") as err:
        trainer.train_step(5, [torch.ones(2, 4)], lambda: False)
    assert err.value.status == 1
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())


def test_bf16_autocast_runs_on_the_cpu():
    dtypes = []

    def loss_fn(net, batch):
        out = net(batch)
        dtypes.append(out.dtype)
        return out.float().pow(2).mean()

    result = _trainer(loss_fn, amp="bf16").train_step(0, [torch.ones(2, 4)] * 2, lambda: True)
    assert dtypes == [torch.bfloat16] * 2 and result.stop and result.grad_norm > 0
    assert _trainer(loss_fn, amp="fp16").scaler.is_enabled() is False  # fp16 is CUDA-only: fp32 on a CPU


def test_bf16_pretrain_step_on_the_cpu(tmp_path):
    assert main(["pretrain", *TINY, "--epochs", "1", "--synthetic-size", "2", "--amp", "bf16", "--mixup", "0", "--cutmix", "0",
                 "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "run")]) == 0
    m = _metrics(tmp_path / "run")
    assert m["effective"]["precision"] == "bf16" and m["recipe"]["amp"] == "bf16" and m["steps"] == 1
    assert torch.isfinite(torch.tensor(m["loss"]))


def test_step_hooks_run_after_every_step_and_a_bad_hook_name_is_one_line(tmp_path, capsys, monkeypatch):
    parser = argparse.ArgumentParser()
    CLASSIFICATION.add_arguments(parser)
    args = parser.parse_args([*TINY, "--epochs", "2", "--synthetic-size", "2", "--data-root", str(tmp_path / "data"),
                              "--output", str(tmp_path / "run")])
    seen = []
    assert fit(CLASSIFICATION, args, step_hooks=[lambda step, rank: seen.append((step, rank))]) == 0
    assert seen == [(1, 0), (2, 0)]

    monkeypatch.setenv(STEP_HOOK_ENV, "no_such_module:hook")
    assert main(["pretrain", *TINY, "--data-root", str(tmp_path / "data"), "--output", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{STEP_HOOK_ENV}='no_such_module:hook' does not name a function" in err
    assert not (tmp_path / "other").exists()


# ------------------------------------------------------------------ data index


def test_layout_errors_are_one_line_then_the_expected_layout(tmp_path, capsys):
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    assert main(["pretrain", "--model", "hrvit_b1", "--dataset", "imagenet", "--data-root", str(tmp_path / "imagenet"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    first, *rest = err.strip().splitlines()
    assert first.startswith("python -m reproduce pretrain: error: no class folders in 'train/'; first offending path: ")
    assert rest[0] == "expected layout:" and "Traceback" not in err


# ------------------------------------------------------------------ loader benchmark


def test_loader_benchmark_reports_images_per_second():
    result = loader_benchmark("cityscapes", None, workers=0, batches=2, batch_size=2)
    assert set(result) >= {"dataset", "root", "workers", "batch_size", "images", "seconds", "images_per_s"}
    assert result["images"] == 4 and result["images_per_s"] > 0 and result["root"] is None


# ------------------------------------------------------------------ layering


def _top_level_imports() -> dict[str, set[str]]:
    """Suite module -> the suite modules it imports when it is loaded (function-level imports aside)."""
    modules = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (REPO / "reproduce").rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_the_layers_import_top_down_without_a_circle():
    graph = _top_level_imports()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import circle: {' -> '.join((*path, name))}"
        if name not in done:
            for target in graph[name]:
                visit(target, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())
    higher = {"reproduce.data": ("reproduce.train", "reproduce.tables", "reproduce.pipeline"),
              "reproduce.tables": ("reproduce.pipeline", "reproduce.train"),
              "reproduce.errors": ("reproduce.",), "reproduce.recipes": ("reproduce.data", "reproduce.train", "reproduce.params")}
    for name, targets in graph.items():
        for layer, forbidden in higher.items():
            if name == layer or name.startswith(layer + "."):
                up = [t for t in targets if t.startswith(forbidden) and t != "reproduce.errors"]
                assert not up, f"{name} imports {up}, a higher layer"


def test_the_suite_formats_agree_between_the_models_and_the_run_files():
    """models.weights (which cannot import reproduce) detects the formats the run files are written in."""
    assert suite_params.SUITE_FORMAT == FORMATS[0]
    assert {suite_params.CHECKPOINT_FORMAT, suite_params.WEIGHTS_FORMAT} == set(SUITE_FORMATS)


# ------------------------------------------------------------------ SLURM


def test_slurm_scripts_parse_and_launch_refuses_outside_an_allocation():
    slurm = REPO / "scripts" / "slurm"
    for script in ("launch.sh", "train.sbatch"):
        assert subprocess.run(["bash", "-n", str(slurm / script)]).returncode == 0, script
    text = (slurm / "train.sbatch").read_text()
    assert "#SBATCH --signal=B:USR1@180" in text and "#SBATCH --requeue" in text and "scontrol requeue" in text
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run([str(slurm / "launch.sh"), "-m", "reproduce", "--help"], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "run inside a SLURM allocation" in done.stderr


def test_randaugment_posterize_to_zero_bits_gives_a_black_image_instead_of_a_crash():
    from PIL import Image

    transform = classification_set([], recipes.profile_recipe("pretrain", "paper"), augment=True).transform
    ops = [op for t in transform.transforms for op in getattr(t, "ops", []) if op.name.startswith("Posterize")]
    assert ops, "the paper policy has a posterize op"
    image = Image.new("RGB", (8, 8), (200, 100, 50))
    assert ops[0].aug_fn(image, 0).getextrema() == ((0, 0),) * 3  # magnitude at its maximum: 0 bits kept
    assert ops[0].aug_fn(image, 1).getpixel((0, 0)) == (128, 0, 0)
