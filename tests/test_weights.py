"""External weights: every accepted checkpoint format loads through timm's ``pretrained=True`` and
through ``models.weights``, giving the same outputs as the model the fixture was made from.

Fixtures are built from the suite models' own state by renaming their keys into each published
format. The renaming here is written independently of the converters, and hand-written key tables
(read off the official code) pin at least one block per family, so a converter that merely inverts
a wrong fixture cannot pass.
"""
from __future__ import annotations

import argparse
import functools
import logging
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

import hrvit_repro  # noqa: F401  (registers every suite model)
from baselines import cswin
from models.factory import build_model
from models.weights import WeightsError, detect_format, load_backbone_weights, load_segmentation_weights, read_checkpoint

torch.manual_seed(0)
X = torch.randn(1, 3, 64, 64)

# ---- hand-written key tables: published key -> suite key -------------------------------------------
HRVIT_TABLE = {  # facebookresearch/HRViT models/hrvit.py
    "stem.conv1.weight": "stem.0.weight",
    "stem.bn2.running_var": "stem.4.running_var",
    "features.2.blocks.1.0.0.weight": "stages.1.fusion.paths.1.0.0.weight",  # module 1, 32 -> 64 down path
    "features.2.blocks.1.0.3.bias": "stages.1.fusion.paths.1.0.3.bias",
    "features.10.blocks.0.3.1.num_batches_tracked": "stages.5.fusion.paths.0.3.1.num_batches_tracked",  # up path BN
    "features.3.patch_embed.1.proj.0.weight": "stages.1.branches.1.patch_embed.proj.weight",
    "features.3.patch_embed.1.proj.1.bias": "stages.1.branches.1.patch_embed.dw.bias",
    "features.5.branches.2.5.attn_norm.weight": "stages.2.branches.2.blocks.5.norm1.weight",
    "features.5.branches.2.5.attn.to_qkv.weight": "stages.2.branches.2.blocks.5.attn.qkv.weight",
    "features.5.branches.2.5.attn.to_out.0.bias": "stages.2.branches.2.blocks.5.attn.proj.bias",
    "features.5.branches.2.5.attn.attn_bn.running_mean": "stages.2.branches.2.blocks.5.attn.bn.running_mean",
    "features.5.branches.2.5.attn.parallel_conv.1.weight": "stages.2.branches.2.blocks.5.attn.conv.weight",
    "features.5.branches.2.5.des.proj_right.weight": "stages.2.branches.2.blocks.5.des.right.weight",
    "features.5.branches.2.5.des.proj_left.bias": "stages.2.branches.2.blocks.5.des.left.bias",
    "features.5.branches.2.5.ffn_norm.bias": "stages.2.branches.2.blocks.5.norm2.bias",
    "features.5.branches.2.5.ffn.fc1.weight": "stages.2.branches.2.blocks.5.mlp.fc1.weight",
    "features.5.branches.2.5.ffn.conv.conv_3.weight": "stages.2.branches.2.blocks.5.mlp.conv3.weight",
    "features.5.branches.2.5.ffn.conv.conv_5.bias": "stages.2.branches.2.blocks.5.mlp.conv5.bias",
    "features.5.branches.2.5.ffn.fc2.weight": "stages.2.branches.2.blocks.5.mlp.fc2.weight",
    "features.11.norm.3.weight": "stages.5.branches.3.norm.weight",
    "head.incre_modules.2.0.conv3.weight": "head.incre.2.conv3.weight",
    "head.incre_modules.2.0.downsample.1.running_mean": "head.incre.2.downsample.1.running_mean",
    "head.downsamp_modules.1.0.bias": "head.downsamples.1.0.bias",
    "head.final_layer.1.weight": "head.final_layer.1.weight",
    "head.classifier.weight": "head.fc.weight",
}
MIT_TABLE = {  # NVlabs/SegFormer mmseg/models/backbones/mix_transformer.py (smp uses the same names)
    k: k for k in ("patch_embed1.proj.weight", "patch_embed2.norm.bias", "block1.0.attn.q.weight",
                   "block1.0.attn.kv.bias", "block1.1.attn.sr.weight", "block1.1.attn.norm.weight",
                   "block2.0.mlp.dwconv.dwconv.weight", "block4.1.mlp.fc2.bias", "norm4.weight", "head.weight")
}
CSWIN_TABLE = {  # microsoft/CSWin-Transformer models/cswin.py
    "stage1_conv_embed.0.weight": "stages.0.embed.proj.weight",
    "stage1_conv_embed.2.bias": "stages.0.embed.norm.bias",
    "merge2.conv.weight": "stages.2.embed.proj.weight",
    "merge3.norm.weight": "stages.3.embed.norm.weight",
    "stage3.20.norm1.weight": "stages.2.blocks.20.norm1.weight",
    "stage3.20.qkv.weight": "stages.2.blocks.20.qkv.weight",
    "stage3.20.attns.1.get_v.weight": "stages.2.blocks.20.attns.1.get_v.weight",
    "stage3.20.proj.bias": "stages.2.blocks.20.proj.bias",
    "stage3.20.mlp.fc1.weight": "stages.2.blocks.20.mlp.fc1.weight",
    "stage4.0.attns.0.get_v.bias": "stages.3.blocks.0.attns.0.get_v.bias",
    "norm.weight": "norm.weight",
    "head.bias": "head.bias",
}


# ---- fixtures in the published formats ------------------------------------------------------------
_HRVIT_BLOCK = {"norm1": "attn_norm", "attn.qkv": "attn.to_qkv", "attn.proj": "attn.to_out.0", "attn.bn": "attn.attn_bn",
                "attn.conv": "attn.parallel_conv.1", "des.right": "des.proj_right", "des.left": "des.proj_left",
                "norm2": "ffn_norm", "mlp.fc1": "ffn.fc1", "mlp.conv3": "ffn.conv.conv_3", "mlp.conv5": "ffn.conv.conv_5",
                "mlp.fc2": "ffn.fc2"}


def _official_hrvit_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] == "stem":
        return "stem." + {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"}[parts[1]] + "." + parts[2]
    if parts[0] == "head":
        rest = ".".join(parts[2:])
        if parts[1] == "incre":  # head.incre.i.param -> head.incre_modules.i.0.param
            return f"head.incre_modules.{parts[2]}.0.{'.'.join(parts[3:])}"
        return {"downsamples": "head.downsamp_modules.", "final_layer": "head.final_layer.", "fc": "head.classifier."}[parts[1]] + rest
    m = int(parts[1])
    if parts[2] == "fusion":  # stages.m.fusion.paths.i.j.k.param
        return f"features.{2 * m}.blocks.{parts[4]}.{parts[5]}.{'.'.join(parts[6:])}"
    i, sub = parts[3], parts[4]  # stages.m.branches.i.<sub>...
    if sub == "patch_embed":
        return f"features.{2 * m + 1}.patch_embed.{i}." + {"proj": "proj.0", "dw": "proj.1", "norm": "norm"}[parts[5]] + f".{parts[6]}"
    if sub == "norm":
        return f"features.{2 * m + 1}.norm.{i}.{parts[5]}"
    module, param = ".".join(parts[6:-1]), parts[-1]  # blocks.j.<module>.param
    return f"features.{2 * m + 1}.branches.{i}.{parts[5]}.{_HRVIT_BLOCK[module]}.{param}"


def _official_cswin_key(key: str) -> str:
    parts = key.split(".")
    if parts[0] in ("norm", "head"):
        return key
    s = int(parts[1])
    if parts[2] == "embed":
        index = {"proj": "0", "norm": "2"} if s == 0 else {"proj": "conv", "norm": "norm"}
        return (f"stage1_conv_embed.{index[parts[3]]}" if s == 0 else f"merge{s}.{index[parts[3]]}") + f".{parts[4]}"
    return f"stage{s + 1}." + ".".join(parts[3:])  # stages.s.blocks.i.<param> -> stage{s+1}.i.<param>


def _head_to_mmseg(head: dict[str, torch.Tensor], segformer: bool) -> dict[str, torch.Tensor]:
    """The suite's decode head in HRViT's mmseg SegformerHead or NVlabs' SegFormerHead key format."""
    out = {}
    for key, value in head.items():
        i = re.fullmatch(r"linear_c\.(\d)\.(weight|bias)", key)
        if i and segformer:
            out[f"linear_c{int(i[1]) + 1}.proj.{i[2]}"] = value.flatten(1) if i[2] == "weight" else value
        elif i:
            out[f"convs.{i[1]}.conv.{i[2]}"] = value
        elif key == "linear_fuse.weight":
            out["linear_fuse.conv.weight" if segformer else "fusion_conv.conv.weight"] = (
                torch.cat(value.chunk(4, dim=1)[::-1], dim=1) if segformer else value)  # NVlabs concatenates c4..c1
        elif key.startswith("fuse_bn."):
            out[("linear_fuse.bn." if segformer else "fusion_conv.bn.") + key[len("fuse_bn."):]] = value
        else:
            out[("linear_pred." if segformer else "conv_seg.") + key[len("classifier."):]] = value
    if segformer:  # mmseg's base head also holds an unused conv_seg
        out.update({"conv_seg.weight": torch.zeros(5, 3, 1, 1), "conv_seg.bias": torch.zeros(5)})
    return out


@functools.cache
def _cls(name: str) -> torch.nn.Module:
    torch.manual_seed(1)
    model = timm.create_model(name).eval()
    for module in model.modules():  # non-trivial BN statistics and zero-init BN weights
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model


def _seg(name: str, num_classes: int = 5) -> torch.nn.Module:
    torch.manual_seed(2)
    model = build_model(name, task="seg", num_classes=num_classes).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.1, 0.1), module.running_var.uniform_(0.5, 1.5)
            module.weight.data.uniform_(0.5, 1.5)
    return model


def _pretrained(name: str, path, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()


def _backbone_state(seg: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k[len("backbone.model."):]: v for k, v in seg.state_dict().items() if k.startswith("backbone.model.")}


def _assert_same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> None:
    with torch.no_grad():
        ya, yb = a(X), b(X)
    for u, v in zip(ya if isinstance(ya, list) else [ya], yb if isinstance(yb, list) else [yb]):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


# ---- HRViT -------------------------------------------------------------------------------------------
def _hrvit_official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {_official_hrvit_key(k): v for k, v in model.state_dict().items()}


def test_hrvit_fixture_and_converter_agree_with_the_hand_written_key_table():
    from models.hrvit import checkpoint_filter_fn

    state = _cls("hrvit_b1").state_dict()
    official = _hrvit_official(_cls("hrvit_b1"))
    assert len(official) == len(state)
    converted = checkpoint_filter_fn(dict(official), _cls("hrvit_b1"))
    for theirs, ours in HRVIT_TABLE.items():
        assert torch.equal(official[theirs], state[ours]), theirs
        assert converted[ours] is official[theirs], theirs


@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "model", "state_dict_ema"])
def test_hrvit_official_imagenet_checkpoint_loads_through_timm(tmp_path, wrapper):
    source = _cls("hrvit_b1")
    official = _hrvit_official(source)
    checkpoint = official if wrapper == "raw" else {wrapper: official, "epoch": 299, "args": argparse.Namespace(lr=1e-3)}
    path = tmp_path / "hrvit_b1_official.pth.tar"
    torch.save(checkpoint, path)
    assert detect_format(read_checkpoint(path)) == "hrvit-official"
    _assert_same_outputs(source, _pretrained("hrvit_b1", path))
    features = _pretrained("hrvit_b1", path, features_only=True)  # the backbone of the segmentation model
    with torch.no_grad():
        torch.testing.assert_close(features(X), source.forward_features(X), rtol=0, atol=0)


def test_hrvit_official_mmseg_checkpoint_loads_into_the_segmentation_model(tmp_path):
    source = _seg("hrvit_b1")
    backbone = {f"backbone.{_official_hrvit_key(k)}": v for k, v in _backbone_state(source).items()}
    head = {f"decode_head.{k}": v for k, v in _head_to_mmseg(source.decode_head.state_dict(), segformer=False).items()}
    assert "decode_head.convs.2.conv.weight" in head and "decode_head.fusion_conv.bn.running_var" in head
    path = tmp_path / "segformer_hrvit_b1_cityscapes.pth"
    torch.save({"state_dict": {**backbone, **head}, "meta": {"CLASSES": ("a", "b", "c", "d", "e")}}, path)
    target = build_model("hrvit_b1", task="seg", num_classes=5).eval()
    record = load_segmentation_weights(target, path, "hrvit_b1")
    assert record["format"] == "hrvit-official-mmseg" and record["kept_init"] == [] and len(record["sha256"]) == 64
    _assert_same_outputs(source, target)
    fresh = build_model("hrvit_b1", task="seg", num_classes=5).eval()  # backbone only, e.g. finetune --pretrained
    assert load_backbone_weights(fresh, path, "hrvit_b1")["loaded"] == len(backbone)
    with torch.no_grad():
        torch.testing.assert_close(fresh.backbone(X), source.backbone(X), rtol=0, atol=0)


def test_suite_checkpoint_and_safetensors_round_trip(tmp_path):
    source = _seg("hrvit_b1")
    pt = tmp_path / "checkpoint.pt"
    torch.save({"format": "hrvit-repro-checkpoint/1", "task": "seg", "model": "hrvit_b1", "model_settings": {},
                "model_state": source.state_dict(), "step": 2}, pt)
    st = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(st),
              metadata={"format": "hrvit-repro-weights/1", "meta": '{"task": "seg", "model": "hrvit_b1"}'})
    for path in (pt, st):
        target = build_model("hrvit_b1", task="seg", num_classes=5).eval()
        assert load_segmentation_weights(target, path, "hrvit_b1")["format"] == "hrvit-repro"
        _assert_same_outputs(source, target)
    with torch.no_grad():  # a suite segmentation checkpoint also initialises a timm backbone
        torch.testing.assert_close(_pretrained("hrvit_b1", pt, features_only=True)(X), source.backbone(X), rtol=0, atol=0)


# ---- MiT ---------------------------------------------------------------------------------------------
def test_mit_nvlabs_imagenet_checkpoint_loads_through_timm(tmp_path):
    source = _cls("mit_b0")
    state = source.state_dict()
    assert set(MIT_TABLE) <= set(state)  # NVlabs' names are smp's: the file is the plain state dict
    path = tmp_path / "mit_b0.pth"
    torch.save(state, path)
    _assert_same_outputs(source, _pretrained("mit_b0", path))


def test_segformer_mmseg_checkpoint_evaluates_in_the_segmentation_model(tmp_path):
    source = _seg("mit_b0")
    head = _head_to_mmseg(source.decode_head.state_dict(), segformer=True)
    assert head["linear_c4.proj.weight"].shape == (256, 256) and "linear_pred.bias" in head
    state = {**{f"backbone.{k}": v for k, v in _backbone_state(source).items()},
             **{f"decode_head.{k}": v for k, v in head.items()}}
    path = tmp_path / "segformer.b0.512x512.ade.160k.pth"
    torch.save({"state_dict": state, "meta": {}}, path)
    target = build_model("mit_b0", task="seg", num_classes=5).eval()
    assert load_segmentation_weights(target, path, "mit_b0")["format"] == "segformer-mmseg"
    _assert_same_outputs(source, target)
    wrong = build_model("mit_b0", task="seg", num_classes=19)
    with pytest.raises(WeightsError, match="predicts 5 classes but the model has 19; build it with --num-classes 5"):
        load_segmentation_weights(wrong, path, "mit_b0")


# ---- CSWin -------------------------------------------------------------------------------------------
def test_cswin_official_checkpoint_prefers_ema_and_leaves_seg_norms_at_init(tmp_path, caplog):
    source = _cls("cswin_ti")
    state = source.state_dict()
    official = {_official_cswin_key(k): v for k, v in state.items()}
    converted = cswin.checkpoint_filter_fn(dict(official), source)
    for theirs, ours in CSWIN_TABLE.items():
        assert official[theirs] is state[ours] and converted[ours] is official[theirs], theirs
    path = tmp_path / "cswin_tiny_224.pth"
    torch.save({"state_dict": {k: torch.zeros_like(v) for k, v in official.items()}, "state_dict_ema": official}, path)
    _assert_same_outputs(source, _pretrained("cswin_ti", path))
    seg = build_model("cswin_ti", task="seg", num_classes=5)
    with caplog.at_level(logging.WARNING):
        record = load_backbone_weights(seg, path, "cswin_ti")
    assert record["format"] == "cswin-official"
    assert {k.split(".")[0] for k in record["kept_init"]} == {"stage_norms"}  # the backbone has no head
    assert "keep their initial values" in caplog.text


# ---- HRNet-ViT and errors ----------------------------------------------------------------------------
def test_hrnet_vit_takes_suite_checkpoints_only(tmp_path):
    source = _seg("hrnet18_mit")
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": "hrvit-repro-checkpoint/1", "model_state": source.state_dict()}, path)
    target = build_model("hrnet18_mit", task="seg", num_classes=5).eval()
    load_segmentation_weights(target, path, "hrnet18_mit")
    _assert_same_outputs(source, target)
    classifier = _cls("hrnet18_mit")  # a pretrain run's checkpoint initialises the segmentation backbone
    torch.save({"format": "hrvit-repro-checkpoint/1", "task": "cls", "model": "hrnet18_mit",
                "model_state": classifier.state_dict()}, path)
    record = load_backbone_weights(target, path, "hrnet18_mit")
    assert record["kept_init"] == [] and record["loaded"] == len(target.backbone.state_dict())
    expected = classifier.state_dict()
    for key, value in target.backbone.state_dict().items():
        assert torch.equal(value, expected[key]), key
    official = tmp_path / "cswin.pth"
    torch.save({_official_cswin_key(k): v for k, v in _cls("cswin_ti").state_dict().items()}, official)
    with pytest.raises(WeightsError, match="HRNet-ViT models cannot load a cswin-official checkpoint; accepted formats: hrvit-repro$"):
        load_backbone_weights(target, official, "hrnet18_mit")


def test_unmapped_and_missing_keys_fail_in_one_message(tmp_path):
    official = _hrvit_official(_cls("hrvit_b1"))
    official["features.5.branches.2.5.attn.extra_scale"] = torch.ones(1)
    del official["features.3.patch_embed.1.proj.1.bias"]
    path = tmp_path / "broken.pth"
    torch.save(official, path)
    with pytest.raises(WeightsError) as err:
        _pretrained("hrvit_b1", path)
    message = str(err.value)
    assert "\n" not in message and "features.5.branches.2.5.attn.extra_scale" in message
    official.pop("features.5.branches.2.5.attn.extra_scale")
    torch.save(official, path)
    with pytest.raises(WeightsError, match=r"missing: \[stages.1.branches.1.patch_embed.dw.bias\]"):
        _pretrained("hrvit_b1", path)


def test_a_head_of_another_width_is_dropped_with_a_notice(tmp_path, caplog):
    source = _cls("mit_b0")
    state = dict(source.state_dict(), **{"head.weight": torch.zeros(10, 256), "head.bias": torch.zeros(10)})
    path = tmp_path / "mit_b0_10cls.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        model = _pretrained("mit_b0", path)
    assert "dropped 2 head tensors of the mit-nvlabs checkpoint: 2 of another width" in caplog.text
    assert "e.g. head.weight (1000, 256) in the model" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(X), source.forward_features(X), rtol=0, atol=0)


def test_a_backbone_drops_the_classifier_head_with_one_short_notice(tmp_path, caplog):
    source = _cls("hrvit_b1")
    path = tmp_path / "hrvit_b1.pt"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING):
        load_backbone_weights(_seg("hrvit_b1"), path, "hrvit_b1")
    heads = [k for k in source.state_dict() if k.startswith("head.")]
    notice = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dropped")]
    assert notice == [f"dropped {len(heads)} head tensors of the hrvit-repro checkpoint: {len(heads)} named head.*, "
                      "which the model lacks (a backbone builds no classifier head)"]


def test_pretrained_without_a_source_or_offline_says_what_to_download(tmp_path):
    with pytest.raises(WeightsError, match=r"no pretrained weights are built in .* pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("cswin_ti", pretrained=True)  # CSWin-T and -S have release URLs, Ti has none
    assert timm.models.get_pretrained_cfg("cswin_t").url.endswith("/v0.1.0/cswin_tiny_224.pth")
    with pytest.raises(WeightsError, match=f"weights file {tmp_path}/nope.pth does not exist"):
        _pretrained("cswin_t", tmp_path / "nope.pth")
    with pytest.raises(WeightsError, match=r"cannot download http://127.0.0.1:9/mit_b0.pth .* put it at .*/checkpoints/mit_b0.pth"):
        timm.create_model("mit_b0", pretrained=True, pretrained_cfg_overlay=dict(url="http://127.0.0.1:9/mit_b0.pth"))
