"""What each regenerated table contains: its paper CSV, its rows, and where each of our cells comes from.

One place for the mapping "paper cell -> our measurement or run". The DVC stages (dvc.yaml) name the
same run folders; ``tests/test_pipeline.py`` checks that the two agree.

Run names are the keys of ``pretrain`` / ``cityscapes`` / ``ade20k`` in params.yaml; their results live
in ``results/pretrain/<run>/metrics.json`` and ``results/finetune/<dataset>/<run>/metrics.json``.
Measurements of table ``T`` live in ``results/measure/T.json`` (one entry per row label).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
PAPER_DIR = REPO_ROOT / "tables" / "paper"

# Efficiency tolerances: params within 0.05 M, GFLOPs within 1 % of the paper's cell, both under the
# paper's counting convention (docs/flop-convention.md). The HRNet-ViT baselines of Table 6 are a reading
# fitted to the paper's cells (docs/hrnet-vit-fit.md): they get the signed difference and no verdict.
DEFAULT_TOLERANCE = {"params_abs_m": 0.05, "gflops_rel": 0.01}

# How the paper convention counts each family (reproduce/flops.py PAPER_RULES), for the tables' legends.
COUNTING_RULES = {
    "HRViT": "mmcv-1.3 module hooks with LayerNorm counted and BatchNorm not (SyncBN in the published runs), "
             "plus one of the two attention matmuls",
    "CSWin": "as HRViT (the HRViT authors re-counted CSWin): LayerNorm counted, BatchNorm not, one attention matmul",
    "MiT": "SegFormer's own figures: mmcv-1.2.7 hooks (LayerNorm not counted), BatchNorm not counted, "
           "both attention matmuls",
    "HRNet-MiT": "HRViT's hooks (LayerNorm counted, BatchNorm not) with the MiT attention counted as SegFormer "
                 "does (both matmuls)",
    "HRNet-CSWin": "HRViT's hooks (LayerNorm counted, BatchNorm not) with one attention matmul",
}

ACCURACY_COLUMNS = {"imagenet_top1": "pretrain", "cityscapes_miou": "cityscapes", "ade20k_miou": "ade20k"}
EFFICIENCY_COLUMNS = ("params_m", "gflops")
METRIC_KEY = {"pretrain": "top1", "cityscapes": "miou", "ade20k": "miou"}


@dataclass(frozen=True)
class Measure:
    """How the paper measured a row: task, classes and input size (the architecture comes from params.yaml)."""

    task: str = "seg"
    num_classes: int = 19
    size: tuple[int, int] = (512, 512)


@dataclass(frozen=True)
class Row:
    label: str  # the paper CSV's row label
    model: str  # the pretrain run whose architecture is measured (params.yaml ``pretrain`` key)
    measure: Measure
    runs: dict[str, str] = field(default_factory=dict)  # accuracy column -> run name
    window_run: str | None = None  # cityscapes/ade20k run whose window sizes the measurement uses
    fitted: bool = False  # a fitted baseline (wider tolerance)
    note: str = ""
    flop_family: str | None = None  # set on a user's row (params.yaml extra_rows): its paper-convention rule

    @property
    def extra(self) -> bool:
        """A user's row: ``model`` is a model name (e.g. timm:convnext_tiny), there is no paper cell."""
        return self.flop_family is not None


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    csv: str
    key: str  # CSV column with the row labels
    columns: tuple[str, ...]  # CSV value columns, in paper order
    rows: tuple[Row, ...]
    notes: tuple[str, ...] = ()
    fair: Measure | None = None  # the one setting of the "all backbones at one setting" view (None: rows differ in none)

    def row(self, label: str) -> Row:
        for row in self.rows:
            if row.label == label:
                return row
        raise KeyError(f"{self.name} has no row {label!r}; rows: {[r.label for r in self.rows]}")


CLS224 = Measure("cls", 1000, (224, 224))
SEG19 = Measure("seg", 19, (512, 512))
SEG150 = Measure("seg", 150, (512, 512))

HRVIT = {"HRViT-b1": "hrvit_b1", "HRViT-b2": "hrvit_b2", "HRViT-b3": "hrvit_b3"}
MIT = {f"MiT-B{i}": f"mit_b{i}" for i in range(5)}
CSWIN = {"CSWin-Ti": "cswin_ti", "CSWin-T": "cswin_t", "CSWin-S": "cswin_s"}
HRNET = {f"HRNet{w}-{f}": f"hrnet{w}_{f.lower()}" for w in (18, 32, 40) for f in ("MiT", "CSWin")}
# Table 5 row label -> (pretrain/cityscapes run name, ablation name of models.hrvit)
ABLATION_ROWS = {
    "HRViT-b1": ("hrvit_b1", None),
    "- Key-value sharing": ("hrvit_b1-no_kv_sharing", "kv_sharing"),
    "- Eff. patch embed": ("hrvit_b1-no_eff_patch_embed", "eff_patch_embed"),
    "- MixCFN": ("hrvit_b1-no_mixcfn", "mixcfn"),
    "- Parallel CONV path": ("hrvit_b1-no_parallel_conv", "parallel_conv"),
    "- Nonlinearity/BN": ("hrvit_b1-no_nonlinearity_bn", "nonlinearity_bn"),
    "- Dense fusion": ("hrvit_b1-no_dense_fusion", "dense_fusion"),
    "- DES": ("hrvit_b1-no_des", "des"),
    "- All block opt.": ("hrvit_b1-no_all", "all"),
}
TABLE4_ORDER = ("MiT-B0", "MiT-B1", "CSWin-Ti", "HRViT-b1", "MiT-B2", "CSWin-T", "HRViT-b2", "MiT-B3", "MiT-B4",
                "CSWin-S", "HRViT-b3")
TABLE6_ORDER = ("HRNet18-MiT", "HRNet18-CSWin", "HRViT-b1", "HRNet32-MiT", "HRNet32-CSWin", "HRViT-b2",
                "HRNet40-MiT", "HRNet40-CSWin", "HRViT-b3")
WINDOWS = {7: "hrvit_b3-w7", 9: "hrvit_b3", 11: "hrvit_b3-w11", 13: "hrvit_b3-w13", 15: "hrvit_b3-w15"}


def _cs_row(label: str, run: str, measure: Measure = SEG19, **kw) -> Row:
    window_run = run if run.startswith("hrvit") else None  # only HRViT has window sizes
    return Row(label, run, measure, {"imagenet_top1": run, "cityscapes_miou": run}, window_run=window_run, **kw)


TABLES: dict[str, Table] = {
    t.name: t
    for t in (
        Table(
            "table3_pretrain", "Table 3: ImageNet-1K classification (224x224)", "table3_imagenet.csv", "variant",
            ("params_m", "gflops", "imagenet_top1"),
            tuple(Row(label, run, CLS224, {"imagenet_top1": run}) for label, run in HRVIT.items()),
            ("Params include the HRNetV2-style classification head (1000 classes).",),
        ),
        Table(
            "table4_cityscapes", "Table 4: Cityscapes semantic segmentation (SegFormer head)", "table4_cityscapes.csv",
            "backbone", ("params_m", "gflops", "cityscapes_miou"),
            tuple(
                _cs_row(label, run) if label in HRVIT
                else Row(label, run, SEG150, {"cityscapes_miou": run},
                         note="efficiency measured with the 150-class head: the paper's MiT/CSWin cells are ADE20K-config figures")
                for label, run in ((label, {**HRVIT, **MIT, **CSWIN}[label]) for label in TABLE4_ORDER)
            ),
            ("MiT/CSWin params/GFLOPs are the 150-class (ADE20K-config) figures, as printed in the paper; "
             "HRViT's are 19-class. HRViT-b3 uses windows 1-2-9-9 (paper text).",),
            fair=SEG19,
        ),
        Table(
            "table5_ablation", "Table 5: HRViT-b1 ablation (ImageNet top-1, Cityscapes mIoU)", "table5_ablation.csv",
            "variant", ("params_m", "gflops", "imagenet_top1", "cityscapes_miou"),
            tuple(_cs_row(label, run) for label, (run, _) in ABLATION_ROWS.items()),
            ("Each row removes one technique; the reading of each row, the alternatives and why: "
             "docs/table5-readings.md.",),
        ),
        Table(
            "table6_hrnet_vit", "Table 6: HRViT vs HRNetV2 with MiT/CSWin blocks", "table6_hrnet_vit.csv", "backbone",
            ("params_m", "gflops", "imagenet_top1", "cityscapes_miou"),
            tuple(
                _cs_row(label, run, fitted=label in HRNET)
                for label, run in ((label, {**HRVIT, **HRNET}[label]) for label in TABLE6_ORDER)
            ),
            ("HRNet-ViT rows are a construction fitted to this table's params/GFLOPs (docs/hrnet-vit-fit.md): "
             "their efficiency cells show the signed difference, marked fitted, with no tolerance verdict.",),
            fair=SEG19,
        ),
        Table(
            "table7_window", "Table 7: HRViT-b3 window size of the MR/LR branches (Cityscapes)", "table7_window.csv",
            "window_size_mr_lr", ("gflops", "cityscapes_miou"),
            tuple(Row(str(s), "hrvit_b3", SEG19, {"cityscapes_miou": run}, window_run=run) for s, run in WINDOWS.items()),
        ),
        Table(
            "fig5_ade20k", "Figure 5: ADE20K mIoU vs params and GFLOPs (150 classes, 512x512)", "fig5_ade20k.csv",
            "backbone", ("params_m", "gflops", "ade20k_miou"),
            tuple(
                Row(label, run, SEG150, {"ade20k_miou": run} if label not in CSWIN else {},
                    note="" if label not in CSWIN else "no ADE20K mIoU in the paper; efficiency only")
                for label, run in {**MIT, **HRVIT, **CSWIN}.items()
            ),
            fair=SEG150,
        ),
    )
}

# Tables a user's own backbone can join (params.yaml ``extra_rows``): the backbone comparisons.
EXTRA_TABLES = ("table4_cityscapes", "table6_hrnet_vit", "fig5_ade20k")
EXTRA_ROW_KEYS = {"label", "model", "flop_family", "runs"}
DEFAULT_EXTRA_FAMILY = "hrvit"  # the HRViT paper's own counting rule (mmcv-1.3 hooks), as `measure` defaults to


def with_extra_rows(table: Table, rows: Sequence[dict[str, Any]]) -> Table:
    """``table`` plus a user's rows (``{label, model, flop_family?, runs?: {column: run}}``), measured at the
    table's shared setting and shown with ours only (no paper cell to compare with)."""
    if not rows:
        return table
    setting = table.fair or table.rows[0].measure
    extra = tuple(Row(r["label"], r["model"], setting, dict(r.get("runs") or {}),
                      flop_family=r.get("flop_family") or DEFAULT_EXTRA_FAMILY,
                      note=f"your row (params.yaml extra_rows): {r['model']}, no paper cell") for r in rows)
    return dataclasses.replace(table, rows=table.rows + extra)


def resolve(name: str, params: dict[str, Any] | None = None) -> Table:
    """Table ``name`` with the user's rows of ``params["extra_rows"][name]``, if any."""
    return with_extra_rows(TABLES[name], ((params or {}).get("extra_rows") or {}).get(name) or ())


FIGURE = "fig5_ade20k"
ABLATION = "table5_ablation"  # also drawn as a figure of deltas against the full model
CLAIMS = "claims"
TARGETS = (*TABLES, CLAIMS)


def runs_needed(table: Table) -> dict[str, set[str]]:
    """Run names per kind (pretrain / cityscapes / ade20k) whose metrics the table reads."""
    needed: dict[str, set[str]] = {kind: set() for kind in METRIC_KEY}
    for row in table.rows:
        for column, run in row.runs.items():
            if column in table.columns:
                needed[ACCURACY_COLUMNS[column]].add(run)
    return needed


def model_family(model: str) -> str:
    """Backbone family of a params.yaml pretrain run (hrvit_b1-no_mixcfn -> HRViT, hrnet18_mit -> HRNet-MiT)."""
    prefix, _, rest = model.partition("_")
    if prefix.startswith("hrnet"):
        return "HRNet-" + {"mit": "MiT", "cswin": "CSWin"}[rest]
    return {"hrvit": "HRViT", "mit": "MiT", "cswin": "CSWin"}[prefix]


def family(label: str) -> str:
    """Backbone family of a row label, for plots (HRViT, MiT, CSWin, HRNet-MiT, HRNet-CSWin)."""
    if label.startswith("HRNet"):
        return "HRNet-" + label.split("-", 1)[1]
    return label.split("-", 1)[0]
