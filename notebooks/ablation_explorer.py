# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Ablation explorer (Table 5)
#
# What each removed technique costs or saves relative to the full HRViT-b1, in the paper and in our
# regenerated table, and where in the network the parameters and FLOPs move (per-module breakdown of
# the measurements in `results/measure/table5_ablation.json`). Readings of each row: docs/table5-readings.md.

# %% tags=["parameters"]
TABLES_DIR = None  # default: tables/ of this checkout
RESULTS_DIR = None  # default: results/ of this checkout

# %%
import json
from pathlib import Path

ROOT = next(p for p in (Path.cwd(), *Path.cwd().parents) if (p / "dvc.yaml").is_file())
TABLES_DIR, RESULTS_DIR = Path(TABLES_DIR or ROOT / "tables"), Path(RESULTS_DIR or ROOT / "results")

import pandas as pd

cells = pd.DataFrame(json.loads((TABLES_DIR / "table5_ablation.json").read_text())["cells"])
wide = cells.pivot(index="row", columns="column", values=["paper", "ours"])
order = list(dict.fromkeys(cells.row))
base = "HRViT-b1"

# %% [markdown]
# ## Deltas against the full model
# Params and GFLOPs in percent (variant / full − 1); top-1 and mIoU in points (variant − full).
# Accuracy deltas from runs that are not reproductions (smoke, proxy, partial: docs/statuses.md) say
# nothing about the paper's claims; proxy cells are means over seeds on generated data.

# %%
def deltas(which: str) -> pd.DataFrame:
    frame = wide[which].loc[order]
    out = pd.DataFrame(index=frame.index)
    for column in ("params_m", "gflops"):
        out[f"{column} %"] = (100 * (frame[column] / frame.at[base, column] - 1)).round(2)
    for column in ("imagenet_top1", "cityscapes_miou"):
        out[f"{column} pt"] = (frame[column] - frame.at[base, column]).round(2)
    return out


comparison = pd.concat({"paper": deltas("paper"), "ours": deltas("ours")}, axis=1)
status = sorted(cells.loc[cells.kind.eq("accuracy") & cells.ours.notna(), "status"].unique())
print("accuracy cells come from runs with status:", status)
comparison

# %% [markdown]
# ## Per-module parameters and FLOPs (paper convention)
# Difference of each variant to the full model, per top-level module of the measured network.

# %%
measure_path = RESULTS_DIR / "measure" / "table5_ablation.json"
measured = json.loads(measure_path.read_text())["rows"]


def breakdown(row: str, value: str) -> pd.Series:
    return pd.Series({module: entry[value] for module, entry in measured[row]["breakdown"].items()})


for value, scale, unit in (("params", 1e-3, "k params"), ("paper", 1.0, "GFLOPs")):
    full = breakdown(base, value)
    table = pd.DataFrame({row: (breakdown(row, value).sub(full, fill_value=0) * scale).round(3)
                          for row in order if row != base and row in measured}).fillna(0)
    print(f"change vs {base}, {unit}")
    display(table.loc[(table != 0).any(axis=1)])  # noqa: F821 (IPython)
