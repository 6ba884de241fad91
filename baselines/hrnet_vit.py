"""The vanilla HRNet-ViT baselines of the HRViT paper (Table 6): HRNet18/32/40-MiT and -CSWin.

The paper only says it "directly replace[s] residual blocks in HRNetV2 with MiT/CSWin Transformer
blocks". This file reuses timm's HRNetV2 as is (stem, 4-Bottleneck stage 1, transitions, fuse
layers, module counts, classification head) and swaps the BasicBlocks of stages 2-4 through timm's
``block_types_dict``. The reading is the fit of docs/hrnet-vit-fit.md, with every choice a keyword
switch and these defaults ("fitted to Table 6 params within 3 %"):

* ``block``: 'mit' (smp's MiT block: SRA attention + Mix-FFN, so MiT itself and HRNet-MiT share one
  block) or 'cswin' (this project's CSWin block: stripe widths 1/2/7/7, the last branch global);
* ``patch_embed='conv3'``: each branch of every module starts with a 3x3 conv + LayerNorm (MiT's /
  CSWin's overlapped patch embedding at stride 1; 'none' drops it);
* ``mit_sr='pool'``: MiT's key/value reduction by a parameter-free sr x sr average pool + LayerNorm
  (sr 8/4/2/1 per branch); 'conv' keeps MiT's learned sr x sr conv (far too heavy for Table 6);
* ``blocks_per_branch=4``, ``num_modules=(1, 4, 3)`` (HRNetV2's), ``mlp_ratio=4``;
* ``num_heads``: head dim W on each branch (MiT 1/2/4/8, CSWin 2/4/8/16 as CSWin needs two halves);
* SegFormer head width 256 for W18/W32 and 768 for W40 (registered per name).

FLOP family: 'hrvit' (mmcv-1.3 hooks, LayerNorm counted, SyncBN not), with each attention module's
matmuls scaled by its own counter family: smp's MiT attention as SegFormer counts it (both matmuls),
CSWin's as HRViT counts it (one). That mix is what lands on Table 6 (docs/hrnet-vit-fit.md). Measured with the
defaults (SegFormer head, 19 classes, 512x512, ``reproduce.flops`` paper convention), ours / paper:

=============  ===================  =====================
model          params (M)           GFLOPs
=============  ===================  =====================
HRNet18-MiT    8.51 / 8.4 (+1.3 %)  28.06 / 29.3 (-4.2 %)
HRNet18-CSWin  8.34 / 8.1 (+2.9 %)  22.32 / 22.3 (+0.1 %)
HRNet32-MiT    24.91 / 24.4 (+2.1 %)  53.13 / 52.4 (+1.4 %)
HRNet32-CSWin  24.61 / 23.9 (+3.0 %)  44.14 / 42.2 (+4.6 %)
HRNet40-MiT    40.73 / 40.1 (+1.6 %)  106.88 / 108.0 (-1.0 %)
HRNet40-CSWin  40.34 / 39.5 (+2.1 %)  96.50 / 96.3 (+0.2 %)
=============  ===================  =====================

The fit is not a documented design: counting MiT attention with one matmul instead would give
about 23.9 / 45.6 / 97.5 G, and no tried topology (1-4 blocks, module counts, mlp ratio, stage-1
depth) fits both families' parameters better (docs/hrnet-vit-fit.md#search-space).

timm's fuse layers upsample by a fixed factor, so HRNet only runs on sizes divisible by 32; these
models zero-pad the input (bottom/right) up to that and crop the features back to ceil(size/stride).
"""
from __future__ import annotations

import copy
import functools
import math
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import mix_transformer as smp_mit
from timm.layers import DropPath, LayerNorm2d
from timm.models import build_model_with_cfg, generate_default_cfgs, hrnet, register_model
from torch import nn

from baselines.cswin import CSWinBlock
from models.factory import refuse_pretrained, register_segmentation_backbone

__all__ = ["HRNetViT", "HRNetViTFeatures", "HRNetViTSettings", "CSWinBranchBlock", "ConvPatchEmbed"]

_ALIGN = 32  # total stride of HRNet's lowest-resolution branch


@dataclass(frozen=True)
class HRNetViTSettings:
    """The construction switches (defaults: the fit of docs/hrnet-vit-fit.md)."""

    block: str  # 'mit' or 'cswin'
    patch_embed: str = "conv3"  # 'conv3' or 'none'
    mit_sr: str = "pool"  # 'pool' or 'conv'
    blocks_per_branch: int = 4
    num_modules: tuple[int, int, int] = (1, 4, 3)  # stages 2, 3, 4
    mlp_ratio: float = 4.0
    num_heads: tuple[int, int, int, int] | None = None  # None: (1, 2, 4, 8) for MiT, (2, 4, 8, 16) for CSWin
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)  # MiT
    split_sizes: tuple[int, int, int, int] = (1, 2, 7, 7)  # CSWin; the last branch attends globally
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        choices = {"block": ("mit", "cswin"), "patch_embed": ("conv3", "none"), "mit_sr": ("pool", "conv")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"HRNet-ViT {name}={getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.blocks_per_branch < 1 or len(self.num_modules) != 3 or min(self.num_modules) < 1:
            raise ValueError("HRNet-ViT needs blocks_per_branch >= 1 and three module counts >= 1 (stages 2-4)")

    @property
    def heads(self) -> tuple[int, ...]:
        if self.num_heads is not None:
            return self.num_heads
        return (1, 2, 4, 8) if self.block == "mit" else (2, 4, 8, 16)


def _branch_index(planes: int, width: int) -> int:
    """HRNet branch i has width * 2**i channels."""
    index = int(round(math.log2(planes / width)))
    if width << index != planes or not 0 <= index < 4:
        raise ValueError(f"{planes} channels is not an HRNet branch width for W={width}")
    return index


class CSWinBranchBlock(nn.Module):
    """A CSWin block on an NCHW branch map (HRNet blocks are NCHW in, NCHW out)."""

    def __init__(self, block: CSWinBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2), (h, w))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


def _transformer_block(inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, *,
                       width: int, settings: HRNetViTSettings, device=None, dtype=None) -> nn.Module:
    """timm HRNet block constructor: one MiT or CSWin block for branch log2(planes / width)."""
    if stride != 1 or downsample is not None or inplanes != planes:
        raise ValueError("HRNet-ViT transformer blocks keep the branch width (no stride, no downsample)")
    i = _branch_index(planes, width)
    heads = settings.heads[i]
    if settings.block == "mit":
        block = smp_mit.Block(planes, heads, settings.mlp_ratio, qkv_bias=True, drop_path=settings.drop_path_rate,
                              norm_layer=functools.partial(smp_mit.LayerNorm, eps=1e-6), sr_ratio=settings.sr_ratios[i])
        if settings.mit_sr == "pool" and settings.sr_ratios[i] > 1:
            block.attn.sr = nn.AvgPool2d(settings.sr_ratios[i])  # parameter-free reduction, LayerNorm kept
    else:
        block = CSWinBranchBlock(CSWinBlock(planes, heads, settings.split_sizes[i], last_stage=i == 3,
                                            mlp_ratio=settings.mlp_ratio, drop_path=settings.drop_path_rate))
    return block.to(device=device, dtype=dtype)


class ConvPatchEmbed(nn.Sequential):
    """3x3 stride-1 conv + LayerNorm at the start of each branch of a module (the "CONV-based patch
    embedding" HRViT's EffPatchEmbed is compared against)."""

    def __init__(self, channels: int):
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), LayerNorm2d(channels))


def _pad_to_alignment(x: torch.Tensor) -> torch.Tensor:
    pad_h, pad_w = -x.shape[-2] % _ALIGN, -x.shape[-1] % _ALIGN
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


class HRNetViT(hrnet.HighResolutionNet):
    """timm's HRNetV2 classifier, accepting any input size."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(_pad_to_alignment(x))


class HRNetViTFeatures(hrnet.HighResolutionNetFeatures):
    """timm's HRNetV2 branch features (strides 4/8/16/32), accepting any input size."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h, w = x.shape[-2:]
        features = super().forward(_pad_to_alignment(x))
        return [f[..., : -(-h // r), : -(-w // r)] for f, r in zip(features, self.feature_info.reduction())]


@contextmanager
def _block_type(block: Callable[..., nn.Module]) -> Iterator[str]:
    """Make ``block`` visible to timm's HRNet, which looks block types up by name, while it builds."""
    key = f"hrnet_vit_{id(block)}"
    hrnet.block_types_dict[key] = block
    try:
        yield key
    finally:
        del hrnet.block_types_dict[key]


def _hrnet_cfg(width: int, block_key: str, settings: HRNetViTSettings) -> dict[str, Any]:
    """timm's HRNetV2-W cfg with the BasicBlocks of stages 2-4 replaced."""
    cfg = copy.deepcopy(hrnet.cfg_cls[f"hrnet_w{width}"])
    for stage, modules in zip(("stage2", "stage3", "stage4"), settings.num_modules):
        branches = cfg[stage]["num_branches"]
        cfg[stage].update(block_type=block_key, num_modules=modules, num_blocks=(settings.blocks_per_branch,) * branches)
    return cfg


def _add_patch_embeds(model: hrnet.HighResolutionNet) -> None:
    for stage in (model.stage2, model.stage3, model.stage4):
        for module in stage:
            for channels, branch in zip(module.num_in_chs, module.branches):
                branch.insert(0, ConvPatchEmbed(channels))


def _schedule_drop_path(model: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 to ``rate`` over the transformer blocks in build order."""
    drops = [m for m in model.modules() if isinstance(m, DropPath)]
    for drop, p in zip(drops, torch.linspace(0, rate, len(drops), device="cpu").tolist()):
        drop.drop_prob = p


_SWITCHES = {f.name for f in fields(HRNetViTSettings)} - {"block"}


def _create_hrnet_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    refuse_pretrained(variant, pretrained)
    width, block_name = _VARIANTS[variant]
    settings = replace(HRNetViTSettings(block=block_name), **{k: kwargs.pop(k) for k in _SWITCHES & set(kwargs)})
    block = functools.partial(_transformer_block, width=width, settings=settings)
    block.expansion = 1  # timm reads the channel expansion off the block type
    features_only = kwargs.pop("features_only", False)
    if features_only:
        model_cls, kwargs_filter = HRNetViTFeatures, ("num_classes", "global_pool")
        kwargs.update(feature_location="", out_indices=kwargs.get("out_indices", (1, 2, 3, 4)))
    else:
        model_cls, kwargs_filter = HRNetViT, None
    with _block_type(block) as key:
        model = build_model_with_cfg(model_cls, variant, pretrained, model_cfg=_hrnet_cfg(width, key, settings),
                                     kwargs_filter=kwargs_filter, **kwargs)
    if settings.patch_embed == "conv3":
        _add_patch_embeds(model)
    _schedule_drop_path(model, settings.drop_path_rate)
    model.reading = settings  # the fitted construction choices; `reproduce measure` prints them
    return model


_VARIANTS = {
    "hrnet18_mit": (18, "mit"), "hrnet18_cswin": (18, "cswin"),
    "hrnet32_mit": (32, "mit"), "hrnet32_cswin": (32, "cswin"),
    "hrnet40_mit": (40, "mit"), "hrnet40_cswin": (40, "cswin"),
}
_SEG_EMBED_DIM = {18: 256, 32: 256, 40: 768}  # the W40 jump in Table 6 needs E=768 (docs/hrnet-vit-fit.md#search-space)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7), "crop_pct": 0.875,
        "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
        "first_conv": "conv1", "classifier": "classifier", **kwargs,
    }


default_cfgs = generate_default_cfgs({name: _cfg() for name in _VARIANTS})


@register_model
def hrnet18_mit(pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    return _create_hrnet_vit("hrnet18_mit", pretrained, **kwargs)


@register_model
def hrnet18_cswin(pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    return _create_hrnet_vit("hrnet18_cswin", pretrained, **kwargs)


@register_model
def hrnet32_mit(pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    return _create_hrnet_vit("hrnet32_mit", pretrained, **kwargs)


@register_model
def hrnet32_cswin(pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    return _create_hrnet_vit("hrnet32_cswin", pretrained, **kwargs)


@register_model
def hrnet40_mit(pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    return _create_hrnet_vit("hrnet40_mit", pretrained, **kwargs)


@register_model
def hrnet40_cswin(pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    return _create_hrnet_vit("hrnet40_cswin", pretrained, **kwargs)


for _name, (_width, _) in _VARIANTS.items():
    register_segmentation_backbone(_name, _SEG_EMBED_DIM[_width], flop_family="hrvit")
