"""Analytic attention-matmul counts, for modules whose attention runs in ``F.scaled_dot_product_attention``.

fvcore and torch's CPU flop counter cannot see inside SDPA, and mmcv-style module hooks never saw
functional matmuls at all. A model file therefore registers, per attention module type, a function
that returns the MACs of its two matmuls (q·kᵀ and attn·v) from the call's inputs; the FLOP ledger
(``reproduce.flops``) installs forward hooks on those modules and adds the counts under each
convention's own rule. Lives in ``models/`` so that model files need not import the pipeline code.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn


@dataclass(frozen=True)
class AttentionMacs:
    """Multiply-accumulates of one attention call, padded windows included."""

    qk: int
    av: int

    @property
    def total(self) -> int:
        return self.qk + self.av


# counter(module, args, kwargs, output) -> AttentionMacs
AttentionCounter = Callable[[nn.Module, tuple, dict, Any], AttentionMacs]


@dataclass(frozen=True)
class RegisteredCounter:
    family: str  # which paper convention the module's authors used ("hrvit", "cswin", "mit", ...)
    count: AttentionCounter
    # True when the module computes its matmuls as explicit ops (e.g. smp's MiT) that fvcore and
    # torch already count; the ledger then uses the counter only for the module-hook ("paper") rule.
    traced: bool = False


_COUNTERS: dict[type, RegisteredCounter] = {}


def register_attention_counter(
    module_type: type, family: str, traced: bool = False
) -> Callable[[AttentionCounter], AttentionCounter]:
    """Decorator: ``@register_attention_counter(MyAttention, family="hrvit")`` on a counter function."""

    def decorate(fn: AttentionCounter) -> AttentionCounter:
        _COUNTERS[module_type] = RegisteredCounter(family, fn, traced)
        return fn

    return decorate


def attention_counter_for(module: nn.Module) -> RegisteredCounter | None:
    """The counter registered for ``module``'s type (or its nearest registered base class)."""
    for cls in type(module).__mro__:
        if cls in _COUNTERS:
            return _COUNTERS[cls]
    return None
