"""The Triton implementation: the "triton" row of `fused_lora.dispatch.table`, with the interface of every
row (`fused_lora.torch_row`'s: a launcher per op, named `op.function`, and `keep_mask`):

    forward(x, W, b, A, B, s, p, seed) -> (Y, H)
    backward(dY, x, W, A, B, H, s, p, seed, need_dx, need_lora, need_dw, need_db) -> (dx, dA, dB, dW, db)
    multi_forward / multi_backward                several adapters in one batch (segment kernels)
    forward_quant / backward_quant                a quantized frozen base (NF4, int8)
    quant_multi_forward / quant_multi_backward    several adapters over a quantized base
    dora_forward(x, W, b, A, B, s, c) -> (Y, H)          DoRA: Y = c * (x W^T + s H B^T) + b
    dora_backward(dY, x, W, A, B, H, s, c, Y, b, need_dx, need_lora, need_dm) -> (dx, dA, dB, dm_num)
    grouped_forward / grouped_backward            expert weights (a 3-D stack, rows sorted by expert)
    keep_mask(seed, (M, K), p, device) -> the boolean dropout mask the kernels use

The layout: shared modules here (configs, dropout, reduce, tiles, launch: the launch helpers every
family uses), then one folder per kernel family, each with its @triton.jit kernels and launchers:

    lora/       the pointer kernels: shrink, forward GEMM, dY pass, dX / dA (and DoRA's variants)
    segments/   several adapters in one batch (grouped row tiles, one adapter per program)
    grouped/    expert weights: the segment kernels over an expert stack (one expert per row tile,
                its own W, b, A, B) and the stack's own gradients
    quantized/  the GEMMs over a quantized base (the W tiles dequantized in registers; a tile loader
                and one `quantized.launchers.FORMATS` entry per format)
    hopper/     the Hopper path: the "triton-tma" row (`hopper.tma`) and the "triton-onepass" row
                (`hopper.one_pass`), each offering its own forward, backward and keep_mask
    compile_check.py  the static gate: every variant compiled for sm_90 / sm_80 and read by ptxas

Importing this package imports triton; `fused_lora.dispatch` imports it only when the Triton row is
chosen. Inputs reach these launchers checked and non-empty, so nothing here imports the package but
`fused_lora.core`.
"""
from __future__ import annotations

from . import configs  # noqa: F401  (kernels.configs: the config lists tests patch)
from .dropout import keep_mask
from .launch import arch_of, block_r, dy_chunk, m_bucket
from .lora.launchers import (backward, dora_backward, dora_forward, dx_da_pointer, dy_pass, forward, forward_gemm, shrink,
                             sum_lora_grads)
from .quantized.launchers import backward_quant, check_quant_weight, forward_quant
from .quantized.multi import quant_multi_backward, quant_multi_forward
from .grouped.launchers import grouped_backward, grouped_forward
from .segments.launchers import multi_backward, multi_forward

__all__ = ["forward", "backward", "keep_mask", "block_r", "arch_of", "dora_forward", "dora_backward",
           "multi_forward", "multi_backward", "forward_quant", "backward_quant", "check_quant_weight",
           "quant_multi_forward", "quant_multi_backward", "m_bucket", "dy_chunk", "shrink", "forward_gemm", "dy_pass",
           "dx_da_pointer", "sum_lora_grads", "grouped_forward", "grouped_backward"]
