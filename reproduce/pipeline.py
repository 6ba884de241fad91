"""Glue between params.yaml and the suite's commands, for the DVC stages in dvc.yaml.

``python -m reproduce.pipeline pretrain RUN`` / ``finetune DATASET RUN`` look the run and the active
profile's recipe up in params.yaml (read and checked by ``reproduce.params``), print the equivalent ``python -m reproduce ...`` command line and run
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
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from reproduce.cli import main as reproduce_main
from reproduce.fingerprint import write_fingerprints
from reproduce.params import (
    CHECKPOINT_NAME, DVCLIVE_DIR, METRICS_NAME, RUN_KINDS, STAGE_STATE, WEIGHTS_NAME, ParamsError, active_recipe, check_launcher,
    init_file, is_main_process, load_params, lookup, run_dir, seed_dir, seeds,
)
from reproduce.tables.spec import TABLES, resolve

# The tables compare the paper convention and show fvcore for reference; torch's counter (2 FLOPs per
# multiply-add) would add a third forward pass per model for a number that is fvcore's doubled.
MEASURE_CONVENTIONS = ("paper", "fvcore")


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
        pretrained = seed_dir(run_dir(results, "pretrain", entry["init"]), seed) / WEIGHTS_NAME  # seed s starts from pretrain seed s
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


def prepare_output(output: Path, key: str, timeout_s: float = 300.0) -> None:
    """Keep ``checkpoint.pt`` only if it belongs to an unfinished run of this very command (a preempted
    stage resumes); otherwise move it to ``stale/`` so the run starts clean instead of being refused.
    Rank 0 does it; other ranks wait until it is done (no process group exists yet)."""
    if not is_main_process():
        deadline = time.time() + timeout_s
        while _read_state(output) != {"key": key, "finished": False}:
            if time.time() > deadline:
                raise ParamsError(f"rank 0 did not prepare {output} within {timeout_s:.0f} s (is the folder shared by all nodes?)")
            time.sleep(0.5)
        return
    ckpt, state_file = output / CHECKPOINT_NAME, output / STAGE_STATE
    state = _read_state(output)
    if ckpt.is_file() and (state.get("key") != key or state.get("finished")):
        (output / "stale").mkdir(exist_ok=True)
        ckpt.replace(output / "stale" / CHECKPOINT_NAME)
        print(f"moved {ckpt} of another or finished run to {output / 'stale' / CHECKPOINT_NAME}", flush=True)
    output.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps({"key": key, "finished": False}) + "\n")


def finish_output(output: Path, key: str, keep_checkpoint: bool) -> None:
    if not is_main_process():
        return
    (output / STAGE_STATE).write_text(json.dumps({"key": key, "finished": True}) + "\n")
    if not keep_checkpoint and (output / CHECKPOINT_NAME).is_file():
        (output / CHECKPOINT_NAME).unlink()


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
    per_seed = {s: json.loads((seed_dir(output, s) / METRICS_NAME).read_text()) for s in seed_list}
    (output / METRICS_NAME).write_text(json.dumps(aggregate_metrics(per_seed), indent=2, sort_keys=True) + "\n")
    (output / WEIGHTS_NAME).unlink(missing_ok=True)  # may be a read-only link into DVC's cache
    shutil.copyfile(first / WEIGHTS_NAME, output / WEIGHTS_NAME)
    if (first / DVCLIVE_DIR).is_dir():
        shutil.rmtree(output / DVCLIVE_DIR, ignore_errors=True)
        shutil.copytree(first / DVCLIVE_DIR, output / DVCLIVE_DIR)


def train_stage(params: dict[str, Any], kind: str, run: str, results: Path) -> int:
    """One training stage: one run, or one run per seed of a seeded profile, each resumable."""
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
    if seed_list and is_main_process():
        collect_seeds(output, seed_list)
    return 0


# ----------------------------------------------------------------------------------------- measure

def measure_requests(params: dict[str, Any], table_name: str, fair: bool = False) -> dict[str, dict[str, Any]]:
    """Row label -> keyword arguments of ``reproduce.measure.measure_named`` for one table: each row at the
    setting the paper measured it (``fair``: the rows whose setting differs from the table's one shared
    setting, measured at that setting, for the "all backbones at one setting" view)."""
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
    # torch and the models load here, not at start-up: the fingerprint stage must not pay for them
    from reproduce.measure import check_request, measure_request
    from reproduce.train.common import git_commit  # the same provenance string as the training runs

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
