"""Records -> Markdown, LaTeX (booktabs), CSV, JSON and the DVC headline metrics of one table.

Every cell reads "paper / ours (ours - paper)". Efficiency cells end with ✓ or ✗ (within the tolerance
under the paper's counting convention or not). Accuracy cells that do not come from a paper-profile run
on the real dataset are prefixed with their profile and a dagger, so they cannot pass for a reproduction.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from reproduce.tables.cells import Record, is_number
from reproduce.tables.spec import PAPER_DIR, Table

HEADERS = {
    "params_m": "Params (M)", "gflops": "GFLOPs", "imagenet_top1": "ImageNet top-1 (%)",
    "cityscapes_miou": "Cityscapes mIoU (%)", "ade20k_miou": "ADE20K mIoU (%)",
}
KEY_HEADERS = {"window_size_mr_lr": "MR/LR window"}
LEGEND = ("Each cell: paper / ours (ours − paper). Efficiency: ours under the paper's counting convention "
          "(mmcv-style module count without BN, plus one attention matmul; spec/hrvit.md §4.5); "
          "✓ within tolerance, ✗ outside.")
NOT_REPRODUCTION = ("† {profile} profile on {dataset} data: this number only shows that the pipeline runs end "
                    "to end; it is not a reproduction of the paper's accuracy.")


def paper_decimals(table: Table, paper_dir: Path = PAPER_DIR) -> dict[str, int]:
    """Decimals printed in the paper per column (from the CSV text, so 81.00 keeps its two)."""
    raw = pd.read_csv(paper_dir / table.csv, dtype=str)
    return {c: max((len(v.split(".")[1]) if "." in v else 0) for v in raw[c].dropna()) if raw[c].notna().any() else 2
            for c in table.columns}


def _num(value: float | None, decimals: int) -> str:
    return "—" if not is_number(value) else f"{value:.{decimals}f}"


def _signed(value: float, decimals: int) -> str:
    return f"{value:+.{decimals}f}".replace("-", "−")


def format_cell(record: Record, decimals: int, latex: bool = False) -> str:
    """One cell as text: paper / ours (difference) plus its flag or profile label."""
    paper = _num(record["paper"], decimals)
    if record["ours"] is None:
        why = {"not trained": "no run"}.get(record["status"], f"{record['status']}")
        return paper if record["status"] == "not trained" else f"{paper} / — ({why})"
    ours_decimals = decimals + 1 if record["kind"] == "efficiency" else 2
    ours = f"{record['ours']:.{ours_decimals}f}"
    label = ""
    if record["kind"] == "accuracy" and record["status"] != "reproduction":
        dagger = r"\textsuperscript{\dag}" if latex else "†"
        label = f"{record['profile']}{dagger} "
    diff = f" ({_signed(record['diff'], ours_decimals)})" if is_number(record.get("diff")) else ""
    flag = ""
    if "within_tolerance" in record:
        flag = (" ok" if record["within_tolerance"] else r" \textbf{off}") if latex else (" ✓" if record["within_tolerance"] else " ✗")
    text = f"{paper} / {label}{ours}{diff}{flag}"
    return text.replace("−", "$-$") if latex else text


def grid(table: Table, records: Sequence[Record], latex: bool = False) -> pd.DataFrame:
    """The table in the paper's layout, one formatted string per cell."""
    decimals = paper_decimals(table)
    by_cell = {(r["row"], r["column"]): r for r in records}
    key = KEY_HEADERS.get(table.key, table.key.capitalize())
    rows = [{key: row.label, **{HEADERS[c]: format_cell(by_cell[row.label, c], decimals[c], latex) for c in table.columns}}
            for row in table.rows]
    return pd.DataFrame(rows)


def accuracy_footnotes(records: Sequence[Record]) -> list[str]:
    """One footnote per (profile, dataset) of the accuracy cells that are not reproductions."""
    seen = sorted({(r["profile"], r["dataset"]) for r in records
                   if r["kind"] == "accuracy" and r["ours"] is not None and r["status"] != "reproduction"})
    return [NOT_REPRODUCTION.format(profile=p, dataset=d) for p, d in seen]


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


def provenance(records: Sequence[Record]) -> pd.DataFrame:
    """Which run (profile, data, commit) produced the accuracy cells."""
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for r in records:
        if r["kind"] == "accuracy" and r["ours"] is not None:
            seen[r["source"], r["run"]] = {
                "run": f"{r['source']}/{r['run']}", "profile": r["profile"], "dataset": r["dataset"],
                "data": r.get("data_source") or "", "commit": (r.get("git_commit") or "")[:10],
                "wall s": f"{r['wall_time_s']:.0f}" if is_number(r.get("wall_time_s")) else "",
            }
    return pd.DataFrame(list(seen.values()))


def _commits(records: Sequence[Record]) -> str:
    commits = sorted({(r.get("git_commit") or "unknown")[:10] for r in records if r["ours"] is not None})
    return ", ".join(commits) or "none"


def to_markdown(table: Table, records: Sequence[Record]) -> str:
    parts = [f"# {table.title}", "", "Generated by `python -m reproduce tables`; do not edit by hand. "
             f"Code commit(s) of our cells: {_commits(records)}.", "",
             grid(table, records).to_markdown(index=False), "", LEGEND]
    parts += [""] + [f"- {text}" for text in (*accuracy_footnotes(records), *table.notes)]
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


def _tex_escape(text: str) -> str:
    for char, repl in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("_", r"\_"), ("#", r"\#"),
                       ("±", r"$\pm$"), ("−", "$-$")):
        text = text.replace(char, repl)
    return text


def to_latex(table: Table, records: Sequence[Record]) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}); cells as in the Markdown version."""
    frame = grid(table, records, latex=True)
    header = " & ".join(_tex_escape(c) for c in frame.columns) + r" \\"
    body = [" & ".join([_tex_escape(str(row.iloc[0])), *map(str, row.iloc[1:])]) + r" \\" for _, row in frame.iterrows()]
    notes = [_tex_escape(LEGEND.replace("✓", "ok").replace("✗", "off")),
             *(_tex_escape(n).replace("†", r"\textsuperscript{\dag}") for n in accuracy_footnotes(records)),
             *map(_tex_escape, table.notes)]
    lines = [f"% {table.title}. Generated by `python -m reproduce tables`; do not edit by hand.",
             r"\begin{tabular}{l" + "l" * (len(frame.columns) - 1) + "}", r"\toprule", header, r"\midrule", *body,
             r"\bottomrule", r"\end{tabular}", "", *(f"% {n}" for n in notes)]
    return "\n".join(lines) + "\n"


def headline_metrics(table: Table, records: Sequence[Record]) -> dict[str, Any]:
    """The DVC metrics of a table: our value per cell, and how many efficiency cells are in tolerance."""
    efficiency = [r for r in records if r["kind"] == "efficiency" and r["paper"] is not None]
    measured = [r for r in efficiency if "within_tolerance" in r]
    profiles = sorted({r["profile"] for r in records if r["kind"] == "accuracy" and r["ours"] is not None})
    return {
        "profile": "+".join(profiles) or "none",
        "efficiency_cells": len(efficiency),
        "efficiency_measured": len(measured),
        "efficiency_within_tolerance": sum(bool(r["within_tolerance"]) for r in measured),
        "ours": {row.label: {r["column"]: round(r["ours"], 4) for r in records if r["row"] == row.label and r["ours"] is not None}
                 for row in table.rows},
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
