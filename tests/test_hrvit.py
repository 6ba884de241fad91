"""HRViT-b1/b2/b3 (models/hrvit.py) against the official-code reference numbers of docs/flop-convention.md#official-code-reference-figures and
the Table 5 readings of docs/table5-readings.md.

Parameter counts, shapes and attention-MAC counts use models built on the ``meta`` device (no
weights, no compute), so the b2/b3 checks cost no CPU time; numerical checks run b1 or single
modules on small inputs.
"""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from models import factory
from models.factory import build_model
from models.flop_registry import attention_counter_for
from models.hrvit import ABLATIONS, HRViTAttn, ablation_kwargs

VARIANTS = ("hrvit_b1", "hrvit_b2", "hrvit_b3")


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def on_meta(build, *args, **kwargs):
    with torch.device("meta"):
        return build(*args, **kwargs)


def meta_input(h: int, w: int, chans: int = 3) -> torch.Tensor:
    return torch.empty(1, chans, h, w, device="meta")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The 2 shared cores are usually busy: 2 intra-op threads then spin against each other (a
    97x131 b1 forward took 23 s instead of 0.2 s under load), so these tests use one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cls_meta() -> dict[str, torch.nn.Module]:
    return {v: on_meta(timm.create_model, v, num_classes=1000) for v in VARIANTS}


@pytest.fixture(scope="module")
def feat_meta() -> dict[str, torch.nn.Module]:
    return {v: on_meta(timm.create_model, v, features_only=True) for v in VARIANTS}


@pytest.fixture(scope="module")
def b1() -> torch.nn.Module:
    torch.manual_seed(0)  # deterministic
    return timm.create_model("hrvit_b1").eval()


# ------------------------------------------------------------------ parameter counts (docs/flop-convention.md#official-code-reference-figures)

SPEC_PARAMS = {  # classifier, backbone, cls head, seg 19 classes, seg 150 classes
    "hrvit_b1": (19_685_152, 7_758_008, 11_927_144, 8_149_451, 8_183_118),
    "hrvit_b2": (32_486_408, 20_310_944, 12_175_464, 20_776_115, 20_809_782),
    "hrvit_b3": (37_870_304, 25_507_960, 12_362_344, 28_623_755, 28_724_494),
}
SPEC_MODULE_PARAMS = {  # stem, then fusion + stage of M1..M6
    "hrvit_b1": (19_584, 16_956, 74_924, 1_267_132, 1_279_708, 2_906_556, 2_193_148),
    "hrvit_b2": (19_584, 22_818, 128_694, 3_457_350, 3_492_342, 6_520_774, 6_669_382),
    "hrvit_b3": (19_584, 37_584, 187_624, 3_164_072, 3_213_800, 9_327_288, 9_558_008),
}
SPEC_FUSION_PARAMS = {
    "hrvit_b1": (0, 2_592, 19_360, 31_936, 97_376, 155_392),
    "hrvit_b2": (0, 5_424, 48_528, 83_520, 243_648, 392_256),
    "hrvit_b3": (0, 9_280, 71_488, 121_216, 366_784, 597_504),
}
# per branch: block total, attn, DES, MixCFN, 2xLN, patch embed (same width), M1 patch embed (64 -> C1)
SPEC_BLOCK_PARAMS = {
    "hrvit_b1": [
        (14_428, 3_552, 92, 10_656, 128, 1_440, 2_464),
        (51_344, 13_248, 144, 37_696, 256, 4_928, None),
        (192_856, 51_072, 344, 140_928, 512, 18_048, None),
        (746_016, 200_448, 544, 544_000, 1_024, 68_864, None),
    ],
    "hrvit_b2": [
        (19_026, 7_632, 114, 11_088, 192, 2_928, 3_696),
        (90_564, 29_088, 228, 60_864, 384, 10_464, None),
        (537_392, 176_400, 512, 359_520, 960, 60_720, None),
        (1_357_544, 448_128, 872, 907_008, 1_536, 152_448, None),
    ],
    "hrvit_b3": [
        (32_528, 13_248, 144, 18_880, 256, 4_928, 4_928),
        (122_456, 51_072, 344, 70_528, 512, 18_048, None),
        (474_144, 200_448, 544, 272_128, 1_024, 68_864, None),
        (1_866_032, 794_112, 1_328, 1_068_544, 2_048, 268_800, None),
    ],
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_classifier_backbone_and_module_params(cls_meta, variant):
    model = cls_meta[variant]
    total, backbone, head, _, _ = SPEC_PARAMS[variant]
    assert n_params(model) == total
    assert n_params(model.head) == head
    assert n_params(model) - n_params(model.head) == backbone
    stem, *modules = SPEC_MODULE_PARAMS[variant]
    assert n_params(model.stem) == stem
    assert [n_params(m) for m in model.stages] == modules
    assert [n_params(m.fusion) for m in model.stages] == list(SPEC_FUSION_PARAMS[variant])


@pytest.mark.parametrize("variant", VARIANTS)
def test_block_and_patch_embed_params(cls_meta, variant):
    stages = cls_meta[variant].stages
    for branch, (total, attn, des, mlp, norms, embed, embed_m1) in enumerate(SPEC_BLOCK_PARAMS[variant]):
        module = stages[-1].branches[branch]  # M6 has every branch
        block = module.blocks[0]
        assert n_params(block) == total
        assert (n_params(block.attn), n_params(block.des), n_params(block.mlp)) == (attn, des, mlp)
        assert n_params(block.norm1) + n_params(block.norm2) == norms
        assert n_params(module.patch_embed) == embed
        if embed_m1 is not None:
            assert n_params(stages[0].branches[0].patch_embed) == embed_m1


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("num_classes", [19, 150])
def test_segmentation_params_via_factory(variant, num_classes):
    expected = SPEC_PARAMS[variant][3 if num_classes == 19 else 4]
    assert n_params(on_meta(build_model, variant, task="seg", num_classes=num_classes)) == expected


def test_factory_registration():
    assert [factory.segmentation_embed_dim(v) for v in VARIANTS] == [256, 256, 768]
    assert all(factory.flop_family(v) == "hrvit" for v in VARIANTS)


def test_pretrained_cfg(cls_meta):
    model = cls_meta["hrvit_b1"]
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.9 and cfg["interpolation"] == "bicubic"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    modules = dict(model.named_modules())
    assert isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    assert modules[cfg["classifier"]] is model.get_classifier()
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model("hrvit_b1", pretrained=True)


def test_drop_path_schedule():
    model = on_meta(timm.create_model, "hrvit_b1", drop_path_rate=0.1)
    rates = [[[round(b.drop_path.drop_prob, 4) if hasattr(b.drop_path, "drop_prob") else 0.0 for b in br.blocks]
              for br in m.branches] for m in model.stages]
    step = 0.1 / 21  # D = 22 for b1 (docs/architecture.md#24-drop-path-schedule)
    assert rates[0] == [[0.0]]
    assert rates[1] == [[round(step, 4)], [round(step, 4)]]
    assert rates[2][2] == [round(step * i, 4) for i in range(2, 8)]
    assert rates[4][3] == [round(step * i, 4) for i in (14, 15)]  # branch 4 uses the first 2 of M5's slice
    assert rates[5] == [[round(step * 20, 4)]] * 2 + [[round(step * 20, 4), 0.1]] * 2


# ------------------------------------------------------------------ ablations (docs/table5-readings.md)

ABLATION_SEG_PARAMS = {  # HRViT-b1 + SegFormer head, 19 classes
    "kv_sharing": 8_769_995,  # K1
    "eff_patch_embed": 9_943_499,  # P2
    "mixcfn": 7_854_539,  # F1
    "parallel_conv": 8_108_491,  # C1
    "nonlinearity_bn": 8_141_259,  # N1
    "dense_fusion": 8_029_643,  # S1
    "des": 8_139_123,  # D1
    "all": 10_089_843,
}


@pytest.fixture(scope="module")
def ablated_b1() -> dict[str, torch.nn.Module]:
    return {
        name: on_meta(build_model, "hrvit_b1", task="seg", **ablation_kwargs([name])) for name in ABLATION_SEG_PARAMS
    }


@pytest.mark.parametrize("name", list(ABLATION_SEG_PARAMS))
def test_ablation_params(ablated_b1, name):
    assert n_params(ablated_b1[name]) == ABLATION_SEG_PARAMS[name]


def test_ablation_structure_and_additivity(ablated_b1):
    base = SPEC_PARAMS["hrvit_b1"][3]
    deltas = {name: ABLATION_SEG_PARAMS[name] - base for name in ABLATIONS}
    assert sum(deltas.values()) == ABLATION_SEG_PARAMS["all"] - base  # removals touch disjoint layers
    # direction of each change as the paper reports it (Table 5): K, patch embed up; the rest down
    assert deltas["kv_sharing"] > 0 and deltas["eff_patch_embed"] > 0
    assert all(deltas[n] < 0 for n in ("mixcfn", "parallel_conv", "nonlinearity_bn", "dense_fusion", "des"))

    def block(name):
        return ablated_b1[name].backbone.model.stages[2].branches[2].blocks[0]

    assert block("kv_sharing").attn.qkv.out_features == 3 * 128
    assert ablated_b1["eff_patch_embed"].backbone.model.stages[2].branches[2].patch_embed.proj.kernel_size == (3, 3)
    assert block("mixcfn").mlp.conv3 is None and block("mixcfn").mlp.conv5 is None
    assert block("parallel_conv").attn.conv is None and isinstance(block("parallel_conv").attn.act, torch.nn.Hardswish)
    assert block("nonlinearity_bn").attn.bn is None and isinstance(block("nonlinearity_bn").attn.act, torch.nn.Identity)
    assert block("des").des is None
    sparse = ablated_b1["dense_fusion"].backbone.model.stages[5].fusion.paths  # M6: 4 -> 4
    assert [sorted(p.keys()) for p in sparse] == [["0", "1"], ["0", "1", "2"], ["1", "2", "3"], ["2", "3"]]
    new_branch = ablated_b1["dense_fusion"].backbone.model.stages[4].fusion.paths[3]  # M5 creates branch 4
    assert list(new_branch.keys()) == ["2"]


def test_ablation_kwargs_names():
    assert ablation_kwargs([]) == {}
    assert ablation_kwargs(["des", "mixcfn"]) == {"des": False, "mixcfn": False}
    assert ablation_kwargs("all") == {n: False for n in ABLATIONS} == ablation_kwargs(["all"])
    assert len(ABLATIONS) == 7
    with pytest.raises(ValueError, match="kv_sharing.*dense_fusion"):
        ablation_kwargs(["des", "no_such_thing"])


# ------------------------------------------------------------------ shapes and feature API


def test_features_only_info(feat_meta):
    for variant, chans in zip(VARIANTS, ((32, 64, 128, 256), (48, 96, 240, 384), (64, 128, 256, 512))):
        info = feat_meta[variant].feature_info
        assert info.channels() == list(chans) and info.reduction() == [4, 8, 16, 32]
    picked = on_meta(timm.create_model, "hrvit_b2", features_only=True, out_indices=(1, 3))
    assert picked.feature_info.channels() == [96, 384]
    assert [f.shape[1] for f in picked(meta_input(64, 64))] == [96, 384]


SPATIAL = {  # official code's output shapes; 500x500 fails in the official code (sizes not multiples of 32)
    224: [(56, 56), (28, 28), (14, 14), (7, 7)],
    512: [(128, 128), (64, 64), (32, 32), (16, 16)],
    (512, 1024): [(128, 256), (64, 128), (32, 64), (16, 32)],
    (480, 640): [(120, 160), (60, 80), (30, 40), (15, 20)],
    (500, 500): [(125, 125), (63, 63), (32, 32), (16, 16)],
}


@pytest.mark.parametrize("size", [(512, 1024), (480, 640), (500, 500)])
def test_feature_shapes_b1(feat_meta, size):
    feats = feat_meta["hrvit_b1"](meta_input(*size))
    assert [tuple(f.shape) for f in feats] == [(1, c, *s) for c, s in zip((32, 64, 128, 256), SPATIAL[size])]


def test_real_forward_b1(b1):
    torch.manual_seed(1)  # deterministic
    with torch.inference_mode():
        feats = b1.forward_features(torch.randn(2, 3, 97, 131))  # odd size: padded windows, cropped up-paths
        assert b1.forward_head(feats).shape == (2, 1000)
    assert [tuple(f.shape) for f in feats] == [(2, 32, 25, 33), (2, 64, 13, 17), (2, 128, 7, 9), (2, 256, 4, 5)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_segmentation_odd_size():
    seg = on_meta(build_model, "hrvit_b1", task="seg")
    assert seg(meta_input(97, 131)).shape == (1, 19, 25, 33)
    assert seg.predict(meta_input(97, 131)).shape == (1, 19, 97, 131)


# ------------------------------------------------------------------ input errors


def test_input_errors(b1):
    with pytest.raises(ValueError, match="3 input channels.*has 1"):
        b1(torch.zeros(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        b1(torch.zeros(3, 32, 32))
    gray = on_meta(timm.create_model, "hrvit_b1", in_chans=1, features_only=True).eval()
    assert len(gray(meta_input(32, 32, chans=1))) == 4
    for bad in [(1, 2, 7), (1, 2, 0, 7), (1, 2, 7.0, 7)]:
        with pytest.raises(ValueError, match="window_sizes must be 4 positive ints"):
            timm.create_model("hrvit_b1", window_sizes=bad)


# ------------------------------------------------------------------ attention: semantics, init, MAC counter


def reference_attention(attn: HRViTAttn, x: torch.Tensor, H: int, W: int, dim_head: int) -> torch.Tensor:
    """Brute force per token (docs/architecture.md#27-attention-cross-shaped-stripes-keys-equal-values): explicit stripe membership, keys = values (unless K1),
    valid-only keys, heads per half of d = min(dim_head, C/2), then conv path / Hardswish / proj / BN."""
    B, N, C = x.shape
    out = attn.qkv(x)
    q, v = out[..., :C], out[..., -C:]
    k = v if out.shape[-1] == 2 * C else out[..., C : 2 * C]
    half = C // 2
    d = min(dim_head, half)
    ws = attn.ws
    rows, cols = torch.arange(N) // W, torch.arange(N) % W
    y = torch.zeros_like(q)
    for t in range(N):
        same_stripe = (rows // ws == rows[t] // ws, cols // ws == cols[t] // ws)  # horizontal, vertical half
        for part, members in enumerate(same_stripe):
            keys = members.nonzero().flatten()
            for start in range(part * half, (part + 1) * half, d):
                ch = slice(start, start + d)
                weights = torch.softmax(q[:, t, ch].unsqueeze(1) @ k[:, keys, ch].transpose(1, 2) * d**-0.5, dim=-1)
                y[:, t, ch] = (weights @ v[:, keys, ch]).squeeze(1)
    if attn.conv is not None:
        conv = attn.conv(attn.conv_act(v.transpose(1, 2).reshape(B, C, H, W)))
        y = y + conv.flatten(2).transpose(1, 2)
    y = attn.proj(attn.act(y))
    return y if attn.bn is None else attn.bn(y.reshape(B * N, C)).reshape(B, N, C)


@pytest.mark.parametrize(
    "dim, dim_head, ws, H, W, kv_sharing",
    [
        (64, 32, 7, 10, 12, True),  # both axes padded
        (32, 32, 1, 6, 5, True),  # one head of C/2
        (48, 24, 2, 5, 7, True),
        (128, 32, 7, 16, 16, True),
        (64, 32, 3, 5, 7, False),  # K1: separate keys, padded
    ],
)
def test_attention_matches_brute_force(dim, dim_head, ws, H, W, kv_sharing):
    torch.manual_seed(0)  # deterministic
    attn = HRViTAttn(dim, dim_head, ws, kv_sharing=kv_sharing).double().eval()
    with torch.no_grad():  # a non-trivial BN tail (its zero init would hide every difference)
        attn.bn.weight.uniform_(0.5, 1.5)
        attn.bn.bias.normal_()
        attn.bn.running_mean.normal_()
        attn.bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, H * W, dim, dtype=torch.float64)
        got, want = attn(x, H, W), reference_attention(attn, x, H, W, dim_head)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_attention_zero_at_init(b1):
    assert all(
        m.bn.weight.eq(0).all() and m.bn.bias.eq(0).all() for m in b1.modules() if isinstance(m, HRViTAttn)
    )
    block = b1.stages[2].branches[2].blocks[0]
    torch.manual_seed(0)  # deterministic
    x = torch.randn(2, 5 * 6, 128)
    block.train()
    try:
        assert block.attn(block.norm1(x), 5, 6).eq(0).all()
    finally:
        block.eval()
    assert block.attn(block.norm1(x), 5, 6).eq(0).all()


# fvcore attention-matmul GFLOPs (both matmuls) by branch, official code: docs/flop-convention.md#official-code-reference-figures
SPEC_MATMUL_GFLOPS = {
    ("hrvit_b1", 224): (0.067, 0.028, 0.098, 0.005),
    ("hrvit_b2", 224): (0.101, 0.042, 0.221, 0.007),
    ("hrvit_b3", 224): (0.135, 0.056, 0.236, 0.015),
    ("hrvit_b1", 512): (0.805, 0.336, 1.285, 0.077),
    ("hrvit_b2", 512): (1.208, 0.503, 2.890, 0.116),
    ("hrvit_b3", 512): (1.611, 0.671, 3.083, 0.231),
}


def run_with_attention_counter(model: torch.nn.Module, size: int) -> tuple[list[torch.Tensor], list[float]]:
    """A (meta) forward with the registered counter hooked on every HRViTAttn: outputs, GMACs per branch."""
    totals: dict[int, int] = {}

    def hook(module, args, kwargs, output):
        macs = attention_counter_for(module).count(module, args, kwargs, output)
        totals[module.dim] = totals.get(module.dim, 0) + macs.qk + macs.av

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in model.modules() if isinstance(m, HRViTAttn)]
    try:
        outputs = model(meta_input(size, size))
    finally:
        for handle in handles:
            handle.remove()
    return outputs, [totals[c] / 1e9 for c in sorted(totals)]


@pytest.mark.parametrize("variant, size", list(SPEC_MATMUL_GFLOPS))
def test_shapes_and_attention_counter(feat_meta, variant, size):
    assert attention_counter_for(HRViTAttn(32, 32, 1)).family == "hrvit"
    feats, got = run_with_attention_counter(feat_meta[variant], size)
    chans = feat_meta[variant].feature_info.channels()
    assert [tuple(f.shape) for f in feats] == [(1, c, *s) for c, s in zip(chans, SPATIAL[size])]
    assert got == pytest.approx(SPEC_MATMUL_GFLOPS[(variant, size)], abs=5e-4)
    if (variant, size) == ("hrvit_b1", 512):
        assert sum(got) == pytest.approx(2.502, abs=5e-4)  # official code, fvcore breakdown


def test_window_sizes_keyword():
    """The paper's b3-Cityscapes windows 1-2-9-9: same params, matmul 6.613 G at 512 (docs/flop-convention.md#published-figures-beside-ours)."""
    model = on_meta(timm.create_model, "hrvit_b3", features_only=True, window_sizes=(1, 2, 9, 9))
    assert n_params(model) == SPEC_PARAMS["hrvit_b3"][1]
    assert sum(run_with_attention_counter(model, 512)[1]) == pytest.approx(6.613, abs=5e-4)


# ------------------------------------------------------------------ gradients


def test_gradients_reach_every_parameter(b1):
    """With the attention BNs at their zero init nothing upstream of them gets a gradient, so the
    BN affine parameters themselves must get one (the first step unblocks the rest); with non-zero
    BN weights every parameter gets a gradient from a loss on the logits (which use all 4 branches)."""
    torch.manual_seed(0)  # deterministic
    x = torch.randn(2, 3, 48, 40)  # branch 4 is 2x2: padded stripes everywhere ws > map size
    weights = torch.randn(2, 1000)

    model = copy.deepcopy(b1).train()
    (model(x) * weights).sum().backward()
    for m in model.modules():
        if isinstance(m, HRViTAttn):
            assert m.bn.weight.grad.abs().sum() > 0 and m.bn.bias.grad.abs().sum() > 0
            assert m.proj.weight.grad.eq(0).all()  # blocked by the zero BN weight, as in the official model

    model = copy.deepcopy(b1).train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HRViTAttn):
                m.bn.weight.fill_(1.0)
    (model(x) * weights).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"


def test_grad_checkpointing_matches_plain_backward(b1):
    model = copy.deepcopy(b1).train()
    model.set_grad_checkpointing(True)
    assert all(m.bn.momentum == pytest.approx(1 - 0.9**0.5) for m in model.modules() if isinstance(m, HRViTAttn))
    branch = model.stages[2].branches[2]  # M3, branch 3: 6 blocks
    torch.manual_seed(0)  # deterministic
    x = torch.randn(2, 128, 5, 6)
    with torch.no_grad():
        for m in branch.modules():
            if isinstance(m, HRViTAttn):
                m.bn.weight.fill_(1.0)
    grads = []
    for checkpointed in (False, True):
        branch.grad_checkpointing = checkpointed
        branch.zero_grad()
        out = branch(x)
        out.square().sum().backward()
        grads.append((out.detach(), [p.grad.clone() for p in branch.parameters()]))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    for plain, ckpt in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(plain, ckpt)


def test_inference_then_training_step_at_the_same_shape(b1):
    """A padding mask first built under inference_mode must not be reused by a later
    training step at the same shape ("Inference tensors cannot be saved for backward")."""
    model = copy.deepcopy(b1)
    torch.manual_seed(0)  # deterministic
    x = torch.randn(1, 3, 40, 48)  # padded stripes on branches 3 and 4
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert model.stages[-1].branches[-1].blocks[0].attn.bn.weight.grad is not None
