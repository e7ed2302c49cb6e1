"""The PyTorch path: forward and backward of the LoRA layer with plain torch ops.

Used on CPU, as the fallback where Triton cannot run, and as a second implementation of the
same math as the kernels. Written for speed on CPU: besides the output, no M x N temporary
(the low-rank term is accumulated into Y with `addmm_`), and with dropout the mask is
regenerated from the seed in backward instead of being stored.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dropout import torch_dropout_scale


def forward(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """Returns (Y, H): Y = x W^T + b + s * H B^T, H = (D * x) A^T; x is M x K."""
    y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    if dropout_p > 0.0:
        xd = torch_dropout_scale(seed, x.shape, dropout_p, x.dtype, x.device).mul_(x)
    else:
        xd = x
    h = torch.mm(xd, lora_A.t())
    y.addmm_(h, lora_B.t(), alpha=scaling)
    return y, h


def backward(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: int,
    need_dx: bool, need_lora: bool, need_dw: bool, need_db: bool,
) -> tuple[Optional[Tensor], ...]:
    """Returns (dx, dA, dB, dW, db), None where not needed.

    G = s dY B;  dB = s dY^T H;  dA = G^T (D x);  dx = dY W + D (G A).
    """
    g = torch.mm(dy, lora_B).mul_(scaling)  # M x r
    dx = dA = dB = dW = db = None
    if need_lora:
        dB = torch.mm(dy.t(), h).mul_(scaling)
    d = torch_dropout_scale(seed, x.shape, dropout_p, x.dtype, x.device) if dropout_p > 0.0 else None
    if need_dx:
        dx = torch.mm(dy, weight)
        if d is None:
            dx.addmm_(g, lora_A)
        else:
            dx.add_(torch.mm(g, lora_A).mul_(d))
    if need_lora:
        xd = x if d is None else d.mul_(x)  # the mask buffer is not needed after this
        dA = torch.mm(g.t(), xd)
    if need_dw:
        dW = torch.mm(dy.t(), x)
    if need_db:
        db = dy.sum(0)
    return dx, dA, dB, dW, db


def keep_mask(seed: int, shape, p: float, device) -> Tensor:
    """The boolean keep mask this backend uses for `seed` (for tests and debugging)."""
    return torch_dropout_scale(seed, shape, p, torch.float32, device) != 0
