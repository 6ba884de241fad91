"""The vanilla HRNet-ViT baselines of the HRViT paper (Table 6): HRNet18/32/40-MiT and -CSWin.

The paper only says it "directly replace[s] residual blocks in HRNetV2 with MiT/CSWin Transformer
blocks". This file builds timm's HRNetV2 through its public constructor (stem, 4-Bottleneck stage 1,
transitions, fuse layers, module counts, classification head) and then gives every branch of
stages 2-4 its own transformer blocks in place of the BasicBlocks. The reading is the fit of
docs/hrnet-vit-fit.md, with every choice a keyword switch and these defaults ("fitted to Table 6 params within
3 %"):

* ``block``: 'mit' (smp's MiT block: SRA attention + Mix-FFN, so MiT itself and HRNet-MiT share one
  block) or 'cswin' (this project's CSWin block: stripe widths 1/2/7/7, the last branch global);
* ``patch_embed='conv3'``: each branch of every module starts with a 3x3 conv + LayerNorm (MiT's /
  CSWin's overlapped patch embedding at stride 1; 'none' drops it);
* ``mit_sr='pool'``: MiT's key/value reduction by a parameter-free sr x sr average pool + LayerNorm
  (sr 8/4/2/1 per branch, ``PooledSRAttention``); 'conv' keeps MiT's learned sr x sr conv (far too
  heavy for Table 6);
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
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.encoders import mix_transformer as smp_mit
from timm.layers import DropPath, LayerNorm2d
from timm.models import checkpoint_seq, generate_default_cfgs, hrnet, register_model
from timm.models._features import feature_take_indices
from torch import nn

from baselines.cswin import CSWinBlock
from models.factory import SuiteCfg
from models.weights import build_with_weights, convert_checkpoint

__all__ = ["HRNetViT", "HRNetViTFeatures", "HRNetViTSettings", "CSWinBranchBlock", "ConvPatchEmbed", "PooledSRAttention",
           "TransformerBranch"]

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


class CSWinBranchBlock(nn.Module):
    """A CSWin block on an NCHW branch map (HRNet blocks are NCHW in, NCHW out)."""

    def __init__(self, block: CSWinBlock):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.block(x.flatten(2).transpose(1, 2), (h, w))
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class PooledSRAttention(smp_mit.Attention):
    """MiT's spatial-reduction attention whose learned sr x sr conv is a parameter-free sr x sr
    average pool (the LayerNorm after it stays): the ``mit_sr='pool'`` reading."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int):
        super().__init__(dim, num_heads, qkv_bias=True, sr_ratio=sr_ratio)
        self.sr = nn.AvgPool2d(sr_ratio)


class MiTBranchBlock(smp_mit.Block):
    """smp's MiT block (NCHW in and out, as HRNet's blocks), optionally with ``PooledSRAttention``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, sr_ratio: int, pooled: bool, drop_path: float):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias=True, drop_path=drop_path,
                         norm_layer=functools.partial(smp_mit.LayerNorm, eps=1e-6), sr_ratio=sr_ratio)
        if pooled and sr_ratio > 1:
            self.attn = PooledSRAttention(dim, num_heads, sr_ratio)


def _transformer_block(branch: int, channels: int, settings: HRNetViTSettings) -> nn.Module:
    """One MiT or CSWin block for HRNet branch ``branch`` (of ``channels`` channels)."""
    heads = settings.heads[branch]
    if settings.block == "mit":
        return MiTBranchBlock(channels, heads, settings.mlp_ratio, settings.sr_ratios[branch],
                              settings.mit_sr == "pool", settings.drop_path_rate)
    return CSWinBranchBlock(CSWinBlock(channels, heads, settings.split_sizes[branch], last_stage=branch == 3,
                                       mlp_ratio=settings.mlp_ratio, drop_path=settings.drop_path_rate))


class ConvPatchEmbed(nn.Sequential):
    """3x3 stride-1 conv + LayerNorm at the start of each branch of a module (the "CONV-based patch
    embedding" HRViT's EffPatchEmbed is compared against)."""

    def __init__(self, channels: int):
        super().__init__(nn.Conv2d(channels, channels, 3, padding=1), LayerNorm2d(channels))


class TransformerBranch(nn.Sequential):
    """One branch of an HRNet module: its patch embedding and transformer blocks, each recomputed in
    backward when ``grad_checkpointing`` is set (timm's ``checkpoint_seq``)."""

    def __init__(self, *blocks: nn.Module):
        super().__init__(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint_seq(self, x)
        return super().forward(x)


class _CheckpointedBranches:
    """``set_grad_checkpointing`` for both HRNet-ViT classes (timm's HRNet refuses it): the
    transformer branches recompute their blocks in backward; stem, stage 1 and fusion do not."""

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for module in self.modules():
            if isinstance(module, TransformerBranch):
                module.grad_checkpointing = enable


def _pad_to_alignment(x: torch.Tensor) -> torch.Tensor:
    pad_h, pad_w = -x.shape[-2] % _ALIGN, -x.shape[-1] % _ALIGN
    return F.pad(x, (0, pad_w, 0, pad_h)) if pad_h or pad_w else x


def _crop_to_input(features: list[torch.Tensor], size: tuple[int, int], reductions: list[int]) -> list[torch.Tensor]:
    """Maps of a padded input cropped back to ceil(size / reduction)."""
    h, w = size
    return [f[..., : -(-h // r), : -(-w // r)] for f, r in zip(features, reductions)]


class HRNetViT(_CheckpointedBranches, hrnet.HighResolutionNet):
    """timm's HRNetV2 classifier, accepting any input size."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward_features(_pad_to_alignment(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[Any, list[torch.Tensor]]:
        """timm's HRNet intermediates (index 0 the stride-2 stem, 1-4 the branches) of the padded
        input, cropped back to the input's size."""
        take, _ = feature_take_indices(self.num_branches + 1, indices)
        out = super().forward_intermediates(_pad_to_alignment(x), indices, norm, stop_early, output_fmt,
                                            intermediates_only)
        reductions = [self.feature_info[i]["reduction"] for i in sorted(take)]
        if intermediates_only:
            return _crop_to_input(out, x.shape[-2:], reductions)
        return out[0], _crop_to_input(out[1], x.shape[-2:], reductions)


class HRNetViTFeatures(_CheckpointedBranches, hrnet.HighResolutionNetFeatures):
    """timm's HRNetV2 branch features (strides 4/8/16/32), accepting any input size."""

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return _crop_to_input(super().forward(_pad_to_alignment(x)), x.shape[-2:], self.feature_info.reduction())


def _hrnet_cfg(width: int, settings: HRNetViTSettings) -> dict[str, Any]:
    """timm's HRNetV2-W cfg with the module counts of stages 2-4 (one BasicBlock per branch: each
    branch is replaced by transformer blocks right after construction)."""
    cfg = copy.deepcopy(hrnet.cfg_cls[f"hrnet_w{width}"])
    for stage, modules in zip(("stage2", "stage3", "stage4"), settings.num_modules):
        cfg[stage].update(block_type="BASIC", num_modules=modules, num_blocks=(1,) * cfg[stage]["num_branches"])
    return cfg


def _set_transformer_branches(model: hrnet.HighResolutionNet, settings: HRNetViTSettings) -> None:
    """Every branch of stages 2-4 becomes ``blocks_per_branch`` transformer blocks (which keep the
    branch width, as the BasicBlocks they replace), initialised as timm initialises HRNet."""
    for stage in (model.stage2, model.stage3, model.stage4):
        for module in stage:
            module.branches = nn.ModuleList(
                TransformerBranch(*(_transformer_block(i, channels, settings) for _ in range(settings.blocks_per_branch)))
                for i, channels in enumerate(module.num_in_chs)
            )
    model.init_weights()


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


def checkpoint_filter_fn(state_dict: dict[str, Any], model: HRNetViT) -> dict[str, torch.Tensor]:
    """timm filter: this suite's checkpoints only (these baselines are the paper's own constructions
    and no weights of them are published anywhere)."""
    return convert_checkpoint(state_dict, model, {}, optional=("incre_modules.", "downsamp_modules.", "final_layer.",
                                                               "classifier."), family="HRNet-ViT")


def _construct(model_cls: type[hrnet.HighResolutionNet], settings: HRNetViTSettings, **kwargs: Any) -> nn.Module:
    """timm's HRNet with the transformer branches, patch embeddings and drop-path schedule of ``settings``
    (the constructor ``build_model_with_cfg`` calls, so that weights load into the finished model)."""
    model = model_cls(**kwargs)
    _set_transformer_branches(model, settings)
    if settings.patch_embed == "conv3":
        _add_patch_embeds(model)
    _schedule_drop_path(model, settings.drop_path_rate)
    model.reading = settings  # the fitted construction choices; `reproduce measure` prints them
    return model


def _create_hrnet_vit(variant: str, pretrained: bool = False, **kwargs: Any) -> HRNetViT:
    width, block_name = _VARIANTS[variant]
    settings = replace(HRNetViTSettings(block=block_name), **{k: kwargs.pop(k) for k in _SWITCHES & set(kwargs)})
    if kwargs.pop("features_only", False):
        model_cls, kwargs_filter = HRNetViTFeatures, ("num_classes", "global_pool")
        kwargs.update(feature_location="", out_indices=kwargs.get("out_indices", (1, 2, 3, 4)))
    else:
        model_cls, kwargs_filter = HRNetViT, None
    return build_with_weights(functools.partial(_construct, model_cls, settings), variant, pretrained,
                              checkpoint_filter_fn, model_cfg=_hrnet_cfg(width, settings), kwargs_filter=kwargs_filter,
                              **kwargs)


_VARIANTS = {
    "hrnet18_mit": (18, "mit"), "hrnet18_cswin": (18, "cswin"),
    "hrnet32_mit": (32, "mit"), "hrnet32_cswin": (32, "cswin"),
    "hrnet40_mit": (40, "mit"), "hrnet40_cswin": (40, "cswin"),
}
_SEG_EMBED_DIM = {18: 256, 32: 256, 40: 768}  # the W40 jump in Table 6 needs E=768 (docs/hrnet-vit-fit.md#search-space)


def _cfg(width: int) -> SuiteCfg:
    return SuiteCfg(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.875, interpolation="bicubic",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="conv1", classifier="classifier",
        seg_embed_dim=_SEG_EMBED_DIM[width], flop_family="hrvit",
    )


default_cfgs = generate_default_cfgs({name: _cfg(width) for name, (width, _) in _VARIANTS.items()})


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

