"""An inference-only copy of a model with fewer, larger operators: the same function up to rounding.

In eval mode several parts of the suite's models are compositions of linear maps that can be merged
once into new weights, each merge saving operators (and GPU kernel launches) on every call:

* a BatchNorm is a per-channel affine map, merged into the conv or linear layer that feeds it;
* MixCFN's two depthwise convolutions (3x3 on one half of the channels, 5x5 on the other) are one 5x5
  depthwise convolution whose first half of kernels are the 3x3 ones zero-padded, so its linears need
  no chunking either: 4 operators where the trained module runs 8 (at the price of the zero taps'
  arithmetic, 16 of 25 taps on half the channels);
* in the SegFormer head, a branch's 1x1 projection and its slice of the 1x1 fuse convolution (with the
  fuse BN merged into it) are one 1x1 convolution, applied before the bilinear resize instead of after:
  a 1x1 convolution commutes with bilinear resizing (both are linear, and the resize's weights sum to
  one, so the bias passes through unchanged). The head's largest convolution then runs at each branch's
  own resolution instead of over all branches concatenated at stride 4.

``fuse_for_inference`` returns the merged copy; the model it is given (and so its module tree, its
state-dict keys and what training, checkpoints and the FLOP ledger see) is left as it is. The FLOP ledger
measures the unmerged model, which is the architecture the papers count.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.models.resnet import Bottleneck
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from models.hrvit import HRViTAttn, MixCFN
from models.segmentation import SegFormerHead

__all__ = ["fuse_for_inference", "MergedMixCFN", "ComposedSegFormerHead"]


def _is_plain_bn(module: nn.Module) -> bool:
    """Exactly nn.BatchNorm1d/2d with running statistics (subclasses may add an activation or sync)."""
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and module.track_running_stats


def _fold_sequential(seq: nn.Sequential) -> None:
    """Conv2d followed by a BatchNorm2d inside ``seq``: the conv takes the BN over, the BN becomes Identity."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and _is_plain_bn(seq[i + 1]):
            seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
            seq[i + 1] = nn.Identity()


def _plain_linear(linear: nn.Linear) -> nn.Linear:
    """An nn.Linear sharing the parameters of ``linear`` (e.g. one of MixCFN's chunked linears)."""
    plain = nn.Linear(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
    plain.weight, plain.bias = linear.weight, linear.bias
    return plain


class MergedMixCFN(nn.Module):
    """MixCFN (models/hrvit.py) for inference: Linear -> one depthwise 5x5 conv -> GELU -> Linear."""

    def __init__(self, mlp: MixCFN):
        super().__init__()
        hidden, w3 = mlp.fc1.out_features, mlp.conv3.weight
        self.fc1, self.fc2, self.act = _plain_linear(mlp.fc1), _plain_linear(mlp.fc2), mlp.act
        self.mixconv = nn.Conv2d(hidden, hidden, 5, padding=2, groups=hidden, device=w3.device, dtype=w3.dtype)
        pad = (mlp.conv5.kernel_size[0] - mlp.conv3.kernel_size[0]) // 2
        self.mixconv.weight.copy_(torch.cat([F.pad(w3, (pad,) * 4), mlp.conv5.weight]))
        self.mixconv.bias.copy_(torch.cat([mlp.conv3.bias, mlp.conv5.bias]))

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, _ = x.shape
        h = self.fc1(x).reshape(B, H, W, -1).permute(0, 3, 1, 2)  # channels-last image view of the tokens
        return self.fc2(self.act(self.mixconv(h)).permute(0, 2, 3, 1).reshape(B, N, -1))


class ComposedSegFormerHead(nn.Module):
    """SegFormerHead (models/segmentation.py) for inference: per branch one 1x1 conv (projection composed
    with its slice of the BN-folded fuse conv) at the branch's resolution, resized and summed, then ReLU and
    the classifier."""

    def __init__(self, head: SegFormerHead):
        super().__init__()
        if not isinstance(head.fuse_bn, nn.Identity):
            raise ValueError("compose the SegFormer head after its fuse BatchNorm is folded into the fuse conv")
        fuse = head.linear_fuse
        slices = fuse.weight.flatten(1).split(head.embed_dim, dim=1)
        self.proj = nn.ModuleList()
        for i, (linear, part) in enumerate(zip(head.linear_c, slices)):
            conv = nn.Conv2d(linear.in_channels, head.embed_dim, 1, device=part.device, dtype=part.dtype)
            conv.weight.copy_((part @ linear.weight.flatten(1))[:, :, None, None])
            conv.bias.copy_(part @ linear.bias + (fuse.bias if i == 0 and fuse.bias is not None else 0))
            self.proj.append(conv)
        self.fuse_act, self.dropout, self.classifier = head.fuse_act, head.dropout, head.classifier
        self.num_classes = head.num_classes

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        size = features[0].shape[-2:]
        out = None
        for proj, feat in zip(self.proj, features):
            y = proj(feat)
            if y.shape[-2:] != size:  # the stride-4 branch is already at the output size
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out.add_(y)
        return self.classifier(self.dropout(self.fuse_act(out)))


def _fold(module: nn.Module) -> nn.Module:
    """``module`` with its own BatchNorms folded (in place), or its merged replacement."""
    if isinstance(module, nn.Sequential):
        _fold_sequential(module)
    elif isinstance(module, HRViTAttn) and module.bn is not None and _is_plain_bn(module.bn):
        module.proj, module.bn = fuse_linear_bn_eval(module.proj, module.bn), None
    elif isinstance(module, MixCFN) and module.conv3 is not None:
        return MergedMixCFN(module)
    elif isinstance(module, SegFormerHead) and _is_plain_bn(module.fuse_bn):
        module.linear_fuse, module.fuse_bn = fuse_conv_bn_eval(module.linear_fuse, module.fuse_bn), nn.Identity()
        return ComposedSegFormerHead(module)
    elif isinstance(module, Bottleneck):
        for i in (1, 2, 3):
            conv, bn = getattr(module, f"conv{i}"), getattr(module, f"bn{i}")
            if isinstance(conv, nn.Conv2d) and _is_plain_bn(bn):
                setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                setattr(module, f"bn{i}", nn.Identity())
    return module


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` merged as the module docstring says: every BatchNorm that directly
    follows a Conv2d or Linear in the suite's HRViT (stem, fusion paths, attention, classification head),
    any ``nn.Sequential`` or timm ``Bottleneck`` of other models, and the SegFormer head's; HRViT's MixCFN;
    the SegFormer head's projections. The copy is for inference only: training it would train the merged
    weights without BatchNorm statistics."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, module in list(model.named_modules()):
            folded = _fold(module)
            if folded is not module:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, folded)
    return model
