"""``python -m reproduce export``: a model as ONNX with free batch, height and width.

The model is built and loaded the way the other commands do it (``models.build_model``; ``--checkpoint``
through ``models.weights``: a segmentation checkpoint with its decode head for ``--task seg``, any
accepted classifier checkpoint for ``--task cls``). It is recorded with torch's tracing ONNX exporter,
whose graph is valid at any input size only if the model computes sizes, padding and masks from the
input's shape inside the graph (HRViT's stripe padding does so while it is traced). The command
therefore checks its own output: with onnxruntime installed it runs the ONNX model at two sizes that
differ from the traced one in batch, height and width (one that no stride or window divides) and
compares with PyTorch, failing when they disagree. ``--fuse-bn`` exports the merged inference copy
(``models.fuse``) and compares it with the model as built, so the check covers the merging too.

Outputs are those of ``model(x)``: classifier logits (B, classes), or segmentation logits at stride 4
(B, classes, ~H/4, ~W/4) as ``SegmentationModel.forward`` gives them.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

from reproduce.cli import UsageError
from reproduce.measure import DEFAULT_CLASSES

TRACE_INPUT = (2, 64, 96)  # batch, height, width the graph is recorded at
CHECK_INPUTS = ((1, 97, 131), (3, 72, 104))  # sizes no stride or window divides, batches other than the traced one
TOLERANCE = 1e-4  # largest |onnx - torch| accepted, relative to the largest |torch| output (fp32 kernels differ)
INPUT_NAME, OUTPUT_NAME = "image", "logits"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME", help="a suite model name (e.g. hrvit_b1, mit_b0, cswin_ti), timm:<name> "
                        "or PKG.MODULE:FACTORY")
    parser.add_argument("--task", choices=("cls", "seg"), default="seg", help="classifier or backbone + SegFormer head (default seg)")
    parser.add_argument("--num-classes", type=int, metavar="N", help="default 1000 for cls, 19 for seg; must match --checkpoint "
                        "(a classifier head of another width is dropped with a notice and left at init)")
    parser.add_argument("--checkpoint", type=Path, metavar="FILE", help="weights to export (any format models.weights reads; seg: a "
                        "fine-tuned segmentation checkpoint, decode head included); default: the model as initialised")
    parser.add_argument("--window-sizes", nargs=4, type=int, default=None, metavar=("A", "B", "C", "D"), help="HRViT only: stripe width per branch, e.g. 1 2 9 9")
    parser.add_argument("--ablate", nargs="+", default=[], metavar="NAME", help="HRViT techniques removed in the checkpoint's model (Table 5)")
    parser.add_argument("--opset", type=int, default=None, metavar="N", help="ONNX opset (default: torch's)")
    parser.add_argument("--fuse-bn", action="store_true", help="export the merged inference copy (models/fuse.py: BatchNorms "
                        "folded, MixCFN and SegFormer-head convolutions merged); it is checked against the model as built")
    parser.add_argument("--output", type=Path, required=True, metavar="F.onnx", help="the .onnx file to write")


def _check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every argument checked before the model is built; returns the model's option kwargs."""
    from models.factory import check_model_name, is_external
    from models.hrvit import option_kwargs

    if importlib.util.find_spec("onnx") is None:
        raise UsageError("export needs the onnx package; install it with pip install -e '.[export]'")
    try:
        check_model_name(args.model)
        kwargs = option_kwargs(args.model, args.ablate, args.window_sizes)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if args.num_classes is not None and args.num_classes < 1:
        raise UsageError(f"--num-classes must be a positive integer, got {args.num_classes}")
    if args.checkpoint is not None:
        if is_external(args.model):
            raise UsageError(f"--checkpoint loads suite models only; {args.model} is built outside the suite, drop --checkpoint")
        if not args.checkpoint.is_file():
            raise UsageError(f"--checkpoint {args.checkpoint} does not exist; pass a weights file (e.g. a run's model.safetensors)")
    if args.output.is_dir():
        raise UsageError(f"--output {args.output} is a folder; name the .onnx file to write")
    if args.output.suffix != ".onnx":
        raise UsageError(f"--output {args.output} must end in .onnx")
    return kwargs


def build_for_export(name: str, task: str, num_classes: int | None, checkpoint: Path | None,
                     **model_kwargs: Any) -> Any:
    """The model in eval mode with ``checkpoint`` loaded by the suite's own loaders (WeightsError on a
    file that does not fit)."""
    from models.factory import build_model
    from models.weights import load_segmentation_weights

    if checkpoint is not None and task == "cls":  # timm's file overlay: every format the family's filter reads
        # timm drops a classifier whose width differs from its cfg's: the cfg states the width asked for
        classes = DEFAULT_CLASSES["cls"] if num_classes is None else num_classes
        model_kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(checkpoint), num_classes=classes))
    model = build_model(name, task, num_classes=num_classes, **model_kwargs)
    if checkpoint is not None and task == "seg":
        load_segmentation_weights(model, checkpoint, name)
    return model.eval()


def export_onnx(model: Any, path: Path, opset: int | None = None) -> None:
    """Record ``model`` as ONNX at ``TRACE_INPUT`` with batch, height and width left free."""
    import torch

    batch, height, width = TRACE_INPUT
    example = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out_dims = {0: "batch"} if model(example).ndim == 2 else {0: "batch", 2: "out_height", 3: "out_width"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # the tracer's per-op warnings and the exporter's deprecation notice
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=opset,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: out_dims})


def compare_with_torch(model: Any, path: Path, inputs: Sequence[tuple[int, int, int]] = CHECK_INPUTS) -> list[dict[str, Any]]:
    """Run the ONNX file with onnxruntime and ``model`` on the same random inputs: one record per
    (batch, height, width) with the shapes, the largest |difference| and the largest |torch output|."""
    import numpy as np
    import onnxruntime
    import torch

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 4  # a failing node is reported in the record, not in onnxruntime's log
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(1)
    records = []
    for batch, height, width in inputs:
        x = torch.randn(batch, 3, height, width, generator=generator)
        with torch.no_grad():
            expected = model(x).numpy()
        record = {"input": [batch, 3, height, width], "torch_shape": list(expected.shape), "onnx_shape": None,
                  "max_abs_diff": float("inf"), "max_abs_torch": float(np.abs(expected).max()), "error": None}
        try:
            got = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
        except Exception as err:  # onnxruntime's errors derive from Exception only
            record["error"] = str(err).strip().splitlines()[0]
        else:
            record["onnx_shape"] = list(got.shape)
            if got.shape == expected.shape:
                record["max_abs_diff"] = float(np.abs(got - expected).max())
        records.append(record)
    return records


def _agrees(record: dict[str, Any]) -> bool:
    return record["max_abs_diff"] <= TOLERANCE * max(1.0, record["max_abs_torch"])


def run(args: argparse.Namespace) -> int:
    from models.weights import WeightsError

    kwargs = _check_args(args)
    try:
        model = build_for_export(args.model, args.task, args.num_classes, args.checkpoint, **kwargs)
    except WeightsError as err:
        raise UsageError(f"--checkpoint {' '.join(str(err).split())}") from err
    except ValueError as err:  # an external model that cannot be built as asked
        raise UsageError(str(err)) from err
    from models.fuse import fuse_for_inference

    export_onnx(fuse_for_inference(model) if args.fuse_bn else model, args.output, args.opset)
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MiB): {INPUT_NAME} [batch, 3, height, width] "
          f"-> {OUTPUT_NAME}, traced at {'x'.join(map(str, TRACE_INPUT[1:]))}{', merged inference copy' if args.fuse_bn else ''}")
    if importlib.util.find_spec("onnxruntime") is None:
        print("not checked: onnxruntime is not installed (pip install -e '.[export]' to check the export)")
        return 0
    failed = False
    for record in compare_with_torch(model, args.output):
        batch, _, height, width = record["input"]
        ok = _agrees(record)
        failed |= not ok
        outcome = (f"onnxruntime failed: {record['error']}" if record["error"] else
                   f"output {record['onnx_shape']} (torch {record['torch_shape']}), max |difference| "
                   f"{record['max_abs_diff']:.2e}")
        print(f"onnxruntime vs torch, batch {batch} at {height}x{width}: {outcome}: {'ok' if ok else 'MISMATCH'}")
    if failed:
        print(f"error: the ONNX model does not reproduce PyTorch (tolerance {TOLERANCE:g} of the largest output); "
              f"{args.model} computes something from the traced input size that the graph fixed", file=sys.stderr)
        return 1
    return 0
