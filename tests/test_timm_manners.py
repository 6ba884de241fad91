"""Every backbone family behaves as a timm model under timm's own utilities: gradient checkpointing
(``set_grad_checkpointing``) recomputes blocks and leaves gradients unchanged, a model pruned by
``prune_intermediate_layers`` still runs and gives the same maps, ``create_optimizer_v2(...,
layer_decay=...)`` finds real layers through ``group_matcher``, weight decay falls on weights only,
and architecture keywords pass through ``timm.create_model``. Also how ``create_model`` initialises
HRViT for each task: the classifier as the official classification code (PyTorch's default init),
the ``features_only`` backbone as the official segmentation backbone (Linear trunc_normal(0.02)).

Small architectures (overridden at ``create_model``) keep each check within a few seconds of CPU."""
from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import timm
import timm.optim
import torch
from segmentation_models_pytorch.encoders import mix_transformer as smp_mit
from timm.layers import DropPath
from torch import nn

import hrvit_repro  # noqa: F401  (registers every family with timm)
from baselines.cswin import CSWinBlock
from models.factory import build_model
from models.hrvit import HRViTAttn, HRViTBlock

SMALL_HRVIT = dict(blocks=((1,), (1, 1), (1, 1, 2), (1, 1, 2, 1)))
SMALL_HRNET = dict(blocks_per_branch=1, num_modules=(1, 1, 1))
# name, small-architecture keywords, the block class that checkpointing recomputes, a stem parameter,
# a parameter of the first and of the last block, the classifier weight
FAMILIES: dict[str, tuple[dict[str, Any], type[nn.Module], str, str, str, str]] = {
    "hrvit_b1": (SMALL_HRVIT, HRViTBlock, "stem.0.weight", "stages.0.branches.0.blocks.0.attn.qkv.weight",
                 "stages.3.branches.3.blocks.0.attn.qkv.weight", "head.fc.weight"),
    "mit_b0": (dict(depths=[1, 2, 1, 1]), smp_mit.Block, "patch_embed1.proj.weight", "block1.0.attn.q.weight",
               "block4.0.attn.q.weight", "head.weight"),
    "cswin_ti": (dict(depths=(1, 1, 2, 1)), CSWinBlock, "stages.0.embed.proj.weight", "stages.0.blocks.0.qkv.weight",
                 "stages.3.blocks.0.qkv.weight", "head.weight"),
    "hrnet18_mit": (SMALL_HRNET, smp_mit.Block, "conv1.weight", "stage2.0.branches.0.1.attn.q.weight",
                    "stage4.0.branches.3.1.attn.q.weight", "classifier.weight"),
    "hrnet18_cswin": (SMALL_HRNET, CSWinBlock, "conv1.weight", "stage2.0.branches.0.1.block.qkv.weight",
                      "stage4.0.branches.3.1.block.qkv.weight", "classifier.weight"),
}
ODD = (2, 3, 50, 38)  # not a multiple of 32: every family's padding and cropping take part


@pytest.fixture(autouse=True)
def one_thread(one_torch_thread):
    """One intra-op thread (conftest): faster at these sizes on the shared 2-core machine."""


def small(name: str, **kwargs: Any) -> nn.Module:
    torch.manual_seed(0)  # deterministic
    return timm.create_model(name, **FAMILIES[name][0], **kwargs)


def wake_attention(model: nn.Module) -> nn.Module:
    """HRViT's attention BNs start at exactly zero, which would block every gradient upstream of them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, HRViTAttn) and m.bn is not None:
                m.bn.weight.fill_(1.0)
    return model


def count_forward_calls(monkeypatch: pytest.MonkeyPatch, block_cls: type[nn.Module]) -> list[int]:
    """Calls of ``block_cls.forward``, recomputations included (module hooks do not see those)."""
    calls, forward = [], block_cls.forward

    def counted(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(block_cls, "forward", counted)
    return calls


def output_and_gradients(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(1)  # the same drop-path draws for both runs
    out = model(x)
    out.square().mean().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", FAMILIES)
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(name, monkeypatch):
    block_cls = FAMILIES[name][1]
    model = wake_attention(small(name, drop_path_rate=0.1, num_classes=10)).train()
    checkpointed = copy.deepcopy(model)
    checkpointed.set_grad_checkpointing(True)
    n_blocks = sum(isinstance(m, block_cls) for m in model.modules())
    calls = count_forward_calls(monkeypatch, block_cls)
    x = torch.randn(*ODD)
    out, grads = output_and_gradients(model, x)
    assert n_blocks > 0 and len(calls) == n_blocks
    ckpt_out, ckpt_grads = output_and_gradients(checkpointed, x)
    assert len(calls) == 3 * n_blocks  # every block ran again in backward
    torch.testing.assert_close(ckpt_out, out)
    assert ckpt_grads.keys() == grads.keys() and len(grads) == len(list(model.parameters()))
    for n, g in grads.items():
        torch.testing.assert_close(ckpt_grads[n], g, msg=lambda m: f"{name} {n}: {m}")


@pytest.mark.parametrize("name", FAMILIES)
def test_segmentation_model_passes_grad_checkpointing_to_its_backbone(name, monkeypatch):
    block_cls = FAMILIES[name][1]
    torch.manual_seed(0)
    model = wake_attention(build_model(name, "seg", 5, **FAMILIES[name][0])).train()
    model.set_grad_checkpointing(True)
    n_blocks = sum(isinstance(m, block_cls) for m in model.modules())
    calls = count_forward_calls(monkeypatch, block_cls)
    model(torch.randn(*ODD)).square().mean().backward()
    assert n_blocks > 0 and len(calls) == 2 * n_blocks  # every block ran again in backward


@pytest.mark.parametrize("name", FAMILIES)
def test_pruned_model_runs_and_keeps_the_selected_map(name):
    model = small(name).eval()
    full = copy.deepcopy(model)
    info = model.feature_info[1]
    assert model.prune_intermediate_layers([1]) == [1]
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    x = torch.randn(*ODD)
    with torch.no_grad():
        model(x)  # runs: the unpooled features of what is left
        (got,) = model.forward_intermediates(x, indices=[1], intermediates_only=True)
        (want,) = full.forward_intermediates(x, indices=[1], intermediates_only=True)
    assert got.shape[:2] == (ODD[0], info["num_chs"])
    torch.testing.assert_close(got, want)


def test_hrvit_pruned_head_cannot_be_given_classes():
    model = small("hrvit_b1")
    model.prune_intermediate_layers([0, 1, 2, 3])
    assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0
    with pytest.raises(ValueError, match="prune_intermediate_layers"):
        model.reset_classifier(10)


@pytest.mark.parametrize("name", FAMILIES)
def test_layer_decay_scales_real_layers(name):
    _, _, stem, first, last, classifier = FAMILIES[name]
    model = small(name)
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(scale) == len(params)
    assert len(set(scale.values())) >= 5, f"{name}: only {sorted(set(scale.values()))}"
    assert scale[id(params[stem])] == min(scale.values())
    assert scale[id(params[stem])] < scale[id(params[first])] < scale[id(params[last])] < scale[id(params[classifier])]
    assert scale[id(params[classifier])] == 1.0


@pytest.mark.parametrize("name", FAMILIES)
def test_weight_decay_falls_on_conv_and_linear_weights_only(name):
    """No family has position embeddings or relative-position tables: with timm's filter (biases and
    norms excluded, plus the model's ``no_weight_decay`` if any) only conv and linear weights decay."""
    model = small(name)
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    decayed = [p for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]]
    assert {id(p) for p in decayed} == weights


def max_drop_path(model: nn.Module) -> float:
    return max(m.drop_prob for m in model.modules() if isinstance(m, DropPath))


def test_architecture_keywords_reach_hrvit():
    model = timm.create_model("hrvit_b1", drop_path_rate=0.2, window_sizes=(1, 2, 9, 9), mlp_ratios=(2, 2, 2, 2),
                              **SMALL_HRVIT)
    assert max_drop_path(model) == pytest.approx(0.2)
    assert [len(b.blocks) for b in model.stages[-1].branches] == [1, 1, 2, 1]
    assert {m.ws for m in model.stages[-1].branches[3].modules() if isinstance(m, HRViTAttn)} == {9}
    assert model.stages[-1].branches[0].blocks[0].mlp.fc1.out_features == 2 * 32


def test_architecture_keywords_reach_mit_and_cswin():
    mit = timm.create_model("mit_b0", depths=[1, 1, 2, 1], drop_path_rate=0.3)
    assert [len(mit.block1), len(mit.block3)] == [1, 2] and max_drop_path(mit) == pytest.approx(0.3)
    cswin = timm.create_model("cswin_ti", depths=(1, 1, 2, 1), split_size=(1, 2, 3, 7), drop_path_rate=0.3)
    assert [len(s.blocks) for s in cswin.stages] == [1, 1, 2, 1] and max_drop_path(cswin) == pytest.approx(0.3)
    assert cswin.stages[2].blocks[0].attns[0].split_size == 3


def test_architecture_keywords_reach_hrnet_vit():
    model = timm.create_model("hrnet18_cswin", drop_path_rate=0.3, **SMALL_HRNET)
    assert len(model.stage3) == 1 and len(model.stage4[0].branches[0]) == 2  # patch embedding + 1 block
    assert max_drop_path(model) == pytest.approx(0.3)


# ------------------------------------------------------------------ HRViT's init per task


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def test_hrvit_classifier_starts_with_pytorch_default_init():
    """The official classification code: every Linear uniform in +-1/sqrt(fan_in) (weight and bias),
    so the weights scaled by sqrt(fan_in) are uniform on [-1, 1] with std 1/sqrt(3); trunc_normal(0.02)
    with zero biases cannot give that."""
    torch.manual_seed(0)  # deterministic
    linears = linear_layers(build_model("hrvit_b1", task="cls"))
    assert len(linears) == 211
    for m in linears:
        bound = 1 / math.sqrt(m.in_features)
        assert m.weight.abs().max() <= bound and m.bias.abs().max() <= bound
    scaled = torch.cat([m.weight.detach().flatten() * math.sqrt(m.in_features) for m in linears])
    assert scaled.std().item() == pytest.approx(1 / math.sqrt(3), rel=0.01)
    assert all(m.bias.abs().sum() > 0 for m in linears)


def test_hrvit_segmentation_backbone_starts_with_trunc_normal_linears():
    """The official segmentation backbone's init_weights: Linear trunc_normal(std 0.02), bias 0. Under
    PyTorch's default init no Linear of 4096+ weights has std within 10 % of 0.02 (they are >= 0.036)."""
    torch.manual_seed(0)  # deterministic
    backbone = build_model("hrvit_b1", task="seg").backbone
    linears = linear_layers(backbone)
    assert len(linears) == 210  # the classifier's Linear is gone with the head
    assert all(m.bias.eq(0).all() for m in linears)
    large = [m for m in linears if m.weight.numel() >= 4096]
    assert large and all(m.weight.std().item() == pytest.approx(0.02, rel=0.1) for m in large)
    assert all(m.bn.weight.eq(0).all() for m in backbone.modules() if isinstance(m, HRViTAttn))
