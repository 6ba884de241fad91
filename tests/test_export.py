"""``python -m reproduce export``: the ONNX model gives PyTorch's outputs at sizes other than the traced
one, with the checkpoint's weights, and bad requests stop with one line before anything is built."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from models import build_model
from reproduce import cli
from reproduce.export import INPUT_NAME, OUTPUT_NAME, TRACE_INPUT

onnxruntime = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

CLASSES = 3


def _seeded(name: str, task: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, task, num_classes=CLASSES).eval()
    with torch.no_grad():  # HRViT's attention starts as exactly zero: make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model


def _save(model: torch.nn.Module, task: str, path) -> None:
    if task == "seg":  # this suite's run checkpoint
        torch.save({"format": "hrvit-repro-checkpoint/1", "model_state": model.state_dict()}, path)
    else:  # a bare classifier state dict, as NVlabs publish MiT
        torch.save(model.state_dict(), path)


@pytest.mark.parametrize("name,task,flags", [("hrvit_b1", "seg", []), ("mit_b0", "seg", []), ("cswin_ti", "seg", []), ("mit_b0", "cls", []),
                                             ("hrvit_b1", "seg", ["--fuse-bn"])])
def test_export_matches_pytorch_at_sizes_no_stride_or_window_divides(name, task, flags, tmp_path, capsys):
    """With --fuse-bn the merged inference copy is exported and still matches the model as built."""
    source = _seeded(name, task)
    checkpoint, onnx_file = tmp_path / "weights.pt", tmp_path / "out" / f"{name}.onnx"
    _save(source, task, checkpoint)

    status = cli.main(["export", "--model", name, "--task", task, "--num-classes", str(CLASSES),
                       "--checkpoint", str(checkpoint), "--output", str(onnx_file), *flags])
    out = capsys.readouterr()
    assert status == 0, out.out + out.err
    assert "97x131" in out.out and "MISMATCH" not in out.out
    assert ("merged inference copy" in out.out) == bool(flags)
    if flags:  # no BatchNormalization node is left
        assert "BatchNormalization" not in {node.op_type for node in onnx.load(str(onnx_file)).graph.node}

    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for batch, height, width in [(1, 97, 131), (TRACE_INPUT[0] + 1, 45, 70)]:
        x = torch.randn(batch, 3, height, width)
        with torch.no_grad():
            expected = source(x).numpy()
        got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)


def test_export_without_onnxruntime_writes_the_file_and_says_it_is_unchecked(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # find_spec then reports it missing
    onnx_file = tmp_path / "resnet.onnx"
    status = cli.main(["export", "--model", "timm:resnet18", "--task", "cls", "--num-classes", "2", "--output", str(onnx_file)])
    assert status == 0 and onnx_file.stat().st_size > 0
    assert "not checked: onnxruntime is not installed" in capsys.readouterr().out


def _backbone_only(path) -> list[str]:
    torch.save(build_model("mit_b0", "cls").state_dict(), path)
    return ["--model", "mit_b0", "--checkpoint", str(path)]


@pytest.mark.parametrize("case,expected", [
    (lambda tmp: ["--model", "mit_b0", "--output", str(tmp / "model.pt")], "must end in .onnx"),
    (lambda tmp: ["--model", "mit_b0", "--output", str(tmp)], "is a folder"),
    (lambda tmp: ["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (lambda tmp: ["--model", "mit_b0", "--ablate", "des"], "apply to HRViT models only"),
    (lambda tmp: ["--model", "mit_b0", "--num-classes", "0"], "--num-classes must be a positive integer"),
    (lambda tmp: ["--model", "mit_b0", "--checkpoint", str(tmp / "missing.pt")], "missing.pt does not exist"),
    (lambda tmp: ["--model", "timm:resnet18", "--checkpoint", str(tmp)], "loads suite models only"),
    (lambda tmp: _backbone_only(tmp / "mit_b0.pth"), "holds backbone weights only"),
], ids=["suffix", "folder", "model", "ablate", "classes", "missing", "external", "backbone-only"])
def test_bad_request_is_one_line_exit_2_and_writes_nothing(case, expected, tmp_path, capsys):
    args = case(tmp_path)
    if "--output" not in args:
        args += ["--output", str(tmp_path / "out.onnx")]
    assert cli.main(["export", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    assert not list(tmp_path.glob("*.onnx"))
