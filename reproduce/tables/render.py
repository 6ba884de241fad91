"""Records -> Markdown, LaTeX (booktabs), CSV, JSON and the DVC headline metrics of one table.

Efficiency cells read "paper / ours (ours - paper)" with ✓ or ✗ (within the tolerance under the paper's
counting convention or not), or the signed differences and "fitted‡" for a fitted baseline. Accuracy
cells read "paper / ours (ours - paper)" only for reproductions; any other run shows its status and a
dagger ("smoke† 12.50", "partial† 79.10", "proxy† 41.20 ± 1.30") and no difference, with a footnote
saying why (docs/statuses.md).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from reproduce.tables.cells import Record, is_number
from reproduce.tables.spec import COUNTING_RULES, DEFAULT_TOLERANCE, PAPER_DIR, Table, family, model_family
from reproduce.tables.status import PARTIAL, REPRODUCTION

HEADERS = {
    "params_m": "Params (M)", "gflops": "GFLOPs", "imagenet_top1": "ImageNet top-1 (%)",
    "cityscapes_miou": "Cityscapes mIoU (%)", "ade20k_miou": "ADE20K mIoU (%)",
}
KEY_HEADERS = {"window_size_mr_lr": "MR/LR window"}
FITTED_MARK = "fitted‡"
STATUS_NOTES = {
    "smoke": "smoke†: the smoke profile ({runs}) on {data}: a few optimizer steps that show the pipeline runs end to "
             "end; the number measures nothing, so no difference to the paper is shown.",
    "proxy": "proxy†: mean ± std over seeds {seeds} of the proxy profile ({runs}) on {data}: a small-scale check that "
             "training learns, on data unlike the paper's, so no difference to the paper is shown.",
    PARTIAL: "partial†: {runs}: {deviations}. The rest is the paper's recipe; not a reproduction, so no difference "
             "to the paper is shown.",
}
GENERATED = ("generated data (reproduce/data/synthetic.py: shapes in the ImageNet layout, street scenes with thin "
             "poles and wires in the Cityscapes layout)")


def legend(table: Table) -> str:
    """How to read the table: cell layout, tolerances, each family's counting rule, statuses."""
    tol = DEFAULT_TOLERANCE
    families = sorted({model_family(row.model) for row in table.rows if not row.extra})
    rules = "; ".join(f"{name}: {COUNTING_RULES[name]}" for name in families)
    rules += "".join(f"; {row.label} (your row, {row.model}): the {row.flop_family} family's rule, no paper cell "
                     "to compare with" for row in table.rows if row.extra)
    text = (f"Each cell: paper / ours. Efficiency: ours under the paper's counting convention "
            f"(docs/flop-convention.md), difference in parentheses; ✓ within tolerance (params ±{tol['params_abs_m']} M, "
            f"GFLOPs ±{tol['gflops_rel']:.0%} of the paper's cell), ✗ outside")
    if any(row.fitted for row in table.rows):
        text += f"; {FITTED_MARK}: a construction fitted to these cells, signed and relative difference, no verdict"
    text += f". Counting rule per family: {rules}."
    if any(c in HEADERS and not c.startswith(("params", "gflops")) for c in table.columns):
        text += (" Accuracy: a difference to the paper only for reproductions (the paper's recipe on the real data, "
                 "docs/statuses.md); any other run is labelled with its status† and explained below.")
    return text


def paper_decimals(table: Table, paper_dir: Path = PAPER_DIR) -> dict[str, int]:
    """Decimals printed in the paper per column (from the CSV text, so 81.00 keeps its two)."""
    raw = pd.read_csv(paper_dir / table.csv, dtype=str)
    return {c: max((len(v.split(".")[1]) if "." in v else 0) for v in raw[c].dropna()) if raw[c].notna().any() else 2
            for c in table.columns}


def _num(value: float | None, decimals: int) -> str:
    return "—" if not is_number(value) else f"{value:.{decimals}f}"


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}".replace("-", "−")


def format_cell(record: Record, decimals: int) -> str:
    """One cell as text (Unicode; ``to_latex`` translates the symbols)."""
    paper = _num(record["paper"], decimals)
    if record["ours"] is None:
        return paper if record["status"] == "not trained" else f"{paper} / — ({record['status']})"
    if record["kind"] == "efficiency":
        d = decimals + 1
        text = f"{paper} / {record['ours']:.{d}f}"
        if record.get("fitted"):
            return f"{text} ({_signed(record['diff'], d)}, {_signed(100 * record['diff_rel'], 1)} %) {FITTED_MARK}"
        if is_number(record.get("diff")):
            text += f" ({_signed(record['diff'], d)})"
        if "within_tolerance" in record:
            text += " ✓" if record["within_tolerance"] else " ✗"
        return text
    value = f"{record['ours']:.2f}" + (f" ± {record['std']:.2f}" if is_number(record.get("std")) else "")
    source = f" [{record['weights']}]" if record.get("weights") else ""  # published weights, not our pretraining
    if record["status"] == REPRODUCTION:
        return f"{paper} / {value}" + (f" ({_signed(record['diff'], 2)})" if is_number(record.get("diff")) else "") + source
    return f"{paper} / {record['status']}† {value}{source}"


def grid(table: Table, records: Sequence[Record]) -> pd.DataFrame:
    """The table in the paper's layout, one formatted string per cell."""
    decimals = paper_decimals(table)
    by_cell = {(r["row"], r["column"]): r for r in records}
    key = KEY_HEADERS.get(table.key, table.key.capitalize())
    rows = [{key: row.label, **{HEADERS[c]: format_cell(by_cell[row.label, c], decimals[c]) for c in table.columns}}
            for row in table.rows]
    return pd.DataFrame(rows)


def _data_name(records: Sequence[Record]) -> str:
    datasets = sorted({r["dataset"] for r in records})
    return GENERATED if datasets == ["synthetic"] else ", ".join(f"{d} data" for d in datasets)


def accuracy_footnotes(records: Sequence[Record]) -> list[str]:
    """One footnote per status (per set of deviations for partial runs) of the non-reproduction cells."""
    shown = [r for r in records if r["kind"] == "accuracy" and r["ours"] is not None and r["status"] != REPRODUCTION]
    notes = []
    for status in sorted({r["status"] for r in shown}):
        cells = [r for r in shown if r["status"] == status]
        groups: dict[tuple[str, ...], list[Record]] = {}
        for r in cells:
            groups.setdefault(tuple(r.get("deviations") or ()) if status == PARTIAL else (), []).append(r)
        for deviations, group in groups.items():
            runs = ", ".join(sorted({f"{r['source']}/{r['run']}" for r in group}))
            seeds = sorted({s for r in group for s in r.get("seeds") or []})
            template = STATUS_NOTES.get(status, STATUS_NOTES[PARTIAL])
            notes.append(template.format(runs=runs, data=_data_name(group), seeds=", ".join(map(str, seeds)) or "—",
                                         deviations="; ".join(deviations) or f"{status} profile")
                         .replace("partial†", f"{status}†"))
    return notes


def fitted_footnote(records: Sequence[Record]) -> list[str]:
    """The residuals and the reading of the fitted rows (empty when the table has none measured)."""
    fitted = [r for r in records if r.get("fitted")]
    if not fitted:
        return []
    by_row: dict[str, list[str]] = {}
    for r in fitted:
        by_row.setdefault(r["row"], []).append(f"{HEADERS[r['column']].split(' ')[0]} {_signed(100 * r['diff_rel'], 1)} %")
    readings = sorted({r["reading"] for r in fitted if r.get("reading")})
    return [f"{FITTED_MARK}: residuals of the fitted reading, ours vs paper: "
            + "; ".join(f"{row} {', '.join(parts)}" for row, parts in by_row.items())
            + (f". Reading measured: {' | '.join(readings)}" if readings else "")
            + ". The search space, the alternatives and why this reading: docs/hrnet-vit-fit.md."]


def efficiency_reference(records: Sequence[Record]) -> pd.DataFrame:
    """Our efficiency cells under every convention (paper, fvcore, torch) with the measured setting."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["kind"] != "efficiency" or r["ours"] is None:
            continue
        row = rows.setdefault(r["row"], {"row": r["row"], "setting": r.get("setting", "")})
        if r["column"] == "params_m":
            row["params (exact)"] = f"{r['exact']:,}"
        else:
            row["GFLOPs paper conv."] = f"{r['ours']:.3f}"
            row["GFLOPs fvcore"] = f"{r['gflops_fvcore']:.3f}"
            if is_number(r.get("gflops_torch")):
                row["GFLOPs torch (2/MAC)"] = f"{r['gflops_torch']:.3f}"
    return pd.DataFrame(list(rows.values()))


def fair_table(table: Table, records: Sequence[Record]) -> pd.DataFrame:
    """All backbones at the table's one setting, under each family's rule and under fvcore (one rule)."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["kind"] != "efficiency":
            continue
        row = rows.setdefault(r["row"], {"row": r["row"], "family": family(r["row"])})
        if "fair_params_m" in r:
            row["params (M)"] = f"{r['fair_params_m']:.2f}"
        if "fair_gflops_fvcore" in r:
            row["GFLOPs paper conv. (family rule)"] = f"{r['fair_gflops_paper']:.2f}"
            row["GFLOPs fvcore (one rule)"] = f"{r['fair_gflops_fvcore']:.2f}"
    frame = pd.DataFrame(list(rows.values()))
    return frame.fillna("not measured") if len(frame.columns) > 2 else pd.DataFrame()


def fair_section(table: Table, records: Sequence[Record]) -> list[str]:
    """Markdown of the "all backbones at one setting" view (tables whose rows the paper measured apart)."""
    if table.fair is None:
        return []
    m = table.fair
    frame = fair_table(table, records)
    text = (f"Every backbone measured at one setting: {m.task} {m.num_classes} classes at {m.size[0]}x{m.size[1]}, "
            "each family with its own SegFormer head-width rule. "
            "The paper convention keeps each family's counting rule (docs/flop-convention.md#per-family); fvcore "
            "counts every family by one rule, so compare across families in that column.")
    body = frame.to_markdown(index=False) if not frame.empty else \
        "Not measured yet: the table's measure stage writes these rows (`fair_rows` of `results/measure/<table>.json`)."
    parts = ["", "## All backbones at one setting", "", text, "", body]
    if not frame.empty and frame.isin(["not measured"]).any().any():
        parts += ["", f"Rows marked 'not measured' have no measurement at this setting in `results/measure/{table.name}.json` "
                      f"(`fair_rows`); `python -m reproduce measure MODEL --task {m.task} --num-classes {m.num_classes}` "
                      "prints them."]
    return parts


def provenance(records: Sequence[Record]) -> pd.DataFrame:
    """Which run (status, profile, data, init, commit) produced the accuracy cells."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "accuracy" and r["ours"] is not None:
            seen[r["source"], r["run"]] = {
                "run": f"{r['source']}/{r['run']}", "status": r["status"], "profile": r["profile"],
                "dataset": r["dataset"], "data": r.get("data_source") or "", "init": r.get("weights") or r.get("init") or "",
                "seeds": ", ".join(map(str, r.get("seeds") or [])), "commit": (r.get("git_commit") or "")[:10],
                "wall s": f"{r['wall_time_s']:.0f}" if is_number(r.get("wall_time_s")) else "",
            }
    return pd.DataFrame(list(seen.values()))


def _commits(records: Sequence[Record]) -> str:
    commits = sorted({(r.get("git_commit") or "unknown")[:10] for r in records if r["ours"] is not None})
    return ", ".join(commits) or "none"


def notes(table: Table, records: Sequence[Record]) -> list[str]:
    """Legend, then the footnotes of this table's cells, then the table's own notes."""
    return [legend(table), *accuracy_footnotes(records), *fitted_footnote(records), *table.notes]


def to_markdown(table: Table, records: Sequence[Record]) -> str:
    parts = [f"# {table.title}", "", "Generated by `python -m reproduce tables`; do not edit by hand. "
             f"Code commit(s) of our cells: {_commits(records)}.", "",
             grid(table, records).to_markdown(index=False), "", *(f"- {text}" for text in notes(table, records))]
    parts += fair_section(table, records)
    reference = efficiency_reference(records)
    if not reference.empty:
        parts += ["", "## Our efficiency under each counting convention", "",
                  reference.to_markdown(index=False), "",
                  "fvcore counts one multiply-add as one FLOP and also counts normalisation and interpolation "
                  "(`python -m reproduce measure MODEL` adds torch's counter, two FLOPs per multiply-add)."]
    runs = provenance(records)
    if not runs.empty:
        parts += ["", "## Runs behind the accuracy cells", "", runs.to_markdown(index=False)]
    return "\n".join(parts) + "\n"


LATEX_PACKAGES = ("booktabs", "amssymb", "graphicx")  # \toprule..., \checkmark, \resizebox
_TEX_SYMBOLS = (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"), ("$", r"\$"),
                ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\textasciicircum{}"),
                ("±", r"$\pm$"), ("−", "$-$"), ("✓", r"$\checkmark$"), ("✗", r"$\times$"),
                ("†", r"\textsuperscript{\dag}"), ("‡", r"\textsuperscript{\ddag}"), ("—", "---"), ("–", "--"),
                ("×", r"$\times$"), ("≤", r"$\leq$"), ("·", r"$\cdot$"))


def tex_escape(text: str) -> str:
    """Plain or Markdown text as LaTeX: special characters escaped, symbols as math, `code` as \texttt."""
    for char, repl in _TEX_SYMBOLS:
        text = text.replace(char, repl) if char != "\\" else text.replace(char, "\0")
    text = text.replace("\0", r"\textbackslash{}")
    parts = text.split("`")
    return "".join(rf"\texttt{{{p}}}" if i % 2 else p for i, p in enumerate(parts))


def to_latex(table: Table, records: Sequence[Record]) -> str:
    """A complete ``table`` float: caption, label, booktabs tabular and the legend/footnotes as notes."""
    frame = grid(table, records)
    header = " & ".join(tex_escape(c) for c in frame.columns) + r" \\"
    body = [" & ".join(tex_escape(str(v)) for v in row) + r" \\" for row in frame.itertuples(index=False)]
    lines = [
        f"% {table.title}. Generated by `python -m reproduce tables`; do not edit by hand.",
        "% Needs: " + " ".join(rf"\usepackage{{{p}}}" for p in LATEX_PACKAGES),
        r"\begin{table}[htbp]", r"\centering", rf"\caption{{{tex_escape(table.title)}}}", rf"\label{{tab:{table.name}}}",
        r"\resizebox{\linewidth}{!}{%", r"\begin{tabular}{l" + "l" * (len(frame.columns) - 1) + "}",
        r"\toprule", header, r"\midrule", *body, r"\bottomrule", r"\end{tabular}}",
        r"\par\smallskip", r"\begin{minipage}{\linewidth}\footnotesize",
        *(tex_escape(n) + r"\par" for n in notes(table, records)),
        r"\end{minipage}", r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


def headline_metrics(table: Table, records: Sequence[Record]) -> dict[str, Any]:
    """The DVC metrics of a table. Efficiency: our measurements and the tolerance counts. Accuracy is nested
    by status (``accuracy.<status>.<row>.<column>``), so no tool reads a smoke number as a result."""
    efficiency = [r for r in records if r["kind"] == "efficiency" and r["paper"] is not None]
    measured = [r for r in efficiency if "within_tolerance" in r]
    accuracy = [r for r in records if r["kind"] == "accuracy" and r["ours"] is not None]
    nested: dict[str, dict[str, dict[str, float]]] = {}
    for r in accuracy:
        cell = nested.setdefault(r["status"], {}).setdefault(r["row"], {})
        cell[r["column"]] = round(r["ours"], 4)
        if is_number(r.get("std")):
            cell[f"{r['column']}_std"] = round(r["std"], 4)
    return {
        "profile": "+".join(sorted({r["profile"] for r in accuracy})) or "none",
        "efficiency_cells": len(efficiency),
        "efficiency_measured": len(measured),
        "efficiency_within_tolerance": sum(bool(r["within_tolerance"]) for r in measured),
        "efficiency_fitted": sum(bool(r.get("fitted")) for r in efficiency if r["ours"] is not None),
        "ours": {row.label: {r["column"]: round(r["ours"], 4) for r in records
                             if r["row"] == row.label and r["kind"] == "efficiency" and r["ours"] is not None}
                 for row in table.rows},
        "accuracy": nested,
    }


def write_table(table: Table, records: Sequence[Record], out_dir: Path) -> list[Path]:
    """tables/<name>.{md,tex,csv,json} and tables/metrics/<name>.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics").mkdir(exist_ok=True)
    paths = {ext: out_dir / f"{table.name}.{ext}" for ext in ("md", "tex", "csv", "json")}
    paths["md"].write_text(to_markdown(table, records))
    paths["tex"].write_text(to_latex(table, records))
    pd.DataFrame(records).to_csv(paths["csv"], index=False)
    paths["json"].write_text(json.dumps({"table": table.name, "title": table.title, "cells": list(records)}, indent=1) + "\n")
    metrics = out_dir / "metrics" / f"{table.name}.json"
    metrics.write_text(json.dumps(headline_metrics(table, records), indent=1) + "\n")
    return [*paths.values(), metrics]
