"""The FLOP ledger: hand-counted hooks per rule, SDPA counted exactly once by every convention, and
HRViT's published params/GFLOPs (Tables 3, 4, 5, 7 and the ADE20K figures) under the paper rule."""
from __future__ import annotations

import csv
import dataclasses
import functools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from models.flop_registry import AttentionMacs, register_attention_counter
from reproduce import flops
from reproduce.flops import PAPER_RULES, AttentionCoverageError, measure
from reproduce.measure import measure_named

PAPER = Path(__file__).resolve().parents[1] / "tables" / "paper"


# ------------------------------------------------------------------ hook counter, hand counted


class Toy(nn.Module):
    """conv(bias) -> BN -> ReLU -> Upsample, and AdaptiveAvgPool -> LayerNorm -> Linear -> GELU."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()
        self.up = nn.Upsample(scale_factor=2)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.norm = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 5)
        self.gelu = nn.GELU()

    def forward(self, x):
        x = self.act(self.bn(self.conv(x)))  # (1, 4, 8, 8)
        tokens = self.pool(x).flatten(2).transpose(1, 2)  # (1, 4 tokens, 4)
        return self.up(x), self.gelu(self.fc(self.norm(tokens)))


# Toy on a 1x3x8x8 input, counted by hand (mmcv 1.x rules):
CONV = 4 * 8 * 8 * (3 * 3 * 3) + 4 * 8 * 8  # MACs + bias: 256 outputs x 27, plus 256 bias adds
RELU = 4 * 8 * 8  # 1 per output element
UPSAMPLE = 4 * 16 * 16  # 1 per output element
POOL = 4 * 8 * 8  # 1 per INPUT element
LINEAR = 4 * 4 * 5  # input elements x out_features, no bias
LAYER_NORM = 2 * 4 * 4  # 2 per element (affine)
BATCH_NORM = 2 * 4 * 8 * 8  # 2 per element (affine), only where the rule counts BN
# GELU: not counted


@pytest.mark.parametrize(
    "rule, expected",
    [
        (PAPER_RULES["hrvit"], CONV + RELU + UPSAMPLE + POOL + LINEAR + LAYER_NORM),
        (PAPER_RULES["mit"], CONV + RELU + UPSAMPLE + POOL + LINEAR),  # mmcv 1.2.7: no LayerNorm
        (dataclasses.replace(PAPER_RULES["hrvit"], count_batch_norm=True),
         CONV + RELU + UPSAMPLE + POOL + LINEAR + LAYER_NORM + BATCH_NORM),
    ],
    ids=["hrvit", "mit", "with-batchnorm"],
)
def test_paper_hooks_hand_counted(rule, expected):
    ledger = measure(Toy(), (8, 8), rule, conventions=("paper",), depth=1)
    assert ledger.gflops["paper"] * 1e9 == pytest.approx(expected, abs=1e-6)
    assert ledger.breakdown["conv"]["paper"] * 1e9 == pytest.approx(CONV)
    assert ledger.breakdown["bn"]["paper"] * 1e9 == pytest.approx(BATCH_NORM if rule.count_batch_norm else 0)
    assert ledger.params == sum(p.numel() for p in Toy().parameters())
    uncounted = {"BatchNorm2d": 0 if rule.count_batch_norm else 1, "LayerNorm": 0 if rule.count_layer_norm else 1}
    assert ledger.uncounted_modules == {k: v for k, v in uncounted.items() if v}


def test_sync_batchnorm_never_counted():
    """mmcv's table has no SyncBatchNorm, so no rule counts it (SegFormer's and HRViT's heads)."""
    rule = dataclasses.replace(PAPER_RULES["hrvit"], count_batch_norm=True)
    sync = nn.SyncBatchNorm(4)
    assert flops.module_flops(sync, (torch.zeros(1, 4, 2, 2),), torch.zeros(1, 4, 2, 2), rule) is None


def test_unknown_rule_lists_known_families():
    with pytest.raises(ValueError, match="hrvit, cswin, mit"):
        measure(Toy(), (8, 8), "vit")


# ------------------------------------------------------------------ attention through SDPA


class ToyAttention(nn.Module):
    """Multi-head SDPA whose q = k = the input; v is the input, or the input twice along channels
    (value width != query width sends CPU SDPA to its math path, i.e. counted bmm ops)."""

    def __init__(self, heads: int, wide_value: bool = False, mask: bool = False):
        super().__init__()
        self.heads, self.wide_value, self.mask = heads, wide_value, mask

    def split(self, x):
        B, N, C = x.shape
        return x.reshape(B, N, self.heads, C // self.heads).transpose(1, 2)

    def forward(self, x):
        q = self.split(x)
        v = self.split(torch.cat([x, x], -1)) if self.wide_value else q
        mask = torch.zeros(x.shape[1], x.shape[1]) if self.mask else None
        return F.scaled_dot_product_attention(q, q, v, attn_mask=mask).transpose(1, 2).flatten(2)


class MiTToyAttention(ToyAttention):
    """Same computation; its counter says SegFormer's family (both matmuls counted by the paper rule)."""


def _toy_attention_macs(module: ToyAttention, args, kwargs, output) -> AttentionMacs:
    B, N, C = args[0].shape
    return AttentionMacs(qk=B * N * N * C, av=B * N * N * C * (2 if module.wide_value else 1))


register_attention_counter(ToyAttention, family="hrvit")(_toy_attention_macs)
register_attention_counter(MiTToyAttention, family="mit")(_toy_attention_macs)

TOKENS, WIDTH = 16, 8
PROJ = TOKENS * WIDTH * WIDTH  # the Linear in front of the attention


def _attention_model(attention: nn.Module) -> nn.Module:
    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(WIDTH, WIDTH)
            self.attn = attention

        def forward(self, x):  # x: (1, 3, TOKENS, WIDTH/...) image -> tokens
            return self.attn(self.proj(x[:, 0].reshape(1, TOKENS, WIDTH)))

    return Wrap()


ATTENTION_CASES = {
    "fused": (dict(heads=2), TOKENS * TOKENS * WIDTH * 2),
    "masked": (dict(heads=2, mask=True), TOKENS * TOKENS * WIDTH * 2),
    "math-path": (dict(heads=2, wide_value=True), TOKENS * TOKENS * WIDTH * 3),
}


def test_premise_torch_misses_fused_cpu_sdpa_but_counts_its_math_path():
    """Why the ledger teaches torch's counter the CPU fused kernel: without it, SDPA counts 0 or
    its bmm ops depending on the dispatch path, so adding counters afterwards would double count."""
    def plain_torch_flops(attention):
        mode = FlopCounterMode(display=False)
        with torch.no_grad(), mode:
            attention(torch.randn(1, TOKENS, WIDTH))
        return mode.get_total_flops()

    assert plain_torch_flops(ToyAttention(heads=2)) == 0
    assert plain_torch_flops(ToyAttention(heads=2, mask=True)) == 0
    assert plain_torch_flops(ToyAttention(heads=2, wide_value=True)) == 2 * TOKENS * TOKENS * WIDTH * 3


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_sdpa_counted_exactly_once(case):
    kwargs, attention_macs = ATTENTION_CASES[case]
    ledger = measure(_attention_model(ToyAttention(**kwargs)), (TOKENS, WIDTH), "hrvit", depth=1)
    assert ledger.attention_macs == attention_macs
    assert ledger.gflops["paper"] * 1e9 == pytest.approx(PROJ + 0.5 * attention_macs)
    assert ledger.gflops["fvcore"] * 1e9 == pytest.approx(PROJ + attention_macs)
    assert ledger.gflops["torch"] * 1e9 == pytest.approx(2 * (PROJ + attention_macs))
    assert ledger.breakdown["attn"]["fvcore"] * 1e9 == pytest.approx(attention_macs)
    # the same on real tensors, where CPU SDPA really takes the fused or the math path
    model = _attention_model(ToyAttention(**kwargs)).eval()
    with torch.no_grad():
        real = flops._shape_pass(model, model, torch.randn(1, 3, TOKENS, WIDTH), PAPER_RULES["hrvit"], with_torch=True)
    assert real.torch[""] == 2 * (PROJ + attention_macs)


def test_attention_factor_follows_the_counter_family():
    """A model counted under the hrvit rule still counts MiT attention with both matmuls (Table 6)."""
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.cswin_like, self.mit_like = ToyAttention(heads=2), MiTToyAttention(heads=2)

        def forward(self, x):
            tokens = x[:, 0].reshape(1, TOKENS, WIDTH)
            return self.cswin_like(tokens) + self.mit_like(tokens)

    ledger = measure(Mixed(), (TOKENS, WIDTH), "hrvit", conventions=("paper",), depth=1)
    macs = TOKENS * TOKENS * WIDTH * 2
    assert ledger.breakdown["cswin_like"]["paper"] * 1e9 == pytest.approx(0.5 * macs)
    assert ledger.breakdown["mit_like"]["paper"] * 1e9 == pytest.approx(1.0 * macs)


def test_sdpa_without_counter_is_an_error():
    class Unregistered(nn.Module):
        def forward(self, x):
            return F.scaled_dot_product_attention(x, x, x)

    with pytest.raises(AttentionCoverageError, match="outside every module with a registered attention counter"):
        measure(_attention_model(Unregistered()), (TOKENS, WIDTH), "hrvit", conventions=("paper",))


def test_counter_disagreeing_with_sdpa_is_an_error():
    class Miscounted(ToyAttention):
        pass

    register_attention_counter(Miscounted, family="hrvit")(lambda m, a, k, o: AttentionMacs(qk=1, av=1))
    with pytest.raises(AttentionCoverageError, match="gives 2 MACs"):
        measure(_attention_model(Miscounted(heads=2)), (TOKENS, WIDTH), "hrvit", conventions=("paper",))


def test_breakdown_covers_containers_torch_never_calls():
    """A ModuleList is never called, so torch's module tracker has no entry for it."""
    class Listed(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.Conv2d(3, 3, 1) for _ in range(2))

        def forward(self, x):
            for block in self.blocks:
                x = block(x)
            return x

    ledger = measure(Listed(), (4, 4), "hrvit", depth=1)
    assert list(ledger.breakdown) == ["blocks"]
    assert ledger.breakdown["blocks"]["torch"] == pytest.approx(ledger.gflops["torch"])
    assert ledger.gflops["torch"] * 1e9 == 2 * 2 * (4 * 4 * 3 * 3)


# ------------------------------------------------------------------ HRViT against the paper


@functools.cache
def paper_ledger(name: str, task: str, num_classes: int | None = None, window_sizes=None, ablate=()) -> dict:
    """Paper-convention measurement, once per configuration for the whole module."""
    return measure_named(name, task, num_classes, None, window_sizes, ablate, conventions=("paper",))


def _rows(table: str) -> list[dict[str, str]]:
    with open(PAPER / table, newline="") as f:
        return list(csv.DictReader(f))


def _variant(label: str) -> str:
    return "hrvit_" + label.split("-")[1]  # "HRViT-b1" -> "hrvit_b1"


def _check(result: dict, params_m: str, gflops: str) -> None:
    assert result["params"] / 1e6 == pytest.approx(float(params_m), abs=0.05), "params"
    assert result["gflops_paper"] == pytest.approx(float(gflops), rel=0.01), "paper GFLOPs"


@pytest.mark.parametrize("row", _rows("table3_imagenet.csv"), ids=lambda r: r["variant"])
def test_table3_classifier_224(row):
    _check(paper_ledger(_variant(row["variant"]), "cls"), row["params_m"], row["gflops"])


B3_CITYSCAPES_WINDOWS = (1, 2, 9, 9)  # the paper's text: "we set the window sizes to 1-2-9-9" for b3 on Cityscapes


@pytest.mark.parametrize("row", [r for r in _rows("table4_cityscapes.csv") if r["backbone"].startswith("HRViT")],
                         ids=lambda r: r["backbone"])
def test_table4_cityscapes_seg_512(row):
    name = _variant(row["backbone"])
    windows = B3_CITYSCAPES_WINDOWS if name == "hrvit_b3" else None
    _check(paper_ledger(name, "seg", 19, windows), row["params_m"], row["gflops"])


@pytest.mark.parametrize("row", _rows("table7_window.csv"), ids=lambda r: f"s{r['window_size_mr_lr']}")
def test_table7_window_sweep(row):
    s = int(row["window_size_mr_lr"])
    result = paper_ledger("hrvit_b3", "seg", 19, (1, 2, s, s))
    assert result["gflops_paper"] == pytest.approx(float(row["gflops"]), rel=0.01)


TABLE5_ABLATIONS = {
    "HRViT-b1": (),
    "- Key-value sharing": ("kv_sharing",),
    "- Eff. patch embed": ("eff_patch_embed",),
    "- MixCFN": ("mixcfn",),
    "- Parallel CONV path": ("parallel_conv",),
    "- Nonlinearity/BN": ("nonlinearity_bn",),
    "- Dense fusion": ("dense_fusion",),
    "- DES": ("des",),
    "- All block opt.": ("all",),
}


@pytest.mark.parametrize("row", _rows("table5_ablation.csv"), ids=lambda r: r["variant"])
def test_table5_ablations_b1_seg_512(row):
    _check(paper_ledger("hrvit_b1", "seg", 19, None, TABLE5_ABLATIONS[row["variant"]]), row["params_m"], row["gflops"])


@pytest.mark.parametrize("row", [r for r in _rows("fig5_ade20k.csv") if r["backbone"].startswith("HRViT")],
                         ids=lambda r: r["backbone"])
def test_ade20k_150_classes_seg_512(row):
    """The README's ADE20K figures (150-class head, the code's default windows 1-2-7-7)."""
    _check(paper_ledger(_variant(row["backbone"]), "seg", 150), row["params_m"], row["gflops"])


def test_fvcore_and_torch_match_the_official_code_measurements():
    """docs/flop-convention.md#official-code-reference-figures (official code, fvcore): b1 classifier @224 = 2.811 G; conv 1.3135 + linear
    1.2633 + attention matmul 0.1988 GMAC, which torch counts at 2 per MAC."""
    result = measure_named("hrvit_b1", "cls")
    assert result["gflops_fvcore"] == pytest.approx(2.811, abs=0.001)
    assert result["gflops_torch"] == pytest.approx(2 * (1.3135 + 1.2633 + 0.1988), abs=0.002)
    assert result["attention_macs"] / 1e9 == pytest.approx(0.1988, abs=0.0001)
    for convention in ("paper", "fvcore", "torch"):
        assert sum(row[convention] for row in result["breakdown"].values()) == pytest.approx(result[f"gflops_{convention}"])
