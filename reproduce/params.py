"""One home for the suite's fixed facts and for params.yaml.

- Run kinds (``pretrain``, ``cityscapes``, ``ade20k``) and the real dataset of each.
- What a run folder holds (``checkpoint.pt``, ``best.pt``, ``model.safetensors``, ``metrics.json``,
  ``dvclive/``), where the pipeline puts run folders, and the formats this suite writes.
- The launch environment torchrun announces (rank, world size), readable before any process group.
- params.yaml: loading and the checks every stage relies on, with each bad value named by its key.

The profile names live with the recipes they select (``reproduce.recipes.PROFILES``).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from reproduce.errors import ParamsError
from reproduce.recipes import PROFILES, validate_recipe
from reproduce.tables.spec import ACCURACY_COLUMNS, EXTRA_ROW_KEYS, EXTRA_TABLES, TABLES

RUN_KINDS = ("pretrain", "cityscapes", "ade20k")
REAL_DATASET = {"pretrain": "imagenet", "cityscapes": "cityscapes", "ade20k": "ade20k"}  # what the paper trained on
# Profiles whose runs are real training: refused under a one-thread launcher.
HEAVY_PROFILES = ("paper",)

# The files of a run folder.
CHECKPOINT_NAME = "checkpoint.pt"  # the full resumable state
BEST_NAME = "best.pt"  # the checkpoint of the best periodic evaluation
WEIGHTS_NAME = "model.safetensors"  # the weights and the run's description
METRICS_NAME = "metrics.json"
DVCLIVE_DIR = "dvclive"
STAGE_STATE = ".stage.json"  # which pipeline command and dependencies the checkpoint beside it belongs to

# What this suite writes: the weights-format name models.weights detects, and the two file formats.
SUITE_FORMAT = "hrvit-repro"
CHECKPOINT_FORMAT = f"{SUITE_FORMAT}-checkpoint/1"
WEIGHTS_FORMAT = f"{SUITE_FORMAT}-weights/1"


# ----------------------------------------------------------------------------------------- run folders

def run_dir(results: Path, kind: str, run: str) -> Path:
    """The folder of one pipeline run under ``results``."""
    return results / "pretrain" / run if kind == "pretrain" else results / "finetune" / kind / run


def seed_dir(output: Path, seed: int | None) -> Path:
    """The folder of one seed of a seeded profile's run (the run folder itself when unseeded)."""
    return output if seed is None else output / f"seed-{seed}"


# ----------------------------------------------------------------------------------------- launch environment

def env_rank() -> int:
    """This process's rank as torchrun announces it (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    """World size torchrun announces (1 outside torchrun), known before any set-up, for validation."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0, before or without a process group (every rank raises the same error; one line is enough)."""
    return env_rank() == 0


# ----------------------------------------------------------------------------------------- params

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ParamsError(message)


def _is_int_list(value: Any, length: int | None = None) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value) \
        and (length is None or len(value) == length)


def validate_params(params: Any, path: Path = Path("params.yaml")) -> dict[str, Any]:
    """Check the structure every stage relies on, before any work: a bad value is named with its key."""
    _require(isinstance(params, dict), f"{path}: expected a YAML mapping")
    profile = params.get("profile")
    _require(profile in PROFILES, f"{path}: profile must be one of {', '.join(PROFILES)}, got {profile!r} "
             "(set it with `dvc exp run -S profile=paper`)")
    launcher = params.get("launcher")
    _require(isinstance(launcher, str) and launcher.split(), f"{path}: launcher must be a command such as "
             "'env OMP_NUM_THREADS=1 python' or 'torchrun --standalone --nproc_per_node=8'")
    recipes = params.get("recipes")
    _require(isinstance(recipes, dict) and isinstance(recipes.get(profile), dict), f"{path}: no recipes.{profile} section")
    recipe = recipes[profile]
    for section in ("data", *RUN_KINDS):
        _require(isinstance(recipe.get(section), dict), f"{path}: recipes.{profile}.{section} must be a mapping")
    for kind, dataset in REAL_DATASET.items():
        data = recipe["data"].get(dataset)
        _require(isinstance(data, dict) and "dataset" in data and "root" in data,
                 f"{path}: recipes.{profile}.data.{dataset} must be {{dataset: NAME, root: PATH or null}}")
    seeds = recipe.get("seeds")
    _require(seeds is None or (_is_int_list(seeds) and seeds and len(set(seeds)) == len(seeds)),
             f"{path}: recipes.{profile}.seeds must be null or a list of distinct integers, got {seeds!r}")
    for kind in RUN_KINDS:
        runs = params.get(kind)
        _require(isinstance(runs, dict) and runs, f"{path}: {kind} must map run names to entries")
        for run, entry in runs.items():
            where = f"{path}: {kind}.{run}"
            _require(isinstance(entry, dict), f"{where} must be a mapping")
            _require(isinstance(entry.get("recipe", {}), dict), f"{where}.recipe must map flags to values")
            if kind == "pretrain":
                _require(isinstance(entry.get("model"), str), f"{where}.model must be a model name")
                _require(isinstance(entry.get("ablate", []), list), f"{where}.ablate must be a list (e.g. [mixcfn])")
            else:
                _require(entry.get("init") in params["pretrain"], f"{where}.init must name a pretrain run, got {entry.get('init')!r}")
                windows = entry.get("window-sizes")
                _require(windows is None or _is_int_list(windows, 4), f"{where}.window-sizes must be four integers, got {windows!r}")
    _check_from_file(params, path)
    _check_recipes(params, path)
    _check_extra_rows(params, path)
    return params


def _check_extra_rows(params: dict[str, Any], path: Path) -> None:
    """``extra_rows: {TABLE: [{label, model, flop_family?, runs?: {column: run}}]}``: a user's own rows."""
    from models.factory import check_model_name  # imports torch: only when params.yaml has extra rows

    extra = params.get("extra_rows") or {}
    _require(isinstance(extra, dict), f"{path}: extra_rows must map table names to lists of rows")
    for table, rows in extra.items():
        _require(table in EXTRA_TABLES, f"{path}: extra_rows.{table}: rows can join {', '.join(EXTRA_TABLES)}")
        _require(isinstance(rows, list), f"{path}: extra_rows.{table} must be a list of rows (or [])")
        labels = {row.label for row in TABLES[table].rows}
        for i, row in enumerate(rows):
            where = f"{path}: extra_rows.{table}[{i}]"
            _require(isinstance(row, dict) and isinstance(row.get("label"), str) and isinstance(row.get("model"), str)
                     and not set(row) - EXTRA_ROW_KEYS,
                     f"{where} must be {{label: TEXT, model: NAME, flop_family: hrvit|mit|cswin, runs: {{COLUMN: RUN}}}}, "
                     f"got {row!r}")
            _require(row["label"] not in labels, f"{where}.label {row['label']!r} is already a row of {table}; pick another")
            labels.add(row["label"])
            try:
                check_model_name(row["model"])
            except ValueError as err:
                raise ParamsError(f"{where}.model: {err}") from None
            _require(row.get("flop_family") in (None, "hrvit", "mit", "cswin"),
                     f"{where}.flop_family must be hrvit, mit or cswin (the paper-convention counting rule)")
            runs = row.get("runs") or {}
            _require(isinstance(runs, dict), f"{where}.runs must map accuracy columns to run names")
            for column, run in runs.items():
                _require(column in TABLES[table].columns and column in ACCURACY_COLUMNS,
                         f"{where}.runs: {table} has no accuracy column {column!r}; its columns: "
                         f"{', '.join(c for c in TABLES[table].columns if c in ACCURACY_COLUMNS)}")
                kind = ACCURACY_COLUMNS[column]
                _require(run in runs_of(params, kind), f"{where}.runs.{column}: no {kind} run {run!r} in {path} (add one whose "
                         f"model is {row['model']})")


def _check_from_file(params: dict[str, Any], path: Path) -> None:
    """``from_file: {cityscapes|ade20k: {RUN: {model, init: {file: PATH}, ...}}}``: fine-tunes that start from a
    weights file (any format ``finetune --pretrained`` reads) instead of a pretrain run."""
    sections = params.get("from_file") or {}
    _require(isinstance(sections, dict) and set(sections) <= set(RUN_KINDS[1:]),
             f"{path}: from_file must map cityscapes/ade20k to runs, got {sections!r}")
    for kind, runs in sections.items():
        _require(isinstance(runs, dict), f"{path}: from_file.{kind} must map run names to entries (or {{}})")
        for run, entry in runs.items():
            where = f"{path}: from_file.{kind}.{run}"
            _require(run not in params[kind], f"{where}: {kind} already has a run {run!r}; run names must be unique")
            _require(isinstance(entry, dict) and isinstance(entry.get("model"), str)
                     and isinstance(entry.get("init"), dict) and isinstance(entry["init"].get("file"), str),
                     f"{where} must be {{model: NAME, init: {{file: PATH}}}} (e.g. {{model: mit_b1, init: {{file: "
                     f"weights/mit_b1.pth}}}}), got {entry!r}")
            _require(isinstance(entry.get("recipe", {}), dict), f"{where}.recipe must map flags to values")
            _require(isinstance(entry.get("ablate", []), list), f"{where}.ablate must be a list (e.g. [mixcfn])")
            windows = entry.get("window-sizes")
            _require(windows is None or _is_int_list(windows, 4), f"{where}.window-sizes must be four integers, got {windows!r}")


def runs_of(params: dict[str, Any], kind: str) -> dict[str, Any]:
    """Every run of a kind: its section, plus (fine-tuning) the runs of ``from_file.<kind>``."""
    runs = dict(params.get(kind) or {})
    if kind != "pretrain":
        runs.update((params.get("from_file") or {}).get(kind) or {})
    return runs


def init_file(entry: dict[str, Any]) -> str | None:
    """The weights file a fine-tuning entry starts from (``init: {file: PATH}``), or None (a pretrain run)."""
    init = entry.get("init")
    return init.get("file") if isinstance(init, dict) else None


def _check_recipes(params: dict[str, Any], path: Path) -> None:
    """Recipe keys and values, by the training engine's own rules (the flags of pretrain/finetune)."""
    profile = params["profile"]
    sections = [(f"recipes.{profile}.{kind}", kind, params["recipes"][profile][kind]) for kind in RUN_KINDS]
    sections += [(f"{kind}.{run}.recipe", kind, entry["recipe"]) for kind in RUN_KINDS
                 for run, entry in runs_of(params, kind).items() if entry.get("recipe")]
    for where, kind, mapping in sections:
        try:
            validate_recipe(kind, mapping)
        except ValueError as err:
            raise ParamsError(f"{path}: {where}: {err}") from None


def load_params(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ParamsError(f"{path} not found: run from the repository root or pass --params")
    try:
        params = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    return validate_params(params, path)


def check_launcher(params: dict[str, Any]) -> None:
    """A paper-profile run under the smoke launcher would train for months on one CPU thread."""
    launcher = params["launcher"]
    if params["profile"] in HEAVY_PROFILES and "torchrun" not in launcher and "OMP_NUM_THREADS=1" in launcher:
        raise ParamsError(
            f"profile {params['profile']} under launcher {launcher!r} (one CPU thread); set the launcher, e.g. "
            "dvc exp run -S profile=paper -S 'launcher=torchrun --standalone --nproc_per_node=8'"
        )


def lookup(params: dict[str, Any], kind: str, run: str) -> dict[str, Any]:
    runs = runs_of(params, kind)
    if run not in runs:
        raise ParamsError(f"params.yaml has no {kind} run {run!r}; defined: {', '.join(runs)}")
    return runs[run] or {}


def active_recipe(params: dict[str, Any]) -> dict[str, Any]:
    return params["recipes"][params["profile"]]


def seeds(params: dict[str, Any]) -> list[int] | None:
    """The seeds a seeded profile (e.g. proxy) trains every run with, or None for one run per stage."""
    return active_recipe(params).get("seeds")
