"""``python -m reproduce tables``: regenerate the paper's Tables 3-7, Figure 5 and the claims ledger.

Reads the pipeline's results (``results/measure``, ``results/pretrain``, ``results/finetune``) and the
paper's cells (``tables/paper``), and writes ``tables/<name>.{md,tex,csv,json}``,
``tables/metrics/<name>.json`` (DVC metrics), ``tables/fig5_ade20k{,_fvcore}.{png,pdf}``,
``tables/table5_ablation_deltas.{png,pdf}`` (Table 5 as a figure) and ``tables/claims.{md,json}``.
Missing results give cells marked as missing rather than an error, so a partial run still renders.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from reproduce import params as suite_params  # the module, not its names: params reads tables.spec, which runs this file
from reproduce.tables.spec import ABLATION, CLAIMS, FIGURE, TARGETS, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"what to write (default: everything): {', '.join(TARGETS)}")
    parser.add_argument("--results", type=Path, default=Path("results"), help="pipeline results folder (default results)")
    parser.add_argument("--out", type=Path, default=Path("tables"), help="output folder (default tables)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params.yaml whose extra_rows add your own rows (default params.yaml; ignored if absent)")


def load_optional_params(path: Path) -> dict:
    """The validated params of ``path`` (the tables read its ``extra_rows``), or {} when there is no such file."""
    if not path.is_file():
        return {}
    return suite_params.load_params(path)


def run(args: argparse.Namespace) -> int:
    unknown = [n for n in args.names if n not in TARGETS]
    if unknown:
        print(f"python -m reproduce tables: error: unknown name(s) {unknown}; choose from {', '.join(TARGETS)}")
        return 2
    names = args.names or list(TARGETS)
    from reproduce.tables.cells import build_records
    from reproduce.tables.render import write_table

    try:
        params = load_optional_params(args.params)
    except suite_params.ParamsError as err:
        print(f"python -m reproduce tables: error: {err}")
        return 2
    written: list[Path] = []
    for name in names:
        if name == CLAIMS:
            continue
        table = resolve(name, params)
        records = build_records(table, args.results)
        written += write_table(table, records, args.out)
        if name == FIGURE:
            from reproduce.tables.figure import plot

            written += plot(records, args.out / FIGURE)
            written += plot(records, args.out / f"{FIGURE}_fvcore", convention="fvcore")  # one counting rule for all
        if name == ABLATION:
            from reproduce.tables.figure import plot_ablation

            written += plot_ablation(records, table.rows[0].label, args.out / f"{ABLATION}_deltas")
    if CLAIMS in names:
        from reproduce.tables.claims import write_ledger

        written += write_ledger(args.out, args.out)
    for path in written:
        print(f"wrote {path}")
    return 0
