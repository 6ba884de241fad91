"""The SegFormer all-MLP decode head (mmseg ``SegformerHead``, as the HRViT repo uses it) and the
backbone + head segmentation model shared by HRViT, MiT, CSWin and HRNet-ViT.

There is one head implementation for every backbone so that Table 4/6 and Figure 5 compare
backbones, not heads.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ChunkedInputConv2d(nn.Conv2d):
    """1x1 nn.Conv2d over an input given as channel chunks (same weights and state-dict keys): each
    chunk's product is added into one output, so the concatenated input (at the stride-4 size, the
    largest tensor of a segmentation forward) is never built."""

    def forward(self, *chunks: torch.Tensor) -> torch.Tensor:
        weights = self.weight.split([c.shape[1] for c in chunks], dim=1)
        out = F.conv2d(chunks[0], weights[0], self.bias)
        for x, w in zip(chunks[1:], weights[1:]):
            out += F.conv2d(x, w)
        return out


class SegFormerHead(nn.Module):
    """Per-branch 1x1 projection to ``embed_dim`` (no norm, no activation), bilinear resize to the
    stride-4 map, concatenation in branch order, 1x1 fuse + BN + ReLU, Dropout2d, 1x1 classifier
    (the fuse conv takes the branches as chunks of its input instead of a built concatenation).

    Logits stay at the resolution of the first (stride-4) feature map, as in mmseg; callers resize
    them to the label or image size (bilinear, ``align_corners=False``).
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.in_channels = tuple(int(c) for c in in_channels)
        self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.linear_c = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in self.in_channels)
        self.linear_fuse = ChunkedInputConv2d(embed_dim * len(self.in_channels), embed_dim, kernel_size=1, bias=False)
        self.fuse_bn = nn.BatchNorm2d(embed_dim)
        self.fuse_act = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(f"SegFormerHead expects {len(self.in_channels)} feature maps, got {len(features)}")
        size = features[0].shape[-2:]
        projected = [
            F.interpolate(proj(feat), size=size, mode="bilinear", align_corners=False)
            for proj, feat in zip(self.linear_c, features)
        ]
        x = self.fuse_act(self.fuse_bn(self.linear_fuse(*projected)))
        return self.classifier(self.dropout(x))


class SegmentationModel(nn.Module):
    """A ``features_only`` backbone (four maps at strides 4/8/16/32) with the SegFormer head."""

    def __init__(self, backbone: nn.Module, embed_dim: int, num_classes: int, dropout: float = 0.1):
        super().__init__()
        self.backbone = backbone
        self.decode_head = SegFormerHead(backbone.feature_info.channels(), embed_dim, num_classes, dropout)

    @property
    def num_classes(self) -> int:
        return self.decode_head.num_classes

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's method for the whole model: the backbone recomputes its blocks in the backward (the head
        is small). timm's ``FeatureGetterNet`` wrapper does not pass the call on, so it goes to its model."""
        inner = getattr(self.backbone, "model", None)
        (inner if hasattr(inner, "set_grad_checkpointing") else self.backbone).set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at stride 4: (B, num_classes, ~H/4, ~W/4)."""
        return self.decode_head(self.backbone(x))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits resized to the input size (bilinear, align_corners=False), as mmseg's inference."""
        return F.interpolate(self(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
