"""The faster HRViT gives the outputs of the implementation at commit 939eb5d: same
weights, max abs difference <= 1e-5 in fp32 for every variant, ablation switch, window sizes and
odd input sizes in eval mode; train mode within the old code's own rounding spread
(tests/fixtures/hrvit_reference.py holds the cases, the tolerances and how the reference was made)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("hrvit_reference", Path(__file__).with_name("fixtures") / "hrvit_reference.py")
ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ref)


@pytest.fixture(scope="module")
def reference() -> dict[str, list[torch.Tensor]]:
    return torch.load(ref.FIXTURE, weights_only=True)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name, variant, task, kwargs, shape, train", ref.CASES, ids=[c[0] for c in ref.CASES])
def test_outputs_match_939eb5d(reference, name, variant, task, kwargs, shape, train):
    got = ref.outputs(ref.build(variant, task, kwargs, train), task, ref.inputs(shape))
    want = reference[name]
    assert [t.shape for t in got] == [t.shape for t in want]
    for i, (g, w) in enumerate(zip(got, want)):
        diff = (g - w).abs().max().item()
        assert diff <= (ref.TRAIN_TOLERANCE if train else ref.TOLERANCE), f"{name}: output {i} differs from 939eb5d by {diff:.2e} (max abs)"


@pytest.mark.parametrize("name", ref.LEDGER_CASES)
def test_flop_ledger_matches_939eb5d(name):
    """Speed changes may restructure a computation, never what it counts: parameters, every
    convention's total and per-module breakdown, and the attention MACs are those of 939eb5d."""
    want = json.loads(ref.LEDGER_FIXTURE.read_text())[name]
    assert ref.ledger(name) == want
