"""Eager PyTorch reference of one LoRA layer: the specification every backend is tested against.

    H = (D * X) A^T                  M x r
    Y = X W^T + b + s * H B^T        M x N

with D = keep / (1 - p) (keep ~ Bernoulli(1 - p) per element of X). Written with plain ops so
autograd derives the backward; run it in float64 to get an oracle for any dtype.

Several adapters in one batch (`lora_linear_multi_ref`): row m uses adapter a(m), with its own
rank, scaling and dropout, or none (a(m) = -1, peft's "__base__"):

    y[m] = x[m] W^T + b + s_a B_a A_a (D_a x[m])

Expert weights (`lora_linear_grouped_ref`): the rows sorted by group, group_sizes[e] rows for expert e, each
through its own base weight, bias and LoRA factors, one scaling, one dropout mask over the whole batch:

    y[m] = x[m] W_e^T + b_e + s B_e A_e (D x[m])      e = the group of row m
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


def group_membership(group_sizes: Tensor, M: int, dtype: torch.dtype) -> Tensor:
    """(M, E) 0/1 matrix: entry (m, e) is 1 where row m is among group e's rows (the rows sorted by group,
    group e holding rows sum(group_sizes[:e]) .. sum(group_sizes[:e + 1]) - 1), by comparisons (no index ops)."""
    ends = torch.cumsum(group_sizes, 0)
    starts = ends - group_sizes
    row = torch.arange(M, device=group_sizes.device).unsqueeze(1)
    return ((row >= starts) & (row < ends)).to(dtype)


def expert_weight(weight: Tensor, transposed: bool = False) -> Tensor:
    """The expert stack as (E, N, K) (a view): `weight` itself, or (E, K, N) transposed."""
    return weight.transpose(1, 2) if transposed else weight


def lora_linear_grouped_ref(x: Tensor, group_sizes: Tensor, weight: Tensor, bias: Optional[Tensor],
                            lora_A: Optional[Tensor], lora_B: Optional[Tensor], scaling: float,
                            keep: Optional[Tensor] = None, dropout_p: float = 0.0,
                            transposed: bool = False) -> Tensor:
    """Expert weights: y[m] = x[m] W_e^T + b_e + s B_e A_e (D x[m]) for row m of group e.

    x is M x K, its rows sorted by group, group e holding group_sizes[e] rows (E groups, summing to M);
    weight (E, N, K) ((E, K, N) with `transposed`), bias (E, N) or None, lora_A (E, r, K), lora_B (E, N, r)
    (both None: the base alone); `keep` the M x K dropout keep mask (None: no dropout). Every expert is
    applied to every row and the rows selected by multiplying with a 0/1 column (`group_membership`), so this
    formulation shares nothing with the implementations' slicing; autograd derives its gradients.
    """
    w = expert_weight(weight, transposed)
    rows = group_membership(group_sizes, x.shape[0], x.dtype)
    xd = x if keep is None else x * dropout_scale(keep, dropout_p, x.dtype)
    y = x.new_zeros(x.shape[0], w.shape[1])
    for e in range(w.shape[0]):
        ye = x @ w[e].t()
        if bias is not None:
            ye = ye + bias[e]
        if lora_A is not None:
            ye = ye + scaling * ((xd @ lora_A[e].t()) @ lora_B[e].t())
        y = y + rows[:, e:e + 1] * ye
    return y


def lora_linear_grouped_ref_h(x: Tensor, group_sizes: Tensor, lora_A: Tensor, keep: Optional[Tensor] = None,
                              dropout_p: float = 0.0) -> Tensor:
    """H (M x r): row m is (D x[m]) A_e^T, e the group of row m (what the grouped op keeps for backward)."""
    rows = group_membership(group_sizes, x.shape[0], x.dtype)
    xd = x if keep is None else x * dropout_scale(keep, dropout_p, x.dtype)
    h = x.new_zeros(x.shape[0], lora_A.shape[1])
    for e in range(lora_A.shape[0]):
        h = h + rows[:, e:e + 1] * (xd @ lora_A[e].t())
    return h
