"""HRViT (Gu et al., CVPR 2022): multi-scale high-resolution vision transformer, b1/b2/b3.

Re-implemented from the description of the official code in docs/architecture.md (section numbers below
refer to it). Beyond the official code:

* any input size works: up-sampling fusion paths are cropped to their target branch, and stripe
  attention pads the last stripe and masks its padded keys (the official code needs multiples of 32);
* all stripes and heads of a half run in one ``F.scaled_dot_product_attention`` call;
* activations stay channels-last from the stem on, so the token view (B, H*W, C) of every map is
  also a channels-last image view: convolutions, patch embeddings and fusion need no transposing
  copies (branch outputs are NCHW-shaped channels-last tensors);
* the Table 5 ablations are keyword switches (``kv_sharing``, ``eff_patch_embed``, ``mixcfn``,
  ``parallel_conv``, ``nonlinearity_bn``, ``dense_fusion``, ``des``; docs/table5-readings.md), and the
  stripe widths are the ``window_sizes`` keyword (the paper's Cityscapes b3 uses ``(1, 2, 9, 9)``).

``timm.create_model("hrvit_b1", features_only=True)`` returns the four branch maps (strides 4, 8, 16,
32); without it the model is the HRNetV2-style ImageNet classifier of §2.11. Each starts as the official
code starts it (§2.13): the classifier with PyTorch's default init, the backbone with trunc-normal Linears.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, fields, replace
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, trunc_normal_
from timm.models import generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import MATCH_PREV_GROUP
from timm.models.resnet import Bottleneck
from torch import nn
from torch.utils.checkpoint import checkpoint

from models.factory import SuiteCfg
from models.flop_registry import AttentionMacs, register_attention_counter
from models.weights import build_with_weights, convert_checkpoint, rename_keys

__all__ = ["HRViT", "HRViTCfg", "HRViTAttn", "ABLATIONS", "ablation_kwargs", "stripe_attention_macs"]

ABLATIONS: tuple[str, ...] = (
    "kv_sharing",  # False -> K1: separate key projection (Linear C -> 3C)
    "eff_patch_embed",  # False -> P2: dense Conv3x3 replaces the patch embedding's 1x1 conv
    "mixcfn",  # False -> F1: plain FFN (MixConv removed)
    "parallel_conv",  # False -> C1: no Hardswish + DW3x3 path on V
    "nonlinearity_bn",  # False -> N1: no post-sum Hardswish, no output BatchNorm
    "dense_fusion",  # False -> S1: HR-NAS neighbour-only fusion
    "des",  # False -> D1: no diversity-enhanced shortcut
)
DEFAULT_WINDOW_SIZES = (1, 2, 7, 7)
NUM_BRANCHES = 4
STEM_CHANNELS = 64
HEAD_WIDTHS = (32, 64, 128, 256)  # §2.11: fixed for every variant
HEAD_FEATURES = 2048
MASK_VALUE = -100.0  # §2.7 step 5: the official mask value (not -inf)


def ablation_kwargs(names: Iterable[str] | str) -> dict[str, bool]:
    """Model kwargs that switch off the named techniques (``"all"`` = every Table 5 removal)."""
    names = [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in ABLATIONS and n != "all"]
    if unknown:
        raise ValueError(f"unknown HRViT ablation(s) {unknown}; valid names: {', '.join(ABLATIONS)}, all")
    if "all" in names:
        return {n: False for n in ABLATIONS}
    return {n: False for n in names}


def _check_window_sizes(window_sizes: Sequence[int]) -> tuple[int, ...]:
    sizes = tuple(window_sizes)
    if len(sizes) != NUM_BRANCHES or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes):
        raise ValueError(
            f"window_sizes must be {NUM_BRANCHES} positive ints (one stripe width per branch), e.g. "
            f"{DEFAULT_WINDOW_SIZES}; got {window_sizes!r}"
        )
    return sizes


def option_kwargs(model: str, ablate: Iterable[str] = (), window_sizes: Sequence[int] | None = None) -> dict[str, Any]:
    """Model kwargs of the HRViT-only experiment options (Table 5 ablations, Table 7 window sizes),
    validated before anything is built so that every command rejects bad values the same way."""
    ablate = list(ablate)
    if not ablate and window_sizes is None:
        return {}
    if model not in MODEL_CFGS:
        raise ValueError(f"--ablate and --window-sizes apply to HRViT models only ({', '.join(MODEL_CFGS)}); got {model!r}")
    kwargs: dict[str, Any] = ablation_kwargs(ablate) if ablate else {}
    if window_sizes is not None:
        kwargs["window_sizes"] = _check_window_sizes(window_sizes)
    return kwargs


@dataclass(frozen=True)
class HRViTCfg:
    """One variant (§2.3): branch widths, blocks per branch in each of the 6 modules, head dim, MLP ratios."""

    channels: tuple[int, int, int, int]
    blocks: tuple[tuple[int, ...], ...]
    dim_head: int
    mlp_ratios: tuple[int, int, int, int]


_B_COMMON = ((1,), (1, 1), (1, 1, 6), (1, 1, 6))
MODEL_CFGS = {
    "hrvit_b1": HRViTCfg((32, 64, 128, 256), _B_COMMON + ((1, 1, 6, 2), (1, 1, 2, 2)), 32, (4, 4, 4, 4)),
    "hrvit_b2": HRViTCfg((48, 96, 240, 384), _B_COMMON + ((1, 1, 6, 2), (1, 1, 6, 2)), 24, (2, 3, 3, 3)),
    "hrvit_b3": HRViTCfg((64, 128, 256, 512), _B_COMMON + ((1, 1, 6, 3), (1, 1, 6, 3)), 32, (2, 2, 2, 2)),
}
SEG_EMBED_DIMS = {"hrvit_b1": 256, "hrvit_b2": 256, "hrvit_b3": 768}  # §2.12


# --------------------------------------------------------------------------------------------------
# Stripe attention
# --------------------------------------------------------------------------------------------------


def half_heads(dim: int, dim_head: int) -> tuple[int, int]:
    """(heads, head dim) inside one channel half (§2.7 step 4): one head of C/2 when C/2 < dim_head."""
    half = dim // 2
    head_dim = min(dim_head, half)
    if dim % 2 or half % head_dim:
        raise ValueError(f"HRViTAttn needs an even dim whose half divides into heads of {head_dim}; got dim={dim}")
    return half // head_dim, head_dim


def _sizes_are_traced() -> bool:
    """True while ``torch.jit.trace``, ``torch.export`` or ``torch.onnx.export`` records the model: sizes are
    then values of the graph, so stripe padding and masks must be computed from them on every path (a Python
    branch on a size would be frozen for the traced size). False under plain ``torch.compile``, whose graphs
    are specialised to static shapes anyway. Checked in this order so that eager mode pays two cheap calls."""
    if torch.jit.is_tracing():
        return True
    return torch.compiler.is_compiling() and (torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export())


def _key_padding_mask(
    batch: int, n_windows: int, length: int, n_valid: int, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Additive mask (B*windows, 1, 1, L): -100 on the padded keys of each image's last stripe, else 0.

    Only valid query rows are kept after attention, and for those this equals the official
    query-and-key mask of §2.7 step 5. Built from the sizes alone, so a trace computes it at any size.
    """
    padded_key = torch.arange(length, device=device) >= n_valid
    last_window = torch.arange(n_windows, device=device) == n_windows - 1
    mask = (last_window[:, None] & padded_key).to(dtype) * MASK_VALUE
    return mask.repeat(batch, 1).reshape(batch * n_windows, 1, 1, length)


def _zeros(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, device=device, dtype=dtype)


def _constant(build: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``build(*args)`` for a tensor that depends on shapes, device and dtype only (zero padding, masks).

    Eager mode reuses one tensor per argument tuple (saving an operator per use; the device is part of
    the key, so a model moved to another device gets its own); while tracing or compiling it is built in
    the graph, from the graph's sizes."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return build(*args)
    return _cached_constant(build, *args)


@functools.lru_cache(maxsize=256)
def _cached_constant(build: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    # made outside inference mode: a tensor first needed under ``torch.inference_mode`` must stay usable
    # by a later training step ("Inference tensors cannot be saved for backward")
    with torch.inference_mode(False):
        return build(*args)


def stripe_attention(maps: Sequence[torch.Tensor], ws: int, n_heads: int) -> tuple[torch.Tensor, ...]:
    """Attention inside horizontal stripes of ``ws`` rows, for one or more maps of one shape in one call.

    Each map is (B, H, W, P, c) with P = 2 (q, v; the keys are the values) or 3 (q, k, v); each result
    is (B, H, W, c), a view of the attention output. The maps are concatenated along H, each followed by
    its zero padding to a multiple of ``ws`` rows, so that the stripes of all of them are one batch of
    ``F.scaled_dot_product_attention`` (the backward of a concatenation is views, unlike ``F.pad``'s
    copy); padded keys are masked and padded query rows cropped. Heads are consecutive channel groups,
    concatenated head-major. In eager mode, sizes that need no padding skip the padding and the mask;
    while tracing for export both are always computed (padding by 0 rows and an all-zero mask where
    none is needed), so the graph works at any size.
    """
    B, H, W, P, c = maps[0].shape
    traced = _sizes_are_traced()
    pad = -H % ws
    padded = traced or pad  # ``traced`` first: ``pad`` is a tensor while tracing
    parts = list(maps)
    if padded:
        zeros = _constant(_zeros, (B, pad, W, P, c), maps[0].device, maps[0].dtype)
        parts = [t for m in maps for t in (m, zeros)]
    qkv = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    n_maps, n_windows, length, head_dim = len(maps), (H + pad) // ws, ws * W, c // n_heads
    windows = qkv.reshape(B * n_maps * n_windows, length, P, n_heads, head_dim)  # a view unless strides forbid it
    qkv_parts = windows.unbind(2)  # (q, v) or (q, k, v): views whose backward is one stack, not a copy per part
    q, k, v = (t.transpose(1, 2) for t in (qkv_parts[0], qkv_parts[1], qkv_parts[-1]))  # (.., heads, L, d); k = v if P = 2
    mask = None
    if padded:
        mask = _constant(_key_padding_mask, B * n_maps, n_windows, length, (ws - pad) * W, qkv.device, qkv.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = out.transpose(1, 2).reshape(B, n_maps, H + pad, W, c)
    return (out[:, :, :H] if padded else out).unbind(1)


class HRViTAttn(nn.Module):
    """Cross-shaped stripe self-attention with K = V, parallel conv path and BN tail (§2.7).

    The first half of the channels attends within horizontal stripes of ``ws`` rows, the second half
    within vertical stripes of ``ws`` columns.
    """

    def __init__(
        self,
        dim: int,
        dim_head: int,
        ws: int,
        kv_sharing: bool = True,
        parallel_conv: bool = True,
        nonlinearity_bn: bool = True,
    ):
        super().__init__()
        self.dim, self.ws, self.kv_sharing = dim, ws, kv_sharing
        self.n_heads, self.head_dim = half_heads(dim, dim_head)
        self.qkv = nn.Linear(dim, (2 if kv_sharing else 3) * dim)  # (q, v) with k = v; or (q, k, v)
        self.conv_act = nn.Hardswish() if parallel_conv else None
        self.conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim) if parallel_conv else None
        self.act = nn.Hardswish() if nonlinearity_bn else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.bn = nn.BatchNorm1d(dim) if nonlinearity_bn else None
        if self.bn is not None:  # §2.7 step 8: the attention sub-layer starts as exactly 0
            nn.init.zeros_(self.bn.weight)
            nn.init.zeros_(self.bn.bias)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, H, W, -1, C)  # (.., P, C): (q, v) with k = v, or (q, k, v)
        # the halves as views of one split, whose backward is one cat (two slices' would be two zero-filled
        # copies and an add)
        horizontal, vertical = qkv.split(C // 2, dim=-1)
        vertical = vertical.transpose(1, 2)  # vertical stripes of the map are horizontal ones of its transpose
        # one attention call when both halves' stripes have one length (a square map) and the halves are copied
        # anyway (padding, or a transposed half that no view can split into stripes): one-row stripes need no copy
        if H == W and self.ws > 1 and not _sizes_are_traced():
            horizontal, vertical = stripe_attention((horizontal, vertical), self.ws, self.n_heads)
        else:
            (horizontal,), (vertical,) = (stripe_attention((m,), self.ws, self.n_heads) for m in (horizontal, vertical))
        vertical = vertical.transpose(1, 2)
        out = torch.cat([horizontal, vertical], dim=-1)  # not added into slices: their backward is 8 operators
        if self.conv is not None:
            out += self.conv(self.conv_act(qkv[:, :, :, -1].permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        out = self.proj(self.act(out.reshape(B, N, C)))
        if self.bn is not None:
            out = self.bn(out.reshape(B * N, C)).reshape(B, N, C)
        return out


def stripe_attention_macs(batch: int, H: int, W: int, ws: int, n_heads: int, head_dim: int) -> int:
    """MACs of ONE attention matmul (q·kᵀ or attn·v; they are equal) over both halves, padded stripes included."""
    horizontal = math.ceil(H / ws) * n_heads * (ws * W) ** 2 * head_dim
    vertical = math.ceil(W / ws) * n_heads * (ws * H) ** 2 * head_dim
    return batch * (horizontal + vertical)


@register_attention_counter(HRViTAttn, family="hrvit")
def _count_hrvit_attention(module: HRViTAttn, args: tuple, kwargs: dict, output: Any) -> AttentionMacs:
    x = args[0] if args else kwargs["x"]
    H = args[1] if len(args) > 1 else kwargs["H"]
    W = args[2] if len(args) > 2 else kwargs["W"]
    macs = stripe_attention_macs(x.shape[0], H, W, module.ws, module.n_heads, module.head_dim)
    return AttentionMacs(qk=macs, av=macs)


# --------------------------------------------------------------------------------------------------
# Block parts
# --------------------------------------------------------------------------------------------------


class DiversityShortcut(nn.Module):
    """DES (§2.8): the token viewed as a k×p matrix, Linear(p) on the right, GELU, Linear(k) on the left."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"DES needs an even width, got {dim}")
        e = int(math.log2(dim))
        self.p = 2 ** (e - e // 2)
        if dim % self.p:
            raise ValueError(f"DES needs the width {dim} to be divisible by p={self.p}")
        self.k = dim // self.p
        self.right = nn.Linear(self.p, self.p)
        self.act = nn.GELU()
        self.left = LeftLinear(self.k, self.k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.left(self.act(self.right(x.reshape(-1, self.p))).view(-1, self.k, self.p))  # (T, k, p)
        return y.reshape(x.shape)


class LeftLinear(nn.Linear):
    """nn.Linear applied from the left to each (k, p) matrix of a (T, k, p) batch: W·Y + b (same weights,
    state-dict keys and module-hook FLOPs as nn.Linear over the transposed rows). One batched matrix
    product whose output is already in the (k, p) layout, where a plain Linear on the transpose needs a
    copy in and a transposed result back."""

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias[:, None], self.weight.expand(y.shape[0], -1, -1), y)


def one_gemm(x: torch.Tensor) -> bool:
    """Whether the chunked linears below run as one matrix product on ``x``'s device: yes on a GPU, where
    each operator is a kernel launch and one product (whose backward needs no weight-chunk
    concatenations) beats the copies it costs; no on the CPU, where the copies cost more (docs/speed.md)."""
    return x.device.type == "cuda"


class ChunkedOutputLinear(nn.Linear):
    """nn.Linear that returns its output channels as ``chunks`` separate tensors (same weights and
    state-dict keys). On the CPU each chunk is its own product, so it is contiguous: a channels-last
    image for its own convolution, where a channel slice of one output would have to be copied. On a
    GPU (``one_gemm``) the chunks are views of one product."""

    def __init__(self, in_features: int, out_features: int, chunks: int):
        super().__init__(in_features, out_features)
        self.chunks = chunks

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if one_gemm(x):
            return super().forward(x).unflatten(-1, (self.chunks, -1)).unbind(-2)  # unbind's backward: one stack
        return tuple(F.linear(x, w, b) for w, b in zip(self.weight.chunk(self.chunks), self.bias.chunk(self.chunks)))


class ChunkedInputLinear(nn.Linear):
    """nn.Linear over an input given as channel chunks (same weights and state-dict keys). On the CPU
    the chunk products are accumulated by the matrix multiplications themselves, so no concatenated
    input is built; on a GPU (``one_gemm``) the chunks are concatenated for one product."""

    def forward(self, *chunks: torch.Tensor) -> torch.Tensor:
        if one_gemm(chunks[0]):
            return super().forward(torch.cat(chunks, dim=-1))
        weights = self.weight.split([c.shape[-1] for c in chunks], dim=1)
        out = F.linear(chunks[0], weights[0], self.bias).flatten(0, -2)
        for x, w in zip(chunks[1:], weights[1:]):
            out = torch.addmm(out, x.flatten(0, -2), w.t())
        return out.reshape(*chunks[0].shape[:-1], self.out_features)


class MixCFN(nn.Module):
    """Linear -> [DW3x3 | DW5x5] on the two channel halves -> GELU -> Linear (§2.9); F1 drops the MixConv.

    With the MixConv, fc1 hands each half over as its own tensor and fc2 takes them back separately
    (``Chunked*Linear``): the same function as one Linear over the concatenation, without the copies.
    """

    def __init__(self, dim: int, hidden: int, mixconv: bool = True):
        super().__init__()
        if mixconv and hidden % 2:
            raise ValueError(f"MixCFN needs an even hidden width, got {hidden}")
        self.fc1 = ChunkedOutputLinear(dim, hidden, 2) if mixconv else nn.Linear(dim, hidden)
        self.conv3 = nn.Conv2d(hidden // 2, hidden // 2, 3, padding=1, groups=hidden // 2) if mixconv else None
        self.conv5 = nn.Conv2d(hidden // 2, hidden // 2, 5, padding=2, groups=hidden // 2) if mixconv else None
        self.act = nn.GELU()
        self.fc2 = ChunkedInputLinear(hidden, dim) if mixconv else nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        if self.conv3 is None:
            return self.fc2(self.act(self.fc1(x)))
        B, N, _ = x.shape
        halves = (
            self.act(conv(half.reshape(B, H, W, -1).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).reshape(B, N, -1)
            for conv, half in zip((self.conv3, self.conv5), self.fc1(x))
        )
        return self.fc2(*halves)


class HRViTBlock(nn.Module):
    """Pre-norm block (§2.5): x + DropPath(Attn(LN(x)) + DES(x)), then x + DropPath(MixCFN(LN(x)))."""

    def __init__(
        self,
        dim: int,
        dim_head: int,
        ws: int,
        mlp_ratio: float,
        drop_path: float,
        kv_sharing: bool = True,
        mixcfn: bool = True,
        parallel_conv: bool = True,
        nonlinearity_bn: bool = True,
        des: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = HRViTAttn(dim, dim_head, ws, kv_sharing, parallel_conv, nonlinearity_bn)
        self.des = DiversityShortcut(dim) if des else None
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MixCFN(dim, int(dim * mlp_ratio), mixcfn)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        a = self.attn(self.norm1(x), H, W)
        if self.des is not None:
            a = a + self.des(x)  # DES sees the un-normalised input and shares the attention drop-path
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x), H, W))


class PatchEmbed(nn.Module):
    """Stride-1 patch embedding (§2.6): Conv1x1 -> DW3x3 -> tokens -> LN. P2 uses a dense Conv3x3 first.

    (The literal MiT reading P1 of docs/table5-readings.md, a single Conv3x3 + LN, is not built: P2 is the
    reading that reproduces every Table 5 cell.)
    """

    def __init__(self, in_chans: int, dim: int, efficient: bool = True):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, 1) if efficient else nn.Conv2d(in_chans, dim, 3, padding=1)
        self.dw = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.dw(self.proj(x)).flatten(2).transpose(1, 2))


class HRViTBranch(nn.Module):
    """One branch of one module (§2.6): patch embedding, HRViT blocks, LayerNorm, back to NCHW."""

    def __init__(self, in_chans: int, dim: int, drop_paths: Sequence[float], eff_patch_embed: bool, **block_kwargs):
        super().__init__()
        self.patch_embed = PatchEmbed(in_chans, dim, eff_patch_embed)
        self.blocks = nn.ModuleList(HRViTBlock(dim, drop_path=dp, **block_kwargs) for dp in drop_paths)
        self.norm = nn.LayerNorm(dim)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        x = self.patch_embed(x)
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
                x = checkpoint(block, x, H, W, use_reentrant=False)
            else:
                x = block(x, H, W)
        return self.norm(x).reshape(B, H, W, -1).permute(0, 3, 1, 2)  # NCHW shape, channels-last memory


# --------------------------------------------------------------------------------------------------
# Cross-resolution fusion
# --------------------------------------------------------------------------------------------------


def _fusion_path(c_in: int, c_out: int, steps: int) -> nn.Module:
    """Path from a branch ``steps`` levels finer (>0: downsample) or coarser (<0: upsample) (§2.10)."""
    if steps == 0:
        return nn.Identity()
    if steps > 0:
        factor = 2**steps
        return nn.Sequential(
            nn.Conv2d(c_in, c_in, factor + 1, stride=factor, padding=factor // 2, groups=c_in, bias=False),
            nn.BatchNorm2d(c_in),
            nn.Conv2d(c_in, c_out, 1),
            nn.BatchNorm2d(c_out),
        )
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), nn.Upsample(scale_factor=2**-steps, mode="nearest")
    )


class FusionLayer(nn.Module):
    """Output i = GELU(sum over inputs j of path_{j->i}(x_j)) (§2.10).

    Dense: every input feeds every output, including a new coarsest branch. ``dense=False`` is the
    HR-NAS neighbour-only rule (S1): only |i - j| <= 1, so a new branch comes from the previous
    coarsest branch alone. Up-paths are cropped to their target size so any input size works.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], dense: bool = True):
        super().__init__()
        self.paths = nn.ModuleList(
            nn.ModuleDict(
                {
                    str(j): _fusion_path(c_in, c_out, i - j)
                    for j, c_in in enumerate(in_channels)
                    if dense or abs(i - j) <= 1
                }
            )
            for i, c_out in enumerate(out_channels)
        )
        self.act = nn.GELU()

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outs = []
        for i, paths in enumerate(self.paths):
            total = None
            for j, path in paths.items():
                y = path(xs[int(j)])
                if int(j) > i:
                    y = y[..., : xs[i].shape[-2], : xs[i].shape[-1]]
                total = y if total is None else total + y
            outs.append(self.act(total))
        return outs


class HRViTModule(nn.Module):
    """Fusion layer followed by one HRViT stage on every branch (one row of §2.1's module table)."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: Sequence[int],
        blocks: Sequence[int],
        drop_paths: Sequence[float],
        dense_fusion: bool,
        eff_patch_embed: bool,
        block_kwargs: Sequence[dict],
    ):
        super().__init__()
        fused = list(in_channels) + list(channels[len(in_channels) :])
        self.fusion = FusionLayer(in_channels, fused, dense_fusion)
        self.branches = nn.ModuleList(
            HRViTBranch(c_in, c, drop_paths[:n], eff_patch_embed, **kw)
            for c_in, c, n, kw in zip(fused, channels, blocks, block_kwargs)
        )

    def forward(self, xs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [branch(x) for branch, x in zip(self.branches, self.fusion(xs))]


# --------------------------------------------------------------------------------------------------
# Classification head and model
# --------------------------------------------------------------------------------------------------


class HRNetV2Head(nn.Module):
    """ImageNet head (§2.11): Bottleneck per branch, strided-conv aggregation, Conv1x1 to 2048, pool, FC."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, drop_rate: float):
        super().__init__()
        outs = [w * Bottleneck.expansion for w in HEAD_WIDTHS]
        self.incre = nn.ModuleList(
            Bottleneck(
                c,
                w,
                downsample=nn.Sequential(nn.Conv2d(c, o, 1, bias=False), nn.BatchNorm2d(o)),
            )
            for c, w, o in zip(in_channels, HEAD_WIDTHS, outs)
        )
        self.downsamples = nn.ModuleList(
            nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.BatchNorm2d(b), nn.ReLU(inplace=True))
            for a, b in zip(outs[:-1], outs[1:])
        )
        self.final_layer = nn.Sequential(
            nn.Conv2d(outs[-1], HEAD_FEATURES, 1), nn.BatchNorm2d(HEAD_FEATURES), nn.ReLU(inplace=True)
        )
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(HEAD_FEATURES, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, xs: Sequence[torch.Tensor], pre_logits: bool = False) -> torch.Tensor:
        y = self.incre[0](xs[0])
        for incre, down, x in zip(self.incre[1:], self.downsamples, xs[1:]):
            y = incre(x) + down(y)
        y = self.drop(self.final_layer(y).mean(dim=(2, 3)))
        return y if pre_logits else self.fc(y)


class HRViT(nn.Module):
    """HRViT backbone (stem + 6 modules) with the HRNetV2 classification head."""

    def __init__(
        self,
        cfg: HRViTCfg,
        in_chans: int = 3,
        num_classes: int = 1000,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        window_sizes: Sequence[int] = DEFAULT_WINDOW_SIZES,
        kv_sharing: bool = True,
        eff_patch_embed: bool = True,
        mixcfn: bool = True,
        parallel_conv: bool = True,
        nonlinearity_bn: bool = True,
        dense_fusion: bool = True,
        des: bool = True,
    ):
        super().__init__()
        window_sizes = _check_window_sizes(window_sizes)
        self.in_chans, self.num_classes, self.drop_rate = in_chans, num_classes, drop_rate
        self.window_sizes = window_sizes
        self.num_features = self.head_hidden_size = HEAD_FEATURES
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, STEM_CHANNELS // 2, 3, stride=2, padding=1),
            nn.BatchNorm2d(STEM_CHANNELS // 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(STEM_CHANNELS // 2, STEM_CHANNELS, 3, stride=2, padding=1),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
        block_kwargs = [
            dict(
                dim_head=cfg.dim_head,
                ws=ws,
                mlp_ratio=r,
                kv_sharing=kv_sharing,
                mixcfn=mixcfn,
                parallel_conv=parallel_conv,
                nonlinearity_bn=nonlinearity_bn,
                des=des,
            )
            for ws, r in zip(window_sizes, cfg.mlp_ratios)
        ]
        # §2.4: one rate per depth index of each module; parallel branches share them.
        depths = [max(b) for b in cfg.blocks]
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, in_channels = [], [STEM_CHANNELS]
        for m, blocks in enumerate(cfg.blocks):
            first = sum(depths[:m])
            channels = cfg.channels[: len(blocks)]
            stages.append(
                HRViTModule(
                    in_channels,
                    channels,
                    blocks,
                    rates[first : first + depths[m]],
                    dense_fusion,
                    eff_patch_embed,
                    block_kwargs,
                )
            )
            in_channels = list(channels)
        self.stages = nn.ModuleList(stages)
        self.feature_info = [
            dict(num_chs=c, reduction=4 * 2**i, module=f"stages.{len(stages) - 1}.branches.{i}")
            for i, c in enumerate(cfg.channels)
        ]
        self.head: HRNetV2Head | None = HRNetV2Head(cfg.channels, num_classes, drop_rate)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block in backward. The recomputation updates the attention BN's running
        statistics a second time, so (as the official ``with_cp``) its momentum becomes 1 - sqrt(0.9)."""
        for module in self.modules():
            if isinstance(module, HRViTBranch):
                module.grad_checkpointing = enable
            elif isinstance(module, HRViTAttn) and module.bn is not None:
                module.bn.momentum = 1 - 0.9**0.5 if enable else 0.1

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Layer groups for timm's layer-wise lr decay: the stem, then per module (coarse) or per block
        depth of a module, whose parallel branches share a depth as they share drop-path rates (§2.4).
        A module's fusion and patch embeddings join its first blocks, its branch norms its last."""
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.branches\.\d+\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.branches\.\d+\.norm", MATCH_PREV_GROUP),
                (r"^stages\.(\d+)\.", (0,)),
            ],
        )

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return nn.Identity() if self.head is None else self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new (PyTorch-default initialised) Linear on the 2048 head features; 0 removes it."""
        if self.head is None and num_classes > 0:
            raise ValueError("HRViT's classification head was removed by prune_intermediate_layers; "
                             "create a new model to classify")
        self.num_classes = num_classes
        if self.head is not None:
            self.head.fc = nn.Linear(HEAD_FEATURES, num_classes) if num_classes > 0 else nn.Identity()

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4:
            raise ValueError(f"HRViT expects a 4-D (B, C, H, W) image batch, got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"HRViT was built for {self.in_chans} input channels but the input has {x.shape[1]}; "
                f"convert the images or build the model with in_chans={x.shape[1]}"
            )

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch maps (B, C_i, ~H/2^(i+2), ~W/2^(i+2)); sizes are ceil-divisions of H and W."""
        self._check_input(x)
        # channels-last activations throughout: token (B, H, W, C) and image views share one memory layout
        xs = [self.stem(x.contiguous(memory_format=torch.channels_last))]
        for stage in self.stages:
            xs = stage(xs)
        return xs

    def forward_head(self, xs: Sequence[torch.Tensor], pre_logits: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Logits (or the pooled 2048 features); without a head (pruned) the branch maps unchanged,
        as timm's pruned models return their unpooled features."""
        return list(xs) if self.head is None else self.head(xs, pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
        """timm feature API: the selected branch maps (all branches finish in the last module)."""
        if output_fmt != "NCHW":
            raise ValueError(f"HRViT features are NCHW only, got output_fmt={output_fmt!r}")
        take, _ = feature_take_indices(NUM_BRANCHES, indices)
        xs = self.forward_features(x)
        intermediates = [xs[i] for i in take]
        return intermediates if intermediates_only else (xs, intermediates)

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the classification head and, in the last module, the branches after the last selected
        one (dense fusion feeds every branch of the earlier modules into every selected map)."""
        take, max_index = feature_take_indices(NUM_BRANCHES, indices)
        if prune_head:
            self.head, self.num_classes = None, 0
            last = self.stages[-1]
            last.fusion.paths = last.fusion.paths[: max_index + 1]
            last.branches = last.branches[: max_index + 1]
        return take


def _init_weights(module: nn.Module) -> None:
    """The official segmentation backbone's ``init_weights`` (§2.13): Linear trunc_normal(0.02), bias 0.
    Its other layers start as they are built here: norms at weight 1 and bias 0, convolutions at
    PyTorch's default, the attention BN at zero (HRViTAttn)."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _segmentation_backbone(**kwargs: Any) -> HRViT:
    """HRViT initialised as the official segmentation backbone (the ``features_only`` model).
    ``HRViT`` itself starts as the official classification code: PyTorch's default init, except
    the zero-initialised attention BN (§2.13)."""
    model = HRViT(**kwargs)
    model.apply(_init_weights)
    return model


# --------------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------------


def _module(m: re.Match) -> int:
    return int(m[1]) // 2  # the official ``features`` alternate fusion (2m) and stage (2m + 1) of module m


_OFFICIAL_BLOCK = {  # official HRViTBlock sub-module -> HRViTBlock here
    "attn_norm": "norm1", "attn.to_qkv": "attn.qkv", "attn.to_out.0": "attn.proj", "attn.attn_bn": "attn.bn",
    "attn.parallel_conv.1": "attn.conv", "des.proj_right": "des.right", "des.proj_left": "des.left",
    "ffn_norm": "norm2", "ffn.fc1": "mlp.fc1", "ffn.conv.conv_3": "mlp.conv3", "ffn.conv.conv_5": "mlp.conv5",
    "ffn.fc2": "mlp.fc2",
}
# Official code (facebookresearch/HRViT models/hrvit.py and its mmseg backbone) -> this file.
_OFFICIAL_RULES = (
    (r"stem\.conv1\.(.+)", r"stem.0.\1"),
    (r"stem\.bn1\.(.+)", r"stem.1.\1"),
    (r"stem\.conv2\.(.+)", r"stem.3.\1"),
    (r"stem\.bn2\.(.+)", r"stem.4.\1"),
    (r"features\.(\d+)\.blocks\.(\d)\.(\d)\.(.+)", lambda m: f"stages.{_module(m)}.fusion.paths.{m[2]}.{m[3]}.{m[4]}"),
    (r"features\.(\d+)\.patch_embed\.(\d)\.proj\.0\.(.+)", lambda m: f"stages.{_module(m)}.branches.{m[2]}.patch_embed.proj.{m[3]}"),
    (r"features\.(\d+)\.patch_embed\.(\d)\.proj\.1\.(.+)", lambda m: f"stages.{_module(m)}.branches.{m[2]}.patch_embed.dw.{m[3]}"),
    (r"features\.(\d+)\.patch_embed\.(\d)\.norm\.(.+)", lambda m: f"stages.{_module(m)}.branches.{m[2]}.patch_embed.norm.{m[3]}"),
    (r"features\.(\d+)\.norm\.(\d)\.(.+)", lambda m: f"stages.{_module(m)}.branches.{m[2]}.norm.{m[3]}"),
    *(
        (rf"features\.(\d+)\.branches\.(\d)\.(\d+)\.{re.escape(theirs)}\.(.+)",
         functools.partial(lambda ours, m: f"stages.{_module(m)}.branches.{m[2]}.blocks.{m[3]}.{ours}.{m[4]}", ours))
        for theirs, ours in _OFFICIAL_BLOCK.items()
    ),
    (r"head\.incre_modules\.(\d)\.0\.(.+)", r"head.incre.\1.\2"),
    (r"head\.downsamp_modules\.(.+)", r"head.downsamples.\1"),
    (r"head\.final_layer\.(.+)", r"head.final_layer.\1"),
    (r"head\.classifier\.(.+)", r"head.fc.\1"),
)


def checkpoint_filter_fn(state_dict: dict[str, Any], model: HRViT) -> dict[str, torch.Tensor]:
    """timm filter: this suite's checkpoints and the official code's (ImageNet, raw or wrapped in
    state_dict/model/state_dict_ema; mmseg ``backbone.``) into ``model``. The official tensors need
    renaming only: q/v order, head split, DES and MixConv halves are the same as here."""
    official = lambda state: rename_keys(state, _OFFICIAL_RULES, "official HRViT")  # noqa: E731
    return convert_checkpoint(state_dict, model, {"hrvit-official": official, "hrvit-official-mmseg": official},
                              optional=("head.",), family="HRViT")


def _cfg(**kwargs: Any) -> SuiteCfg:
    return SuiteCfg(
        num_classes=1000,
        input_size=(3, 224, 224),
        pool_size=(7, 7),
        crop_pct=0.9,
        interpolation="bicubic",
        mean=IMAGENET_DEFAULT_MEAN,
        std=IMAGENET_DEFAULT_STD,
        first_conv="stem.0",
        classifier="head.fc",
        license="cc-by-nc-4.0",
        flop_family="hrvit",
        **kwargs,
    )


# No url: the official repository publishes no checkpoints; pretrained=True needs a file (models.weights).
default_cfgs = generate_default_cfgs({name: _cfg(seg_embed_dim=SEG_EMBED_DIMS[name]) for name in MODEL_CFGS})


def _create_hrvit(variant: str, pretrained: bool = False, **kwargs: Any) -> HRViT:
    """The variant's architecture; every ``HRViTCfg`` field and ``HRViT`` keyword can be overridden
    (``timm.create_model("hrvit_b1", drop_path_rate=0.2, mlp_ratios=(2, 2, 2, 2))``)."""
    arch = {f.name: kwargs.pop(f.name) for f in fields(HRViTCfg) if f.name in kwargs}
    return build_with_weights(
        _segmentation_backbone if kwargs.get("features_only") else HRViT,
        variant,
        pretrained,
        checkpoint_filter_fn,
        model_cfg=replace(MODEL_CFGS[variant], **arch),
        feature_cfg=dict(feature_cls="getter", out_indices=tuple(range(NUM_BRANCHES))),
        **kwargs,
    )


@register_model
def hrvit_b1(pretrained: bool = False, **kwargs: Any) -> HRViT:
    return _create_hrvit("hrvit_b1", pretrained, **kwargs)


@register_model
def hrvit_b2(pretrained: bool = False, **kwargs: Any) -> HRViT:
    return _create_hrvit("hrvit_b2", pretrained, **kwargs)


@register_model
def hrvit_b3(pretrained: bool = False, **kwargs: Any) -> HRViT:
    return _create_hrvit("hrvit_b3", pretrained, **kwargs)
