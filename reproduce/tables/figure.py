"""Figure 5: ADE20K mIoU against params and against GFLOPs, per backbone family, paper values and ours.

Each family gets its Pareto front (points not beaten by a smaller model of the same family): solid for
the paper's values, dashed for ours. Our mIoU is labelled with its status (docs/statuses.md); a smoke
point shows that the pipeline runs, not the paper's accuracy.
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
# x of the GFLOPs panel per convention: the paper's own (each family's rule) or fvcore (one rule for all)
GFLOPS_LABEL = {"paper": "GFLOPs (paper convention: each family's rule, 512x512)",
                "fvcore": "GFLOPs (fvcore, one rule for every family, 512x512; ours measured)"}


def pareto_front(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (x, y) not dominated by a point with smaller-or-equal x and larger y, sorted by x."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front


def series(records: Sequence[Record], x_column: str, which: str, convention: str = "paper") -> dict[str, list[tuple[float, float, str]]]:
    """Per family: (x, mIoU, row label) from the paper's cells or ours, rows with both values only. Under
    ``convention="fvcore"`` the GFLOPs of both series are our fvcore measurement (the paper gives none)."""
    cells = {(r["row"], r["column"]): r for r in records}
    out: dict[str, list[tuple[float, float, str]]] = {}
    for (row, column), r in cells.items():
        if column != "ade20k_miou":
            continue
        x_cell = cells[row, x_column]
        x = x_cell.get("gflops_fvcore") if x_column == "gflops" and convention == "fvcore" else x_cell.get(which)
        y = r.get(which)
        if is_number(x) and is_number(y):
            out.setdefault(family(row), []).append((x, y, row))
    return out


def ours_label(records: Sequence[Record]) -> str:
    statuses = sorted({r["status"] for r in records if r["column"] == "ade20k_miou" and r.get("ours") is not None
                       and r["status"] != "reproduction"})
    return "ours" + (f" ({'+'.join(statuses)}†: not a reproduction)" if statuses else "")


def plot(records: Sequence[Record], out_stem: Path, convention: str = "paper") -> list[Path]:
    """Write ``out_stem``.png and .pdf; ``convention="fvcore"`` counts every family's GFLOPs by one rule."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), constrained_layout=True)
    label_ours = ours_label(records)
    for ax, (column, xlabel) in zip(axes, AXES):
        xlabel = GFLOPS_LABEL[convention] if column == "gflops" else xlabel
        for which, style, marker in (("paper", "-", "o"), ("ours", "--", "s")):
            for fam, points in sorted(series(records, column, which, convention).items()):
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


# ----------------------------------------------------------------------------------------- Table 5

ABLATION_PANELS = (("params_m", "Δ params (M)"), ("gflops", "Δ GFLOPs (paper convention)"),
                   ("imagenet_top1", "Δ ImageNet top-1 (pt)"), ("cityscapes_miou", "Δ Cityscapes mIoU (pt)"))


def ablation_deltas(records: Sequence[Record], base: str, which: str) -> dict[str, dict[str, float]]:
    """Per column: row -> value minus the full model's (``which``: "paper" or "ours"), rows with both values.
    Smoke runs are left out, as the tables leave out their differences: two optimizer steps measure nothing."""
    cells = {(r["row"], r["column"]): r for r in records if not (which == "ours" and r.get("status") == "smoke")}
    out: dict[str, dict[str, float]] = {}
    for column, _ in ABLATION_PANELS:
        reference = cells.get((base, column), {}).get(which)
        for (row, col), r in cells.items():
            if col == column and row != base and is_number(reference) and is_number(r.get(which)):
                out.setdefault(column, {})[row] = r[which] - reference
    return out


def accuracy_label(records: Sequence[Record]) -> str:
    """What our accuracy bars are: 'reproduction', or the statuses with a dagger (not the paper's data)."""
    statuses = sorted({r["status"] for r in records if r["kind"] == "accuracy" and r.get("ours") is not None})
    if not statuses:
        return "ours: no accuracy runs"
    return "ours: " + "+".join(s if s == "reproduction" else f"{s}†" for s in statuses)


def ablation_figure(records: Sequence[Record], base: str) -> plt.Figure:
    """Table 5 as a figure: each ablation's change against the full model, the paper's on the top row and
    ours below, every panel on its own scale (the paper's accuracy changes are fractions of a point, ours
    may be anything), smoke differences left out."""
    rows = [r["row"] for r in records if r["column"] == ABLATION_PANELS[0][0] and r["row"] != base]
    label = accuracy_label(records)
    fig, axes = plt.subplots(2, len(ABLATION_PANELS), figsize=(14, 6.5), sharey=True, constrained_layout=True)
    for ax_row, which, color in ((axes[0], "paper", "tab:gray"), (axes[1], "ours", "tab:red")):
        deltas = ablation_deltas(records, base, which)
        for ax, (column, title) in zip(ax_row, ABLATION_PANELS):
            accuracy = column not in ("params_m", "gflops")
            values = deltas.get(column, {})
            ax.barh(range(len(rows)), [values.get(row, float("nan")) for row in rows], height=0.6, color=color)
            if not values:
                ax.text(0.5, 0.5, "smoke runs or none:\nno difference shown" if accuracy and which == "ours" else "not measured",
                        transform=ax.transAxes, ha="center", va="center", fontsize=8, color="0.4")
            ax.axvline(0, color="black", linewidth=0.8)
            source = (label if accuracy else "ours (measured)") if which == "ours" else "paper"
            ax.set_title(f"{title}: {source}", fontsize=8)
            ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(rows)), rows)
    axes[0][0].invert_yaxis()
    for ax in axes[:, 0]:
        ax.tick_params(axis="y", labelsize=8)
    fig.suptitle(f"Table 5: each ablation minus {base}; top: the paper, bottom: ours (each panel on its own scale; "
                 "† = not the paper's data or recipe, docs/statuses.md)", fontsize=9)
    return fig


def plot_ablation(records: Sequence[Record], base: str, out_stem: Path) -> list[Path]:
    """Write the Table 5 figure (``ablation_figure``) to ``out_stem``.png and .pdf."""
    fig = ablation_figure(records, base)
    paths = [out_stem.with_suffix(".png"), out_stem.with_suffix(".pdf")]
    for path in paths:
        fig.savefig(path, dpi=150)
    plt.close(fig)
    return paths
