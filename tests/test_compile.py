"""torch.compile(fullgraph=True) on HRViT: no graph breaks for every ablation switch,
padded stripes and odd input sizes; the inductor-compiled block matches eager.

Compiling a whole model with inductor takes minutes of CPU, so the full-model checks trace with
dynamo only (``backend="eager"``, which is what reports graph breaks) on a small configuration,
and one block goes through inductor (C++ code generated and built with gcc)."""
from __future__ import annotations

import pytest
import torch

from models.hrvit import ABLATIONS, HRViT, HRViTBlock, HRViTCfg

SMALL = HRViTCfg((16, 32, 64, 128), ((1,), (1, 1), (1, 1, 1), (1, 1, 1, 1)), 8, (2, 2, 2, 2))


@pytest.fixture(autouse=True)
def fresh_dynamo():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "switches, window_sizes",
    [({}, (1, 2, 7, 7)), ({name: False for name in ABLATIONS}, (3, 3, 2, 5))],
    ids=["all-techniques", "all-ablated"],
)
def test_whole_model_traces_without_graph_breaks(switches, window_sizes):
    torch.manual_seed(0)  # deterministic
    model = HRViT(SMALL, num_classes=10, window_sizes=window_sizes, **switches).eval()
    x = torch.randn(2, 3, 37, 45)  # odd size: padded stripes on every branch, cropped up-paths
    compiled = torch.compile(model, fullgraph=True, backend="eager")  # fullgraph: a graph break raises
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=0, atol=0)


def test_inductor_block_matches_eager():
    torch.manual_seed(0)  # deterministic
    block = HRViTBlock(32, 16, 3, 2, 0.0).eval()
    torch.nn.init.ones_(block.attn.bn.weight)  # the zero init would make the attention invisible
    x = torch.randn(2, 5 * 7, 32)  # 5 rows in stripes of 3: a padded, masked last stripe
    compiled = torch.compile(block, fullgraph=True, backend="inductor")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, 5, 7), block(x, 5, 7), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mit_b0", "cswin_ti"])
def test_baseline_segmenters_trace_without_graph_breaks(name):
    """The MiT and CSWin baselines compile whole too (HRNet-ViT was checked by hand: its dynamo trace
    takes 20-60 s per width, too long for the suite)."""
    from models.factory import build_model

    torch.manual_seed(0)  # deterministic
    model = build_model(name, "seg", 19).eval()
    x = torch.randn(1, 3, 65, 97)  # odd size
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x), rtol=0, atol=0)
