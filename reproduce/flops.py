"""The FLOP ledger: parameters and GFLOPs of a model under three counting conventions.

* ``paper``  — the convention that lands on the published figures (docs/flop-convention.md; the
  per-family rules there). It re-creates mmcv 1.x ``get_model_complexity_info`` (what mmseg's
  ``tools/get_flops.py`` calls) as forward hooks on module types:

  ====================================  =======================================================
  module                                 counted
  ====================================  =======================================================
  Conv1d/2d/3d                           MACs + one add per output element when it has a bias
  Linear                                 input elements x out_features (MACs, bias not counted)
  BatchNorm1d/2d/3d                      per rule (2/elem with affine, 1 without); never SyncBN
  LayerNorm / GroupNorm / InstanceNorm   per rule (2/elem with affine, 1 without)
  ReLU, ReLU6, LeakyReLU, PReLU, ELU     1 per output element
  max/avg pools, adaptive pools          1 per input element
  nn.Upsample (and its subclasses)       1 per output element
  anything else                          0 — GELU, Hardswish, softmax, F.interpolate, additions,
                                         and every functional matmul, attention included
  ====================================  =======================================================

  The attention matmuls, invisible to module hooks, are added from the counters that attention
  modules register in ``models.flop_registry``, scaled by the attention factor of the counter's
  own family (so one model may mix families, e.g. HRNet-MiT, whose MiT attention SegFormer's
  ``sra_flops`` counted with both matmuls). The LN/BN part of the rule comes from the model's
  family (``models.factory.flop_family``); see ``PAPER_RULES`` for why each rule exists. Module
  types are matched with ``isinstance`` (mmcv matched exact types) so that re-implementations built
  from timm's ``nn.Linear``/``nn.Conv2d`` subclasses are counted like the originals.

* ``fvcore`` — ``fvcore.nn.FlopCountAnalysis(...).total()``: one fused multiply-add = one FLOP,
  conv bias not counted, norms and up-sampling counted per fvcore's own handles.
* ``torch`` — ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per MAC, matmul/conv only.

Both tracing tools lose ``F.scaled_dot_product_attention``: fvcore skips the ``aten::scaled_dot_
product_attention`` node, and torch's counter has no formula for the CPU fused kernel
(``_scaled_dot_product_flash_attention_for_cpu``), while SDPA calls that fall back to the math
path (e.g. value width != query width, non-contiguous inputs) reach it as counted ``bmm`` ops. The
ledger therefore teaches each tool the one op it misses (an fvcore op handle; a torch
``custom_mapping`` entry) instead of adding counts afterwards: every SDPA call is counted exactly
once by whichever path it takes, and lands in the right module of the breakdown. (fvcore also lacks a
``baddbmm`` handle, which HRViT's DES uses; the ledger gives it one.) It also checks,
during the paper pass, that every SDPA call ran inside a module with a registered counter and that
each untraced counter agrees with the SDPA shapes it ran, so attention is never silently dropped.
"""
from __future__ import annotations

import contextlib
import math
import warnings
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode

from models.flop_registry import RegisteredCounter, attention_counter_for

T = TypeVar("T")

CONVENTIONS: dict[str, str] = {
    "paper": "mmcv-1.x module hooks (conv MACs+bias, linear MACs, norms per family rule, ReLU/pool/"
    "nn.Upsample per element; GELU, Hardswish, F.interpolate and functional matmuls not counted) plus "
    "the registered attention matmuls scaled by their family's factor (hrvit/cswin: one of the two "
    "matmuls; mit: both); reproduces the papers' published GFLOPs",
    "fvcore": "fvcore FlopCountAnalysis total, 1 MAC = 1 FLOP, with scaled_dot_product_attention "
    "counted as its two matmuls",
    "torch": "torch.utils.flop_counter.FlopCounterMode total, 2 FLOPs per MAC, with the CPU fused "
    "scaled_dot_product_attention kernel counted as its two matmuls",
}
ALL_CONVENTIONS: tuple[str, ...] = tuple(CONVENTIONS)


@dataclass(frozen=True)
class CountingRule:
    """What the ``paper`` convention counts beyond conv/linear/ReLU/pool/upsample for one family."""

    name: str
    count_layer_norm: bool  # LayerNorm, GroupNorm, InstanceNorm (mmcv gained all three after 1.2.7)
    count_batch_norm: bool  # plain BatchNorm1d/2d/3d; nn.SyncBatchNorm is never counted (not in mmcv's table)
    attention_factor: float  # fraction of the two attention matmuls (q·kᵀ + attn·v) counted
    why: str


PAPER_RULES: dict[str, CountingRule] = {
    "hrvit": CountingRule(
        "hrvit", count_layer_norm=True, count_batch_norm=False, attention_factor=0.5,
        why="HRViT pinned mmcv-full 1.3.0, whose hooks count LayerNorm; its BNs are SyncBN in the "
        "published runs, which mmcv does not count; one of the two attention matmuls (half the "
        "matmul MACs) reproduces all published HRViT figures (docs/flop-convention.md#the-attention-matmul-finding).",
    ),
    "cswin": CountingRule(
        "cswin", count_layer_norm=True, count_batch_norm=False, attention_factor=0.5,
        why="HRViT's authors re-counted CSWin for Table 4 with their own convention: mmcv-1.3 hooks "
        "plus one attention matmul reproduces CSWin-Ti/T/S within 0.12 G (docs/flop-convention.md#per-family).",
    ),
    "mit": CountingRule(
        "mit", count_layer_norm=False, count_batch_norm=False, attention_factor=1.0,
        why="Table 4's MiT cells are SegFormer's own: mmcv-full 1.2.7 (LayerNorm not yet counted), "
        "SyncBN head, and SegFormer's sra_flops adding both attention matmuls (docs/flop-convention.md#per-family).",
    ),
}

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_LAYER_NORM = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
_ACTIVATION = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU)
_POOL = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)


def get_rule(family: str | CountingRule) -> CountingRule:
    """The ``PAPER_RULES`` entry for ``family`` (a ValueError lists the known families)."""
    if isinstance(family, CountingRule):
        return family
    if family not in PAPER_RULES:
        raise ValueError(f"unknown FLOP-counting family {family!r}; known: {', '.join(PAPER_RULES)}")
    return PAPER_RULES[family]


def module_flops(module: nn.Module, inputs: tuple, output: Any, rule: CountingRule) -> int | None:
    """mmcv-1.x FLOPs of one call of ``module`` under ``rule``; None for types the rule ignores."""
    if isinstance(module, _CONV):
        macs = output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
        return macs + (output.numel() if module.bias is not None else 0)
    if isinstance(module, nn.Linear):
        return sum(x.numel() for x in inputs) * module.out_features  # inputs may be channel chunks
    norm_counted = (isinstance(module, _BATCH_NORM) and rule.count_batch_norm) or (
        isinstance(module, _LAYER_NORM) and rule.count_layer_norm
    )
    if norm_counted:
        affine = getattr(module, "affine", False) or getattr(module, "elementwise_affine", False)
        return inputs[0].numel() * (2 if affine else 1)
    if isinstance(module, (*_ACTIVATION, nn.Upsample)):
        return output.numel()
    if isinstance(module, _POOL):
        return inputs[0].numel()
    return None


def sdpa_macs(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int]) -> int:
    """MACs of q·kᵀ plus attn·v for SDPA shapes (..., L, E), (..., S, E), (..., S, Ev)."""
    *batch, length, width = query_shape
    return math.prod(batch) * length * key_shape[-2] * (width + value_shape[-1])


def _fvcore_sdpa_handle(inputs: list, outputs: list) -> int:
    from fvcore.nn.jit_handles import get_shape

    return sdpa_macs(*(get_shape(v) for v in inputs[:3]))


def _fvcore_baddbmm_handle(inputs: list, outputs: list) -> int:
    """fvcore has a ``bmm`` handle but none for ``baddbmm`` (bias + batched product): the product's MACs."""
    from fvcore.nn.jit_handles import get_shape

    batch, n, k = get_shape(inputs[1])
    return batch * n * k * get_shape(inputs[2])[-1]


CPU_FUSED_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # no flop formula in torch's registry


def _torch_cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return 2 * sdpa_macs(query_shape, key_shape, value_shape)


@dataclass
class Ledger:
    """Params and GFLOPs of one model at one input size. ``gflops`` maps convention -> total;
    ``breakdown`` maps module group -> {"params", convention: GFLOPs}; ``attention_macs`` is the sum
    of the registered counters (both matmuls, unscaled); ``uncounted_modules`` lists module
    types with parameters of their own that the paper rule counts as 0 (type -> number of calls)."""

    params: int
    gflops: dict[str, float]
    breakdown: dict[str, dict[str, float]]
    attention_macs: int
    paper_attention_gflops: float
    rule: CountingRule
    uncounted_modules: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["rule"] = self.rule.name
        for name in ALL_CONVENTIONS:
            out[f"gflops_{name}"] = self.gflops.get(name)
        return out


class _SdpaWatch(TorchFunctionMode):
    """Attributes each F.scaled_dot_product_attention call to the innermost registered attention
    module running (``stack``), so the paper pass can verify the counters cover every call."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.macs: dict[str | None, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            qkv = [*args[:3], *(kwargs[k] for k in ("query", "key", "value") if k in kwargs)]
            self.macs[self.stack[-1] if self.stack else None] += sdpa_macs(*(t.shape for t in qkv))
        return func(*args, **kwargs)


Forward = Callable[[torch.Tensor], Any]  # runs ``model`` (possibly with swapped-in meta weights)


@dataclass
class _ShapePass:
    """What one forward pass under the module hooks (and optionally torch's counter) counted."""

    paper: dict[str, float]  # module name -> exclusive paper FLOPs
    attention_macs: int  # registered counters, both matmuls, unscaled
    paper_attention_flops: float  # the same after each counter family's factor
    uncounted: dict[str, int]  # types with own parameters that the rule counts as 0 -> calls
    torch: dict[str, float] | None  # module name -> inclusive torch FLOPs ("" = whole model)


def _shape_pass(model: nn.Module, forward: Forward, x: torch.Tensor, rule: CountingRule, with_torch: bool) -> _ShapePass:
    """One forward: paper-rule hooks, attention counters, the SDPA coverage check and, when asked,
    torch's FlopCounterMode (sharing the pass halves the cost)."""
    names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
    flops: dict[str, float] = defaultdict(float)
    uncounted: dict[str, int] = defaultdict(int)
    counter_macs: dict[str, int] = defaultdict(int)  # attention module name -> unscaled MACs
    counters: dict[str, RegisteredCounter] = {}
    scaled = [0.0]  # attention FLOPs after each family's factor
    stack: list[str] = []  # registered attention modules currently running

    def table_hook(module, inputs, output):
        value = module_flops(module, inputs, output, rule)
        if value is not None:
            flops[names[module]] += value
        elif attention_counter_for(module) is None and next(module.parameters(recurse=False), None) is not None:
            uncounted[type(module).__name__] += 1

    def enter_attention(module, args):
        stack.append(names[module])

    def attention_hook(module, args, kwargs, output):
        stack.pop()
        counter = attention_counter_for(module)
        macs = counter.count(module, args, kwargs, output).total
        counter_macs[names[module]] += macs
        counters[names[module]] = counter
        flops[names[module]] += get_rule(counter.family).attention_factor * macs
        scaled[0] += get_rule(counter.family).attention_factor * macs

    handles = [m.register_forward_hook(table_hook) for m in names]
    for module in names:
        if attention_counter_for(module) is not None:
            handles.append(module.register_forward_pre_hook(enter_attention))
            handles.append(module.register_forward_hook(attention_hook, with_kwargs=True))
    watch = _SdpaWatch(stack)
    torch_mode = FlopCounterMode(display=False, custom_mapping={CPU_FUSED_SDPA: _torch_cpu_sdpa_flops}) if with_torch else None
    try:
        with watch, torch_mode or contextlib.nullcontext():
            forward(x)
    finally:
        for handle in handles:
            handle.remove()
    _check_attention_coverage(watch.macs, {n: (counters[n], macs) for n, macs in counter_macs.items()})
    return _ShapePass(flops, sum(counter_macs.values()), scaled[0], dict(uncounted),
                      None if torch_mode is None else _torch_module_counts(torch_mode, model))


def _torch_module_counts(mode: FlopCounterMode, model: nn.Module) -> dict[str, float]:
    """torch's per-module totals keyed like ``named_modules`` (its tracker prefixes the root's class name)."""
    root = type(model).__name__
    counts = {"": float(mode.get_total_flops())}
    for key, ops in mode.get_flop_counts().items():
        if key.startswith(root + "."):
            counts[key[len(root) + 1:]] = float(sum(ops.values()))
    return counts


class AttentionCoverageError(RuntimeError):
    """An SDPA call that no registered counter covers, or a counter that disagrees with its SDPA calls."""


def _is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _count_on_shapes(count: Callable[..., T], model: nn.Module, shape: tuple[int, ...], *args: Any) -> T:
    """``count(model, forward, zeros(shape), *args)`` with ``model`` run on meta-device copies of its
    weights (``torch.func.functional_call``): the hook and dispatch counters need only shapes, and
    skipping the arithmetic makes them 5-10x faster. A forward that needs real values (data-dependent
    ops fail on meta tensors) is rerun on real zeros when the model has real weights."""
    meta_state = {n: torch.empty_like(t, device="meta") for n, t in (*model.named_parameters(), *model.named_buffers())}
    try:
        with torch.device("meta"):
            return count(model, lambda x: functional_call(model, meta_state, (x,)), torch.zeros(shape), *args)
    except AttentionCoverageError:
        raise
    except (RuntimeError, NotImplementedError, TypeError):
        if _is_meta(model):
            raise
        return count(model, model, torch.zeros(shape), *args)


def _check_attention_coverage(sdpa: Mapping[str | None, int], counted: Mapping[str, tuple[RegisteredCounter, int]]) -> None:
    if sdpa.get(None):
        raise AttentionCoverageError(
            f"F.scaled_dot_product_attention ran outside every module with a registered attention "
            f"counter ({sdpa[None]:,} MACs); the paper convention would drop it. Register a counter "
            f"for the attention module with models.flop_registry.register_attention_counter."
        )
    for name, (counter, macs) in counted.items():
        if not counter.traced and sdpa.get(name, 0) != macs:
            raise AttentionCoverageError(
                f"attention counter of {name!r} gives {macs:,} MACs but the module's "
                f"scaled_dot_product_attention calls ran {sdpa.get(name, 0):,}; fix the counter "
                f"(or register it with traced=True if the module computes explicit matmuls)."
            )


def _fvcore_counts(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    with warnings.catch_warnings():  # fvcore's import and jit tracing warn about deprecations and tracer casts
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, x).set_op_handle(
            "aten::scaled_dot_product_attention", _fvcore_sdpa_handle, "aten::baddbmm", _fvcore_baddbmm_handle
        )
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        return dict(analysis.by_module())


def _inclusive(exclusive: Mapping[str, float]) -> dict[str, float]:
    """Sum per-module counts into every ancestor ("" is the whole model)."""
    total: dict[str, float] = defaultdict(float)
    for name, value in exclusive.items():
        parts = name.split(".") if name else []
        for i in range(len(parts) + 1):
            total[".".join(parts[:i])] += value
    return total


def breakdown_groups(model: nn.Module, depth: int) -> list[str]:
    """Module names at ``depth`` (1 = children of the model), plus shallower leaves."""
    groups = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if level == depth or (0 < level < depth and next(module.children(), None) is None):
            groups.append(name)
    return groups


def _group_total(counts: Mapping[str, float], group: str) -> float:
    """``group``'s inclusive count; for a container never called itself (ModuleList, which torch's
    module tracker never sees) the sum over its outermost counted descendants."""
    if group in counts:
        return counts[group]
    inside = [n for n in counts if n.startswith(group + ".")]
    return sum(counts[n] for n in inside if not any(n.startswith(m + ".") for m in inside))


def _breakdown(model: nn.Module, depth: int, inclusive: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, float]]:
    rows: dict[str, dict[str, float]] = {}
    for group in breakdown_groups(model, depth):
        row: dict[str, float] = {"params": sum(p.numel() for p in model.get_submodule(group).parameters())}
        row.update({conv: _group_total(counts, group) / 1e9 for conv, counts in inclusive.items()})
        rows[group] = row
    other = {conv: counts.get("", 0.0) / 1e9 - sum(row[conv] for row in rows.values()) for conv, counts in inclusive.items()}
    if any(abs(v) > 1e-9 for v in other.values()):  # ops run directly in shallower forward()s
        rows["(other)"] = {"params": 0, **other}
    return rows


def measure(
    model: nn.Module,
    input_size: tuple[int, int],
    rule: str | CountingRule,
    conventions: Iterable[str] = ALL_CONVENTIONS,
    depth: int = 2,
    in_chans: int = 3,
) -> Ledger:
    """Count ``model`` (put in eval mode) on one zero image of ``input_size`` = (H, W), batch 1.

    ``rule`` is the model's paper-convention family (``models.factory.flop_family``) or a rule;
    ``conventions`` may skip the slower tracing tools; ``depth`` sets the breakdown granularity."""
    rule = get_rule(rule)
    conventions = tuple(conventions)
    unknown = set(conventions) - set(CONVENTIONS)
    if unknown:
        raise ValueError(f"unknown conventions {sorted(unknown)}; choose from {', '.join(CONVENTIONS)}")
    if "fvcore" in conventions and _is_meta(model):
        raise ValueError("fvcore traces real tensors: build the model on a real device to count it with fvcore")
    model.eval()
    shape = (1, in_chans, *input_size)
    with torch.no_grad():
        counted = _count_on_shapes(_shape_pass, model, shape, rule, "torch" in conventions)
        inclusive = {"paper": _inclusive(counted.paper)}
        if "fvcore" in conventions:  # the jit tracer needs real tensors
            inclusive["fvcore"] = _fvcore_counts(model, torch.zeros(shape))
        if counted.torch is not None:
            inclusive["torch"] = counted.torch
    return Ledger(
        params=sum(p.numel() for p in model.parameters()),
        gflops={conv: inclusive[conv].get("", 0.0) / 1e9 for conv in ALL_CONVENTIONS if conv in inclusive},
        breakdown=_breakdown(model, depth, inclusive),
        attention_macs=counted.attention_macs,
        paper_attention_gflops=counted.paper_attention_flops / 1e9,
        rule=rule,
        uncounted_modules=counted.uncounted,
    )
