"""The DVC pipeline: dvc.yaml agrees with the table spec and params.yaml, and a real `dvc repro
table5_ablation` on a temporary copy runs exactly the stages Table 5 needs, then nothing, then only the
variant whose parameters changed."""
from __future__ import annotations

import argparse
import configparser
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reproduce import pipeline
from reproduce.tables.spec import TABLES, runs_needed

ROOT = Path(__file__).resolve().parents[1]
DVC_YAML = yaml.safe_load((ROOT / "dvc.yaml").read_text())
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = DVC_YAML["stages"]
# What a copy of the pipeline needs: code, paper values, DVC files (no results, no .git).
PIPELINE_FILES = ["dvc.yaml", "params.yaml", ".dvcignore", "models", "baselines", "reproduce", "tables/paper"]


def _deps(stage: dict) -> list[str]:
    return [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]


def _outs(stage: dict, key: str = "outs") -> dict[str, dict]:
    return {next(iter(o)) if isinstance(o, dict) else o: (next(iter(o.values())) if isinstance(o, dict) else {}) or {}
            for o in stage.get(key, [])}


@pytest.mark.parametrize("name", list(TABLES))
def test_table_stage_deps_match_the_table_spec(name):
    """Each table stage depends on exactly the run metrics its table reads, and on its measurements."""
    table, stage = TABLES[name], STAGES[name]
    expected = {f"results/measure/{name}.json", f"tables/paper/{table.csv}"}
    for kind, runs in runs_needed(table).items():
        prefix = "results/pretrain" if kind == "pretrain" else f"results/finetune/{kind}"
        expected |= {f"{prefix}/{run}/metrics.json" for run in runs}
    results = {d for d in _deps(stage) if d.startswith(("results/", "tables/paper/"))}
    assert results == expected
    assert stage["cmd"] == f"python -m reproduce tables {name}"
    assert set(_outs(stage)) >= {f"tables/{name}.{ext}" for ext in ("md", "tex", "csv", "json")}
    assert list(_outs(stage, "metrics")) == [f"tables/metrics/{name}.json"]


def test_every_run_a_table_needs_is_defined_in_params():
    for table in TABLES.values():
        for kind, runs in runs_needed(table).items():
            assert runs <= set(PARAMS[kind]), (table.name, kind, runs - set(PARAMS[kind]))
        for row in table.rows:
            assert row.model in PARAMS["pretrain"]
    for kind in ("cityscapes", "ade20k"):
        assert {e["init"] for e in PARAMS[kind].values()} <= set(PARAMS["pretrain"])


def test_measurements_are_never_restored_from_the_run_cache():
    for name, stage in STAGES.items():
        if name.startswith("measure_") or name in TABLES or name == "claims":
            assert all(opts.get("cache") is False for opts in _outs(stage).values()), name


def test_measure_stages_track_exactly_the_params_they_read():
    for name, table in TABLES.items():
        stage = STAGES[f"measure_{name.split('_')[0]}"]
        assert stage["cmd"] == f"python -m reproduce.pipeline measure {name}"
        requests = pipeline.measure_requests(PARAMS, name)
        assert set(requests) == {r.label for r in table.rows}
        keys = set(stage["params"])
        for row in table.rows:
            assert {f"pretrain.{row.model}.model", f"pretrain.{row.model}.ablate"} <= keys
            if row.window_run:
                assert f"cityscapes.{row.window_run}.window-sizes" in keys
    assert pipeline.measure_requests(PARAMS, "table4_cityscapes")["HRViT-b3"]["window_sizes"] == [1, 2, 9, 9]
    assert pipeline.measure_requests(PARAMS, "table4_cityscapes")["MiT-B1"]["num_classes"] == 150
    assert pipeline.measure_requests(PARAMS, "table5_ablation")["- MixCFN"]["ablate"] == ["mixcfn"]


def test_profile_launcher_and_analytics():
    assert PARAMS["profile"] == "smoke" and PARAMS["launcher"].endswith("python")
    assert set(PARAMS["recipes"]) == {"smoke", "paper"}
    assert all(PARAMS["recipes"]["paper"]["data"][d]["root"] for d in ("imagenet", "cityscapes", "ade20k"))
    assert STAGES["pretrain"]["do"]["cmd"].startswith("${launcher} -m reproduce.pipeline pretrain")
    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config["core"]["analytics"] == "false"


@pytest.mark.parametrize("profile", ["smoke", "paper"])
def test_recipes_are_accepted_by_the_training_commands(profile):
    """Every recipe flag in params.yaml is an option of `python -m reproduce pretrain|finetune`."""
    from reproduce.train import finetune, pretrain

    params = {**PARAMS, "profile": profile}
    for argv in (pipeline.pretrain_argv(params, "hrvit_b1-no_all", Path("results")),
                 pipeline.finetune_argv(params, "cityscapes", "hrvit_b3-w11", Path("results")),
                 pipeline.finetune_argv(params, "ade20k", "mit_b2", Path("results"))):
        parser = argparse.ArgumentParser(exit_on_error=False)
        (pretrain if argv[0] == "pretrain" else finetune).add_arguments(parser)
        args = parser.parse_args(argv[1:])
        assert args.profile == profile
    cs = pipeline.finetune_argv(params, "cityscapes", "hrvit_b3-w11", Path("r"))
    assert cs[cs.index("--window-sizes") + 1:cs.index("--window-sizes") + 5] == ["1", "2", "11", "11"]
    assert cs[cs.index("--pretrained") + 1] == "r/pretrain/hrvit_b3/checkpoint.pt"


def test_per_run_recipe_override_and_bad_params():
    params = {**PARAMS, "pretrain": {**PARAMS["pretrain"], "x": {"model": "hrvit_b1", "ablate": [], "recipe": {"seed": 7}}}}
    argv = pipeline.pretrain_argv(params, "x", Path("results"))
    assert argv[argv.index("--seed") + 1] == "7"
    with pytest.raises(pipeline.ParamsError, match="no pretrain run 'nope'"):
        pipeline.pretrain_argv(params, "nope", Path("results"))
    assert pipeline.flags({"amp": False, "sync-bn": True, "x": None, "ablate": []}) == ["--no-amp", "--sync-bn"]


# ----------------------------------------------------------------------------------------- real DVC run

TABLE5_STAGES = {"measure_table5", "table5_ablation"} | {
    f"{stage}@{run}" for run in PARAMS["cityscapes"] if run.startswith("hrvit_b1")
    for stage in ("pretrain", "finetune_cityscapes")
}


def _dvc(*args: str, cwd: Path) -> str:
    bindir = os.path.dirname(sys.executable)  # stage commands run `python` from PATH
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": bindir + os.pathsep + os.environ.get("PATH", "")}
    done = subprocess.run([os.path.join(bindir, "dvc"), *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


@pytest.fixture
def tiny_pipeline(tmp_path):
    """A copy of the pipeline whose smoke recipes take one optimizer step per run."""
    for name in PIPELINE_FILES:
        src, dst = ROOT / name, tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir() else shutil.copy2(src, dst))
    params = yaml.safe_load((tmp_path / "params.yaml").read_text())
    smoke = params["recipes"]["smoke"]
    # synthetic-size 16: the generated classification set needs at least one image per class (10)
    smoke["pretrain"].update({"epochs": 1, "warmup-epochs": 0, "synthetic-size": 16, "batch-size": 16})
    for ds in ("cityscapes", "ade20k"):
        smoke[ds].update({"iters": 1, "warmup-iters": 0, "synthetic-size": 4, "batch-size": 2})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _dvc("init", "--no-scm", "-q", cwd=tmp_path)
    _dvc("config", "core.site_cache_dir", str(tmp_path / ".dvc-site"), cwd=tmp_path)
    return tmp_path


def test_repro_table5_runs_only_what_table5_needs(tiny_pipeline):
    out = _dvc("repro", "table5_ablation", cwd=tiny_pipeline)
    assert _ran(out) == TABLE5_STAGES
    md = (tiny_pipeline / "tables" / "table5_ablation.md").read_text()
    assert "- All block opt." in md and "smoke†" in md
    assert r"\toprule" in (tiny_pipeline / "tables" / "table5_ablation.tex").read_text()
    cells = json.loads((tiny_pipeline / "tables" / "table5_ablation.json").read_text())["cells"]
    assert all(c["ours"] is not None for c in cells)
    assert all(c["status"] == "smoke" for c in cells if c["kind"] == "accuracy")

    assert _ran(_dvc("repro", "table5_ablation", cwd=tiny_pipeline)) == set()  # nothing changed

    params = yaml.safe_load((tiny_pipeline / "params.yaml").read_text())
    params["pretrain"]["hrvit_b1-no_des"]["recipe"] = {"seed": 1}
    (tiny_pipeline / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert _ran(_dvc("repro", "table5_ablation", cwd=tiny_pipeline)) == {
        "pretrain@hrvit_b1-no_des", "finetune_cityscapes@hrvit_b1-no_des", "table5_ablation"}
