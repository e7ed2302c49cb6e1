"""The PyTorch path of the LoRA layer over a quantized base: W is dequantized in bounded row chunks.

    forward_quant(x, data, b, A, B, s, p, seed) -> (Y, H)
    backward_quant(dY, x, data, A, B, H, s, p, seed, need_dx, need_lora, need_db) -> (dx, dA, dB, db)
    quant_multi_forward / quant_multi_backward: several adapters in one batch (the base once, then each
    adapter's low-rank term on its rows: `torch_row.multi`'s add_lora / lora_backward)

`data` is the `core.formats` layout (NF4Data or Int8Data), as the Triton launchers take it. The
math is `torch_row.dense`'s with W replaced by its dequantization; the rank-r parts are its own
code, only the products with W are here:
    Y[:, n0:n1] += x W[n0:n1]^T            dx += dY[:, n0:n1] W[n0:n1]
one chunk of at most `core.formats.common.CHUNK_ELEMENTS` weight elements at a time (dequantized in fp32 as
bitsandbytes does, then cast to x's dtype), so no full 16-bit copy of W ever exists. The dropout mask is
the torch row's (`dropout.keep_mask`), as for an unquantized base. W is frozen: there is no dW.

`chunk_hook`, when set, is called with (start, stop, chunk tensor) for every chunk dequantized: tests
use it to see that no chunk is the whole weight.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional

import torch
from torch import Tensor

from ..core import formats
from ..core.dropout import keep_mask
from .dense import backward_with_mask, dropped, low_rank_start, scaled_mm
from .multi import add_lora, lora_backward

chunk_hook: Optional[Callable[[int, int, Tensor], None]] = None


def weight_chunks(data, dtype: torch.dtype) -> Iterator[tuple[int, int, Tensor]]:
    """(start, stop, W[start:stop] in `dtype`) over the rows of the quantized weight."""
    for start, stop in formats.row_chunks(*data.shape):
        w = formats.dequantize_rows(data, start, stop).to(dtype)
        if chunk_hook is not None:
            chunk_hook(start, stop, w)
        yield start, stop, w


def _accumulate_base(y: Tensor, x: Tensor, data) -> Tensor:
    """y += x W^T, chunk by chunk of W's rows (y's column blocks)."""
    for start, stop, w in weight_chunks(data, x.dtype):
        y[:, start:stop].addmm_(x, w.t())
    return y


def base_linear(x: Tensor, data, bias: Optional[Tensor]) -> Tensor:
    """x W^T + b (x: M x K), W dequantized chunk by chunk: the base layer alone (QuantizedLinear)."""
    N = data.shape[0]
    y = bias.expand(x.shape[0], N).clone() if bias is not None else x.new_zeros(x.shape[0], N)
    return _accumulate_base(y, x, data)


def accumulate_grad_input(dx: Tensor, dy: Tensor, data) -> Tensor:
    """dx += dY W (dy: M x N), chunk by chunk of W's rows."""
    for start, stop, w in weight_chunks(data, dy.dtype):
        dx.addmm_(dy[:, start:stop], w)
    return dx


def forward_quant(
    x: Tensor, data, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: int,
) -> tuple[Tensor, Tensor]:
    """(Y, H): Y = x W^T + b + s H B^T, H = (D x) A^T; the rank-r term written first, the base
    product accumulated onto it chunk by chunk."""
    y, h = low_rank_start(x, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return _accumulate_base(y, x, data), h


def backward_quant(
    dy: Tensor, x: Tensor, data, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: int, need_dx: bool, need_lora: bool, need_db: bool,
) -> tuple[Optional[Tensor], ...]:
    """(dx, dA, dB, db), None where not asked for. dA, dB, db are torch_row.dense's; dx = D (G A) + dY W with
    dY W accumulated chunk by chunk."""
    keep = keep_mask(seed, x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    _, dA, dB, _, db = backward_with_mask(dy, x, dy.new_empty(0, x.shape[1]), lora_A, lora_B, h, scaling,
                                          dropout_p, keep, False, need_lora, False, need_db)
    dx = None
    if need_dx:
        dx = torch.mm(scaled_mm(dy, lora_B, scaling), lora_A)  # G A, s inside the product (dense.scaled_mm)
        if keep is not None:
            dx = dropped(dx, keep, dropout_p)
        accumulate_grad_input(dx, dy, data)
    return dx, dA, dB, db


# ------------------------------------------------------------------ several adapters in one batch

def quant_multi_forward(x, data, bias, adapters, segs, seed: int):
    """The torch row's forward: the base once for the whole batch, then each adapter's term on its rows."""
    y = base_linear(x, data, bias)
    return y, add_lora(y, x, adapters, segs, seed)


def quant_multi_backward(dy, x, data, adapters, h, segs, seed: int, need_dx, need_lora, need_db):
    """The torch row's backward: dx = dY W (chunk by chunk) plus each adapter's D_a (G_a A_a) on its rows."""
    dx = accumulate_grad_input(dy.new_zeros(x.shape), dy, data) if need_dx else None
    pairs = lora_backward(dx, dy, x, adapters, h, segs, seed, need_lora)
    return dx, pairs, (dy.sum(0) if need_db else None)
