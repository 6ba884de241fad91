"""MiT-B0..B4 (SegFormer's Mix Transformer) as timm models, built on smp's MiT encoder.

The backbone is ``segmentation_models_pytorch``'s ``MixVisionTransformer`` with smp's own per-variant
configuration (parameter for parameter the official NVlabs/SegFormer model, docs/baseline-models.md#mit);
this file only adds what timm's ``create_model`` needs: MiT's ImageNet head (stage-4 LayerNorm,
token mean, Linear), ``forward_intermediates`` for ``features_only`` (4 NCHW maps at strides
4/8/16/32) and the registrations. smp computes attention with explicit matmuls, so fvcore and
torch already count them; the registered counter serves the paper ("mit") convention only.
"""
from __future__ import annotations

from typing import Any

import torch
from segmentation_models_pytorch.encoders import mix_transformer as smp_mit
from timm.layers import trunc_normal_
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

from models.factory import SuiteCfg
from models.flop_registry import AttentionMacs, register_attention_counter
from models.weights import build_with_weights, convert_checkpoint

__all__ = ["MiT"]

_STAGES = 4
_REDUCTIONS = (4, 8, 16, 32)


class MiT(smp_mit.MixVisionTransformer):
    """smp's MixVisionTransformer plus the classification head of the official MiT."""

    def __init__(self, embed_dims: list[int], num_classes: int = 1000, drop_rate: float = 0.0,
                 global_pool: str = "avg", **kwargs: Any):
        if global_pool not in ("avg", ""):
            raise ValueError(f"MiT supports global_pool 'avg' or '' (no pooling), got {global_pool!r}")
        super().__init__(embed_dims=embed_dims, num_classes=num_classes, **kwargs)
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.feature_info = [
            dict(num_chs=c, reduction=r, module=f"norm{i + 1}") for i, (c, r) in enumerate(zip(embed_dims, _REDUCTIONS))
        ]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if isinstance(self.head, nn.Linear):
            trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        self.grad_checkpointing = False

    def _stage(self, index: int) -> tuple[nn.Module, nn.Sequential, nn.Module]:
        i = index + 1
        return getattr(self, f"patch_embed{i}"), getattr(self, f"block{i}"), getattr(self, f"norm{i}")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (timm's ``checkpoint_seq``)."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm's layer-wise lr decay: the stem embedding, then per stage (coarse) or
        per block; a stage's patch embedding joins its first block, its norm its last."""
        return dict(
            stem=r"^patch_embed1\.",
            blocks=r"^(?:patch_embed|block|norm)(\d+)\." if coarse else [
                (r"^block(\d+)\.(\d+)\.", None),
                (r"^patch_embed(\d+)\.", (0,)),
                (r"^norm(\d+)\.", MATCH_PREV_GROUP),
            ],
        )

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs after each stage's LayerNorm (MiT always normalises them); ``norm`` is
        accepted for timm's API and has no further effect."""
        if output_fmt != "NCHW":
            raise ValueError(f"MiT features are NCHW only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(_STAGES, indices)
        intermediates = []
        last = max_index if stop_early else _STAGES - 1
        for i in range(last + 1):
            patch_embed, blocks, stage_norm = self._stage(i)
            x = patch_embed(x)
            x = checkpoint_seq(blocks, x) if self.grad_checkpointing and torch.is_grad_enabled() else blocks(x)
            x = stage_norm(x).contiguous()
            if i in take_indices:
                intermediates.append(x)
        return intermediates if intermediates_only else (x, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last wanted one, and the classifier."""
        take_indices, max_index = feature_take_indices(_STAGES, indices)
        for i in range(max_index + 1, _STAGES):
            setattr(self, f"patch_embed{i + 1}", nn.Identity())
            setattr(self, f"block{i + 1}", nn.Sequential())  # empty: checkpoint_seq runs it too
            setattr(self, f"norm{i + 1}", nn.Identity())
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Stage-4 map (NCHW, after norm4)."""
        return self.forward_intermediates(x, indices=1)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))  # the official head: mean over tokens of the norm4 output
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_attention_counter(smp_mit.Attention, family="mit", traced=True)
def _sra_macs(module: smp_mit.Attention, args: tuple, kwargs: dict, output: Any) -> AttentionMacs:
    """SegFormer's ``sra_flops``: q·kᵀ and attn·v, each N·(N/sr²)·C (keys/values spatially reduced)."""
    x, height, width = args  # smp's Block calls attn(x, height, width)
    batch, tokens, channels = x.shape
    sr = module.sr_ratio
    reduced = (height // sr) * (width // sr) if sr > 1 else tokens
    macs = batch * tokens * reduced * channels
    return AttentionMacs(qk=macs, av=macs)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: MiT) -> dict[str, torch.Tensor]:
    """timm filter: NVlabs' ImageNet ``mit_bN.pth`` (its keys are smp's and this model's, so nothing
    is renamed), SegFormer mmseg checkpoints (``backbone.``) and this suite's checkpoints."""
    same = dict  # NVlabs and smp share every key name
    return convert_checkpoint(state_dict, model, {"mit-nvlabs": same, "segformer-mmseg": same},
                              optional=("head.",), family="MiT")


def _cfg(seg_embed_dim: int) -> SuiteCfg:
    # NVlabs publishes mit_b0..b5 (ImageNet-1K) on Google Drive/OneDrive only, so there is no url here.
    return SuiteCfg(
        num_classes=1000, input_size=(3, 224, 224), pool_size=(7, 7), crop_pct=0.9, interpolation="bicubic",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="patch_embed1.proj", classifier="head",
        origin_url="https://github.com/NVlabs/SegFormer", seg_embed_dim=seg_embed_dim, flop_family="mit",
    )


# Head widths of the SegFormer configs (docs/baseline-models.md#mit): 256 for B0/B1, 768 for B2+.
default_cfgs = generate_default_cfgs({
    "mit_b0": _cfg(256), "mit_b1": _cfg(256), "mit_b2": _cfg(768), "mit_b3": _cfg(768), "mit_b4": _cfg(768),
})


def _create_mit(variant: str, pretrained: bool = False, **kwargs: Any) -> MiT:
    arch = {k: v for k, v in smp_mit.mix_transformer_encoders[variant]["params"].items() if k != "out_channels"}
    arch.update(kwargs)
    return build_with_weights(
        MiT, variant, pretrained, checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(_STAGES))),
        **arch,
    )


@register_model
def mit_b0(pretrained: bool = False, **kwargs: Any) -> MiT:
    return _create_mit("mit_b0", pretrained, **kwargs)


@register_model
def mit_b1(pretrained: bool = False, **kwargs: Any) -> MiT:
    return _create_mit("mit_b1", pretrained, **kwargs)


@register_model
def mit_b2(pretrained: bool = False, **kwargs: Any) -> MiT:
    return _create_mit("mit_b2", pretrained, **kwargs)


@register_model
def mit_b3(pretrained: bool = False, **kwargs: Any) -> MiT:
    return _create_mit("mit_b3", pretrained, **kwargs)


@register_model
def mit_b4(pretrained: bool = False, **kwargs: Any) -> MiT:
    return _create_mit("mit_b4", pretrained, **kwargs)

