"""Glue between params.yaml and the suite's commands, for the DVC stages in dvc.yaml.

``python -m reproduce.pipeline pretrain RUN`` / ``finetune DATASET RUN`` look the run and the active
profile's recipe up in params.yaml, print the equivalent ``python -m reproduce ...`` command line and run
it in this process (so a ``torchrun ... -m reproduce.pipeline`` launcher starts every rank the same way).
``python -m reproduce.pipeline measure TABLE`` measures every row of a table in one process and writes
``results/measure/TABLE.json``.

Why a glue module: DVC templating cannot select ``recipes.<profile>`` from the value of ``profile``
(no nested interpolation), and a recipe is easier to read and override as a YAML mapping of the
training CLI's own flags (``batch-size: 8`` -> ``--batch-size 8``).
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import yaml

RUN_KINDS = ("pretrain", "cityscapes", "ade20k")
# The tables compare the paper convention and show fvcore for reference; torch's counter (2 FLOPs per
# multiply-add) would add a third forward pass per model for a number that is fvcore's doubled.
MEASURE_CONVENTIONS = ("paper", "fvcore")
PROFILES = ("smoke", "paper")


class ParamsError(ValueError):
    """params.yaml lacks something a stage needs."""


def load_params(path: Path) -> dict[str, Any]:
    params = yaml.safe_load(path.read_text())
    profile = params.get("profile")
    if profile not in PROFILES:
        raise ParamsError(f"{path}: profile must be one of {PROFILES}, got {profile!r} (set it with `dvc exp run -S profile=paper`)")
    if profile not in params.get("recipes", {}):
        raise ParamsError(f"{path}: no recipes.{profile} section")
    return params


def lookup(params: dict[str, Any], kind: str, run: str) -> dict[str, Any]:
    runs = params.get(kind) or {}
    if run not in runs:
        raise ParamsError(f"params.yaml has no {kind} run {run!r}; defined: {', '.join(runs)}")
    return runs[run] or {}


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
    data = params["recipes"][params["profile"]]["data"][dataset]
    return flags({"dataset": data["dataset"], "data-root": data.get("root")})


def pretrain_argv(params: dict[str, Any], run: str, results: Path) -> list[str]:
    entry = lookup(params, "pretrain", run)
    recipe = {**params["recipes"][params["profile"]]["pretrain"], **(entry.get("recipe") or {})}
    return ["pretrain", "--model", entry["model"], "--profile", params["profile"], *dataset_flags(params, "imagenet"),
            *flags({"ablate": entry.get("ablate") or []}), *flags(recipe), "--output", str(results / "pretrain" / run)]


def finetune_argv(params: dict[str, Any], dataset: str, run: str, results: Path) -> list[str]:
    entry = lookup(params, dataset, run)
    init = lookup(params, "pretrain", entry["init"])
    recipe = {**params["recipes"][params["profile"]][dataset], **(entry.get("recipe") or {})}
    return ["finetune", "--model", init["model"], "--profile", params["profile"], *dataset_flags(params, dataset),
            *flags({"ablate": init.get("ablate") or [], "window-sizes": entry.get("window-sizes") or []}), *flags(recipe),
            "--pretrained", str(results / "pretrain" / entry["init"] / "checkpoint.pt"),
            "--output", str(results / "finetune" / dataset / run)]


def measure_requests(params: dict[str, Any], table_name: str) -> dict[str, dict[str, Any]]:
    """Row label -> keyword arguments of ``reproduce.measure.measure_named`` for one table."""
    from reproduce.tables.spec import TABLES

    if table_name not in TABLES:
        raise ParamsError(f"unknown table {table_name!r}; choose from {', '.join(TABLES)}")
    requests = {}
    for row in TABLES[table_name].rows:
        entry = lookup(params, "pretrain", row.model)
        windows = lookup(params, "cityscapes", row.window_run).get("window-sizes") if row.window_run else None
        requests[row.label] = {"name": entry["model"], "task": row.measure.task, "num_classes": row.measure.num_classes,
                               "size": row.measure.size, "window_sizes": windows, "ablate": entry.get("ablate") or []}
    return requests


def measure_table(params: dict[str, Any], table_name: str, results: Path) -> Path:
    from reproduce.measure import check_request, measure_request
    from reproduce.train.engine import git_commit  # the same provenance string as the training runs

    requests = measure_requests(params, table_name)
    checked = {label: check_request(**{"model" if k == "name" else k: v for k, v in kw.items()}) for label, kw in requests.items()}
    commit = git_commit()
    rows = {}
    for label, request in checked.items():
        result = measure_request(request, MEASURE_CONVENTIONS, depth=4)  # 4: HRViT's six modules M1..M6
        result["git_commit"] = commit
        rows[label] = result
        print(f"{table_name} {label}: {result['params']:,} params, {result['gflops']['paper']:.3f} GFLOPs (paper convention)", flush=True)
    out = results / "measure" / f"{table_name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"table": table_name, "git_commit": commit, "rows": rows}, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reproduce.pipeline", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("measure").add_argument("table")
    sub.add_parser("pretrain").add_argument("run")
    fine = sub.add_parser("finetune")
    fine.add_argument("dataset", choices=RUN_KINDS[1:])
    fine.add_argument("run")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        if args.command == "measure":
            measure_table(params, args.table, args.results)
            return 0
        command = pretrain_argv(params, args.run, args.results) if args.command == "pretrain" \
            else finetune_argv(params, args.dataset, args.run, args.results)
    except ParamsError as err:
        print(f"python -m reproduce.pipeline: error: {err}", file=sys.stderr)
        return 2
    print("+ python -m reproduce " + shlex.join(command), flush=True)
    from reproduce.cli import main as reproduce_main

    return reproduce_main(command)


if __name__ == "__main__":
    raise SystemExit(main())
