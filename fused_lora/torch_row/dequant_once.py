"""The dequantize-once computation over a quantized base: W dequantized whole into a transient buffer in the
compute dtype, then the 16-bit LoRA path's own code on it (`torch_row.dense` for one adapter,
`torch_row.multi` for several in one batch: the vendor GEMMs, torch.mm / addmm, with the low-rank term
as those compute it).

    DequantOnce(dequantize)   a row's module for the quantized ops, around `dequantize(data, dtype) -> W`
                              (N x K in dtype, bit for bit `core.formats.dequantize_rows(data, 0, N)
                              .to(dtype)`): the dispatch layer gives it the one-launch Triton kernel on
                              CUDA and `core.formats.dequantize` elsewhere (`fused_lora.dispatch.dequant_once`)

Its functions are the quantized ops' (`fused_lora.ops.quant`: forward_quant, backward_quant,
quant_multi_forward, quant_multi_backward) and keep_mask, the torch row's (`core.dropout.keep_mask`: the
dense path draws it), so this row and the torch row draw the same dropout mask for a seed.

Memory: W lives for one call (the forward's products, or the backward's dX = dY W) and is dropped when the
call returns; backward dequantizes again instead of keeping the forward's copy, and skips the
dequantization when dX is not asked for. So at most one layer's W exists at a time: the peak grows by the
largest adapted layer's N x K in the compute dtype, against the torch row's chunks of
`core.formats.common.CHUNK_ELEMENTS` elements (`torch_row.quant`) and none for the triton row's in-loop
kernels.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from ..core.dropout import keep_mask
from . import dense, multi

Dequantizer = Callable[[object, torch.dtype], Tensor]


class DequantOnce:
    """The quantized ops with W dequantized whole by `dequantize(data, dtype)` (module doc)."""

    keep_mask = staticmethod(keep_mask)

    def __init__(self, dequantize: Dequantizer):
        self.dequantize = dequantize

    def _weight(self, data, x: Tensor, needed: bool = True) -> Tensor:
        """W in x's dtype, or where it is not needed a stand-in of no memory (N x K, stride 0)."""
        if needed:
            return self.dequantize(data, x.dtype)
        return x.new_empty(1).expand(*data.shape)

    def forward_quant(self, x: Tensor, data, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                      scaling: float, dropout_p: float, seed: int) -> tuple[Tensor, Tensor]:
        """(Y, H) as `torch_row.dense.forward` computes them with W = dequantize(data)."""
        return dense.forward(x, self._weight(data, x), bias, lora_A, lora_B, scaling, dropout_p, seed)

    def backward_quant(self, dy: Tensor, x: Tensor, data, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                       scaling: float, dropout_p: float, seed: int, need_dx: bool, need_lora: bool,
                       need_db: bool) -> tuple[Optional[Tensor], ...]:
        """(dx, dA, dB, db) as `torch_row.dense.backward` computes them (no dW: W is frozen); W is
        dequantized again, only when dx is asked for."""
        weight = self._weight(data, x, need_dx)
        dx, dA, dB, _, db = dense.backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                                           need_dx, need_lora, False, need_db)
        return dx, dA, dB, db

    def quant_multi_forward(self, x: Tensor, data, bias: Optional[Tensor], adapters, segs, seed: int):
        """(Y, packed H) as `torch_row.multi.forward` computes them with W = dequantize(data)."""
        return multi.forward(x, self._weight(data, x), bias, adapters, segs, seed)

    def quant_multi_backward(self, dy: Tensor, x: Tensor, data, adapters, h: Tensor, segs, seed: int,
                             need_dx: bool, need_lora, need_db: bool):
        """(dx, [(dA_a, dB_a) or None], db) as `torch_row.multi.backward` computes them (no dW)."""
        weight = self._weight(data, x, need_dx)
        dx, pairs, _, db = multi.backward(dy, x, weight, adapters, h, segs, seed, need_dx, need_lora, False,
                                          need_db)
        return dx, pairs, db
