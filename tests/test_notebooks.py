"""The notebooks (jupytext percent files) run headless on table outputs built from small fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import jupytext
import pytest
from nbclient import NotebookClient

from reproduce.tables.cells import build_records, measure_path, run_metrics_path
from reproduce.tables.render import write_table
from reproduce.tables.spec import TABLES, runs_needed

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def _fixture_outputs(root: Path) -> tuple[Path, Path]:
    """results/ and tables/ for every table: measured rows with a two-module breakdown, smoke-profile runs."""
    results, tables = root / "results", root / "tables"
    for n, table in enumerate(TABLES.values()):
        rows = {}
        for i, row in enumerate(table.rows):
            params, flops = 8_000_000 + 10_000 * i, 14.0 + 0.1 * i
            rows[row.label] = {
                "model": row.model, "task": row.measure.task, "num_classes": row.measure.num_classes,
                "size": list(row.measure.size), "ablate": [], "params": params,
                "gflops": {"paper": flops, "fvcore": flops * 1.08}, "git_commit": "fixture",
                "breakdown": {"backbone.model.stages.0": {"params": params - 400_000, "paper": flops - 4.0},
                              "decode_head.linear_fuse": {"params": 400_000, "paper": 4.0 + 0.01 * i}},
            }
        path = measure_path(results, table.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": rows}))
        for kind, runs in runs_needed(table).items():
            for run in runs:
                out = run_metrics_path(results, kind, run)
                out.parent.mkdir(parents=True, exist_ok=True)
                value = {"top1": 10.0 + n} if kind == "pretrain" else {"miou": 0.2 + 0.01 * len(run)}
                out.write_text(json.dumps({**value, "profile": "smoke", "dataset": "synthetic", "git_commit": "fixture"}))
        write_table(table, build_records(table, results), tables)
    return results, tables


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return _fixture_outputs(tmp_path_factory.mktemp("nb"))


def test_there_are_notebooks():
    assert {p.stem for p in NOTEBOOKS} >= {"backbone_comparison", "ablation_explorer"}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path, outputs):
    results, tables = outputs
    nb = jupytext.read(path)
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "each notebook has one cell tagged 'parameters'"
    params[0].source = f"TABLES_DIR = {str(tables)!r}\nRESULTS_DIR = {str(results)!r}\n"
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # raises CellExecutionError
    text = "\n".join(str(o.get("text", "")) + str(o.get("data", {}).get("text/plain", ""))
                     for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "smoke" in text  # the notebooks say where their accuracy numbers come from
