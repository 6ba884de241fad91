"""Dispatched ATen operators of one eager pass, counted (not timed): ``bench --count-ops``.

In eager mode every operator is one trip through PyTorch's dispatcher (and on a GPU usually one or
more kernel launches); when the work per operator is small, the CPU-side dispatch is what limits the
speed. Counting the operators is deterministic, so a test can hold a model to a budget where a timing
on a shared machine could not.

Counted with a ``TorchDispatchMode`` at the bottom of the dispatcher (after autograd, so the backward's
operators are seen as well), one entry per ATen call:

* ``compute``: every operator that is neither of the two below: it reads or writes tensor data;
* ``views``: operators whose output aliases their input (``view``, ``transpose``, ``slice``,
  ``detach``, ``_unsafe_view``, ...) and pure allocations (``empty*``): no data is touched, but each
  is a dispatch.

A forward is one call of the model in eval mode under ``torch.no_grad`` (with ``--fuse-bn``, of the
merged inference copy that ``models.fuse.fuse_for_inference`` makes); a training step is one forward in
train mode, the cross-entropy on fixed labels and the backward (no optimizer step: its
operator count depends on the optimizer's implementation, not on the model).
"""
from __future__ import annotations

import argparse
import collections
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
TOP_OPS = 8  # most frequent compute operators listed per model
VIEW_LIKE = frozenset({"_unsafe_view", "_reshape_alias"})  # views whose schema does not declare the alias


@dataclass
class OpCounts:
    """Operator calls by kind, and by operator name (``aten.<name>``) for reading where they come from."""

    compute: int = 0
    views: int = 0
    by_op: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, int]:
        return {"compute_ops": self.compute, "view_ops": self.views}


def is_view_or_allocation(func: torch._ops.OpOverload) -> bool:
    """True for operators that alias their input or only allocate memory (see the module docstring)."""
    return func.is_view or func.overloadpacket.__name__ in ALLOCATIONS | VIEW_LIKE


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts = OpCounts()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if is_view_or_allocation(func):
            self.counts.views += 1
        else:
            self.counts.compute += 1
            self.counts.by_op[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_forward(model: torch.nn.Module, x: torch.Tensor) -> OpCounts:
    """Operators of one eval-mode forward under ``torch.no_grad`` (after one uncounted warm-up call,
    so that one-off work such as lazy initialisation is not counted)."""
    model.eval()
    with torch.no_grad():
        model(x)
        with _OpCounter() as counter:
            model(x)
    return counter.counts


def count_training_step(model: torch.nn.Module, x: torch.Tensor) -> OpCounts:
    """Operators of one train-mode forward + cross-entropy + backward (after one uncounted step);
    labels are class 0 everywhere, shaped like the logits (per image, or per pixel)."""
    model.train()

    def step() -> None:
        logits = model(x)
        labels = torch.zeros((logits.shape[0], *logits.shape[2:]), dtype=torch.long, device=x.device)
        F.cross_entropy(logits, labels).backward()

    step()
    model.zero_grad(set_to_none=True)
    with _OpCounter() as counter:
        step()
    model.zero_grad(set_to_none=True)
    return counter.counts


def count_model(name: str, task: str, size: Sequence[int], batch_size: int, mode: str, num_classes: int,
                seed: int = 0, fuse_bn: bool = False) -> dict[str, Any]:
    """``count_forward`` (mode ``infer``) or ``count_training_step`` (``train``) of a model that ``bench`` builds,
    on random input; ``fuse_bn``: of its inference copy (``models.fuse.fuse_for_inference``)."""
    from models.fuse import fuse_for_inference
    from reproduce.bench import _build

    torch.manual_seed(seed)
    model = _build(name, task, num_classes)[0]
    if fuse_bn:
        model = fuse_for_inference(model)
    x = torch.randn(batch_size, 3, *size)
    counts = (count_forward if mode == "infer" else count_training_step)(model, x)
    return {"model": name, "fused_bn": fuse_bn, **counts.as_dict(), "top_ops": dict(counts.by_op.most_common(TOP_OPS))}


def run(args: argparse.Namespace) -> int:
    """``bench --count-ops``: the counts of every ``--models`` entry for ``--mode``, ``--task``, ``--size`` and
    ``--batch-size``, as a table or (``--json``) one JSON object."""
    what = "forward (eval, no_grad)" if args.mode == "infer" else "training step (train mode, forward + cross-entropy + backward)"
    if args.fuse_bn:
        what += " of the inference copy (models/fuse.py)"
    rows = [count_model(name, args.task, args.size, args.batch_size, args.mode, args.num_classes, fuse_bn=args.fuse_bn)
            for name in args.models]
    result = {"counted": f"dispatched ATen operators of one {what}", "task": args.task, "size": list(args.size),
              "batch_size": args.batch_size, "mode": args.mode, "torch": torch.__version__, "results": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.task} {what}, batch {args.batch_size}, {args.size[0]}x{args.size[1]}, torch {torch.__version__}: "
          f"dispatched ATen operators (compute = all but views and allocations)")
    for row in rows:
        top = ", ".join(f"{op} {n}" for op, n in row["top_ops"].items())
        print(f"{row['model']:>16}: {row['compute_ops']:>6,} compute, {row['view_ops']:>6,} views/allocations; most: {top}")
    return 0
