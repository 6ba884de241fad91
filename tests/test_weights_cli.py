"""Published weights through the commands: ``finetune --pretrained`` from every published format
starts from those weights and records ``init``; ``evaluate --weights`` scores a fine-tuned mmseg
checkpoint without training; a file that does not fit fails with one error line.

The fixtures are test_weights.py's (the suite models' own state renamed into each published format);
its tests prove the conversions exact, these prove the commands use them.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import _assert_one_line_error
from test_weights import _backbone_state, _cls, _head_to_mmseg, _hrvit_official, _official_cswin_key, _official_hrvit_key, _seg

from models.weights import sha256
from reproduce.train.checkpointing import save_weights
from reproduce.cli import main
from reproduce.tables.status import init_of

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 2 iterations of 64 px crops on 4 generated scenes; an lr of 1e-12 leaves the loaded weights in place
# (to ~1e-11), so the fine-tuned backbone shows which weights the run started from.
TINY = ["--profile", "smoke", "--dataset", "synthetic", "--synthetic-size", "4", "--batch-size", "2", "--iters", "2", "--lr", "1e-12"]
CLASSES = 7  # the synthetic scenes' classes
BN_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")  # updated by the training forward passes


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


def _mmseg(seg: torch.nn.Module, segformer: bool) -> dict:
    """A fine-tuned segmentation model as an mmseg checkpoint (SegFormer's or the official HRViT's keys)."""
    rename = (lambda k: k) if segformer else _official_hrvit_key
    backbone = {f"backbone.{rename(k)}": v for k, v in _backbone_state(seg).items()}
    head = {f"decode_head.{k}": v for k, v in _head_to_mmseg(seg.decode_head.state_dict(), segformer).items()}
    return {"state_dict": {**backbone, **head}, "meta": {}}


def _hrvit_official_file(path: Path) -> dict:
    torch.save({"state_dict_ema": _hrvit_official(_cls("hrvit_b1")), "epoch": 299}, path)
    return _cls("hrvit_b1").state_dict()


def _mmseg_file(name: str, segformer: bool, path: Path) -> dict:
    """A fine-tuned ``name`` as an mmseg checkpoint; returns its backbone state."""
    seg = _seg(name, CLASSES)
    torch.save(_mmseg(seg, segformer), path)
    return _backbone_state(seg)


def _mit_nvlabs_file(path: Path) -> dict:
    torch.save(_cls("mit_b0").state_dict(), path)
    return _cls("mit_b0").state_dict()


def _cswin_file(path: Path) -> dict:
    torch.save({"state_dict_ema": {_official_cswin_key(k): v for k, v in _cls("cswin_ti").state_dict().items()}}, path)
    return _cls("cswin_ti").state_dict()


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.parametrize("fmt, model, write", [
    ("hrvit-official", "hrvit_b1", _hrvit_official_file),
    ("hrvit-official-mmseg", "hrvit_b1", functools.partial(_mmseg_file, "hrvit_b1", False)),
    ("mit-nvlabs", "mit_b0", _mit_nvlabs_file),
    ("segformer-mmseg", "mit_b0", functools.partial(_mmseg_file, "mit_b0", True)),
    ("cswin-official", "cswin_ti", _cswin_file),
])
def test_finetune_starts_from_published_weights_and_records_init(tmp_path, data, fmt, model, write):
    path = tmp_path / f"{model}.pth"
    source = write(path)
    out = tmp_path / "ft"
    assert main(["finetune", "--model", model, *TINY, "--pretrained", str(path), "--data-root", str(data), "--output", str(out)]) == 0
    metrics = _metrics(out)
    assert metrics["init"] == {"format": fmt, "file": str(path), "sha256": sha256(path)} and metrics["pretrained"] is None
    assert init_of(metrics) == metrics["init"]  # what the tables read
    backbone = {k[len("backbone.model."):]: v for k, v in load_file(out / "model.safetensors").items() if k.startswith("backbone.model.")}
    weights = [k for k in backbone if not k.endswith(BN_STATISTICS)]
    assert all(k.startswith("stage_norms.") for k in weights if k not in source)  # CSWin's seg-only norms: not in its ImageNet file
    for key in (k for k in weights if k in source):
        torch.testing.assert_close(backbone[key], source[key], rtol=0, atol=1e-6, msg=key)


def test_finetune_takes_the_backbone_of_a_suite_segmentation_run(tmp_path, data):
    seg = _seg("mit_b0", 19)  # a run on another dataset: its decode head does not fit, its backbone does
    path = tmp_path / "model.safetensors"
    save_weights(path, {"task": "seg", "model": "mit_b0", "model_settings": {"ablate": []}, "profile": "smoke",
                        "num_classes": 19, "model_state": seg.state_dict()})
    out = tmp_path / "ft"
    assert main(["finetune", "--model", "mit_b0", *TINY, "--pretrained", str(path), "--data-root", str(data), "--output", str(out)]) == 0
    metrics = _metrics(out)
    assert metrics["init"]["format"] == "hrvit-repro" and metrics["pretrained"]["source_task"] == "seg"
    assert metrics["pretrained"]["dropped"] == sorted(k for k in seg.state_dict() if k.startswith("decode_head."))
    assert metrics["pretrained"]["missing"] == []
    source = _backbone_state(seg)
    backbone = {k[len("backbone.model."):]: v for k, v in load_file(out / "model.safetensors").items() if k.startswith("backbone.model.")}
    for key in (k for k in backbone if not k.endswith(BN_STATISTICS)):
        torch.testing.assert_close(backbone[key], source[key], rtol=0, atol=1e-6, msg=key)


def test_evaluate_weights_scores_an_mmseg_checkpoint_like_the_same_weights_in_suite_format(tmp_path, data):
    seg = _seg("mit_b0", CLASSES)
    mmseg, suite = tmp_path / "segformer.b0.synthetic.pth", tmp_path / "suite.pt"
    torch.save(_mmseg(seg, segformer=True), mmseg)
    torch.save({"format": "hrvit-repro-checkpoint/1", "model_state": seg.state_dict()}, suite)
    common = ["--model", "mit_b0", "--dataset", "synthetic", "--synthetic-size", "4", "--data-root", str(data)]
    assert main(["evaluate", "--weights", str(mmseg), *common, "--output", str(tmp_path / "ev")]) == 0
    assert main(["evaluate", "--weights", str(suite), *common, "--output", str(tmp_path / "ev-suite")]) == 0
    published, ours = _metrics(tmp_path / "ev"), _metrics(tmp_path / "ev-suite")
    assert published["init"] == {"format": "segformer-mmseg", "file": str(mmseg), "sha256": sha256(mmseg)}
    assert published["weights"]["kept_init"] == [] and published["weights"]["into"] == "segmentation model"
    assert published["source"] == "published weights, evaluated" and "source" not in ours and ours["init"]["format"] == "hrvit-repro"
    assert published["checkpoint"] is None and published["model"] == "mit_b0" and published["eval_images"] == 4
    assert published["recipe"]["test_mode"] == "slide" and published["recipe"]["test_crop"] == 64  # the paper's test recipe
    assert 0.0 <= published["miou"] <= 1.0 and len(published["per_class_iou"]) == CLASSES
    for key in ("miou", "per_class_iou", "pixel_accuracy"):
        assert published[key] == ours[key], key


@pytest.mark.parametrize("case", ["unreadable", "other family", "backbone only", "no model", "classes"])
def test_a_file_that_does_not_fit_is_one_error_line(tmp_path, data, capsys, case):
    path = tmp_path / "weights.pth"
    out = ["--data-root", str(tmp_path / "fresh"), "--output", str(tmp_path / "out")]
    if case == "unreadable":
        path.write_text("<html>403 Forbidden</html>")  # what a failed download leaves
        argv, message = ["finetune", "--model", "mit_b0", *TINY, "--pretrained", str(path)], "is not a readable PyTorch checkpoint"
    elif case == "other family":
        _cswin_file(path)
        argv, message = ["finetune", "--model", "hrvit_b1", *TINY, "--pretrained", str(path)], "cannot load a cswin-official checkpoint"
    elif case == "backbone only":
        _mit_nvlabs_file(path)
        argv, message = ["evaluate", "--weights", str(path), "--model", "mit_b0"], "holds backbone weights only"
    elif case == "no model":
        _mmseg_file("mit_b0", True, path)
        argv, message = ["evaluate", "--weights", str(path)], "--weights needs --model NAME"
    else:
        torch.save(_mmseg(_seg("mit_b0", 5), segformer=True), path)
        argv, message = ["evaluate", "--weights", str(path), "--model", "mit_b0"], "predicts 5 classes but the model has 7"
    assert main(argv + out) == 2
    _assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "fresh").exists() and not (tmp_path / "out").exists()  # nothing made, nothing half-written
