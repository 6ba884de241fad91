"""Every command that reads a weights file or a model name answers a bad one with one ``error:`` line
naming it and what was expected (exit status 2, no traceback), before any data is made; a file
whose unpickling would run code is refused in every path that reads one and its code never runs.

The matrix is two tables: commands that read a file (``FILE_COMMANDS``) x bad files (``BAD_FILES``),
and commands that read a model name (``NAME_COMMANDS``) x bad names (``BAD_NAMES``). A new command
is one row of its table.
"""
from __future__ import annotations

import argparse
import json
import pickle
import zipfile
from pathlib import Path
from typing import Callable

import pytest
import timm
import torch
from safetensors.torch import save_file
from test_train import _assert_one_line_error

from models.weights import WeightsError
from reproduce import bench
from reproduce.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MARKER = "code-ran"  # the file a planted checkpoint's unpickling would create, beside it


class _TouchesMarker:
    """Pickles to a call of ``Path.touch``: a checkpoint that runs code when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def _runs_code(path: Path, legacy: bool = False) -> None:
    state = {"format": "hrvit-repro-checkpoint/1", "model_state": {}, "payload": _TouchesMarker(path.parent / MARKER)}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)


def _truncated(write: Callable[[Path], None]) -> Callable[[Path], None]:
    def truncate(path: Path) -> None:
        write(path)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    return truncate


def _torch_file(path: Path) -> None:
    torch.save({"model_state": {"weight": torch.zeros(4096)}}, path)


def _safetensors_file(path: Path) -> None:
    save_file({"weight": torch.zeros(4096)}, str(path))


def _suite_checkpoint_without_weights(path: Path) -> None:
    torch.save({"format": "hrvit-repro-checkpoint/1", "task": "seg", "model": "mit_b0"}, path)


def _suite_weights_with_a_broken_header(path: Path) -> None:
    save_file({"weight": torch.zeros(4)}, str(path), metadata={"format": "hrvit-repro-weights/1", "meta": "{cut off"})


# name -> (file suffix, writer, the words the error must contain)
BAD_FILES: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "missing": (".pt", lambda path: None, "does not exist"),
    "empty .pt": (".pt", lambda path: path.write_bytes(b""), "is empty"),
    "empty .safetensors": (".safetensors", lambda path: path.write_bytes(b""), "is empty"),
    "truncated .pth": (".pth", _truncated(_torch_file), "is not a readable PyTorch checkpoint"),
    "truncated .safetensors": (".safetensors", _truncated(_safetensors_file), "is not a readable safetensors file"),
    "html as .bin": (".bin", lambda path: path.write_text("<html>403 Forbidden</html>"), "the file is text ('<html>403"),
    "html as .safetensors": (".safetensors", lambda path: path.write_text("<html>403</html>"), "the file is text ('<html>403"),
    "torch file as .safetensors": (".safetensors", _torch_file, "the file is a zip archive"),
    "a tensor, not a dict": (".pt", lambda path: torch.save(torch.zeros(2), path), "not a checkpoint"),
    "suite checkpoint without weights": (".pt", _suite_checkpoint_without_weights, "is in this suite's format but lacks"),
    "suite weights, broken header": (".safetensors", _suite_weights_with_a_broken_header, "'meta' header is not a JSON object"),
    "runs code": (".pt", _runs_code, "is refused: unpickling it would call"),
    "runs code, legacy format": (".pth", lambda path: _runs_code(path, legacy=True), "is refused: unpickling it would call"),
}

# name -> argv with {file} and {tmp} placeholders (export rows go here too)
FILE_COMMANDS: dict[str, list[str]] = {
    "evaluate --checkpoint": ["evaluate", "--checkpoint", "{file}", "--data-root", "{tmp}/data", "--output", "{tmp}/out"],
    "evaluate --weights": ["evaluate", "--weights", "{file}", "--model", "mit_b0", "--data-root", "{tmp}/data", "--output", "{tmp}/out"],
    "finetune --pretrained": ["finetune", "--model", "mit_b0", "--profile", "smoke", "--pretrained", "{file}",
                              "--data-root", "{tmp}/data", "--output", "{tmp}/out"],
    "export --checkpoint": ["export", "--model", "mit_b0", "--num-classes", "5", "--checkpoint", "{file}", "--output", "{tmp}/out/m.onnx"],
}


def _plant(tmp_path: Path, bad: str, name: str = "weights") -> Path:
    suffix, write, _ = BAD_FILES[bad]
    path = tmp_path / f"{name}{suffix}"
    write(path)
    return path


def _fill(argv: list[str], **values: Path) -> list[str]:
    return [arg.format(**values) for arg in argv]


def _unpickle_plainly(path: Path) -> object:
    """The saved object read by plain ``pickle``, as an unrestricted loader would (the planted
    checkpoint holds no tensors, so no storages need resolving): the zip format keeps it in
    ``*/data.pkl``, the legacy format after three header pickles."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return pickle.loads(archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl"))))
    with open(path, "rb") as f:
        for _ in range(3):  # magic number, protocol version, system info
            pickle.load(f)
        return pickle.load(f)


def test_the_planted_file_runs_code_when_unpickled_without_the_allow_list(tmp_path):
    """The fixture is real: unpickled without the allow-list, it creates the marker."""
    for bad in ("runs code", "runs code, legacy format"):
        path = _plant(tmp_path, bad)
        _unpickle_plainly(path)
        assert (tmp_path / MARKER).exists(), bad
        (tmp_path / MARKER).unlink()


@pytest.mark.parametrize("bad", BAD_FILES)
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_a_bad_weights_file_is_one_error_line_naming_it(tmp_path, capsys, command, bad):
    path = _plant(tmp_path, bad)
    assert main(_fill(FILE_COMMANDS[command], file=path, tmp=tmp_path)) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, BAD_FILES[bad][2])
    assert str(path) in err and "weights_only=False" not in err
    assert not (tmp_path / MARKER).exists()
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # refused before any work


@pytest.mark.parametrize("bad", ["runs code", "truncated .pth", "empty .pt", "a tensor, not a dict", "suite checkpoint without weights"])
def test_a_bad_checkpoint_to_resume_from_is_one_error_line_naming_it(tmp_path, capsys, bad):
    out = tmp_path / "out"
    out.mkdir()
    path = _plant(out, bad, "checkpoint")
    path.rename(out / "checkpoint.pt")
    argv = ["finetune", "--model", "mit_b0", "--profile", "smoke", "--synthetic-size", "2", "--batch-size", "2", "--iters", "1",
            "--data-root", str(tmp_path / "data"), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, BAD_FILES[bad][2])
    assert str(out / "checkpoint.pt") in err and "--no-resume" in err
    assert not (out / MARKER).exists() and not (out / "metrics.json").exists()
    assert not (tmp_path / "data").exists()  # refused before the data is generated


@pytest.mark.parametrize("bad", BAD_FILES)
def test_timm_file_overlay_refuses_a_bad_file_in_one_line(tmp_path, bad):
    path = _plant(tmp_path, bad)
    with pytest.raises(WeightsError) as info:
        timm.create_model("mit_b0", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and BAD_FILES[bad][2] in message, message
    assert not (tmp_path / MARKER).exists()


def test_evaluate_checkpoint_of_a_finished_pipeline_run_points_to_its_weights(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.safetensors").write_bytes(b"")  # what a finished stage keeps; only its existence matters here
    assert main(["evaluate", "--checkpoint", str(run / "checkpoint.pt"), "--output", str(tmp_path / "out")]) == 2
    _assert_one_line_error(capsys.readouterr().err, f"{run / 'checkpoint.pt'} does not exist; the run's weights are in {run / 'model.safetensors'}")


# name -> (model name, the words the error must contain)
BAD_NAMES: dict[str, tuple[str, str]] = {
    "unknown suite name": ("hrvit_b9", "unknown model 'hrvit_b9'; available models: "),
    "unknown timm name": ("timm:no_such_net", "timm has no model 'no_such_net'"),
    "unimportable module": ("no_such_pkg.models:build", "cannot import 'no_such_pkg.models'"),
    "no such factory": ("json:no_such_factory", "json has no callable 'no_such_factory'"),
}

# name -> argv with {model} and {tmp} placeholders
NAME_COMMANDS: dict[str, list[str]] = {
    "measure": ["measure", "{model}"],
    "bench": ["bench", "--models", "{model}"],
    "pretrain": ["pretrain", "--model", "{model}", "--data-root", "{tmp}/data", "--output", "{tmp}/out"],
    "finetune": ["finetune", "--model", "{model}", "--data-root", "{tmp}/data", "--output", "{tmp}/out"],
    "evaluate --weights": ["evaluate", "--weights", "{tmp}/w.pt", "--model", "{model}", "--output", "{tmp}/out"],
    "export": ["export", "--model", "{model}", "--output", "{tmp}/out/m.onnx"],
}


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("command", NAME_COMMANDS)
def test_a_bad_model_name_is_one_error_line_naming_it(tmp_path, capsys, command, bad):
    name, message = BAD_NAMES[bad]
    assert main(_fill(NAME_COMMANDS[command], model=name, tmp=tmp_path)) == 2
    _assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("model, message", [
    ("collections:OrderedDict", "returned a OrderedDict, not a torch nn.Module"),
    ("timm:vit_tiny_patch16_224", "does not run on a 64x64 input with --task seg (AssertionError"),
])
def test_measure_answers_a_model_that_cannot_be_measured_in_one_line(capsys, model, message):
    assert main(["measure", model, "--task", "seg", "--size", "64", "64"]) == 2
    err = capsys.readouterr().err
    _assert_one_line_error(err, message)
    assert model in err


def test_bench_times_a_timm_model():
    """What each bench worker runs, in this process (the command adds subprocesses and a matmul peak)."""
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(["--models", "timm:resnet18", "--runs", "1", "--warmup", "0", "--size", "32", "32", "--num-classes", "19"])
    bench.check_args(args)
    row = bench.bench_one({"model": "timm:resnet18", **{key: getattr(args, key) for key in bench.OPTION_KEYS}})
    assert row["model"] == "timm:resnet18" and row["params"] > 11e6 and row["gmacs"] > 0 and row["latency_s"] > 0


def test_a_model_that_cannot_run_at_the_size_is_one_bench_line(tmp_path, capsys):
    """The worker's traceback stays out of the terminal (one line names the error) and goes to --jsonl."""
    rows = tmp_path / "rows.jsonl"
    argv = ["bench", "--models", "timm:vit_tiny_patch16_224", "--size", "64", "64", "--runs", "1", "--warmup", "0",
            "--threads", "1", "--jsonl", str(rows)]
    assert main(argv) == 1  # a row not measured: exit 1, after the other rows (here none) are reported
    err = capsys.readouterr().err
    assert "Traceback" not in err and "failed: AssertionError: Input height (64) doesn't match model (224)." in err
    (record,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert record["bench"] == "failed" and "Traceback" in record["traceback"]
