"""MiT, CSWin and HRNet-ViT baselines: registration, shapes, feature strides, parameter counts
against the published/official figures, the CSWin stripe attention against a per-window
reference, and the FLOP ledger's per-family rule on hand-counted tiny modules."""
from __future__ import annotations

import csv
import functools
import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import get_encoder
from segmentation_models_pytorch.encoders import mix_transformer as smp_mit
from torch import nn

import baselines  # noqa: F401  (registers the names)
from baselines.cswin import LePEAttention
from models.factory import available_models, build_model, flop_family, segmentation_embed_dim
from models.segmentation import SegmentationModel
from reproduce.flops import measure

PAPER = Path(__file__).resolve().parents[1] / "tables" / "paper"
MIT = [f"mit_b{i}" for i in range(5)]
CSWIN = ["cswin_ti", "cswin_t", "cswin_s"]
HRNET = [f"hrnet{w}_{b}" for w in (18, 32, 40) for b in ("mit", "cswin")]
ALL = MIT + CSWIN + HRNET
ODD = (97, 131)


def _paper_name(name: str) -> str:
    if name.startswith("mit_"):
        return f"MiT-{name[4:].upper()}"
    if name.startswith("cswin_"):
        return f"CSWin-{name[6:].capitalize()}"
    width, block = name[5:].split("_")
    return f"HRNet{width}-{'MiT' if block == 'mit' else 'CSWin'}"


def _paper_rows(table: str) -> dict[str, dict[str, str]]:
    with open(PAPER / table, newline="") as f:
        return {row["backbone"]: row for row in csv.DictReader(f)}


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_name_is_registered_with_its_family():
    names = set(available_models())
    assert set(ALL) <= names
    assert {flop_family(n) for n in MIT} == {"mit"}
    assert {flop_family(n) for n in CSWIN} == {"cswin"}
    assert {flop_family(n) for n in HRNET} == {"hrvit"}


@functools.cache
def _backbone(name: str) -> nn.Module:
    """One features_only build per name (the big variants take seconds to initialise)."""
    return timm.create_model(name, features_only=True).eval()


def _seg(name: str, num_classes: int) -> SegmentationModel:
    return SegmentationModel(_backbone(name), segmentation_embed_dim(name), num_classes).eval()


def _expected_sizes(name: str, size: tuple[int, int]) -> list[tuple[int, int]]:
    """MiT/HRNet convs give ceil(size / stride); CSWin's 7x7/4 stem with padding 2 floors stage 1."""
    if name.startswith("cswin"):
        first = ((size[0] - 3) // 4 + 1, (size[1] - 3) // 4 + 1)
        return [first] + [(-(-first[0] // 2 ** i), -(-first[1] // 2 ** i)) for i in (1, 2, 3)]
    return [(-(-size[0] // r), -(-size[1] // r)) for r in (4, 8, 16, 32)]


@pytest.mark.parametrize("name", ALL)
def test_features_only_strides_and_odd_size_segmentation(name):
    backbone = _backbone(name)
    assert backbone.feature_info.reduction() == [4, 8, 16, 32]
    x = torch.randn(1, 3, *ODD)
    with torch.no_grad():
        features = backbone(x)
        logits = _seg(name, 19)(x)
    assert [f.shape[1] for f in features] == backbone.feature_info.channels()
    expect = _expected_sizes(name, ODD)
    assert [tuple(f.shape[-2:]) for f in features] == expect
    assert logits.shape == (1, 19, *expect[0])


# The cheapest member of each family runs both tasks for real; at 512 only the two lightest (about
# 8 and 11 GFLOPs), HRNet-ViT on a multiple of 32 (its unpadded path; the odd size pads).
@pytest.mark.parametrize(
    "name, size", [("mit_b0", (512, 512)), ("cswin_ti", (512, 512)), ("hrnet18_mit", (128, 160)), ("hrnet18_cswin", (128, 160))]
)
def test_small_variants_both_tasks(name, size):
    with torch.no_grad():
        cls = build_model(name, "cls", num_classes=10).eval()
        assert cls(torch.randn(2, 3, *ODD)).shape == (2, 10)
        seg = build_model(name, "seg", num_classes=150).eval()
        assert seg.predict(torch.randn(1, 3, *ODD)).shape == (1, 150, *ODD)
        assert seg(torch.zeros(1, 3, *size)).shape == (1, 150, size[0] // 4, size[1] // 4)


@pytest.mark.parametrize("name", MIT)
def test_mit_is_smps_encoder_and_table4_params(name):
    assert _params(_backbone(name)) == _params(get_encoder(name, weights=None))
    paper = float(_paper_rows("table4_cityscapes.csv")[_paper_name(name)]["params_m"])
    assert abs(_params(_seg(name, 150)) / 1e6 - paper) <= 0.05


def test_mit_classifier_head_is_linear_on_stage4():
    # MiT's ImageNet head: Linear(C4 -> classes) on the mean of the norm4 tokens
    assert _params(timm.create_model("mit_b0")) - _params(_backbone("mit_b0")) == (256 + 1) * 1000


# Official CSWin code (docs/baseline-models.md#cswin): classifier 22.32M (T); segmentation backbone
# 5.491M (Ti) / 21.808M (T) / 34.131M (S).
CSWIN_BACKBONE_M = {"cswin_ti": 5.491, "cswin_t": 21.808, "cswin_s": 34.131}


@pytest.mark.parametrize("name", CSWIN)
def test_cswin_params_official_and_table4(name):
    assert round(_params(_backbone(name)) / 1e6, 3) == CSWIN_BACKBONE_M[name]
    paper = float(_paper_rows("table4_cityscapes.csv")[_paper_name(name)]["params_m"])
    assert abs(_params(_seg(name, 150)) / 1e6 - paper) <= 0.05


def test_cswin_t_classifier_params_official():
    assert round(_params(timm.create_model("cswin_t")) / 1e6, 2) == 22.32


@pytest.mark.parametrize("name", HRNET)
def test_hrnet_vit_params_within_3_percent_of_table6(name):
    paper = float(_paper_rows("table6_hrnet_vit.csv")[_paper_name(name)]["params_m"])
    ours = _params(_seg(name, 19)) / 1e6
    assert abs(ours / paper - 1) <= 0.03, (ours, paper)


def test_hrnet_vit_switches_give_the_specs_other_readings():
    # docs/hrnet-vit-fit.md: natural 1:1 swap 9.41M (MiT) / 7.33M (CSWin); conv reduction with
    # patch embedding 10.42M (MiT); all W18, E=256, 19 classes
    def params(name, **switches):
        return round(_params(build_model(name, "seg", num_classes=19, **switches)) / 1e6, 2)

    assert params("hrnet18_mit", patch_embed="none", mit_sr="conv") == 9.41
    assert params("hrnet18_cswin", patch_embed="none") == 7.33
    assert params("hrnet18_mit", mit_sr="conv") == 10.42
    with pytest.raises(ValueError, match="mit_sr"):
        build_model("hrnet18_mit", "seg", mit_sr="learned")


def test_hrnet_vit_classifier_is_hrnetv2s():
    # timm's HRNetV2-W18 classifier minus its BasicBlock branch features = the classification head
    reference = timm.create_model("hrnet_w18")
    head = _params(reference) - _params(timm.create_model("hrnet_w18", features_only=True, feature_location=""))
    ours = _params(timm.create_model("hrnet18_cswin")) - _params(timm.create_model("hrnet18_cswin", features_only=True))
    assert ours == head


def _reference_stripe_attention(attn: LePEAttention, q, k, v):
    """Per-window loop with explicit softmax, padding symmetric with zeros, no mask."""
    b, c, h, w = q.shape
    wh, ww = attn.window_shape(h, w)
    ph, pw = (wh - h % wh) % wh, (ww - w % ww) % ww
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    q, k, v = (F.pad(t, pad) for t in (q, k, v))
    out = torch.zeros_like(q)
    d = c // attn.num_heads
    for y in range(0, q.shape[2], wh):
        for x in range(0, q.shape[3], ww):
            win = (slice(None), slice(None), slice(y, y + wh), slice(x, x + ww))
            lepe = attn.get_v(v[win])
            for head in range(attn.num_heads):
                ch = slice(head * d, (head + 1) * d)
                qh, kh, vh = (t[win][:, ch].flatten(2).transpose(1, 2) for t in (q, k, v))
                a = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1)
                o = (a @ vh).transpose(1, 2).reshape(b, d, wh, ww)
                out[win][:, ch] = o + lepe[:, ch]
    return out[:, :, pad[2]:pad[2] + h, pad[0]:pad[0] + w].permute(0, 2, 3, 1)


@pytest.mark.parametrize("orientation, split", [("vertical", 2), ("horizontal", 3), ("global", 7)])
def test_cswin_stripe_attention_matches_per_window_reference(orientation, split):
    torch.manual_seed(0)
    attn = LePEAttention(dim=8, num_heads=2, split_size=split, orientation=orientation).eval()
    q, k, v = torch.randn(3, 2, 8, 5, 7).unbind(0)
    torch.testing.assert_close(attn(q, k, v), _reference_stripe_attention(attn, q, k, v), atol=1e-5, rtol=1e-5)


class _SraOnTokens(nn.Module):
    """smp's MiT attention on a (1, C, H, W) input."""

    def __init__(self, dim: int, sr: int):
        super().__init__()
        self.attn = smp_mit.Attention(dim, num_heads=1, qkv_bias=True, sr_ratio=sr)

    def forward(self, x):
        return self.attn(x.flatten(2).transpose(1, 2), x.shape[2], x.shape[3])


class _Stripes(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = LePEAttention(dim=4, num_heads=1, split_size=2, orientation="vertical")

    def forward(self, x):
        return self.attn(x, x, x)


def test_ledger_mit_rule_on_hand_counted_sra():
    # C=8, 4x4 tokens (N=16), sr=2 -> M=4 keys. q: 16*8*8=1024; sr conv: 4 out px * 8 ch * 32 = 1024
    # MACs + 32 bias; kv: 4*8*16=512; proj: 1024; SegFormer's sra_flops: 2 * N*M*C = 1024.
    # "mit" (mmcv 1.2.7) does not count the LayerNorm; "hrvit" adds its 2*4*8 = 64.
    model = _SraOnTokens(8, 2)
    ledger = measure(model, (4, 4), "mit", in_chans=8)
    assert ledger.gflops["paper"] * 1e9 == pytest.approx(1024 + 1056 + 512 + 1024 + 1024)
    assert ledger.attention_macs == 1024
    assert measure(model, (4, 4), "hrvit", ("paper",), in_chans=8).gflops["paper"] * 1e9 == pytest.approx(4640 + 64)
    assert ledger.gflops["torch"] * 1e9 == pytest.approx(2 * (1024 + 1024 + 512 + 1024 + 1024))


def test_ledger_cswin_rule_on_hand_counted_padded_stripes():
    # 4 channels on a 3x5 map, vertical stripes 2 wide: W padded 5 -> 6 (0 left, 1 right), 3 stripes of
    # 3x2 = 6 tokens. Attention: 3 * 6*6 * 4 = 432 MACs per matmul; "cswin" counts one of the two.
    # LePE: depthwise 3x3 on the padded stripes, 3*4*6 = 72 outputs * 9 = 648 MACs + 72 bias.
    ledger = measure(_Stripes(), (3, 5), "cswin", in_chans=4)
    assert ledger.attention_macs == 2 * 432
    assert ledger.gflops["paper"] * 1e9 == pytest.approx(720 + 432)
    assert ledger.gflops["fvcore"] * 1e9 == pytest.approx(648 + 2 * 432)
    assert ledger.gflops["torch"] * 1e9 == pytest.approx(2 * (648 + 2 * 432))


def test_mit_b0_paper_gflops_at_512_match_table4():
    paper = float(_paper_rows("table4_cityscapes.csv")["MiT-B0"]["gflops"])
    ledger = measure(build_model("mit_b0", "seg", num_classes=150), (512, 512), flop_family("mit_b0"), ("paper",))
    assert abs(ledger.gflops["paper"] / paper - 1) <= 0.01
