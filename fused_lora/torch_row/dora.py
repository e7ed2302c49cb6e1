"""The PyTorch path of the DoRA op (no dropout: the layer handles DoRA's dropout, see `fused_lora.ops.dora`).

    dora_forward(x, W, b, A, B, s, c) -> (Y, H)
        H = x A^T,  Y = c * (x W^T + s H B^T) + b          (c: fp32 column scale m / n, one per output)
    dora_backward(dY, x, W, A, B, H, s, c, Y, b, need_dx, need_lora, need_dm) -> (dx, dA, dB, dm_num)
        with dY' = dY * c (columnwise) the LoRA backward: G = s dY' B, dB = s dY'^T H, dA = G^T x,
        dx = dY' W + G A; and dm_num_j = sum_i dY_ij (Y_ij - b_j) in fp32 (the caller divides by m_j).

The column scale is folded into the small operands where that is cheaper than an M x N pass:
s H (c B)^T costs N x r, and x (c W)^T costs one N x K pass, used when N x K < M x N (more tokens
than input features: the usual training shape); otherwise the output is scaled in place, as
Y = c (x W^T + b) + s H (c B)^T + (1 - c) b, the first term the base layer's own addmm. Either way a
column scale of exactly 1 (a fresh adapter: B = 0, m = n) gives the base layer's F.linear bit for bit. The
backward likewise scales W (N x K) or dY (M x N), whichever is smaller. Either temporary is freed
before the op returns; nothing M x N or N x K is kept.

Roundings in float16: s multiplies B and H before their products with dY (the unscaled dY B or H^T dY can
overflow where the scaled product does not; `torch_row.dense` puts s through the GEMM's alpha instead, which
c, a per-column scale, cannot use), and c multiplies W and B
(W folded) or dY (otherwise) before the products, so G and dx are finite wherever the reference's are.
With W folded, dB's rows get c after the product (in fp32, one rounding): for a column with c_j < 1
that leaves 1/c_j less headroom below the dtype's largest value than the reference's dY' = dY * c.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .dense import backward_with_mask


def _scaled_rows(t: Tensor, c: Tensor) -> Tensor:
    """diag(c) t in t's dtype (t is N x something): the product taken in c's precision."""
    return (t.to(c.dtype) * c[:, None]).to(t.dtype) if t.dtype != c.dtype else t * c[:, None]


def fold_weight(M: int, N: int, K: int) -> bool:
    """Whether scaling W (N x K) is cheaper than scaling an M x N tensor."""
    return N * K <= M * N


def dora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 scaling: float, colscale: Tensor) -> tuple[Tensor, Tensor]:
    M, K = x.shape
    N = weight.shape[0]
    h = torch.mm(x, lora_A.t())
    if fold_weight(M, N, K):
        bc = _scaled_rows(lora_B, colscale * scaling)
        y = torch.addmm(bias, h, bc.t()) if bias is not None else torch.mm(h, bc.t())
        y.addmm_(x, (weight * colscale.to(weight.dtype)[:, None]).t())
    else:  # c (x W^T + b) + c s H B^T + (1 - c) b: the base layer's own product first, so c = 1 gives it exactly
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.mul_(colscale.to(y.dtype))
        y.addmm_(h, _scaled_rows(lora_B, colscale * scaling).t())
        if bias is not None:
            y.add_(_scaled_rows(bias[:, None], 1.0 - colscale)[:, 0])
    return y, h


def dm_numerator(dy: Tensor, y: Tensor, bias: Optional[Tensor]) -> Tensor:
    """sum_i dY_ij (Y_ij - b_j) per column j, accumulated in fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    y0 = y.to(acc) if bias is None else y.to(acc) - bias.to(acc)
    return y0.mul_(dy).sum(0) if y0 is not y else (y0 * dy).sum(0)


def dora_backward(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                  scaling: float, colscale: Tensor, y: Tensor, bias: Optional[Tensor],
                  need_dx: bool, need_lora: bool, need_dm: bool):
    M, K = x.shape
    N = weight.shape[0]
    dm_num = dm_numerator(dy, y, bias) if need_dm else None
    dx = dA = dB = None
    if need_dx or need_lora:
        if fold_weight(M, N, K):  # dY' W = dY (c W), G = s dY (c B): no M x N temporary
            w = weight * colscale.to(weight.dtype)[:, None] if need_dx else weight
            dx, dA, dB, _, _ = backward_with_mask(dy, x, w, lora_A, _scaled_rows(lora_B, colscale), h, scaling,
                                                  0.0, None, need_dx, need_lora, False, False)
            if dB is not None:  # s dY^T H, rows scaled: s dY'^T H
                dB = _scaled_rows(dB, colscale)
        else:
            dx, dA, dB, _, _ = backward_with_mask(dy * colscale.to(dy.dtype), x, weight, lora_A, lora_B, h, scaling,
                                                  0.0, None, need_dx, need_lora, False, False)
    return dx, dA, dB, dm_num
