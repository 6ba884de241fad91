"""Table maker, claims ledger and Figure 5 on small result fixtures written in the pipeline's schemas.

The fixtures stand in for `results/` (measure JSON, run metrics.json); the assertions check the table
logic: tolerance flags, smoke labelling, provenance, LaTeX rules, and the claims recomputed from cells.
"""
from __future__ import annotations

import csv
import shutil
import subprocess
import json
from pathlib import Path

import pandas as pd
import pytest

from reproduce.tables import claims as ledger
from reproduce.tables.cells import build_records, measure_path, run_metrics_path
from reproduce.tables.figure import pareto_front, plot
from reproduce.tables.render import format_cell, headline_metrics, legend, to_markdown, write_table
from reproduce.tables.spec import COUNTING_RULES, PAPER_DIR, SEG19, SEG150, TABLES, model_family, runs_needed
from reproduce.tables.status import init_of, paper_recipe, run_status

T5 = TABLES["table5_ablation"]


def _measure(params: int, paper: float, fvcore: float) -> dict:
    return {"model": "hrvit_b1", "task": "seg", "num_classes": 19, "size": [512, 512], "ablate": [],
            "params": params, "gflops": {"paper": paper, "fvcore": fvcore}, "git_commit": "feedbeef"}


def _metrics(kind: str, value: float, profile: str = "smoke", dataset: str = "synthetic", model: str = "hrvit_b1",
             recipe: dict | None = None, init: dict | str | None = None) -> dict:
    key = "top1" if kind == "pretrain" else "miou"
    real = {"pretrain": "imagenet"}.get(kind, kind)
    if dataset == "real":
        dataset = real
    metrics = {key: value, "profile": profile, "dataset": dataset, "model": model,
               "data_source": "generated" if dataset == "synthetic" else "/d", "git_commit": "c0ffee", "wall_time_s": 3.0,
               "recipe": paper_recipe(kind, model) if recipe is None else recipe}
    if kind != "pretrain":
        metrics["init"] = init if init is not None else "random"
    return metrics


def write_results(root: Path, table_name: str, measured: dict[str, dict], metric: float = 10.0,
                  profile: str = "smoke", dataset: str = "synthetic", recipe_change: dict | None = None,
                  published_init: bool = False) -> Path:
    """Fixture results for one table: given measurements, and every run it needs with the same metric.
    ``dataset="real"`` writes the kind's real dataset and the paper recipe (with ``recipe_change`` laid
    over it); fine-tuning runs start from their pretrain run's checkpoint, or published weights."""
    path = measure_path(root, table_name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"rows": measured}))
    for kind, runs in runs_needed(TABLES[table_name]).items():
        for run in runs:
            out = run_metrics_path(root, kind, run)
            out.parent.mkdir(parents=True, exist_ok=True)
            model = run.split("-")[0]
            recipe = {**paper_recipe(kind, model), **(recipe_change or {})}
            init = {"format": "mit-nvlabs", "file": "/w/mit.pth", "sha256": "ab"} if published_init else \
                {"format": "hrvit-repro", "file": str(run_metrics_path(root, "pretrain", run).parent / "model.safetensors"), "sha256": "cd"}
            out.write_text(json.dumps(_metrics(kind, metric if kind == "pretrain" else metric / 100, profile, dataset, model,
                                               recipe, init)))
    return root


def cell(records, row, column):
    return next(r for r in records if r["row"] == row and r["column"] == column)


@pytest.fixture
def t5_records(tmp_path):
    measured = {"HRViT-b1": _measure(8_149_451, 14.083, 15.448),  # within tolerance of 8.1 / 14.1
                "- MixCFN": _measure(8_300_000, 13.0, 14.0)}  # 8.3 vs 7.9 M and 13.0 vs 13.6 G: both off
    write_results(tmp_path, T5.name, measured, metric=12.5)
    return build_records(T5, tmp_path)


def test_efficiency_cells_flag_tolerance(t5_records):
    ok = cell(t5_records, "HRViT-b1", "params_m")
    assert ok["within_tolerance"] and ok["ours"] == pytest.approx(8.149451) and ok["diff"] == pytest.approx(0.049451)
    assert cell(t5_records, "HRViT-b1", "gflops")["within_tolerance"]
    assert cell(t5_records, "HRViT-b1", "gflops")["gflops_fvcore"] == 15.448
    assert not cell(t5_records, "- MixCFN", "params_m")["within_tolerance"]
    assert not cell(t5_records, "- MixCFN", "gflops")["within_tolerance"]
    assert cell(t5_records, "- DES", "params_m")["status"] == "missing"  # not in the fixture's measurements


def test_fitted_baselines_show_signed_difference_not_a_verdict(tmp_path):
    table = TABLES["table6_hrnet_vit"]
    measured = {"HRNet18-MiT": {**_measure(int(8.4e6 * 1.025), 29.3 * 0.96, 30.0), "reading": {"block": "mit", "mit_sr": "pool"}},
                "HRViT-b1": _measure(8_149_451, 14.083, 15.448)}
    write_results(tmp_path, table.name, measured)
    records = build_records(table, tmp_path)
    params = cell(records, "HRNet18-MiT", "params_m")
    assert params["fitted"] and "within_tolerance" not in params and params["diff_rel"] == pytest.approx(0.025, abs=1e-6)
    assert format_cell(params, 1).endswith("(+0.21, +2.5 %) fitted‡") and "✓" not in format_cell(params, 1)
    assert format_cell(cell(records, "HRNet18-MiT", "gflops"), 1).endswith("(−1.17, −4.0 %) fitted‡")
    assert cell(records, "HRViT-b1", "params_m")["within_tolerance"]  # HRViT rows keep their verdict
    md = to_markdown(table, records)
    assert "HRNet18-MiT Params +2.5 %, GFLOPs −4.0 %" in md and "block=mit, mit_sr=pool" in md
    assert "docs/hrnet-vit-fit.md" in md
    # the legend states each family's counting rule and the tolerances
    assert "HRNet-MiT: HRViT's hooks" in md and "(both matmuls)" in md and "HRViT: mmcv-1.3" in md and "±0.05 M" in md and "±1%" in md
    assert headline_metrics(table, records)["efficiency_fitted"] == 2


def test_smoke_accuracy_is_labelled_without_a_delta(t5_records):
    top1 = cell(t5_records, "HRViT-b1", "imagenet_top1")
    assert top1["status"] == "smoke" and top1["ours"] == 12.5 and "diff" not in top1
    miou = cell(t5_records, "HRViT-b1", "cityscapes_miou")
    assert miou["ours"] == pytest.approx(12.5)  # miou fraction -> percent
    assert format_cell(top1, 2) == "80.52 / smoke† 12.50"  # no difference to the paper
    md = to_markdown(T5, t5_records)
    assert "smoke†: the smoke profile" in md and "measures nothing" in md
    assert "feedbeef" in md and "c0ffee" in md  # code commits of measurements and runs


def test_paper_recipe_on_real_data_is_a_reproduction(tmp_path):
    write_results(tmp_path, T5.name, {}, metric=80.0, profile="paper", dataset="real")
    records = build_records(T5, tmp_path)
    top1, miou = cell(records, "HRViT-b1", "imagenet_top1"), cell(records, "HRViT-b1", "cityscapes_miou")
    assert top1["status"] == miou["status"] == "reproduction"  # the fine-tune's init is a reproduction pretrain
    assert format_cell(top1, 2) == "80.52 / 80.00 (−0.52)" and miou["diff"] == pytest.approx(80.0 - 81.63)
    assert "†" not in to_markdown(T5, records).split("## Our efficiency")[0].split("|---")[1]


def test_shortened_schedule_is_partial_with_the_deviating_key(tmp_path):
    write_results(tmp_path, T5.name, {}, metric=70.0, profile="paper", dataset="real", recipe_change={"iters": 1000, "epochs": 5})
    records = build_records(T5, tmp_path)
    top1, miou = cell(records, "HRViT-b1", "imagenet_top1"), cell(records, "HRViT-b1", "cityscapes_miou")
    assert top1["status"] == "partial" and top1["deviations"] == ["epochs 5 (paper 300)"] and "diff" not in top1
    # the fine-tune deviates itself and starts from a partial pretrain
    assert miou["deviations"][0] == "iters 1000 (paper 160000)" and miou["deviations"][1].startswith("init from a partial pretrain")
    assert format_cell(miou, 2) == "81.63 / partial† 70.00"
    md = to_markdown(T5, records)
    assert "partial†: cityscapes/hrvit_b1" in md and "iters 1000 (paper 160000)" in md


def test_init_decides_the_finetune_status(tmp_path):
    recipe = paper_recipe("cityscapes", "hrvit_b1")
    published = _metrics("cityscapes", 0.8, "paper", "real", recipe=recipe, init={"format": "hrvit-official", "file": "x", "sha256": "0"})
    assert run_status("cityscapes", published).status == "reproduction"
    random = _metrics("cityscapes", 0.8, "paper", "real", recipe=recipe, init="random")
    assert run_status("cityscapes", random).deviations == ("init random (paper: ImageNet-pretrained backbone)",)
    # today's files: init "pretrained" beside a pretrained record; the pretrain run's metrics.json is next to the file
    pre = tmp_path / "pre"
    pre.mkdir()
    (pre / "metrics.json").write_text(json.dumps(_metrics("pretrain", 80.0, "smoke", "synthetic")))
    old = {**random, "init": "pretrained", "pretrained": {"path": str(pre / "checkpoint.pt"), "pretrain_profile": "smoke"}}
    assert init_of(old) == {"format": "hrvit-repro", "file": str(pre / "checkpoint.pt")}
    assert run_status("cityscapes", old).deviations == (f"init from a smoke pretrain ({pre / 'checkpoint.pt'})",)
    (pre / "metrics.json").write_text(json.dumps(_metrics("pretrain", 80.0, "paper", "real")))
    assert run_status("cityscapes", old).status == "reproduction"
    # a paper-profile run on generated data is partial, naming the data
    assert run_status("pretrain", _metrics("pretrain", 80.0, "paper", "synthetic")).deviations == ("dataset synthetic (paper imagenet)",)


def test_multi_seed_proxy_cells_show_mean_and_std(tmp_path):
    write_results(tmp_path, T5.name, {}, metric=40.0, profile="proxy")
    for kind, runs in runs_needed(T5).items():
        for run in runs:
            path = run_metrics_path(tmp_path, kind, run)
            metrics = json.loads(path.read_text())
            key = "top1" if kind == "pretrain" else "miou"
            metrics.update({"seeds": [0, 1, 2], f"{key}_std": metrics[key] / 20, "per_seed": {}})
            path.write_text(json.dumps(metrics))
    records = build_records(T5, tmp_path)
    top1 = cell(records, "HRViT-b1", "imagenet_top1")
    assert top1["status"] == "proxy" and format_cell(top1, 2) == "80.52 / proxy† 40.00 ± 2.00"
    md = to_markdown(T5, records)
    assert "proxy†: mean ± std over seeds 0, 1, 2" in md and "street scenes" in md
    assert headline_metrics(T5, records)["accuracy"]["proxy"]["HRViT-b1"] == {
        "imagenet_top1": 40.0, "imagenet_top1_std": 2.0, "cityscapes_miou": 40.0, "cityscapes_miou_std": 2.0}


def test_outputs_layout_latex_and_metrics(t5_records, tmp_path):
    out = tmp_path / "tables"
    paths = write_table(T5, t5_records, out)
    assert {p.name for p in paths} >= {"table5_ablation.md", "table5_ablation.tex", "table5_ablation.csv", "table5_ablation.json"}
    tex = (out / "table5_ablation.tex").read_text()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{table}", r"\caption{", r"\label{tab:table5_ablation}"):
        assert tex.count(rule) == 1, rule
    assert "\\usepackage{booktabs}" in tex.splitlines()[1] and "\\usepackage{amssymb}" in tex.splitlines()[1]
    body = tex.split(r"\midrule")[1].split(r"\bottomrule")[0]
    assert body.count(r"\\") == len(T5.rows) and "†" not in body and r"\dag" in body
    assert r"$\checkmark$" in body and r"$\times$" in body and " ok" not in body
    assert "%" not in body.replace(r"\%", "")  # no unescaped comment character inside the tabular
    notes = tex.split(r"\end{tabular}")[1]
    assert "smoke" in notes and not any(line.startswith("%") for line in notes.splitlines())  # notes are typeset
    frame = pd.read_csv(out / "table5_ablation.csv")
    assert len(frame) == len(T5.rows) * len(T5.columns)
    metrics = json.loads((out / "metrics" / "table5_ablation.json").read_text())
    assert metrics == headline_metrics(T5, t5_records)
    assert (metrics["efficiency_cells"], metrics["efficiency_measured"], metrics["efficiency_within_tolerance"]) == (18, 4, 2)
    assert metrics["profile"] == "smoke"
    # accuracy only under its status: nothing outside "accuracy.smoke" carries a smoke number
    assert set(metrics["accuracy"]) == {"smoke"} and metrics["accuracy"]["smoke"]["HRViT-b1"]["imagenet_top1"] == 12.5
    assert all(set(cols) <= {"params_m", "gflops"} for cols in metrics["ours"].values())


def test_every_legend_states_the_counting_rule_of_each_family_in_it():
    for table in TABLES.values():
        text = legend(table)
        assert "±0.05 M" in text and "±1%" in text
        for row in table.rows:
            assert f"{model_family(row.model)}: {COUNTING_RULES[model_family(row.model)]}" in text, (table.name, row.label)
    assert "HRViT: mmcv-1.3" in legend(TABLES["table7_window"])  # rows labelled by window size


def test_table_rows_follow_the_paper_and_measure_the_papers_setting():
    for table in TABLES.values():
        frame = pd.read_csv(PAPER_DIR / table.csv, dtype={table.key: str})
        assert [r.label for r in table.rows] == list(frame[table.key])
    table4 = TABLES["table4_cityscapes"]
    assert table4.row("HRViT-b1").measure == SEG19 and table4.row("MiT-B1").measure == SEG150
    assert table4.row("CSWin-S").measure == SEG150
    assert all(r.measure == SEG150 for r in TABLES["fig5_ade20k"].rows)
    assert TABLES["table3_pretrain"].row("HRViT-b1").measure.size == (224, 224)


# ----------------------------------------------------------------------------------------- claims


def test_claims_csv_covers_every_claim_of_the_paper():
    ids = ledger.claim_ids(PAPER_DIR / "claims.md")
    assert ids == [f"C{i}" for i in range(1, 20)]
    assert [c.id for c in ledger.load_claims(PAPER_DIR / "claims_quantities.csv")] == ids
    assert [c.id for c in ledger.CLAIMS] == ids


@pytest.mark.parametrize("field, value, message", [
    ("row", "HRViT-b9", "fig5_ade20k has no row 'HRViT-b9'"),
    ("op", "ratio", "op 'ratio' is not one of"),
    ("pair_set", "CS_PAIRS", "not both"),
    ("stated", "n/a", "stated 'n/a' is not a number"),
])
def test_malformed_claims_csv_names_file_and_line(tmp_path, field, value, message):
    lines = (PAPER_DIR / "claims_quantities.csv").read_text().splitlines()
    rows = list(csv.DictReader(lines[:3]))  # header + C1's first two quantities
    rows[1][field] = value
    path = tmp_path / "claims_quantities.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ledger.CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(ValueError, match="line 3") as err:
        ledger.load_claims(path)
    assert str(path) in str(err.value) and message in str(err.value)


def _paper_check(records, cid, quantity):
    return next(r for r in records if r["id"] == cid and r["quantity"] == quantity)


@pytest.fixture(scope="module")
def paper_only_ledger(tmp_path_factory):
    return ledger.ledger_records(tmp_path_factory.mktemp("empty"))  # no regenerated tables: paper arithmetic only


def test_paper_arithmetic_inconsistencies_are_found(paper_only_ledger):
    c12 = _paper_check(paper_only_ledger, "C12", "mIoU loss")
    assert c12["from_paper_cells"] == pytest.approx(1.11) and c12["paper_arithmetic"].startswith("INCONSISTENT")
    c5 = _paper_check(paper_only_ledger, "C5", "FLOPs saving")
    assert c5["from_paper_cells"] == pytest.approx(100 * (1 - 66.8 / 95.7)) and "30.2" in c5["paper_arithmetic"]
    for cid, quantity in (("C9", "mIoU gain"), ("C1", "params saving"), ("C17", "FLOPs increase"), ("C5", "params saving")):
        assert _paper_check(paper_only_ledger, cid, quantity)["paper_arithmetic"] == "consistent"
    assert all(r["verdict"] == "not available (missing cells)" for r in paper_only_ledger)


def test_claims_from_our_cells(t5_records, tmp_path):
    write_table(T5, t5_records, tmp_path)
    records = ledger.ledger_records(tmp_path)
    assert _paper_check(records, "C9", "params saving")["verdict"] == "not available (missing cells)"  # not measured
    smoke = _paper_check(records, "C12", "top-1 drop")
    assert smoke["ours"] == pytest.approx(0.0) and smoke["verdict"] == "untested (smoke cells are not reproductions)"
    assert not any(r["verdict"].startswith(("holds", "does not", "same")) for r in records if r["kind"] == "accuracy")
    md = ledger.to_markdown(records)
    assert all(f"| {c.id} |" in md for c in ledger.CLAIMS) and "## Averaging" in md


@pytest.mark.parametrize("change, verdict", [
    (None, "holds"),  # reproduction cells: the claim is tested
    ({"epochs": 5}, "untested (partial cells are not reproductions)"),  # the pretrain runs deviate
])
def test_claims_verdicts_follow_the_status(tmp_path, change, verdict):
    results = write_results(tmp_path / "r", T5.name, {}, metric=80.0, profile="paper", dataset="real", recipe_change=change)
    for kind, run, value in (("pretrain", "hrvit_b1-no_mixcfn", 79.0), ("cityscapes", "hrvit_b1-no_mixcfn", 0.79)):
        path = run_metrics_path(results, kind, run)
        path.write_text(json.dumps({**json.loads(path.read_text()), ("top1" if kind == "pretrain" else "miou"): value}))
    write_table(T5, build_records(T5, results), tmp_path / "t")
    c12 = _paper_check(ledger.ledger_records(tmp_path / "t"), "C12", "top-1 drop")  # paper: MixCFN costs ~1 pt top-1
    assert c12["ours"] == pytest.approx(1.0) and c12["verdict"] == verdict


def test_ours_verdict_on_paper_profile_efficiency():
    q = ledger.Quantity("params increase", "increase", (), 9, 0)
    assert ledger.ours_verdict(q, 8.7, []) == "holds"
    assert ledger.ours_verdict(q, 7.6, []).startswith("same direction")
    assert ledger.ours_verdict(q, -1.0, []) == "does not hold"
    precise = ledger.Quantity("FLOPs saving", "saving", (), 30.7, 1)  # C5: our exact cells give 30.24
    assert ledger.ours_verdict(precise, 30.65, []) == "holds"
    assert ledger.ours_verdict(precise, 30.24, []).startswith("same direction, off by -0.46")


# ----------------------------------------------------------------------------------------- figure


def test_pareto_front_keeps_only_undominated_points():
    assert pareto_front([(3, 5), (1, 2), (2, 1), (4, 4), (5, 6)]) == [(1, 2), (3, 5), (5, 6)]


def test_figure5_writes_png_and_pdf(tmp_path):
    table = TABLES["fig5_ade20k"]
    measured = {r.label: {**_measure(10_000_000 + i, 10.0 + i, 11.0 + i), "num_classes": 150} for i, r in enumerate(table.rows)}
    write_results(tmp_path, table.name, measured, metric=30.0)
    paths = plot(build_records(table, tmp_path), tmp_path / "fig5")
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    assert all(p.stat().st_size > 1000 for p in paths)
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:4] == b"%PDF"


def test_cli_rejects_unknown_names(capsys):
    from reproduce.cli import main

    assert main(["tables", "table9"]) == 2
    assert "table5_ablation" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- LaTeX


@pytest.mark.skipif(shutil.which("pdflatex") is None,
                    reason="pdflatex not installed (Debian: apt-get install texlive-latex-recommended; .ci/run does)")
@pytest.mark.parametrize("name", list(TABLES))
def test_generated_latex_compiles(tmp_path, name):
    """Every table, with smoke, partial and fitted cells and its footnotes, compiles in a minimal document."""
    table = TABLES[name]
    measured = {r.label: {**_measure(8_000_000 + i, 10.0 + i, 11.0 + i), "reading": {"block": "mit"}} for i, r in enumerate(table.rows)}
    write_results(tmp_path / "r", name, measured, profile="paper", dataset="real", recipe_change={"iters": 1000, "epochs": 5})
    write_table(table, build_records(table, tmp_path / "r"), tmp_path)
    tex = (tmp_path / f"{name}.tex").read_text()
    packages = tex.splitlines()[1].removeprefix("% Needs: ")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n" + packages + "\n\\begin{document}\n"
                                      f"\\input{{{name}.tex}}\n\\end{{document}}\n")
    run = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout[-3000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_table5_figure_of_deltas(t5_records, tmp_path):
    from reproduce.tables.figure import ablation_deltas, accuracy_label, plot_ablation

    paper = ablation_deltas(t5_records, "HRViT-b1", "paper")
    assert paper["params_m"]["- MixCFN"] == pytest.approx(7.9 - 8.1) and paper["cityscapes_miou"]["- MixCFN"] == pytest.approx(80.52 - 81.63)
    ours = ablation_deltas(t5_records, "HRViT-b1", "ours")
    assert ours["params_m"] == {"- MixCFN": pytest.approx(8.3 - 8.149451)}  # only measured rows
    assert accuracy_label(t5_records) == "ours: smoke†"
    assert "imagenet_top1" not in ours and "cityscapes_miou" not in ours  # smoke differences are left out
    paths = plot_ablation(t5_records, "HRViT-b1", tmp_path / "t5")
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].read_bytes()[:4] == b"%PDF"


def test_table5_figure_scales_paper_and_ours_apart(t5_records):
    """The paper's sub-point accuracy changes fill their own panel, whatever our differences are."""
    from reproduce.tables.figure import ABLATION_PANELS, ablation_deltas, ablation_figure

    records = [{**r, "status": "proxy", "ours": 40.0} if r["kind"] == "accuracy" and r["row"] == "- MixCFN" else
               {**r, "status": "proxy", "ours": 10.0} if r["kind"] == "accuracy" else r for r in t5_records]
    ours = ablation_deltas(records, "HRViT-b1", "ours")
    assert ours["cityscapes_miou"]["- MixCFN"] == 30.0  # a non-smoke difference is shown
    fig = ablation_figure(records, "HRViT-b1")
    column = [c for c, _ in ABLATION_PANELS].index("cityscapes_miou")
    paper_axis, ours_axis = fig.axes[column], fig.axes[len(ABLATION_PANELS) + column]
    largest_paper = max(abs(v) for v in ablation_deltas(records, "HRViT-b1", "paper")["cityscapes_miou"].values())
    assert max(map(abs, paper_axis.get_xlim())) < 2 * largest_paper < 5  # ours (30 points) does not squash it
    assert max(map(abs, ours_axis.get_xlim())) >= 30


def test_all_backbones_at_one_setting(tmp_path):
    """Table 4: HRViT rows are measured at 19 classes already; MiT/CSWin come from the fair rows."""
    table = TABLES["table4_cityscapes"]
    measured = {"HRViT-b1": _measure(8_149_451, 14.083, 15.448), "MiT-B1": {**_measure(13_700_000, 15.9, 16.2), "num_classes": 150}}
    write_results(tmp_path, table.name, measured)
    path = measure_path(tmp_path, table.name)
    path.write_text(json.dumps({**json.loads(path.read_text()), "fair_rows": {"MiT-B1": _measure(13_680_000, 15.35, 15.6)}}))
    records = build_records(table, tmp_path)
    assert cell(records, "MiT-B1", "params_m")["fair_params_m"] == pytest.approx(13.68)
    assert cell(records, "HRViT-b1", "gflops")["fair_gflops_fvcore"] == 15.448  # its paper setting is the fair one
    md = to_markdown(table, records)
    fair = md.split("## All backbones at one setting")[1].split("##")[0]
    assert "seg 19 classes at 512x512" in fair and "| MiT-B1 " in fair and "15.60" in fair and "15.45" in fair
    assert "not measured" in fair  # the rows without a measurement say so
    assert "## All backbones at one setting" not in to_markdown(T5, build_records(T5, tmp_path))  # one family only


def test_figure5_under_one_counting_rule(tmp_path):
    from reproduce.tables.figure import series

    table = TABLES["fig5_ade20k"]
    measured = {r.label: {**_measure(10_000_000 + i, 10.0 + i, 20.0 + i), "num_classes": 150} for i, r in enumerate(table.rows)}
    write_results(tmp_path, table.name, measured, metric=30.0)
    records = build_records(table, tmp_path)
    paper_x = {name: x for points in series(records, "gflops", "paper", "fvcore").values() for x, _, name in points}
    assert paper_x["MiT-B0"] == 20.0 and paper_x["HRViT-b1"] == 25.0  # our fvcore count, beside the paper's mIoU
    paths = plot(records, tmp_path / "fig5_fvcore", convention="fvcore")
    assert all(p.stat().st_size > 1000 for p in paths)
