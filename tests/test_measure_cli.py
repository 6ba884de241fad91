"""``python -m reproduce measure`` (JSON contract, errors before any build) and ``bench`` (runs, prints a table)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import reproduce.measure
from reproduce.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_measure_json_contract():
    proc = subprocess.run([sys.executable, "-m", "reproduce", "measure", "hrvit_b1", "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert isinstance(result["params"], int) and result["params"] == 19_685_152  # official code, docs/flop-convention.md#official-code-reference-figures
    for convention in ("paper", "fvcore", "torch"):
        assert isinstance(result[f"gflops_{convention}"], float) and result[f"gflops_{convention}"] > 0
        assert convention in result["conventions"]
    assert (result["model"], result["task"], result["num_classes"], result["size"]) == ("hrvit_b1", "cls", 1000, [224, 224])
    assert result["ablate"] == [] and "window_sizes" not in result
    assert result["flop_family"] == "hrvit"
    assert {"torch", "timm", "fvcore"} <= set(result["versions"])
    assert {"stem.0", "stages.0", "head.fc"} <= set(result["breakdown"])


def test_measure_prints_a_table_without_json(capsys):
    assert main(["measure", "hrvit_b1", "--task", "seg", "--size", "64", "64", "--depth", "1"]) == 0
    out = capsys.readouterr().out
    assert "hrvit_b1 seg 19 classes 64x64" in out
    assert "GFLOPs paper" in out and "GFLOPs fvcore" in out and "GFLOPs torch" in out
    assert "backbone" in out and "decode_head" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["hrvit_b9"], "unknown model 'hrvit_b9'; available models:"),
        (["hrvit_b1", "--ablate", "mixcfn", "nope"], "unknown HRViT ablation(s) ['nope']"),
        (["hrvit_b1", "--window-sizes", "1", "2", "7"], "window_sizes must be 4 positive ints"),
        (["hrvit_b1", "--window-sizes", "1", "2", "0", "7"], "window_sizes must be 4 positive ints"),
        (["hrvit_b1", "--size", "0", "512"], "--size takes H W"),
        (["hrvit_b1", "--size", "1", "2", "3"], "--size takes H W"),
        (["hrvit_b1", "--num-classes", "0"], "--num-classes must be a positive integer"),
        (["hrvit_b1", "--depth", "0"], "--depth must be >= 1"),
        (["mit_b1", "--window-sizes", "1", "2", "9", "9"], "apply to HRViT models only"),
        (["cswin_t", "--ablate", "des"], "apply to HRViT models only"),
    ],
)
def test_measure_rejects_bad_requests_before_building(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(reproduce.measure, "_build", lambda *a, **k: pytest.fail("built a model for a bad request"))
    assert main(["measure", *argv]) == 2
    assert message in capsys.readouterr().err


def test_measure_rejects_unknown_task():
    with pytest.raises(SystemExit) as exit_info:
        main(["measure", "hrvit_b1", "--task", "det"])
    assert exit_info.value.code == 2


def test_bench_runs_and_prints_a_table(capsys):
    assert main(["bench", "--runs", "1", "--warmup", "0", "--size", "64", "64", "--models", "hrvit_b1"]) == 0
    out = capsys.readouterr().out
    assert "64x64" in out and "latency ms" in out and "peak MiB" in out
    row = next(line for line in out.splitlines() if line.startswith("hrvit_b1"))
    assert row.split()[1] == "8.15"  # params (M) of b1 + SegFormer head, 19 classes (docs/flop-convention.md#official-code-reference-figures)


def test_bench_rejects_amp_on_cpu(capsys):
    assert main(["bench", "--amp", "fp16", "--models", "hrvit_b1"]) == 2
    assert "--amp is CUDA autocast" in capsys.readouterr().err


def test_measure_reports_the_fitted_reading_of_hrnet_vit():
    """Table 6 baselines are a fitted reading of the paper: every measurement says which one."""
    fitted = reproduce.measure.measure_named("hrnet18_mit", "seg", size=(64, 64), conventions=["paper"])
    assert fitted["reading"]["block"] == "mit" and fitted["reading"]["mit_sr"] == "pool"
    assert "reading" not in reproduce.measure.measure_named("hrvit_b1", "seg", size=(64, 64), conventions=["paper"])


def _segformer_head(channels: int, embed: int, classes: int) -> int:
    """Parameters of the SegFormer head on 4 maps of ``channels`` channels in all: 1x1 projections,
    bias-free fuse conv, fuse BN, classifier."""
    return channels * embed + 4 * embed + 4 * embed * embed + 2 * embed + embed * classes + classes


def test_measure_a_timm_model_as_a_segmentation_backbone(capsys):
    assert main(["measure", "timm:resnet18", "--task", "seg", "--num-classes", "19", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    # resnet18 without fc (11,689,512 - 513,000) + the E=256 head on its stride-4..32 maps (64+128+256+512 channels)
    assert result["params"] == 11_176_512 + _segformer_head(960, 256, 19)
    assert (result["model"], result["flop_family"], result["flop_family_source"]) == ("timm:resnet18", "hrvit", "default")
    assert result["gflops_fvcore"] > 0 and {"backbone.layer4", "decode_head.linear_fuse"} <= set(result["breakdown"])


def test_measure_row_builds_a_users_factory(tmp_path, monkeypatch):
    (tmp_path / "my_backbones.py").write_text(
        "import timm\n"
        "from models.segmentation import SegmentationModel\n\n"
        "def tiny():\n"
        "    return timm.create_model('resnet18', features_only=True, out_indices=(1, 2, 3, 4))\n\n"
        "def complete():\n"
        "    return SegmentationModel(tiny(), 128, 7)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    row = reproduce.measure.measure_row({"label": "Mine", "model": "my_backbones:tiny", "flop_family": "mit",
                                         "size": [64, 64]}, conventions=["paper"])
    timm_row = reproduce.measure.measure_named("timm:resnet18", "seg", size=(64, 64), conventions=["paper"])
    assert (row["label"], row["flop_family"], row["flop_family_source"]) == ("Mine", "mit", "flag")
    assert row["params"] == timm_row["params"]
    complete = reproduce.measure.measure_named("my_backbones:complete", "seg", size=(64, 64), conventions=["paper"])
    assert complete["params"] == timm_row["params"] - _segformer_head(960, 256, 19) + _segformer_head(960, 128, 7)
    with pytest.raises(ValueError, match="needs 'label' and 'model'.*unknown: colour"):
        reproduce.measure.measure_row({"label": "x", "model": "timm:resnet18", "colour": "red"})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["timm:no_such_model_xyz"], "timm has no model 'no_such_model_xyz'"),
        (["nosuchpkg.backbones:tiny"], "cannot import 'nosuchpkg.backbones'"),
        (["reproduce.measure:NOT_THERE"], "reproduce.measure has no callable 'NOT_THERE'"),
        (["timm:resnet18", "--ablate", "des"], "apply to HRViT models only"),
    ],
)
def test_measure_rejects_bad_external_models_before_building(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(reproduce.measure, "_build", lambda *a, **k: pytest.fail("built a model for a bad request"))
    assert main(["measure", *argv]) == 2
    assert message in capsys.readouterr().err


def _readme_python(heading: str) -> str:
    """The python code block of one README subsection."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_add_your_model_example_runs(capsys):
    exec(compile(_readme_python("### Your own model"), "README.md", "exec"), {})
    label, params, _, source = capsys.readouterr().out.split()
    assert (label, int(params), source) == ("ResNet-18", 11_176_512 + _segformer_head(960, 256, 19), "flag")


def test_readme_published_weights_example_runs(capsys):
    exec(compile(_readme_python("### Which weights exist"), "README.md", "exec"), {})
    assert capsys.readouterr().out.split()[-1] == "hrvit-repro"
