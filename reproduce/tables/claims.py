"""The claims ledger: every quantitative claim of the paper's prose (tables/paper/claims.md), recomputed twice.

1. From the paper's own cells: does the paper's arithmetic hold? (e.g. C12 states a 0.11 mIoU loss
   where Table 5 gives 1.11; C5 states 30.7 % fewer FLOPs where Table 4 gives 30.2 %.)
2. From our regenerated cells (tables/<name>.json): efficiency from our measurements, accuracy from our
   runs. Only reproduction cells (the paper's recipe on the real data, reproduce/tables/status.py) can
   make an accuracy claim hold or fail; any other cell leaves it "untested".

"Avg improv." (C6/C19, C8, C16) is the arithmetic mean over tier-matched (HRViT, baseline) pairs of the
mIoU/top-1 difference in points and of the relative saving 1 - HRViT/baseline in percent; the pairs are
listed in ``AVERAGING`` and printed in the ledger. No pairing of Table 4 rows reproduces all three of
Table 4's printed averages, so those rows are reported as the paper states them, not fitted.

The claims themselves (the stated figures and the paper cells each one compares) are the paper's, so they
are data: tables/paper/claims_quantities.csv, one row per quantity. The pair sets behind the averages are
our method and stay here (``PAIR_SETS``; the CSV names them).
"""
from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from reproduce.tables.cells import is_number, paper_frame
from reproduce.tables.spec import ACCURACY_COLUMNS, PAPER_DIR, TABLES
from reproduce.tables.status import REPRODUCTION

ACCURACY_TOLERANCE_PT = 0.5  # a recomputed accuracy difference "holds" within half a point of the stated one
# A recomputed efficiency percentage "holds" within one unit of the stated figure's last digit (1 pp for
# "40%", 0.1 pp for "30.7%"): our cells are exact, the paper's percentages come from rounded cells.


@dataclass(frozen=True)
class Ref:
    table: str
    row: str
    column: str


Pair = tuple[Ref, Ref]  # (ours-of-interest, reference)


def delta(a: float, b: float) -> float:
    return a - b


def saving(a: float, b: float) -> float:
    return 100.0 * (1.0 - a / b)


def increase(a: float, b: float) -> float:
    return 100.0 * (a / b - 1.0)


OPS: dict[str, tuple[Callable[[float, float], float], str]] = {
    "delta": (delta, "pt"), "saving": (saving, "%"), "increase": (increase, "%"),
}


@dataclass(frozen=True)
class Quantity:
    what: str
    op: str  # delta | saving | increase
    pairs: tuple[Pair, ...]  # averaged when more than one
    stated: float
    decimals: int
    bound: str = "="  # "=": equal after rounding; "<": stated is an upper bound; ">": stated is a lower bound

    @property
    def unit(self) -> str:
        return OPS[self.op][1]

    @property
    def accuracy(self) -> bool:
        return any(ref.column in ACCURACY_COLUMNS for pair in self.pairs for ref in pair)


@dataclass(frozen=True)
class Claim:
    id: str
    where: str
    text: str
    quantities: tuple[Quantity, ...]
    note: str = ""


T4, T6, F5 = "table4_cityscapes", "table6_hrnet_vit", "fig5_ade20k"
CS_PAIRS = ((T4, "HRViT-b1", "MiT-B1"), (T4, "HRViT-b1", "CSWin-Ti"), (T4, "HRViT-b2", "MiT-B2"),
            (T4, "HRViT-b2", "CSWin-T"), (T4, "HRViT-b3", "MiT-B3"), (T4, "HRViT-b3", "CSWin-S"))
ADE_PAIRS = ((F5, "HRViT-b1", "MiT-B1"), (F5, "HRViT-b2", "MiT-B2"), (F5, "HRViT-b3", "MiT-B3"))
HRNET_PAIRS = tuple((T6, f"HRViT-b{i}", f"HRNet{w}-{f}") for i, w in ((1, 18), (2, 32), (3, 40)) for f in ("MiT", "CSWin"))
PAIR_SETS = {"CS_PAIRS": CS_PAIRS, "ADE_PAIRS": ADE_PAIRS, "HRNET_PAIRS": HRNET_PAIRS}  # names used in the CSV
AVERAGING = {
    "C6/C19 (Table 4 'Avg improv.')": CS_PAIRS,
    "C8 (abstract, ADE20K + Cityscapes)": ADE_PAIRS + CS_PAIRS,
    "C16 (Table 6 'Avg Improv.')": HRNET_PAIRS,
}

# ----------------------------------------------------------------------------------------- the claims (data)

CLAIMS_CSV = PAPER_DIR / "claims_quantities.csv"
CSV_FIELDS = ("id", "where", "claim", "quantity", "op", "table", "column", "row", "reference", "pair_set",
              "stated", "decimals", "bound", "note")
BOUNDS = ("=", "<", ">")


def _ref(table: str, row: str, column: str) -> Ref:
    """A paper cell named in the claims CSV; it must exist in reproduce/tables/spec.py."""
    if table not in TABLES:
        raise ValueError(f"unknown table {table!r}; tables: {list(TABLES)}")
    spec = TABLES[table]
    if column not in spec.columns:
        raise ValueError(f"{table} has no column {column!r}; columns: {list(spec.columns)}")
    if row not in [r.label for r in spec.rows]:
        raise ValueError(f"{table} has no row {row!r}; rows: {[r.label for r in spec.rows]}")
    return Ref(table, row, column)


def _pairs(entry: dict[str, str]) -> tuple[Pair, ...]:
    """One explicit pair (table: row vs reference), or named pair sets ("ADE_PAIRS+CS_PAIRS") with one
    column for all or one column per set ("ade20k_miou+cityscapes_miou")."""
    location = [entry["table"], entry["row"], entry["reference"]]
    if not entry["pair_set"]:
        if not all(location):
            raise ValueError("give table, row and reference, or a pair_set")
        table, row, reference = location
        return ((_ref(table, row, entry["column"]), _ref(table, reference, entry["column"])),)
    if any(location):
        raise ValueError("give either a pair_set or table/row/reference, not both")
    names, columns = entry["pair_set"].split("+"), entry["column"].split("+")
    unknown = [name for name in names if name not in PAIR_SETS]
    if unknown:
        raise ValueError(f"unknown pair_set {unknown}; known: {list(PAIR_SETS)}")
    if len(columns) not in (1, len(names)):
        raise ValueError(f"column {entry['column']!r} must name one column, or one per set of {entry['pair_set']!r}")
    columns = columns * len(names) if len(columns) == 1 else columns
    return tuple((_ref(t, a, column), _ref(t, b, column))
                 for name, column in zip(names, columns) for t, a, b in PAIR_SETS[name])


def _quantity(entry: dict[str, str]) -> Quantity:
    if not entry["quantity"]:
        raise ValueError("quantity is empty")
    if entry["op"] not in OPS:
        raise ValueError(f"op {entry['op']!r} is not one of {list(OPS)}")
    if entry["bound"] not in BOUNDS:
        raise ValueError(f"bound {entry['bound']!r} is not one of {list(BOUNDS)}")
    if not entry["decimals"].isdigit():
        raise ValueError(f"decimals {entry['decimals']!r} is not a non-negative integer")
    try:  # the figure as printed: "40" stays an int, "0.80" a float
        stated = float(entry["stated"]) if "." in entry["stated"] else int(entry["stated"])
    except ValueError:
        raise ValueError(f"stated {entry['stated']!r} is not a number") from None
    return Quantity(entry["quantity"], entry["op"], _pairs(entry), stated, int(entry["decimals"]), entry["bound"])


def load_claims(path: Path = CLAIMS_CSV) -> tuple[Claim, ...]:
    """The claims, one CSV row per quantity; a claim's rows are consecutive and repeat its where/claim/note."""
    claims: list[tuple[tuple[str, str, str, str], list[Quantity]]] = []  # (id, where, claim, note), quantities
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != CSV_FIELDS:
            raise ValueError(f"{path}: the header must be {','.join(CSV_FIELDS)}, not {','.join(reader.fieldnames or ())}")
        for entry in reader:
            try:
                if None in entry or None in entry.values():
                    raise ValueError(f"expected {len(CSV_FIELDS)} fields")
                if not re.fullmatch(r"C\d+", entry["id"]) or not entry["where"] or not entry["claim"]:
                    raise ValueError("id must read C<number>, and where and claim must be given")
                key = (entry["id"], entry["where"], entry["claim"], entry["note"])
                if claims and claims[-1][0] == key:
                    claims[-1][1].append(_quantity(entry))
                elif any(k[0] == entry["id"] for k, _ in claims):
                    raise ValueError(f"the rows of {entry['id']} must be together and repeat the same where/claim/note")
                else:
                    claims.append((key, [_quantity(entry)]))
            except ValueError as err:
                raise ValueError(f"{path}, line {reader.line_num} ({entry.get('id')}, {entry.get('quantity')!r}): {err}") from None
    return tuple(Claim(cid, where, text, tuple(qs), note) for (cid, where, text, note), qs in claims)


CLAIMS: tuple[Claim, ...] = load_claims()


# ----------------------------------------------------------------------------------------- evaluation

Lookup = Callable[[Ref], dict[str, Any] | None]


def paper_lookup(paper_dir: Path = PAPER_DIR) -> Lookup:
    frames = {name: paper_frame(table, paper_dir) for name, table in TABLES.items()}

    def look(ref: Ref) -> dict[str, Any] | None:
        value = frames[ref.table].at[ref.row, ref.column]
        return None if pd.isna(value) else {"value": float(value), "status": "paper"}
    return look


def ours_lookup(tables_dir: Path) -> Lookup:
    """Our cells from the regenerated tables/<name>.json (a missing table gives missing cells)."""
    cells: dict[tuple[str, str, str], dict[str, Any]] = {}
    for name in TABLES:
        path = tables_dir / f"{name}.json"
        if path.is_file():
            for c in json.loads(path.read_text())["cells"]:
                cells[name, c["row"], c["column"]] = c

    def look(ref: Ref) -> dict[str, Any] | None:
        cell = cells.get((ref.table, ref.row, ref.column))
        if cell is None or not is_number(cell.get("ours")):
            return None
        return {"value": cell["ours"], "status": cell["status"], "profile": cell.get("profile"),
                "dataset": cell.get("dataset"), "fitted": bool(cell.get("fitted"))}
    return look


def compute(q: Quantity, look: Lookup) -> tuple[float | None, list[dict[str, Any]]]:
    """The quantity's value (mean over its pairs) and the cells it used; None if any cell is missing."""
    fn = OPS[q.op][0]
    used, values = [], []
    for a, b in q.pairs:
        ca, cb = look(a), look(b)
        if ca is None or cb is None:
            return None, used
        used += [ca, cb]
        values.append(fn(ca["value"], cb["value"]))
    return sum(values) / len(values), used


def _matches(q: Quantity, value: float, slack: float) -> bool:
    if q.bound == "<":
        return value < q.stated
    if q.bound == ">":
        return value > q.stated
    return abs(value - q.stated) <= slack + 1e-9


def paper_verdict(q: Quantity, value: float | None) -> str:
    """Is the paper's stated figure what its own (rounded) cells give, at the printed precision?"""
    if value is None:
        return "cells missing"
    if _matches(q, value, 0.5 * 10 ** -q.decimals):
        return "consistent"
    if len(q.pairs) > 1:
        return f"not matched by our averaging: {value:.{max(q.decimals, 1) if q.unit == '%' else 2}f}"
    return f"INCONSISTENT: cells give {value:.{max(q.decimals, 1) if q.unit == '%' else 2}f}"


def ours_verdict(q: Quantity, value: float | None, used: Sequence[dict[str, Any]]) -> str:
    if value is None:
        return "not available (missing cells)"
    if q.accuracy:
        statuses = sorted({c["status"] for c in used if c["status"] not in (REPRODUCTION, "measured")})
        if statuses:
            return f"untested ({'/'.join(statuses)} cells are not reproductions)"
    slack = ACCURACY_TOLERANCE_PT if q.unit == "pt" else 10.0 ** -q.decimals
    fitted = " (from fitted baselines)" if any(c.get("fitted") for c in used) else ""
    if _matches(q, value, slack):
        return "holds" + fitted
    if q.bound == "=" and q.stated != 0 and (value > 0) == (q.stated > 0):
        return f"same direction, off by {value - q.stated:+.2f} {q.unit}" + fitted
    return "does not hold" + fitted


def _stated(q: Quantity) -> str:
    prefix = {"<": "< ", ">": "> "}.get(q.bound, "")
    return f"{prefix}{q.stated:.{q.decimals}f} {q.unit}"


def ledger_records(tables_dir: Path, paper_dir: Path = PAPER_DIR) -> list[dict[str, Any]]:
    paper, ours = paper_lookup(paper_dir), ours_lookup(tables_dir)
    records = []
    for claim in CLAIMS:
        for q in claim.quantities:
            pv, _ = compute(q, paper)
            ov, used = compute(q, ours)
            records.append({
                "id": claim.id, "where": claim.where, "claim": claim.text, "quantity": q.what, "unit": q.unit,
                "kind": "accuracy" if q.accuracy else "efficiency", "stated": q.stated, "bound": q.bound,
                "from_paper_cells": pv, "paper_arithmetic": paper_verdict(q, pv),
                "ours": ov, "verdict": ours_verdict(q, ov, used), "note": claim.note,
            })
    return records


def claim_ids(claims_md: Path) -> list[str]:
    """The claim ids listed in the paper's claims file (first column of its table)."""
    ids = []
    for line in claims_md.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells and cells[0][:1] == "C" and cells[0][1:].isdigit():
            ids.append(cells[0])
    return ids


def to_markdown(records: Sequence[dict[str, Any]]) -> str:
    def num(v: float | None, unit: str) -> str:
        return "—" if v is None else f"{v:+.2f} {unit}"

    rows = [{"id": r["id"], "quantity": r["quantity"], "paper states": _stated_record(r),
             "from paper's cells": num(r["from_paper_cells"], r["unit"]), "paper's arithmetic": r["paper_arithmetic"],
             "from our cells": num(r["ours"], r["unit"]), "verdict (ours)": r["verdict"]} for r in records]
    claims = {r["id"]: r for r in records}
    inconsistent = [r for r in records if r["paper_arithmetic"].startswith("INCONSISTENT")]
    parts = [
        "# Claims ledger", "",
        "Every quantitative claim of the paper's text (tables/paper/claims.md), recomputed from the paper's own "
        "table cells (does the paper's arithmetic hold?) and from our regenerated tables (tables/*.json). "
        "Generated by `python -m reproduce tables claims`; do not edit by hand.", "",
        f"- Differences are in points (pt); savings are 1 − HRViT/baseline and increases variant/base − 1, in percent. "
        f"'Holds' means within {ACCURACY_TOLERANCE_PT} pt (accuracy) or one unit of the stated figure's last digit "
        "(efficiency: 1 pp for '40%', 0.1 pp for '30.7%'), or on the stated side of a bound.",
        "- Efficiency from our cells uses our exact measurements (the paper's percentages come from rounded cells).",
        "- Accuracy claims are tested only on reproduction cells (the paper's recipe on the real data; "
        "docs/statuses.md). A claim that needs a smoke, proxy or partial cell reads 'untested'.",
        "- Efficiency claims that use the fitted HRNet-ViT baselines say so: those cells are a fitted reading "
        "(docs/hrnet-vit-fit.md).",
        "", "## Claims", "", "| id | where | claim | note |", "|---|---|---|---|",
        *(f"| {cid} | {r['where']} | {r['claim']} | {r['note']} |" for cid, r in claims.items()),
        "", "## Ledger", "", pd.DataFrame(rows).to_markdown(index=False),
        "", "## Inconsistencies inside the paper", "",
        *(f"- {r['id']} ({r['quantity']}): states {_stated_record(r)}; {r['paper_arithmetic'].split(': ', 1)[1]} {r['unit']}."
          for r in inconsistent),
        "", "## Averaging ('Avg improv.')", "",
        "Arithmetic mean, over the pairs below, of the accuracy difference (points) and of the relative saving "
        "1 − HRViT/baseline (percent). Pairs are tier-matched (the HRViT variant against the baselines of "
        "similar size, as in C2/C3). A search over every subset of up to eight (HRViT, baseline) pairs of Table 4 "
        "found none that gives all three printed Table 4 averages (+2.16, 30.7 %, 23.1 %); the paper does not say "
        "how it averaged. The abstract's +1.78 mIoU (C8) equals the six-pair Cityscapes mean of the Table 4 cells "
        "(C6 above), which suggests the abstract averaged Cityscapes only.", "",
        *(f"- {name}: " + ", ".join(f"{a} vs {b}" + (" (ADE20K)" if t == F5 else "") for t, a, b in pairs)
          for name, pairs in AVERAGING.items()),
    ]
    return "\n".join(parts) + "\n"


def _stated_record(r: dict[str, Any]) -> str:
    q = next(q for c in CLAIMS if c.id == r["id"] for q in c.quantities if q.what == r["quantity"])
    return _stated(q)


def write_ledger(tables_dir: Path, out_dir: Path) -> list[Path]:
    records = ledger_records(tables_dir)
    md, js = out_dir / "claims.md", out_dir / "claims.json"
    md.write_text(to_markdown(records))
    js.write_text(json.dumps(records, indent=1) + "\n")
    return [md, js]
