"""Paper cell + our cell -> one record per table cell, with the difference, tolerance flag and provenance.

A record is a flat dict (one CSV line). Efficiency cells compare our measurement under the paper's
counting convention (docs/flop-convention.md) with the printed cell; fitted baselines carry the signed
difference and no verdict (docs/hrnet-vit-fit.md). Accuracy cells carry the status of the run that
produced them (reproduce/tables/status.py); only a reproduction gets a difference to the paper.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from reproduce.params import METRICS_NAME, SUITE_FORMAT, run_dir
from reproduce.tables.spec import (
    ACCURACY_COLUMNS,
    DEFAULT_TOLERANCE,
    METRIC_KEY,
    PAPER_DIR,
    Row,
    Table,
)
from reproduce.tables.status import PUBLISHED, REPRODUCTION, init_of, run_status

Record = dict[str, Any]


def paper_frame(table: Table, paper_dir: Path = PAPER_DIR) -> pd.DataFrame:
    """The paper's printed cells, indexed by row label (labels read as strings, e.g. Table 7's '9')."""
    frame = pd.read_csv(paper_dir / table.csv, dtype={table.key: str}).set_index(table.key)
    missing = [row.label for row in table.rows if not row.extra and row.label not in frame.index]
    if missing:
        raise ValueError(f"{paper_dir / table.csv} lacks rows {missing}; it must match reproduce/tables/spec.py")
    return frame


def run_metrics_path(results: Path, kind: str, run: str) -> Path:
    """Where the pipeline writes a run's metrics (kind: pretrain, cityscapes or ade20k)."""
    return run_dir(results, kind, run) / METRICS_NAME


def measure_path(results: Path, table: str) -> Path:
    return results / "measure" / f"{table}.json"


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def within_tolerance(column: str, paper: float, ours: float) -> tuple[bool, str]:
    """Tolerance check of an efficiency cell, and the rule in words."""
    if column == "params_m":
        tol = DEFAULT_TOLERANCE["params_abs_m"]
        return abs(ours - paper) <= tol + 1e-9, f"±{tol} M"
    tol = DEFAULT_TOLERANCE["gflops_rel"]
    return abs(ours - paper) <= tol * paper, f"±{tol:.0%}"


def _efficiency(table: Table, row: Row, column: str, paper: float | None, measured: dict[str, Any] | None) -> Record:
    record: Record = {"kind": "efficiency", "convention": "paper", "source": "measure"}
    if measured is None:
        return {**record, "status": "missing", "ours": None}
    if column == "params_m":
        ours = measured["params"] / 1e6
        record["exact"] = measured["params"]
    else:
        ours = measured["gflops"]["paper"]
        record["gflops_fvcore"] = measured["gflops"]["fvcore"]
        record["gflops_torch"] = measured["gflops"].get("torch")
    record.update(ours=ours, status="measured", git_commit=measured.get("git_commit"),
                  setting=_setting(measured))
    if measured.get("reading"):  # a fitted baseline says which construction was measured
        record["reading"] = ", ".join(f"{k}={v}" for k, v in measured["reading"].items())
    if paper is not None:
        record.update(diff=ours - paper, diff_rel=(ours - paper) / paper)
        if row.fitted:  # a fitted reading lands near the cell by construction: a verdict would be circular
            record["fitted"] = True
        else:
            ok, rule = within_tolerance(column, paper, ours)
            record.update(within_tolerance=ok, tolerance=rule)
    return record


def fair_view(row: Row, column: str, measured: dict[str, Any] | None) -> Record:
    """The row measured at its table's one shared setting: params, or GFLOPs under the paper convention
    (each family's own rule) and under fvcore (one rule for every family). Empty when not measured."""
    if measured is None:
        return {}
    if column == "params_m":
        return {"fair_params_m": measured["params"] / 1e6}
    return {"fair_gflops_paper": measured["gflops"]["paper"], "fair_gflops_fvcore": measured["gflops"]["fvcore"]}


def _setting(measured: dict[str, Any]) -> str:
    """The measured configuration in words, e.g. 'seg 19 cls 512x512 windows 1-2-9-9 ablate mixcfn'."""
    text = f"{measured['task']} {measured['num_classes']} cls {measured['size'][0]}x{measured['size'][1]}"
    if measured.get("window_sizes"):
        text += " windows " + "-".join(map(str, measured["window_sizes"]))
    if measured.get("ablate"):
        text += " ablate " + "+".join(measured["ablate"])
    return text


def _accuracy(row: Row, column: str, results: Path) -> Record:
    kind = ACCURACY_COLUMNS[column]
    run = row.runs.get(column)
    record: Record = {"kind": "accuracy", "source": kind, "run": run}
    metrics = _read_json(run_metrics_path(results, kind, run)) if run else None
    if metrics is None:
        return {**record, "status": "not trained" if run is None else "missing", "ours": None}
    key = METRIC_KEY[kind]
    scale = 1.0 if kind == "pretrain" else 100.0  # top1 is a percentage already; miou a fraction (seg_metrics.py)
    status = run_status(kind, metrics)
    record.update(
        ours=scale * metrics[key], profile=metrics["profile"], dataset=metrics["dataset"],
        data_source=metrics.get("data_source"), git_commit=metrics.get("git_commit"),
        wall_time_s=metrics.get("wall_time_s"), status=status.status, deviations=list(status.deviations),
    )
    if metrics.get("seeds"):  # a multi-seed run: the metric is the mean over seeds
        record.update(seeds=list(metrics["seeds"]), std=scale * metrics[f"{key}_std"])
    if kind != "pretrain":
        record["init"] = init_of(metrics)["format"]
        label = weights_label(metrics)
        if label:
            record["weights"] = label
    return record


def weights_label(metrics: dict[str, Any]) -> str | None:
    """Where a fine-tuned cell's weights come from when not from this suite's own pretraining: the run's
    own ``source`` (``evaluate --weights``: "published weights, evaluated"), or "published weights" for a
    fine-tune that started from a file in another format (params.yaml ``init: {file: ...}``)."""
    if metrics.get("source"):
        return str(metrics["source"])
    return PUBLISHED if init_of(metrics)["format"] not in (SUITE_FORMAT, "random") else None


def build_records(table: Table, results: Path, paper_dir: Path = PAPER_DIR) -> list[Record]:
    """Every cell of ``table``: paper value, ours, difference, tolerance flag and provenance."""
    paper = paper_frame(table, paper_dir)
    measurement = _read_json(measure_path(results, table.name)) or {}
    measured, fair = measurement.get("rows", {}), measurement.get("fair_rows", {})
    records = []
    for row in table.rows:
        for column in table.columns:
            value = None if row.extra else paper.at[row.label, column]  # a user's row has no paper cell
            paper_value = None if value is None or pd.isna(value) else float(value)
            if column in ACCURACY_COLUMNS:
                record = _accuracy(row, column, results)
                if paper_value is not None and record["ours"] is not None and record["status"] == REPRODUCTION:
                    record["diff"] = record["ours"] - paper_value  # no difference to the paper for anything else
            else:
                record = _efficiency(table, row, column, paper_value, measured.get(row.label))
                if table.fair is not None:
                    record.update(fair_view(row, column, measured.get(row.label) if row.measure == table.fair else fair.get(row.label)))
            records.append({"table": table.name, "row": row.label, "column": column, "paper": paper_value,
                            "note": row.note, **record})
    return records


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value))
