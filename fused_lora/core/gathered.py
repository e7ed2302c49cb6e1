"""Rows gathered from a tensor the caller keeps: saved for backward as (source, index), not as a copy.

A mixture-of-experts block gives its experts each token's hidden state once per expert it is routed to:
x = source[index] (top-k rows per token, sorted by expert). The grouped op needs its input x again in
backward (dA_e = G_e^T (D x_e)); holding the gathered x there is a copy top-k times the size of the hidden
states, which the block without LoRA does not hold (its frozen GEMM needs only W for dX). Where x is such a
gather, `remember(x, source, index)` says so (by x's identity, for as long as x lives); the op's autograd then
saves source and index instead (`kept_form`) and gathers x again in backward (`regather`: one M x K copy,
freed with the op's gradients). Writes are watched through torch's version counters: one to x or source
between `remember` and the save (a forward pre-hook, say) makes the op keep x itself; source is saved as
autograd saves any tensor, so one after the save is refused by autograd's own check. Writes through `.data`
are invisible to both (as to autograd everywhere).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_GATHERS = WeakIdKeyDictionary()  # x -> (source, index, versions of x and source) with x == source[index]


def remember(x: Tensor, source: Tensor, index: Tensor) -> None:
    """Record that x is source[index] (index: a 1-D integer tensor of x's rows), so that an op keeping x for
    backward may keep (source, index) instead. Not under torch.compile (the traced op saves x itself)."""
    if torch.compiler.is_compiling():
        return
    if index.dim() != 1 or index.shape[0] != x.shape[0] or source.shape[1:] != x.shape[1:] \
            or source.dtype != x.dtype or source.device != x.device:
        raise ValueError(f"remember: x {tuple(x.shape)} is not rows of source {tuple(source.shape)} picked by an "
                         f"index of shape {tuple(index.shape)}")
    _GATHERS[x] = (source, index, x._version, source._version)


def kept_form(x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """What an op saves for x: (source, index) where x was remembered as source[index] and neither has been
    written in place since (then x may no longer be those rows), else (x, None)."""
    known = None if torch.compiler.is_compiling() else _GATHERS.get(x)
    if known is None:
        return x, None
    source, index, x_version, source_version = known
    if (x._version, source._version) != (x_version, source_version):
        return x, None
    return source, index


def regather(kept: Tensor, index: Optional[Tensor]) -> Tensor:
    """x again from what `kept_form` gave: kept[index], or kept itself when index is None."""
    return kept if index is None else kept[index]
