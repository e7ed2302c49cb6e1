"""Eager PyTorch reference of one LoRA layer: the specification every backend is tested against.

    H = (D * X) A^T                  M x r
    Y = X W^T + b + s * H B^T        M x N

with D = keep / (1 - p) (keep ~ Bernoulli(1 - p) per element of X). Written with plain ops so
autograd derives the backward; run it in float64 to get an oracle for any dtype.

Several adapters in one batch (`lora_linear_multi_ref`): row m uses adapter a(m), with its own
rank, scaling and dropout, or none (a(m) = -1, peft's "__base__"):

    y[m] = x[m] W^T + b + s_a B_a A_a (D_a x[m])
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def dropout_scale(keep: Tensor, p: float, dtype: torch.dtype) -> Tensor:
    """D = keep / (1 - p) as `dtype`; `keep` is a boolean (or 0/1) mask."""
    return keep.to(dtype) / (1.0 - p)


def lora_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_A: Tensor,
    lora_B: Tensor,
    scaling: float,
    keep: Optional[Tensor] = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """y = x W^T + b + s * ((D * x) A^T) B^T for x of any leading shape.

    `keep` is the dropout keep-mask (same shape as x) or None for no dropout.
    """
    xd = x if keep is None else x * dropout_scale(keep, dropout_p, x.dtype)
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    return y + scaling * ((xd @ lora_A.t()) @ lora_B.t())


def lora_linear_ref_h(x: Tensor, lora_A: Tensor, keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """H = (D * x) A^T, the only activation besides x a LoRA layer needs to keep."""
    xd = x if keep is None else x * dropout_scale(keep, dropout_p, x.dtype)
    return xd @ lora_A.t()


def lora_delta_weight(lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """s * B @ A in float32 (or float64 if given float64): what merging adds to W."""
    acc = torch.float64 if lora_A.dtype == torch.float64 else torch.float32
    return (lora_B.to(acc) @ lora_A.to(acc)) * scaling


def lora_linear_multi_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters, row_adapter: Tensor,
                          keeps=None) -> Tensor:
    """Several adapters in one batch: y[m] = x[m] W^T + b + s_a B_a A_a (D_a x[m]), a = row_adapter[m].

    x is M x K; `adapters` a sequence of (lora_A (r_a x K), lora_B (N x r_a), scaling s_a, dropout_p p_a),
    each with its own rank; `row_adapter` (M,) integers in [-1, len(adapters)), -1 = no adapter
    ("__base__"). `keeps`: None, or per adapter None (no dropout) or an M x K keep mask of which only
    that adapter's rows are read. Rows are selected by multiplying with a 0/1 column (no index ops),
    so this formulation is independent of the implementations' gathers and scatters.
    """
    y = x @ weight.t()
    if bias is not None:
        y = y + bias
    for a, (lora_A, lora_B, scaling, p) in enumerate(adapters):
        keep = None if keeps is None else keeps[a]
        xd = x if keep is None else x * dropout_scale(keep, p, x.dtype)
        rows = (row_adapter == a).to(x.dtype).unsqueeze(-1)
        y = y + scaling * rows * ((xd @ lora_A.t()) @ lora_B.t())
    return y


def dora_linear_ref(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, scaling: float, keep: Optional[Tensor] = None,
                    dropout_p: float = 0.0) -> Tensor:
    """DoRA as peft computes it: W + s B A formed, its row norms n detached, c = m / n;
    without dropout y = c (x W^T + s B A x) + b; with dropout (D x the dropped input)
    y = x W^T + b + (c - 1) (D x) W^T + c s B A (D x)."""
    norm = torch.linalg.norm(weight + scaling * (lora_B @ lora_A), dim=1).detach()
    c = magnitude / norm
    xd = x if keep is None else x * dropout_scale(keep, dropout_p, x.dtype)
    lora = scaling * ((xd @ lora_A.t()) @ lora_B.t())
    base = x @ weight.t()
    y = c * (base + lora) if keep is None else base + (c - 1) * (xd @ weight.t()) + c * lora
    return y if bias is None else y + bias
