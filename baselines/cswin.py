"""CSWin Transformer (Dong et al., CVPR 2022) as timm models: cswin_ti, cswin_t, cswin_s.

CSWin is in neither timm nor any package (docs/baseline-models.md#cswin), so it is written here from the
official code, following the official segmentation backbone so that one model serves both tasks:

* conv stem (7x7, stride 4, padding 2) + LayerNorm; between stages a 3x3 stride-2 conv + LayerNorm;
* each block: LN -> qkv -> channels split in two halves, vertical and horizontal stripes of width
  ``split_size`` (1/2/7/7 per stage) with LePE (depthwise 3x3 conv on V inside each stripe) -> proj;
  LN -> MLP (ratio 4). The last stage attends globally;
* any input size: stripes are zero-padded symmetrically to a multiple of the stripe width after the
  qkv projection, without an attention mask (padded tokens take part in the softmax), then cropped;
* ``features_only``: four NCHW maps at strides 4/8/16/32, each after a per-stage LayerNorm;
  classification: final LayerNorm, token mean, Linear (the official ImageNet head).

Attention runs in ``F.scaled_dot_product_attention``, batched over stripes and heads; its matmuls
are invisible to fvcore and torch's CPU counter, hence the registered attention counter.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import checkpoint, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from torch import nn

from models.factory import SuiteCfg
from models.flop_registry import AttentionMacs, register_attention_counter
from models.weights import build_with_weights, convert_checkpoint, rename_keys

__all__ = ["CSWin", "CSWinBlock", "LePEAttention"]

_REDUCTIONS = (4, 8, 16, 32)


def _stripe_shape(height: int, width: int, orientation: str, split_size: int) -> tuple[int, int]:
    """(window height, window width): 'vertical' = full height x split, 'horizontal' = split x full
    width, 'global' = the whole map."""
    if orientation == "vertical":
        return height, split_size
    if orientation == "horizontal":
        return split_size, width
    return height, width


def _padding(size: int, window: int) -> tuple[int, int]:
    """Symmetric zero padding (before, after) to the next multiple of ``window``."""
    pad = (window - size % window) % window
    return pad // 2, pad - pad // 2


class LePEAttention(nn.Module):
    """Multi-head self-attention inside stripes of one orientation, plus LePE on V.

    Takes q, k, v as (B, C, H, W) maps (C = this half's channels), returns (B, H, W, C).
    """

    def __init__(self, dim: int, num_heads: int, split_size: int, orientation: str, attn_drop: float = 0.0):
        super().__init__()
        if orientation not in ("vertical", "horizontal", "global"):
            raise ValueError(f"orientation must be 'vertical', 'horizontal' or 'global', got {orientation!r}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be a positive multiple of num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads
        self.split_size = split_size
        self.orientation = orientation
        self.attn_drop = attn_drop
        self.get_v = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)  # LePE

    def window_shape(self, height: int, width: int) -> tuple[int, int]:
        return _stripe_shape(height, width, self.orientation, self.split_size)

    def _to_windows(self, x: torch.Tensor, wh: int, ww: int) -> torch.Tensor:
        """(B, C, H', W') -> (B * nW, C, wh, ww)."""
        b, c, h, w = x.shape
        x = x.view(b, c, h // wh, wh, w // ww, ww).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(-1, c, wh, ww)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B * nW, C, wh, ww) -> (B * nW, heads, wh * ww, C / heads)."""
        n, c, wh, ww = x.shape
        return x.reshape(n, self.num_heads, c // self.num_heads, wh * ww).transpose(-2, -1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, c, h, w = q.shape
        wh, ww = self.window_shape(h, w)
        (top, bottom), (left, right) = _padding(h, wh), _padding(w, ww)
        pad = (left, right, top, bottom)
        q, k, v = (self._to_windows(F.pad(t, pad), wh, ww) for t in (q, k, v))
        lepe = self._heads(self.get_v(v))
        x = F.scaled_dot_product_attention(
            self._heads(q), self._heads(k), self._heads(v), dropout_p=self.attn_drop if self.training else 0.0
        )
        x = (x + lepe).transpose(-2, -1).reshape(-1, c, wh, ww)  # (B * nW, C, wh, ww)
        hp, wp = h + top + bottom, w + left + right
        x = x.view(b, hp // wh, wp // ww, c, wh, ww).permute(0, 1, 4, 2, 5, 3).reshape(b, hp, wp, c)
        return x[:, top:top + h, left:left + w]


@register_attention_counter(LePEAttention, family="cswin")
def _lepe_attention_macs(module: LePEAttention, args: tuple, kwargs: dict, output: Any) -> AttentionMacs:
    """Per padded stripe of T tokens: q·kᵀ and attn·v cost T²·C each (summed over heads)."""
    b, c, h, w = args[0].shape
    wh, ww = module.window_shape(h, w)
    hp, wp = h + sum(_padding(h, wh)), w + sum(_padding(w, ww))
    windows = b * (hp // wh) * (wp // ww)
    macs = windows * (wh * ww) ** 2 * c
    return AttentionMacs(qk=macs, av=macs)


class CSWinBlock(nn.Module):
    """Pre-norm CSWin block on tokens (B, H*W, C) of a known (H, W) map."""

    def __init__(self, dim: int, num_heads: int, split_size: int, last_stage: bool = False, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        if last_stage:
            self.attns = nn.ModuleList([LePEAttention(dim, num_heads, split_size, "global", attn_drop)])
        else:
            if dim % 2 or num_heads % 2:
                raise ValueError(f"a two-stripe CSWin block needs even dim and num_heads, got {dim}, {num_heads}")
            self.attns = nn.ModuleList(
                LePEAttention(dim // 2, num_heads // 2, split_size, o, attn_drop) for o in ("vertical", "horizontal")
            )
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)

    def attention(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        b, n, c = x.shape
        h, w = size
        qkv = self.qkv(x).transpose(1, 2).reshape(b, 3, c, h, w)
        halves = qkv.chunk(len(self.attns), dim=2)
        out = torch.cat([attn(*part.unbind(1)) for attn, part in zip(self.attns, halves)], dim=-1)
        return self.proj_drop(self.proj(out.reshape(b, n, c)))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attention(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class _ConvEmbed(nn.Module):
    """Conv (stem or stride-2 merge) followed by LayerNorm on the tokens; returns tokens and size."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, padding: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding)
        self.norm = nn.LayerNorm(out_chs)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(x.flatten(2).transpose(1, 2)), size


def _tokens_to_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *size).contiguous()


class CSWinStage(nn.Module):
    def __init__(self, embed: _ConvEmbed, blocks: Sequence[CSWinBlock]):
        super().__init__()
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """NCHW in -> tokens and their (H, W) out."""
        x, size = self.embed(x)
        for block in self.blocks:
            x = checkpoint(block, x, size) if self.grad_checkpointing and torch.is_grad_enabled() else block(x, size)
        return x, size


@dataclass(frozen=True)
class CSWinConfig:
    embed_dim: int  # C, the stage-1 width; stage i has C * 2**i channels
    depths: tuple[int, int, int, int]
    num_heads: tuple[int, int, int, int]
    split_size: tuple[int, int, int, int] = (1, 2, 7, 7)
    mlp_ratio: float = 4.0


class CSWin(nn.Module):
    """CSWin backbone + ImageNet head. ``stage_norms=True`` (set for ``features_only``) adds the
    segmentation backbone's LayerNorms on the outputs of stages 1-3 (stage 4 uses ``norm``)."""

    def __init__(self, cfg: CSWinConfig, in_chans: int = 3, num_classes: int = 1000, global_pool: str = "avg",
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.1,
                 qkv_bias: bool = True, stage_norms: bool = False):
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"CSWin supports global_pool 'avg' or '' (no pooling), got {global_pool!r}")
        dims = [cfg.embed_dim * 2 ** i for i in range(4)]
        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths), device="cpu").tolist()
        stages, first = [], 0
        for i, depth in enumerate(cfg.depths):
            embed = (_ConvEmbed(in_chans, dims[0], 7, 4, 2) if i == 0 else _ConvEmbed(dims[i - 1], dims[i], 3, 2, 1))
            blocks = [
                CSWinBlock(dims[i], cfg.num_heads[i], cfg.split_size[i], last_stage=i == 3, mlp_ratio=cfg.mlp_ratio,
                           qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=rates[first + j])
                for j in range(depth)
            ]
            stages.append(CSWinStage(embed, blocks))
            first += depth
        self.stages = nn.ModuleList(stages)
        self.stage_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims[:3]) if stage_norms else None
        self.norm = nn.LayerNorm(dims[3])
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = dims[3]
        self.feature_info = [
            dict(num_chs=d, reduction=r, module=f"stages.{i}") for i, (d, r) in enumerate(zip(dims, _REDUCTIONS))
        ]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dims[3], num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward (timm's ``checkpoint``)."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm's layer-wise lr decay: the conv stem, then per stage (coarse) or per
        block; a stage's merge conv joins its first block, its norm its last."""
        return dict(
            stem=r"^stages\.0\.embed\.",
            blocks=r"^stages\.(\d+)\." if coarse else [
                (r"^stages\.(\d+)\.blocks\.(\d+)\.", None),
                (r"^stages\.(\d+)\.embed\.", (0,)),
                (r"^stage_norms\.(\d+)\.", MATCH_PREV_GROUP),
                (r"^norm\.", MATCH_PREV_GROUP),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def _stage_norm(self, index: int) -> nn.Module:
        """``norm`` after the last stage; after stages 1-3 the segmentation backbone's stage norms (the
        classifier has none, so its early maps are the raw stage outputs)."""
        if index == 3:
            return self.norm
        return nn.Identity() if self.stage_norms is None else self.stage_norms[index]

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = True,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """NCHW stage outputs, each through its stage LayerNorm where the model has one (``_stage_norm``)."""
        if output_fmt != "NCHW":
            raise ValueError(f"CSWin features are NCHW only, got output_fmt={output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        tokens = x
        for i, stage in enumerate(self.stages[: max_index + 1] if stop_early else self.stages):
            tokens, size = stage(x)
            if i in take_indices:
                intermediates.append(_tokens_to_map(self._stage_norm(i)(tokens), size))
            x = _tokens_to_map(tokens, size)
        return intermediates if intermediates_only else (tokens, intermediates)

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the stages after the last wanted one, and the classifier."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if max_index < 3:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Final tokens (B, N, 8C) after the last LayerNorm."""
        for stage in self.stages:
            tokens, size = stage(x)
            x = _tokens_to_map(tokens, size)
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_CONFIGS = {
    # The HRViT paper's CSWin-Ti: CSWin-T with C = 64 -> 32 (heads do not change params or FLOPs).
    "cswin_ti": CSWinConfig(embed_dim=32, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16)),
    "cswin_t": CSWinConfig(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16)),
    "cswin_s": CSWinConfig(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16)),
}
# Official ImageNet checkpoints (microsoft/CSWin-Transformer models/cswin.py) -> this file. Their
# LePE attentions are ordered as here (0: vertical stripes, 1: horizontal; one global in stage 4).
_OFFICIAL_RULES = (
    (r"stage1_conv_embed\.0\.(.+)", r"stages.0.embed.proj.\1"),
    (r"stage1_conv_embed\.2\.(.+)", r"stages.0.embed.norm.\1"),
    (r"merge(\d)\.conv\.(.+)", r"stages.\1.embed.proj.\2"),
    (r"merge(\d)\.norm\.(.+)", r"stages.\1.embed.norm.\2"),
    (r"stage(\d)\.(\d+)\.((?:norm1|qkv|attns\.\d\.get_v|proj|norm2|mlp\.fc1|mlp\.fc2)\..+)",
     lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
    (r"(norm|head)\.(weight|bias)", r"\1.\2"),
)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: CSWin) -> dict[str, torch.Tensor]:
    """timm filter: official CSWin ImageNet checkpoints (``state_dict_ema`` preferred, as its eval
    script) and this suite's. The segmentation stage norms are not in ImageNet checkpoints and
    start at their init, as in the official segmentation backbone."""
    official = lambda state: rename_keys(state, _OFFICIAL_RULES, "official CSWin")  # noqa: E731
    return convert_checkpoint(state_dict, model, {"cswin-official": official},
                              optional=("head.", "stage_norms."), family="CSWin")


_RELEASES = "https://github.com/microsoft/CSWin-Transformer/releases/download/v0.1.0/"


def _cfg(seg_embed_dim: int, url: str | None = None) -> SuiteCfg:
    return SuiteCfg(
        url=url, num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9, interpolation="bicubic",
        mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), first_conv="stages.0.embed.proj", classifier="head",
        origin_url="https://github.com/microsoft/CSWin-Transformer", seg_embed_dim=seg_embed_dim, flop_family="cswin",
    )


# SegFormer head width reproducing Table 4 (docs/baseline-models.md#cswin): 256 for Ti/T, 768 for S. Microsoft
# publishes ImageNet-1K weights of CSWin-T and CSWin-S; CSWin-Ti (this paper's C = 32 variant) has none.
default_cfgs = generate_default_cfgs({
    "cswin_ti": _cfg(256),
    "cswin_t": _cfg(256, _RELEASES + "cswin_tiny_224.pth"),
    "cswin_s": _cfg(768, _RELEASES + "cswin_small_224.pth"),
})


def _create_cswin(variant: str, pretrained: bool = False, **kwargs: Any) -> CSWin:
    """The variant's architecture; every ``CSWinConfig`` field and ``CSWin`` keyword can be overridden
    (``timm.create_model("cswin_t", depths=(1, 2, 9, 1), drop_path_rate=0.2)``)."""
    arch = {f.name: kwargs.pop(f.name) for f in fields(CSWinConfig) if f.name in kwargs}
    return build_with_weights(
        CSWin, variant, pretrained, checkpoint_filter_fn,
        model_cfg=replace(_CONFIGS[variant], **arch),
        feature_cfg=dict(feature_cls="getter", out_indices=(0, 1, 2, 3)),
        stage_norms=kwargs.get("features_only", False),
        **kwargs,
    )


@register_model
def cswin_ti(pretrained: bool = False, **kwargs: Any) -> CSWin:
    return _create_cswin("cswin_ti", pretrained, **kwargs)


@register_model
def cswin_t(pretrained: bool = False, **kwargs: Any) -> CSWin:
    return _create_cswin("cswin_t", pretrained, **kwargs)


@register_model
def cswin_s(pretrained: bool = False, **kwargs: Any) -> CSWin:
    return _create_cswin("cswin_s", pretrained, **kwargs)

