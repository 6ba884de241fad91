"""``python -m reproduce plan``: what the paper profile's training stages cost, before running them.

For every DVC training stage (``pretrain@RUN``, ``finetune_cityscapes@RUN``, ``finetune_ade20k@RUN``)
that the chosen tables need, the plan lists the images (or crops) processed, the GFLOPs per image of
a training step, and an ESTIMATE of GPU-hours and wall time on ``--gpus`` GPUs, plus the disk the
stage's checkpoint needs; then totals per table and for the de-duplicated set of stages.

How the figures are made (all printed with the plan):

* images: pretraining epochs x 1,281,167 ImageNet-1K training images; fine-tuning iterations x the
  global batch (crops of the recipe's crop size). Evaluation passes are not included.
* GFLOPs per image: the FLOP ledger's torch count (2 FLOPs per multiply-accumulate, attention
  included) of one forward pass at the stage's image/crop size, times 3 for forward + backward.
* GPU-hours: from ``--measured FILE ...`` (``results/doctor.json``, ``bench --json`` output or the
  lines of ``bench --jsonl``: their training-step rows): a stage whose model was measured at the
  stage's task and size takes the measured images/s (the fastest variant measured: eager, compiled
  or CUDA graphs); one whose model was measured at another size takes that run's achieved GMAC/s
  (of the same task if there is one);
  a model not measured falls back to the assumption below, labelled so per stage. From
  ``--throughput FILE`` (the JSON of ``bench --device cuda --mode train --json``: each model's
  achieved GMAC/s, or the file's mean for models it did not measure). Otherwise from
  ``--gpu-type``'s dense bf16/fp16 tensor peak times ``--efficiency`` (an assumption, default 5 %).
  Wall time assumes perfect scaling over ``--gpus``.
* disk: one checkpoint per stage, 12 bytes per parameter (fp32 weights + two AdamW moments).
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from reproduce.bench import TRAIN_MAC_FACTOR  # forward + backward (2x forward), as bench counts a step
from reproduce.params import RUN_KINDS, ParamsError, load_params, lookup

IMAGENET_TRAIN_IMAGES = 1_281_167
CHECKPOINT_BYTES_PER_PARAM = 12  # fp32 weights + AdamW exp_avg + exp_avg_sq
GPU_PEAK_TFLOPS = {  # dense fp16/bf16 tensor-core peak per GPU (vendor data sheets)
    "V100": 125.0,
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
}
# Assumed share of the tensor peak a training run sustains. Mid-size vision transformers with
# depthwise convs, small matmuls and data loading land far below the peak: e.g. a DeiT-S-sized
# model (4.6 GMAC) trained 300 epochs in about 3 days on 8 V100s sustains about 4 % of their peak.
DEFAULT_EFFICIENCY = 0.05


@dataclass(frozen=True)
class Stage:
    """One DVC training stage of the paper profile and its estimated cost."""

    stage: str
    model: str
    images: int
    size: int
    gflops_per_image: float  # forward + backward, torch count
    params: int
    gpu_hours: float
    disk_gb: float
    source: str = ""  # what the GPU-hours rest on: a measurement or the assumption


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from reproduce.tables.spec import TABLES

    parser.add_argument("--tables", nargs="+", default=list(TABLES), metavar="TABLE",
                        help=f"tables to plan for (default: all): {', '.join(TABLES)}")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs the stages run on (default 8)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--gpu-type", choices=sorted(GPU_PEAK_TFLOPS), default="A100",
                        help="estimate from this GPU's tensor peak x --efficiency (default A100)")
    source.add_argument("--throughput", type=Path, metavar="FILE",
                        help="estimate from measured GMAC/s: the JSON of `bench --device cuda --mode train --json`")
    parser.add_argument("--measured", type=Path, nargs="+", metavar="FILE",
                        help="measured training images/s: results/doctor.json, `bench --json` output or a `bench --jsonl` "
                             "file; models not measured fall back to --gpu-type x --efficiency")
    parser.add_argument("--efficiency", type=float, default=DEFAULT_EFFICIENCY,
                        help="fraction of the --gpu-type peak assumed achieved (default %(default)s)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="pipeline parameters (default params.yaml)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def _check(args: argparse.Namespace) -> dict[str, float] | None:
    """Validate the options (ValueError naming the problem); return the measured GMAC/s per model, if given."""
    from reproduce.tables.spec import TABLES

    unknown = [t for t in args.tables if t not in TABLES]
    if unknown:
        raise ValueError(f"unknown table(s) {unknown}; choose from {', '.join(TABLES)}")
    if args.gpus < 1:
        raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
    if not 0 < args.efficiency <= 1:
        raise ValueError(f"--efficiency must be in (0, 1], got {args.efficiency}")
    if args.measured and args.throughput:
        raise ValueError("--measured and --throughput are two sources of the same figure; give one")
    if args.throughput is None:
        return None
    try:
        bench = json.loads(args.throughput.read_text())
        rates = {row["model"]: float(row["gmac_per_s"]) for row in bench["results"]}
        mode = bench["options"]["mode"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"--throughput {args.throughput}: not a `bench --json` result ({err}); "
                         "make one with `python -m reproduce bench --device cuda --mode train --json > FILE`") from err
    if mode != "train" or not rates:
        raise ValueError(f"--throughput {args.throughput}: needs a `bench --mode train` result with at least one model; got mode {mode!r}")
    return rates


@dataclass(frozen=True)
class Measured:
    """One measured training step: a model at a task and size, and its rates on one GPU."""

    model: str
    variant: str
    task: str
    size: int
    images_per_s: float
    gmac_per_s: float


def _bench_rows(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The training-step rows (with their options) that one JSON record holds: a doctor report, a
    ``bench --json`` result, or one ``bench --jsonl`` line."""
    if "parts" in record:
        return [row for part in record["parts"] if isinstance(part.get("bench"), dict) for row in _bench_rows(part["bench"])]
    if "results" in record:
        return [{**row, "options": record["options"]} for row in record["results"]] if record["options"]["mode"] == "train" else []
    return [record] if record.get("bench") == "row" and record["options"]["mode"] == "train" else []


def read_measured(paths: list[Path]) -> list[Measured]:
    """Every training-step measurement of this checkout's models in ``paths`` (ValueError naming a bad file)."""
    found = []
    for path in paths:
        try:
            text = path.read_text()
            try:
                records = [json.loads(text)]
            except ValueError:  # one JSON object per line
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            for row in (row for record in records for row in _bench_rows(record)):
                variant = row.get("variant", "eager")
                model = row["model"].removesuffix(f"+{variant}")
                if "@" not in model:  # rows of another checkout (bench --against) are not this code's speed
                    found.append(Measured(model, variant, row["options"]["task"], row["options"]["size"][0],
                                          float(row["images_per_s"]), float(row["gmac_per_s"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"--measured {path}: not a doctor report or bench result ({type(err).__name__}: {err}); make one with "
                             "`python -m reproduce doctor --device cuda` or `python -m reproduce bench --device cuda --mode train --jsonl FILE`") from err
    if not found:
        raise ValueError(f"--measured {' '.join(map(str, paths))}: no training-step measurement in it; measure with "
                         "`python -m reproduce bench --device cuda --mode train --jsonl FILE`")
    return found


def _fastest(measured: list[Measured], model: str, task: str, size: int) -> tuple[Measured | None, Measured | None]:
    """The fastest measurement of ``model`` at this task and size, and the fastest (by GMAC/s) at another
    size of this task, or of the other task when this one was not measured (a classification step's GMAC/s
    says little about a segmentation step's, so it is the last resort)."""
    mine = [m for m in measured if m.model == model]
    same = [m for m in mine if (m.task, m.size) == (task, size)]
    same_task = [m for m in mine if m.task == task]
    return (max(same, key=lambda m: m.images_per_s, default=None),
            max(same_task or mine, key=lambda m: m.gmac_per_s, default=None))


@functools.lru_cache(maxsize=None)
def _forward_gflops_and_params(model: str, task: str, num_classes: int, size: int, ablate: tuple[str, ...],
                               windows: tuple[int, ...] | None) -> tuple[float, int]:
    from reproduce.measure import measure_named

    result = measure_named(model, task, num_classes, (size, size), windows, ablate, conventions=["torch"])
    return result["gflops"]["torch"], result["params"]


def stages_for(params: dict[str, Any], tables: list[str]) -> dict[str, list[tuple[str, str, str]]]:
    """Table -> its training stages as (kind, run, stage name), pretraining first (finetunes need its checkpoint)."""
    from reproduce.tables.spec import TABLES, runs_needed

    plan = {}
    for table in tables:
        needed = runs_needed(TABLES[table])
        pretrain = set(needed["pretrain"])
        for kind in RUN_KINDS[1:]:
            pretrain |= {lookup(params, kind, run)["init"] for run in needed[kind]}
        stages = [("pretrain", run, f"pretrain@{run}") for run in sorted(pretrain)]
        stages += [(kind, run, f"finetune_{kind}@{run}") for kind in RUN_KINDS[1:] for run in sorted(needed[kind])]
        plan[table] = stages
    return plan


def stage_shape(params: dict[str, Any], kind: str, run: str) -> tuple[dict[str, Any], int, int, str, int, tuple[int, ...] | None]:
    """(pretraining entry, images, size, task, classes, window sizes) of one stage of the paper recipe."""
    from reproduce.data.datasets import SEG_DATASETS

    recipes = params["recipes"]["paper"]
    if kind == "pretrain":
        recipe = recipes["pretrain"]
        return lookup(params, "pretrain", run), recipe["epochs"] * IMAGENET_TRAIN_IMAGES, recipe["image-size"], "cls", 1000, None
    finetune, recipe = lookup(params, kind, run), recipes[kind]
    windows = tuple(finetune["window-sizes"]) if finetune.get("window-sizes") else None
    return (lookup(params, "pretrain", finetune["init"]), recipe["iters"] * recipe["batch-size"], recipe["crop-size"], "seg",
            SEG_DATASETS[kind].num_classes, windows)


def cost(params: dict[str, Any], kind: str, run: str, stage: str, gmac_per_s: float,
         measured: list[Measured] | None = None, assumption: str = "") -> Stage:
    """The cost of one stage: from a measurement of its model in ``measured`` if there is one, else at
    ``gmac_per_s`` achieved GMAC/s (2 FLOPs each) per GPU, which ``assumption`` names."""
    entry, images, size, task, classes, windows = stage_shape(params, kind, run)
    forward, n_params = _forward_gflops_and_params(entry["model"], task, classes, size, tuple(entry.get("ablate") or ()), windows)
    gflops = TRAIN_MAC_FACTOR * forward
    exact, other = _fastest(measured or [], entry["model"], task, size)
    if exact is not None:
        gpu_hours = images / exact.images_per_s / 3600
        source = f"measured: {exact.images_per_s:,.0f} img/s ({exact.variant})"
    else:
        if other is not None:
            gmac_per_s = other.gmac_per_s
            assumption = f"measured GMAC/s at {other.task} {other.size} px ({other.variant})"
        gpu_hours = images * gflops / (2 * gmac_per_s) / 3600
        source = assumption
    return Stage(stage, entry["model"], images, size, gflops, n_params, gpu_hours, n_params * CHECKPOINT_BYTES_PER_PARAM / 1e9, source)


def run(args: argparse.Namespace) -> int:
    try:
        rates = _check(args)
        measured = read_measured(args.measured) if args.measured else None
        params = load_params(args.params)
        if "paper" not in params["recipes"]:
            raise ParamsError(f"{args.params}: no recipes.paper section")
    except (ValueError, ParamsError) as err:
        print(f"python -m reproduce plan: error: {err}", file=sys.stderr)
        return 2
    peak_assumption = f"{args.gpu_type} at {args.efficiency:.0%} of its {GPU_PEAK_TFLOPS[args.gpu_type]:.0f} TFLOPS tensor peak"
    if measured:
        assumption = f"images/s measured in {', '.join(map(str, args.measured))} where given per stage; elsewhere ASSUMED: {peak_assumption}"
        default_rate, fallback = GPU_PEAK_TFLOPS[args.gpu_type] * 1e3 / 2 * args.efficiency, f"ASSUMED: {peak_assumption}"
    elif rates is None:
        assumption = fallback = peak_assumption
        default_rate = GPU_PEAK_TFLOPS[args.gpu_type] * 1e3 / 2 * args.efficiency
    else:
        assumption = f"GMAC/s measured by bench ({args.throughput}); models it did not measure use its mean"
        fallback = "mean measured GMAC/s"
        default_rate = sum(rates.values()) / len(rates)
    plan: dict[str, list[Stage]] = {}
    by_table = stages_for(params, args.tables)
    total = sum(len(stages) for stages in by_table.values())
    done = 0
    for table, stages in by_table.items():
        plan[table] = []
        for kind, run_name, stage in stages:
            done += 1  # counting a stage's FLOPs takes seconds; say what is being counted
            print(f"plan: [{done}/{total}] {table}: {stage}", file=sys.stderr, flush=True)
            model = lookup_model(params, kind, run_name)
            rate = (rates or {}).get(model, default_rate)
            source = f"measured GMAC/s ({args.throughput})" if rates and model in rates else fallback
            plan[table].append(cost(params, kind, run_name, stage, rate, measured, source))
    unique = {s.stage: s for stages in plan.values() for s in stages}
    result = {
        "assumption": assumption,
        "gpus": args.gpus,
        "tables": {t: {"stages": [asdict(s) for s in stages], **_totals(stages, args.gpus)} for t, stages in plan.items()},
        "all": {"stages": len(unique), **_totals(list(unique.values()), args.gpus)},
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        _print(result)
    return 0


def lookup_model(params: dict[str, Any], kind: str, run: str) -> str:
    entry = lookup(params, kind, run)
    return entry["model"] if kind == "pretrain" else lookup(params, "pretrain", entry["init"])["model"]


def _totals(stages: list[Stage], gpus: int) -> dict[str, float]:
    gpu_hours = sum(s.gpu_hours for s in stages)
    return {"gpu_hours": gpu_hours, "wall_hours": gpu_hours / gpus, "disk_gb": sum(s.disk_gb for s in stages)}


def _print(result: dict[str, Any]) -> None:
    from tabulate import tabulate

    print(f"ESTIMATES for the paper profile: {result['assumption']}; {result['gpus']} GPUs, perfect scaling; "
          "GFLOPs/img = torch count of forward x 3 (fwd + bwd); evaluation not included; disk = one checkpoint "
          f"({CHECKPOINT_BYTES_PER_PARAM} B/param)")
    for table, entry in result["tables"].items():
        print(f"\n{table}")
        rows = [[s["stage"], f"{s['images']:,}", s["size"], f"{s['gflops_per_image']:.1f}", f"{s['gpu_hours']:,.0f}",
                 f"{s['gpu_hours'] / result['gpus']:,.1f}", f"{s['disk_gb']:.2f}", s["source"]] for s in entry["stages"]]
        rows.append(["total", "", "", "", f"{entry['gpu_hours']:,.0f}", f"{entry['wall_hours']:,.1f}", f"{entry['disk_gb']:.2f}", ""])
        print(tabulate(rows, headers=["stage", "images", "px", "GFLOPs/img", "GPU-h", "wall h", "disk GB", "GPU-h from"],
                       disable_numparse=True))
    total = result["all"]
    print(f"\nall selected tables, {total['stages']} distinct stages (shared stages counted once): "
          f"{total['gpu_hours']:,.0f} GPU-hours, {total['wall_hours']:,.1f} h wall on {result['gpus']} GPUs, "
          f"{total['disk_gb']:.1f} GB of checkpoints")
