"""Launchers for LoRA on expert weights (the grouped op), with the interface of `fused_lora.torch_row.grouped`:

    grouped_forward(x, segs, W, b, A, B, s, p, seed, transposed) -> (Y (M x N), H (M x r))
    grouped_backward(dY, x, segs, W, A, B, H, s, p, seed, transposed, need_dx, need_lora, need_dw, need_db)
        -> (dx (M x K), dA (E x r x K), dB (E x N x r), dW (W's shape), db (E x N)), None where not needed

x's rows are sorted by expert, `segs` their layout (`core.segments.grouped`): an expert stack is the segment
kernels' layout (`kernels/segments/`) with no base rows and one segment per expert, each with its own base
weight and bias besides its own A and B. So these launchers are the segment kernels' (`segment_forward`,
`segment_lora_backward`) on:

- the tile table from the experts' row counts (`segs.device_counts`: the group sizes on the device, no host
  read; `tile_table_of_counts`): each expert's rows cut into row tiles that never cross into the next
  expert's, the grids the table's upper bound cdiv(M, BLOCK_M) + E + 1 (programs past the real tiles return
  at once), so each program has one expert;
- the expert stack as the base weight (`BaseWeight.experts`: W_e at e * W.stride(0), (E, N, K) or (E, K, N)
  through its strides, never copied) and the bias one row per expert;
- A (E, r, K) and B (E, N, r) as the stacks (no copy, no padding: one rank), and per-expert tables holding
  the one scaling, dropout threshold and seed.

Forward: the shrink pass H = (D x) A_e^T per tile, then the base GEMM over every tile with its accumulator
started from s H B_e^T (the low-rank term in the GEMM, as in the single-adapter kernel), the bias added in the
epilogue, Y written once. Backward: one pass over dY (G = s dY B_e and the dB_e partials, one per tile), dX =
dY W_e + D (G A_e) with the dA_e partials in the same programs, and each expert's partials summed in slot order
(deterministic; zero for an expert no row reaches). Rank 0 (A, B of r = 0: the base alone) skips the shrink
and dY passes; every low-rank load is masked off. dW_e and db_e, when asked, are `wgrad.py`'s kernels.

Dropout: one M x K mask over the whole batch, this row's `keep_mask(seed, (M, K), p)`: element (m, k) drawn
in-kernel from (seed, m, k), m the row's index in x (the tile table's `global_rows`), in the shrink pass and
again in backward (never stored). Row m's mask does not depend on the group sizes, as the op documents.
"""
from __future__ import annotations

import torch
import triton

from .. import configs
from ..dropout import keep_threshold
from ..launch import arch_of
from ..segments.launchers import BaseWeight, SegmentBatch, launch_options, segment_forward, segment_lora_backward
from ..segments.multi_backward import multi_dx_da_kernel
from ..segments.multi_forward import multi_forward_kernel
from .wgrad import grouped_colsum_kernel, grouped_wgrad_kernel

__all__ = ["KERNELS", "grouped_forward", "grouped_backward", "expert_batch", "expert_weight_grad",
           "expert_bias_grad"]

# The variants the grouped op adds to the compile gate (configs.GROUPED_KERNELS): the segment kernels that read
# W with the transposed stack's strides, and the expert stack's gradients.
KERNELS = {"grouped_forward_t": multi_forward_kernel, "grouped_dx_da_t": multi_dx_da_kernel,
           "grouped_wgrad": grouped_wgrad_kernel, "grouped_colsum": grouped_colsum_kernel}


def expert_batch(x, segs, lora_A, lora_B, scaling, dropout_p, seed) -> SegmentBatch:
    """The segment layout of an expert stack: one segment per expert, A and B as its stacks (placeholders
    read through zero strides at rank 0, every load masked), the tables with one rank, scaling and seed."""
    E, r = lora_A.shape[:2]
    p = float(dropout_p) if r else 0.0
    if r:
        a_stack, b_stack = lora_A, lora_B
    else:
        a_stack = b_stack = x.new_zeros(()).expand(E, 1, 1)
    ints = [(r, keep_threshold(p), int(seed))] * E
    floats = [(float(scaling), 1.0 / (1.0 - p))] * E
    return SegmentBatch(x, segs, a_stack, b_stack, r, ints, floats, p > 0.0, counts=segs.device_counts)


def grouped_forward(x, segs, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, transposed):
    batch = expert_batch(x, segs, lora_A, lora_B, scaling, dropout_p, seed)
    if bias is not None:
        bias = bias.contiguous()  # (E, N): one row per expert, unit column stride
    return segment_forward(batch, BaseWeight.experts(weight, transposed), bias,
                           bias.stride(0) if bias is not None else 0)


def grouped_backward(dy, x, segs, weight, lora_A, lora_B, h, scaling, dropout_p, seed, transposed,
                     need_dx, need_lora, need_dw, need_db):
    r = lora_A.shape[1]
    dx = dA = dB = None
    if need_dx or (need_lora and r):
        batch = expert_batch(x, segs, lora_A, lora_B, scaling, dropout_p, seed)
        dx, stacks = segment_lora_backward(batch, dy, BaseWeight.experts(weight, transposed), h, need_dx,
                                           need_lora)
        if stacks is not None:
            dA, dB = stacks  # (E, r, K) and (E, N, r): the stacks are the factors' own shapes
    if need_lora and dA is None:  # rank 0: nothing to differentiate
        dA, dB = torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    offsets = None
    if need_dw or need_db:
        offsets = segs.device_offsets[1:].to(torch.int32)  # expert e: rows offsets[e] .. offsets[e + 1]
    dW = expert_weight_grad(dy, x, offsets, weight, transposed) if need_dw else None
    db = expert_bias_grad(dy, offsets, weight.shape[0]) if need_db else None
    return dx, dA, dB, dW, db


def expert_weight_grad(dy, x, offsets, weight, transposed):
    """dW (the weight's shape, contiguous): dY_e^T x_e per expert, or x_e^T dY_e for the transposed stack."""
    E = weight.shape[0]
    dW = torch.empty(weight.shape, dtype=x.dtype, device=x.device)
    u, v = (x, dy) if transposed else (dy, x)  # dW_e = U_e^T V_e
    I, J = u.shape[1], v.shape[1]
    cfg = configs.grouped_config("grouped_wgrad", arch_of(x.device))
    tiles = triton.cdiv(I, cfg.kwargs["BLOCK_M"]) * triton.cdiv(J, cfg.kwargs["BLOCK_N"])
    grouped_wgrad_kernel[(E * tiles,)](
        u, v, dW, offsets, *u.stride(), *v.stride(), *dW.stride(), I, J, tiles, **launch_options(cfg))
    return dW


def expert_bias_grad(dy, offsets, E: int):
    """db (E, N): the sum of each expert's rows of dY."""
    N = dy.shape[1]
    db = torch.empty((E, N), dtype=dy.dtype, device=dy.device)
    cfg = configs.grouped_config("grouped_colsum", arch_of(dy.device))
    grouped_colsum_kernel[(E, triton.cdiv(N, cfg.kwargs["BLOCK_N"]))](
        dy, db, offsets, *dy.stride(), db.stride(0), N, **launch_options(cfg))
    return db
