"""BatchNorm folded into the preceding convolution or linear layer, for inference only.

In eval mode a BatchNorm is a per-channel affine map, so it can be merged into the weights and bias of
the layer that feeds it: one operator (one GPU kernel) less per BatchNorm, the same function up to
floating-point rounding. ``fuse_for_inference`` returns a folded copy; the model it is given (and so
its module tree, its state-dict keys and what training, checkpoints and the FLOP ledger see) is left
as it is.
"""
from __future__ import annotations

import copy

import torch
from timm.models.resnet import Bottleneck
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from models.hrvit import HRViTAttn
from models.segmentation import SegFormerHead

__all__ = ["fuse_for_inference"]


def _is_plain_bn(module: nn.Module) -> bool:
    """Exactly nn.BatchNorm1d/2d with running statistics (subclasses may add an activation or sync)."""
    return type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and module.track_running_stats


def _fold_sequential(seq: nn.Sequential) -> None:
    """Conv2d followed by a BatchNorm2d inside ``seq``: the conv takes the BN over, the BN becomes Identity."""
    for i in range(len(seq) - 1):
        if isinstance(seq[i], nn.Conv2d) and _is_plain_bn(seq[i + 1]):
            seq[i] = fuse_conv_bn_eval(seq[i], seq[i + 1])
            seq[i + 1] = nn.Identity()


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with every BatchNorm that directly follows a Conv2d or Linear folded
    into it: the suite's HRViT (stem, fusion paths, attention BN, classification head), the SegFormer head,
    and any ``nn.Sequential`` or timm ``Bottleneck`` in other models. The copy is for inference only:
    training it would train the folded weights without BatchNorm statistics."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        for module in list(model.modules()):
            if isinstance(module, nn.Sequential):
                _fold_sequential(module)
            elif isinstance(module, HRViTAttn) and module.bn is not None and _is_plain_bn(module.bn):
                module.proj, module.bn = fuse_linear_bn_eval(module.proj, module.bn), None
            elif isinstance(module, SegFormerHead) and _is_plain_bn(module.fuse_bn):
                module.linear_fuse, module.fuse_bn = fuse_conv_bn_eval(module.linear_fuse, module.fuse_bn), nn.Identity()
            elif isinstance(module, Bottleneck):
                for i in (1, 2, 3):
                    conv, bn = getattr(module, f"conv{i}"), getattr(module, f"bn{i}")
                    if isinstance(conv, nn.Conv2d) and _is_plain_bn(bn):
                        setattr(module, f"conv{i}", fuse_conv_bn_eval(conv, bn))
                        setattr(module, f"bn{i}", nn.Identity())
    return model
