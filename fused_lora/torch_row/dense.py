"""The PyTorch row's LoRA op over a 16-bit base: forward and backward with plain torch ops.

Used on CPU, as the fallback where Triton cannot run, and as a second implementation of the
same math as the kernels. Written for speed on CPU: besides the output, no M x N temporary (the
rank-r term is written first and the base GEMM accumulates onto it with `addmm_`, beta = 1, and
likewise for dX), only x and H are saved, and with dropout the mask is regenerated from the seed
in backward instead of being stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.dropout import keep_mask


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """Returns (Y, H): Y = x W^T + b + s * H B^T, H = (D * x) A^T; x is M x K.

    Y is first written with b + s H B^T (cheap: rank r), then the base product is accumulated
    onto it by the GEMM itself (beta = 1), so Y is written by one GEMM pass and no M x N temporary exists.
    """
    y, h = low_rank_start(x, bias, lora_A, lora_B, scaling, dropout_p, seed)
    y.addmm_(x, weight.t())
    return y, h


def low_rank_start(x: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor, scaling: float,
                   dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
    """(Y started as b + s H B^T, H = (D * x) A^T): what every PyTorch path writes before adding the
    base product onto Y (`forward` here, `torch_row.quant.forward_quant` chunk by chunk); s reaches the
    product through the GEMM (`scaled_mm`, addmm's alpha)."""
    keep = keep_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    h = torch.mm(dropped(x, keep, dropout_p), lora_A.t())
    y = scaled_mm(h, lora_B.t(), scaling) if bias is None else torch.addmm(bias, h, lora_B.t(), alpha=scaling)
    return y, h


def scaled_mm(a: Tensor, b: Tensor, scaling: float) -> Tensor:
    """s (a @ b), s applied inside the GEMM's accumulation (addmm's alpha; beta = 0), float32 for 16-bit
    inputs: not through an operand rounded to a's dtype first. In float16 the unscaled product can overflow
    where the scaled one is finite (a large B or dY with a small s), and s B can fall below the normal range
    (a small s with a small B, as early in training) and lose its precision there; alpha does neither.
    Differentiable (double backward differentiates it)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scaling)


def backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: int,
    need_dx: bool, need_lora: bool, need_dw: bool, need_db: bool,
) -> tuple[Optional[Tensor], ...]:
    """Returns (dx, dA, dB, dW, db), None where not needed.

    G = s dY B;  dB = s dY^T H;  dA = G^T (D x);  dx = dY W + D (G A).
    """
    keep = keep_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    return backward_with_mask(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, keep,
                              need_dx, need_lora, need_dw, need_db)


def dropped(x: Tensor, keep: Optional[Tensor], dropout_p: float) -> Tensor:
    """D x: x itself without dropout, else x * keep / (1 - p) (a new tensor). The mask first: a dropped element
    is exactly 0 however far x / (1 - p) is beyond the dtype (scaled first, inf * 0 gave NaN)."""
    return x if keep is None else x.mul(keep).mul_(1.0 / (1.0 - dropout_p))


def backward_with_mask(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, keep: Optional[Tensor],
    need_dx: bool, need_lora: bool, need_dw: bool, need_db: bool,
) -> tuple[Optional[Tensor], ...]:
    """`backward` with the keep mask given (None: no dropout). G = s dY B and dB = s dY^T H, s applied
    inside the products (`scaled_mm`: see there why).

    Every step is an autograd-differentiable op (the in-place ones act on fresh results that no
    gradient formula needs), so with H computed under autograd this also gives the graph of the
    gradients that double backward needs, for either backend's mask.
    """
    g = scaled_mm(dy, lora_B, scaling)  # M x r
    dx = dA = dB = dW = db = None
    if need_lora:
        dB = scaled_mm(h.t(), dy, scaling).t().contiguous()  # r x N product: the faster orientation
    scale = 1.0 / (1.0 - dropout_p)
    if need_dx:  # the low-rank term first, then the GEMM accumulates onto it (beta = 1 or D's scale)
        dx = torch.mm(g, lora_A)
        if keep is None:
            dx.addmm_(dy, weight)
        else:
            dx.mul_(keep).addmm_(dy, weight, beta=scale)
    if need_lora:
        dA = torch.mm(g.t(), dropped(x, keep, dropout_p))
    if need_dw:
        dW = torch.mm(dy.t(), x)
    if need_db:
        db = dy.sum(0)
    return dx, dA, dB, dW, db
