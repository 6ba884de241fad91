"""Figure 5: ADE20K mIoU against params and against GFLOPs, per backbone family, paper values and ours.

Each family gets its Pareto front (points not beaten by a smaller model of the same family): solid for
the paper's values, dashed for ours. Our mIoU is labelled with its profile; a smoke-profile point shows
that the pipeline runs, not the paper's accuracy.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless, whatever MPLBACKEND says
import matplotlib.pyplot as plt  # noqa: E402

from reproduce.tables.cells import Record, is_number  # noqa: E402
from reproduce.tables.spec import family  # noqa: E402

COLORS = {"HRViT": "tab:red", "MiT": "tab:blue", "CSWin": "tab:green"}
AXES = (("params_m", "Params (M)"), ("gflops", "GFLOPs (paper convention, 512x512)"))


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (x, y) not dominated by a point with smaller-or-equal x and larger y, sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def series(records: Sequence[Record], x_column: str, which: str) -> dict[str, list[tuple[float, float, str]]]:
    """Per family: (x, mIoU, row label) from the paper's cells or ours, rows with both values only."""
    cells = {(r["row"], r["column"]): r for r in records}
    out: dict[str, list[tuple[float, float, str]]] = {}
    for (row, column), r in cells.items():
        if column != "ade20k_miou":
            continue
        x, y = cells[row, x_column].get(which), r.get(which)
        if is_number(x) and is_number(y):
            out.setdefault(family(row), []).append((x, y, row))
    return out


def ours_label(records: Sequence[Record]) -> str:
    profiles = sorted({r["profile"] for r in records if r["column"] == "ade20k_miou" and r.get("ours") is not None
                       and r["status"] != "reproduction"})
    return "ours" + (f" ({'+'.join(profiles)} profile: not a reproduction)" if profiles else "")


def plot(records: Sequence[Record], out_stem: Path) -> list[Path]:
    """Write ``out_stem``.png and .pdf."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    label_ours = ours_label(records)
    for ax, (column, xlabel) in zip(axes, AXES):
        for which, style, marker in (("paper", "-", "o"), ("ours", "--", "s")):
            for fam, points in sorted(series(records, column, which).items()):
                color = COLORS.get(fam, "tab:gray")
                xs, ys = zip(*pareto_front([(x, y) for x, y, _ in points]))
                ax.plot(xs, ys, style, color=color, alpha=0.8)
                ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color=color,
                           facecolors=color if which == "paper" else "none",
                           label=f"{fam} ({'paper' if which == 'paper' else label_ours})")
                for x, y, name in points:
                    ax.annotate(name, (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ADE20K mIoU (%)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=4, fontsize=7)
    fig.suptitle("Figure 5: ADE20K mIoU vs efficiency (SegFormer head, 150 classes); lines: per-family Pareto fronts",
                 fontsize=9)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths
