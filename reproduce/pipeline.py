"""Glue between params.yaml and the suite's commands, for the DVC stages in dvc.yaml.

``python -m reproduce.pipeline pretrain RUN`` / ``finetune DATASET RUN`` look the run and the active
profile's recipe up in params.yaml, print the equivalent ``python -m reproduce ...`` command line and run
it in this process (so a ``torchrun ... -m reproduce.pipeline`` launcher starts every rank the same way).
``python -m reproduce.pipeline measure TABLE`` measures every row of a table in one process and writes
``results/measure/TABLE.json``; ``fingerprint`` writes the semantic dependencies of the measure and
training stages (``reproduce.fingerprint``).

Why a glue module: DVC templating cannot select ``recipes.<profile>`` from the value of ``profile``
(no nested interpolation), and a recipe is easier to read and override as a YAML mapping of the
training CLI's own flags (``batch-size: 8`` -> ``--batch-size 8``).

A run folder holds what DVC caches (``model.safetensors``, ``metrics.json``, ``dvclive/``) and the
resumable ``checkpoint.pt``, which DVC does not track: a stage DVC reruns after a preemption resumes
from it; one left by a different or finished run is moved to ``stale/`` first; once the stage succeeds
it is deleted unless ``keep_checkpoints: true`` (its optimizer state is 2x the weights).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import yaml

RUN_KINDS = ("pretrain", "cityscapes", "ade20k")
DATASETS = {"pretrain": "imagenet", "cityscapes": "cityscapes", "ade20k": "ade20k"}
# The tables compare the paper convention and show fvcore for reference; torch's counter (2 FLOPs per
# multiply-add) would add a third forward pass per model for a number that is fvcore's doubled.
MEASURE_CONVENTIONS = ("paper", "fvcore")
PROFILES = ("smoke", "paper", "proxy")
# Profiles whose runs are real training: refused under a one-thread launcher.
HEAVY_PROFILES = ("paper",)
CHECKPOINT = "checkpoint.pt"
STAGE_STATE = ".stage.json"  # which command and dependencies the checkpoint beside it belongs to
WEIGHTS, METRICS, DVCLIVE = "model.safetensors", "metrics.json", "dvclive"


class ParamsError(ValueError):
    """params.yaml lacks something a stage needs, or holds a value it cannot use."""


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
    for kind, dataset in DATASETS.items():
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
    from models.factory import check_model_name
    from reproduce.tables.spec import ACCURACY_COLUMNS, EXTRA_ROW_KEYS, EXTRA_TABLES, TABLES

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
    from reproduce.train.recipes import validate_recipe

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


# ----------------------------------------------------------------------------------------- commands

def flags(mapping: dict[str, Any]) -> list[str]:
    """A recipe mapping as command-line flags: lists give several values, booleans --x / --no-x, None is skipped."""
    out: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out.append(f"--{key}" if value else f"--no-{key}")
        elif isinstance(value, list):
            if value:
                out += [f"--{key}", *map(str, value)]
        else:
            out += [f"--{key}", str(value)]
    return out


def dataset_flags(params: dict[str, Any], dataset: str) -> list[str]:
    """--dataset and --data-root of the active profile for a logical dataset (imagenet, cityscapes, ade20k)."""
    data = active_recipe(params)["data"][dataset]
    return flags({"dataset": data["dataset"], "data-root": data.get("root")})


def run_dir(results: Path, kind: str, run: str) -> Path:
    return results / "pretrain" / run if kind == "pretrain" else results / "finetune" / kind / run


def seed_dir(output: Path, seed: int | None) -> Path:
    return output if seed is None else output / f"seed-{seed}"


def pretrain_argv(params: dict[str, Any], run: str, results: Path, seed: int | None = None) -> list[str]:
    entry = lookup(params, "pretrain", run)
    recipe = {**active_recipe(params)["pretrain"], **(entry.get("recipe") or {}), **({} if seed is None else {"seed": seed})}
    return ["pretrain", "--model", entry["model"], "--profile", params["profile"], *dataset_flags(params, "imagenet"),
            *flags({"ablate": entry.get("ablate") or []}), *flags(recipe),
            "--output", str(seed_dir(run_dir(results, "pretrain", run), seed))]


def finetune_argv(params: dict[str, Any], dataset: str, run: str, results: Path, seed: int | None = None) -> list[str]:
    entry = lookup(params, dataset, run)
    recipe = {**active_recipe(params)[dataset], **(entry.get("recipe") or {}), **({} if seed is None else {"seed": seed})}
    if init_file(entry):  # from_file: the entry names its model; every seed starts from the same file
        init, pretrained = entry, Path(init_file(entry))
        if not pretrained.is_file():
            raise ParamsError(f"from_file.{dataset}.{run}.init.file {pretrained} not found: put the weights there "
                              "(README: Published weights and your own model) or fix the path in params.yaml")
    else:
        init = lookup(params, "pretrain", entry["init"])
        pretrained = seed_dir(run_dir(results, "pretrain", entry["init"]), seed) / WEIGHTS  # seed s starts from pretrain seed s
    return ["finetune", "--model", init["model"], "--profile", params["profile"], *dataset_flags(params, dataset),
            *flags({"ablate": init.get("ablate") or [], "window-sizes": entry.get("window-sizes") or []}), *flags(recipe),
            "--pretrained", str(pretrained), "--output", str(seed_dir(run_dir(results, dataset, run), seed))]


def training_argv(params: dict[str, Any], kind: str, run: str, results: Path, seed: int | None = None) -> list[str]:
    return pretrain_argv(params, run, results, seed) if kind == "pretrain" else finetune_argv(params, kind, run, results, seed)


# ----------------------------------------------------------------------------------------- run folders

def stage_key(argv: list[str], inputs: list[Path]) -> str:
    """Identity of one training command: its argv and the content of its inputs (the code and model
    fingerprints, the pretrained weights), so a checkpoint is resumed only by the very same run."""
    digest = hashlib.sha256(shlex.join(argv).encode())
    for path in inputs:
        if path.is_file():
            with path.open("rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
    return digest.hexdigest()


def _read_state(output: Path) -> dict[str, Any]:
    try:
        return json.loads((output / STAGE_STATE).read_text())
    except (OSError, ValueError):
        return {}


def is_main_rank() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def prepare_output(output: Path, key: str, timeout_s: float = 300.0) -> None:
    """Keep ``checkpoint.pt`` only if it belongs to an unfinished run of this very command (a preempted
    stage resumes); otherwise move it to ``stale/`` so the run starts clean instead of being refused.
    Rank 0 does it; other ranks wait until it is done (no process group exists yet)."""
    if not is_main_rank():
        deadline = time.time() + timeout_s
        while _read_state(output) != {"key": key, "finished": False}:
            if time.time() > deadline:
                raise ParamsError(f"rank 0 did not prepare {output} within {timeout_s:.0f} s (is the folder shared by all nodes?)")
            time.sleep(0.5)
        return
    ckpt, state_file = output / CHECKPOINT, output / STAGE_STATE
    state = _read_state(output)
    if ckpt.is_file() and (state.get("key") != key or state.get("finished")):
        (output / "stale").mkdir(exist_ok=True)
        ckpt.replace(output / "stale" / CHECKPOINT)
        print(f"moved {ckpt} of another or finished run to {output / 'stale' / CHECKPOINT}", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"key": key, "finished": False}) + "\n")


def finish_output(output: Path, key: str, keep_checkpoint: bool) -> None:
    if not is_main_rank():
        return
    (output / STAGE_STATE).write_text(json.dumps({"key": key, "finished": True}) + "\n")
    if not keep_checkpoint and (output / CHECKPOINT).is_file():
        (output / CHECKPOINT).unlink()


def aggregate_metrics(per_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """One metrics.json for a seeded stage: float metrics as mean, ``<key>_std`` (sample std) beside
    them, ``seeds`` and ``per_seed``; every other key (profile, recipe, model, counts) from the first seed."""
    first = per_seed[next(iter(per_seed))]
    out = dict(first)
    for key, value in first.items():
        values = [m.get(key) for m in per_seed.values()]
        if isinstance(value, float) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = statistics.fmean(values)
            out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    out["seeds"] = list(per_seed)
    out["per_seed"] = {str(seed): metrics for seed, metrics in per_seed.items()}
    return out


def collect_seeds(output: Path, seed_list: list[int]) -> None:
    """The stage's own outputs from its seed runs: aggregated metrics, the first seed's weights and curves."""
    first = seed_dir(output, seed_list[0])
    per_seed = {s: json.loads((seed_dir(output, s) / METRICS).read_text()) for s in seed_list}
    (output / METRICS).write_text(json.dumps(aggregate_metrics(per_seed), indent=2, sort_keys=True) + "\n")
    (output / WEIGHTS).unlink(missing_ok=True)  # may be a read-only link into DVC's cache
    shutil.copyfile(first / WEIGHTS, output / WEIGHTS)
    if (first / DVCLIVE).is_dir():
        shutil.rmtree(output / DVCLIVE, ignore_errors=True)
        shutil.copytree(first / DVCLIVE, output / DVCLIVE)


def train_stage(params: dict[str, Any], kind: str, run: str, results: Path) -> int:
    """One training stage: one run, or one run per seed of a seeded profile, each resumable."""
    from reproduce.cli import main as reproduce_main

    output = run_dir(results, kind, run)
    fingerprints = [results / "fingerprints" / "code.json", results / "fingerprints" / kind / f"{run}.json"]
    seed_list = seeds(params)
    commands = [(s, training_argv(params, kind, run, results, s)) for s in (seed_list or [None])]
    for seed, argv in commands:
        out = seed_dir(output, seed)
        pretrained = [Path(argv[argv.index("--pretrained") + 1])] if "--pretrained" in argv else []
        key = stage_key(argv, fingerprints + pretrained)
        prepare_output(out, key)
        print("+ python -m reproduce " + shlex.join(argv), flush=True)
        code = reproduce_main(argv)
        if code:
            return code
        finish_output(out, key, bool(params.get("keep_checkpoints")))
    if seed_list and is_main_rank():
        collect_seeds(output, seed_list)
    return 0


# ----------------------------------------------------------------------------------------- measure

def measure_requests(params: dict[str, Any], table_name: str, fair: bool = False) -> dict[str, dict[str, Any]]:
    """Row label -> keyword arguments of ``reproduce.measure.measure_named`` for one table: each row at the
    setting the paper measured it (``fair``: the rows whose setting differs from the table's one shared
    setting, measured at that setting, for the "all backbones at one setting" view)."""
    from reproduce.tables.spec import TABLES, resolve

    if table_name not in TABLES:
        raise ParamsError(f"unknown table {table_name!r}; choose from {', '.join(TABLES)}")
    table = resolve(table_name, params)
    requests = {}
    for row in table.rows:
        if fair and (table.fair is None or row.measure == table.fair):
            continue
        setting = table.fair if fair else row.measure
        if row.extra:  # a user's row: the model name itself, at the table's shared setting
            requests[row.label] = {"name": row.model, "task": setting.task, "num_classes": setting.num_classes,
                                   "size": setting.size, "window_sizes": None, "ablate": [], "flop_family": row.flop_family}
            continue
        entry = lookup(params, "pretrain", row.model)
        windows = lookup(params, "cityscapes", row.window_run).get("window-sizes") if row.window_run else None
        requests[row.label] = {"name": entry["model"], "task": setting.task, "num_classes": setting.num_classes,
                               "size": setting.size, "window_sizes": windows, "ablate": entry.get("ablate") or []}
    return requests


def measure_table(params: dict[str, Any], table_name: str, results: Path, labels: list[str] | None = None) -> Path:
    """Measure the table's rows into ``results/measure/<table>.json``; ``labels``: only those rows, the
    file's other rows kept (a row you add, measured in seconds instead of the whole table)."""
    from reproduce.measure import check_request, measure_request
    from reproduce.train.engine import git_commit  # the same provenance string as the training runs

    out = results / "measure" / f"{table_name}.json"
    unknown = sorted(set(labels or ()) - set(measure_requests(params, table_name)))
    if unknown:
        raise ParamsError(f"{table_name} has no row {', '.join(map(repr, unknown))}; its rows: "
                          f"{', '.join(measure_requests(params, table_name))}")
    kept = json.loads(out.read_text()) if labels and out.is_file() else {}
    commit = git_commit()
    measured: dict[str, dict[str, Any]] = {}
    for key, fair in (("rows", False), ("fair_rows", True)):
        requests = {label: kw for label, kw in measure_requests(params, table_name, fair).items() if not labels or label in labels}
        checked = {label: check_request(**{"model" if k == "name" else k: v for k, v in kw.items()}) for label, kw in requests.items()}
        measured[key] = dict(kept.get(key, {}))
        for label, request in checked.items():
            result = measure_request(request, MEASURE_CONVENTIONS, depth=4)  # 4: HRViT's six modules M1..M6
            result["git_commit"] = commit
            measured[key][label] = result
            print(f"{table_name} {label}{' (shared setting)' if fair else ''}: {result['params']:,} params, "
                  f"{result['gflops']['paper']:.3f} GFLOPs (paper convention)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"table": table_name, "git_commit": commit, **measured}, indent=1) + "\n")
    return out


def fingerprint(params: dict[str, Any], results: Path) -> None:
    from reproduce.fingerprint import write_fingerprints

    start = time.time()
    counts = write_fingerprints(params, Path.cwd(), results / "fingerprints")
    Path("tables/metrics").mkdir(parents=True, exist_ok=True)  # so `dvc metrics show` is silent before any table exists
    print(f"fingerprints: {counts['runs']} runs, {counts['configs']} model configurations ({counts['built']} built), "
          f"{counts['changed']} files changed, {time.time() - start:.1f} s", flush=True)


# ----------------------------------------------------------------------------------------- entry

class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def main(argv: list[str] | None = None) -> int:
    parser = _OneLineParser(prog="python -m reproduce.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fingerprint", help="write the measure and training stages' semantic dependencies (results/fingerprints)")
    measure = sub.add_parser("measure", help="params and GFLOPs of every row of a table")
    measure.add_argument("table")
    measure.add_argument("--rows", nargs="+", metavar="LABEL", help="only these rows (the file's other rows are kept)")
    sub.add_parser("pretrain", help="one pretraining stage").add_argument("run")
    fine = sub.add_parser("finetune", help="one fine-tuning stage")
    fine.add_argument("dataset", choices=RUN_KINDS[1:])
    fine.add_argument("run")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.command == "fingerprint":
            fingerprint(params, args.results)
            return 0
        if args.command == "measure":
            measure_table(params, args.table, args.results, args.rows)
            return 0
        check_launcher(params)
        kind = "pretrain" if args.command == "pretrain" else args.dataset
        lookup(params, kind, args.run)
        return train_stage(params, kind, args.run, args.results)
    except (ValueError, FileNotFoundError) as err:  # bad input everywhere in the suite (SettingsError too)
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
