"""Your own model in the tables: a params.yaml ``extra_rows`` entry flows through validation, the measure
stage's requests, a real measurement (timm:resnet18) and the regenerated Table 4 / Figure 5, with no code
edit; and a fine-tune from published weights is labelled as such.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import yaml

from reproduce import params as suite_params
from reproduce import pipeline
from reproduce.cli import main as reproduce_main
from reproduce.tables.cells import measure_path, run_metrics_path
from reproduce.tables.render import format_cell
from reproduce.tables.spec import TABLES, resolve, runs_needed
from reproduce.tables.status import paper_recipe

ROOT = Path(__file__).resolve().parents[1]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
ROW = {"label": "ResNet-18", "model": "timm:resnet18", "flop_family": "hrvit", "runs": {"cityscapes_miou": "resnet18"}}


def with_row(table: str = "table4_cityscapes", row: dict = ROW) -> dict:
    params = copy.deepcopy(PARAMS)
    params["pretrain"]["resnet18"] = {"model": "timm:resnet18", "ablate": []}
    params["cityscapes"]["resnet18"] = {"init": "resnet18"}
    params["extra_rows"][table] = [copy.deepcopy(row)]
    return params


def test_default_params_have_no_extra_rows_and_tables_equal_the_paper_spec():
    assert all(rows == [] for rows in PARAMS["extra_rows"].values())
    assert all(resolve(name, PARAMS) == table for name, table in TABLES.items())


def test_extra_row_joins_the_table_with_its_runs_and_shared_setting():
    params = suite_params.validate_params(with_row())
    table = resolve("table4_cityscapes", params)
    row = table.row("ResNet-18")
    assert row.extra and row.measure == TABLES["table4_cityscapes"].fair and row.flop_family == "hrvit"
    assert table.rows[:-1] == TABLES["table4_cityscapes"].rows
    assert runs_needed(table)["cityscapes"] - runs_needed(TABLES["table4_cityscapes"])["cityscapes"] == {"resnet18"}
    request = pipeline.measure_requests(params, "table4_cityscapes")["ResNet-18"]
    assert request == {"name": "timm:resnet18", "task": "seg", "num_classes": 19, "size": (512, 512),
                       "window_sizes": None, "ablate": [], "flop_family": "hrvit"}
    assert "ResNet-18" not in pipeline.measure_requests(params, "table4_cityscapes", fair=True)  # already there


@pytest.mark.parametrize("change, message", [
    (lambda p: p["extra_rows"].update(table5_ablation=[ROW]), "rows can join table4_cityscapes"),
    (lambda p: p["extra_rows"]["table4_cityscapes"][0].update(label="MiT-B1"), "already a row of table4_cityscapes"),
    (lambda p: p["extra_rows"]["table4_cityscapes"][0].update(model="timm:no_such_net"), "timm has no model"),
    (lambda p: p["extra_rows"]["table4_cityscapes"][0].update(runs={"ade20k_miou": "resnet18"}), "no accuracy column"),
    (lambda p: p["extra_rows"]["table4_cityscapes"][0].update(runs={"cityscapes_miou": "nope"}), "no cityscapes run 'nope'"),
    (lambda p: p["extra_rows"]["table4_cityscapes"][0].update(flop_family="vit"), "flop_family must be"),
    (lambda p: p["extra_rows"]["table4_cityscapes"][0].update(colour="red"), "must be {label"),
])
def test_bad_extra_rows_fail_in_one_line(change, message):
    params = with_row()
    change(params)
    with pytest.raises(suite_params.ParamsError, match=message):
        suite_params.validate_params(params)


def test_extra_row_measured_and_rendered_in_table4_and_figure5(tmp_path, monkeypatch):
    """The README's "Add your model" flow on fixtures: measure the extra row as the measure stage does, give
    it a fine-tune metrics.json, regenerate Table 4 and Figure 5 with `python -m reproduce tables`."""
    params = with_row()
    params["ade20k"]["resnet18"] = {"init": "resnet18"}
    params["extra_rows"]["fig5_ade20k"] = [{**ROW, "runs": {"ade20k_miou": "resnet18"}}]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    from reproduce.measure import check_request, measure_request

    request = pipeline.measure_requests(params, "table4_cityscapes")["ResNet-18"]
    measured = measure_request(check_request(request["name"], request["task"], request["num_classes"], request["size"],
                                             flop_family=request["flop_family"]), pipeline.MEASURE_CONVENTIONS, depth=1)
    assert 11e6 < measured["params"] < 13e6  # resnet18 features (11.2 M) + a 19-class SegFormer head
    for table in ("table4_cityscapes", "fig5_ade20k"):
        path = measure_path(tmp_path / "results", table)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rows": {"ResNet-18": measured}}))
    for kind, value in (("cityscapes", 0.61), ("ade20k", 0.31)):
        out = run_metrics_path(tmp_path / "results", kind, "resnet18")
        out.parent.mkdir(parents=True)
        out.write_text(json.dumps({"miou": value, "profile": "paper", "dataset": kind, "model": "timm:resnet18",
                                   "recipe": paper_recipe(kind, "mit_b1"), "git_commit": "c0ffee",
                                   "init": {"format": "timm", "file": "/w/resnet18.safetensors", "sha256": "ab"}}))
    monkeypatch.chdir(tmp_path)
    assert reproduce_main(["tables", "table4_cityscapes", "fig5_ade20k"]) == 0
    md = (tmp_path / "tables" / "table4_cityscapes.md").read_text()
    line = next(l for l in md.splitlines() if l.startswith("| ResNet-18"))
    assert f"— / {measured['params'] / 1e6:.2f}" in line and "✓" not in line and "✗" not in line  # ours only
    assert "[published weights]" in line and "61.00" in line
    assert "ResNet-18 (your row, timm:resnet18): the hrvit family's rule" in md
    assert (tmp_path / "tables" / "fig5_ade20k.png").stat().st_size > 0
    cells = json.loads((tmp_path / "tables" / "fig5_ade20k.json").read_text())["cells"]
    assert any(c["row"] == "ResNet-18" and c["column"] == "ade20k_miou" and c["ours"] == pytest.approx(31.0) for c in cells)


def test_evaluated_published_checkpoint_is_labelled_with_its_source():
    record = {"kind": "accuracy", "paper": 80.0, "ours": 79.5, "status": "reproduction", "diff": -0.5,
              "weights": "published weights, evaluated"}
    assert format_cell(record, 1) == "80.0 / 79.50 (−0.50) [published weights, evaluated]"
    from reproduce.tables.cells import weights_label

    assert weights_label({"source": "published weights, evaluated", "init": {"format": "segformer-mmseg"}}) \
        == "published weights, evaluated"
    assert weights_label({"init": {"format": "mit-nvlabs", "file": "w.pth"}}) == "published weights"
    assert weights_label({"init": {"format": "hrvit-repro", "file": "m.safetensors"}}) is None


def test_measure_rows_measures_only_the_named_rows_and_keeps_the_others(tmp_path, monkeypatch):
    """`reproduce.pipeline measure TABLE --rows LABEL`: your row in seconds, the table's file otherwise as it was."""
    out = tmp_path / "measure" / "table4_cityscapes.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps({"table": "table4_cityscapes", "rows": {"MiT-B0": {"params": 1}}, "fair_rows": {}}))
    monkeypatch.setattr("reproduce.measure.measure_request",
                        lambda request, *args, **kwargs: {"model": request.model, "params": 7, "gflops": {"paper": 1.0}})
    pipeline.measure_table(with_row(), "table4_cityscapes", tmp_path, ["ResNet-18"])
    rows = json.loads(out.read_text())["rows"]
    assert set(rows) == {"MiT-B0", "ResNet-18"} and rows["MiT-B0"] == {"params": 1}
    assert rows["ResNet-18"]["model"] == "timm:resnet18"
    with pytest.raises(ValueError, match="table4_cityscapes has no row 'ResNet-19'"):
        pipeline.measure_table(with_row(), "table4_cityscapes", tmp_path, ["ResNet-19"])
