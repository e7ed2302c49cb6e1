"""The pointer kernels' launchers (the "triton" row's dense ops), with the interface of
`fused_lora.torch_row.dense`:

    forward(x, W, b, A, B, s, p, seed) -> (Y, H)
    backward(dY, x, W, A, B, H, s, p, seed, need_dx, need_lora, need_dw, need_db) -> (dx, dA, dB, dW, db)
    dora_forward(x, W, b, A, B, s, c) -> (Y, H)          DoRA: Y = c * (x W^T + s H B^T) + b
    dora_backward(dY, x, W, A, B, H, s, c, Y, b, need_dx, need_lora, need_dm) -> (dx, dA, dB, dm_num)

and the steps other families reuse: `shrink`, `forward_gemm`, `dy_pass`, `dx_da_pointer`,
`sum_lora_grads`, and `launcher` (the autotuned launcher of a kernel of `KERNELS`). Inputs reach
these launchers checked and non-empty (`fused_lora.ops.lora` computes empty sizes itself).
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from .. import configs
from ..launch import arch_of, block_r, dy_chunk, m_bucket, row_blocks, row_blocks_used, rows_grid, tiles_grid
from ..dropout import keep_threshold
from ..reduce import sum_partials
from .backward import lora_dx_da_kernel, lora_dy_kernel
from .forward import lora_forward_kernel, lora_shrink_kernel

__all__ = ["KERNELS", "launcher", "forward", "shrink", "forward_gemm", "backward", "dy_pass", "dx_da_pointer",
           "sum_lora_grads", "dora_forward", "dora_backward"]

KERNELS = {  # name -> (jit function, autotuning key: every argument that changes the code or the work)
    "shrink": (lora_shrink_kernel, ["M_BUCKET", "K", "HAS_DROPOUT"]),
    "forward": (lora_forward_kernel, ["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_COLSCALE"]),
    "dy": (lora_dy_kernel, ["M_BUCKET", "N", "N_CHUNK", "HAS_DB", "HAS_COLSCALE"]),
    # DoRA's variants of the same kernels (HAS_COLSCALE), tuned and gated as kernels of their own
    "dora_forward": (lora_forward_kernel, ["M_BUCKET", "N", "K", "HAS_BIAS", "HAS_COLSCALE"]),
    "dora_dy": (lora_dy_kernel, ["M_BUCKET", "N", "N_CHUNK", "HAS_DB", "HAS_COLSCALE"]),
    "dx_da": (lora_dx_da_kernel, ["M_BUCKET", "N", "K", "HAS_DX", "HAS_DA", "HAS_DROPOUT"]),
}


@lru_cache(maxsize=None)
def _tuned(kernel_name: str, arch: int, blk_r: int, elt: int, dropout: bool):
    """The autotuned launcher for one kernel, architecture, padded rank, element size and dropout."""
    fn, key = KERNELS[kernel_name]
    return triton.autotune(configs.candidates(kernel_name, arch, blk_r, elt, dropout), key=key)(fn)


def launcher(kernel_name: str, x: torch.Tensor, r: int, dropout: bool = False):
    """The autotuned launcher of KERNELS[kernel_name] for x's device and element size, rank r, dropout."""
    return _tuned(kernel_name, arch_of(x.device), block_r(r), x.element_size(), dropout)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    h = shrink(x, lora_A, dropout_p, seed)
    return forward_gemm(x, weight, bias, h, lora_B, scaling), h


def shrink(x, lora_A, dropout_p, seed):
    """H = (D x) A^T (the shrink pass), in x's dtype."""
    M, K = x.shape
    r = lora_A.shape[0]
    h = torch.empty((M, r), dtype=x.dtype, device=x.device)
    p = float(dropout_p)
    launcher("shrink", x, r, p > 0.0)[rows_grid(M)](
        x, lora_A, h, *x.stride(), *lora_A.stride(), *h.stride(),
        M, K, r, seed, keep_threshold(p), 1.0 / (1.0 - p), m_bucket(M), HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
    return h


def forward_gemm(x, weight, bias, h, lora_B, scaling):
    """Y = x W^T + b + s H B^T with the pointer kernel."""
    M, K = x.shape
    N, r = weight.shape[0], h.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    launcher("forward", x, r)[tiles_grid(M, N)](
        x, weight, bias if bias is not None else y, h, lora_B, y, y,
        *x.stride(), *weight.stride(), *h.stride(), *lora_B.stride(), *y.stride(),
        M, N, K, r, float(scaling), m_bucket(M), HAS_BIAS=bias is not None, HAS_COLSCALE=False, BLOCK_R=block_r(r))
    return y


def backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_dw, need_db,
             dx_da_step=None):
    """`dx_da_step` (default `dx_da_pointer`) launches the dX / dA-partials step: other launchers
    (fused_lora.kernels.hopper.tma) replace that step alone."""
    dx = dA = dB = None
    if need_dx or need_lora:
        dx, dA, dB = _lora_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora,
                                    dx_da_step or dx_da_pointer)
    dW = torch.mm(dy.t(), x) if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, dA, dB, dW, db


def dy_pass(dy, lora_B, h, scaling, need_lora):
    """The first step of every backward: G = s dY B (in H's dtype) from fp32 partials (one per
    column chunk, summed in a fixed order), and with `need_lora` the fp32 partials of dB = s dY^T H
    (one per row block). Returns (G, dB partials or None, how many of their slots were written)."""
    M, N = dy.shape
    r = h.shape[1]
    f32 = dict(dtype=torch.float32, device=dy.device)
    dy_launch = launcher("dy", h, r)
    chunk = dy_chunk(M, N)
    g_ws = torch.empty((triton.cdiv(N, chunk), M, r), **f32)
    db_ws = torch.empty((row_blocks(dy_launch, M), N, r), **f32) if need_lora else g_ws
    dy_launch[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, chunk))](
        dy, lora_B, h, g_ws, db_ws, dy, dy, g_ws, g_ws, *dy.stride(), *lora_B.stride(), *h.stride(), 0, 0,
        M, N, r, chunk, float(scaling), m_bucket(M), HAS_DB=need_lora, HAS_COLSCALE=False, BLOCK_R=block_r(r))
    g = torch.empty((M, r), dtype=h.dtype, device=h.device)
    sum_partials((g_ws, g))
    return g, (db_ws if need_lora else None), row_blocks_used(dy_launch, M)


def _lora_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, dx_da_step):
    """dX, dA, dB in four launches: dY pass, G sum, dX/dA, dA+dB sums."""
    # 1. dY pass: G, and the partials of dB (one per row block).
    g, db_ws, db_slots = dy_pass(dy, lora_B, h, scaling, need_lora)
    # 2. dX and the dA partials (one per row block).
    dx, da_ws, da_slots = dx_da_step(dy, x, weight, g, lora_A, float(dropout_p), seed, need_dx, need_lora)
    if not need_lora:
        return dx, None, None
    # 3. dA and dB summed in a fixed order, written in the parameters' dtypes.
    return (dx,) + sum_lora_grads(da_ws[:da_slots], db_ws[:db_slots], lora_A, lora_B)


def sum_lora_grads(da_partials, db_partials, lora_A, lora_B):
    """(dA, dB): the fp32 partials summed in a fixed order (bit-identical run to run), written in
    the parameters' dtypes."""
    dA = torch.empty(lora_A.shape, dtype=lora_A.dtype, device=lora_A.device)
    dB = torch.empty(lora_B.shape, dtype=lora_B.dtype, device=lora_B.device)
    sum_partials((da_partials, dA), (db_partials, dB))
    return dA, dB


def dx_da_pointer(dy, x, weight, g, lora_A, p, seed, need_dx, need_lora):
    """dX = D (G A) + dY W and the dA partials with the pointer kernel: (dx or None, the fp32
    workspace of dA partials (None without need_lora), how many of its slots were written)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    dx_da = launcher("dx_da", x, r, p > 0.0)
    da_ws = torch.empty((row_blocks(dx_da, M), r, K), dtype=torch.float32, device=x.device) if need_lora else g
    dx_da[tiles_grid(M, K)](
        dy, weight, g, lora_A, x, dx if need_dx else g, da_ws,
        *dy.stride(), *weight.stride(), *g.stride(), *lora_A.stride(), *x.stride(),
        *(dx.stride() if need_dx else (0, 0)),
        M, N, K, r, seed, keep_threshold(p), 1.0 / (1.0 - p), m_bucket(M),
        HAS_DX=need_dx, HAS_DA=need_lora, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
    return dx, (da_ws if need_lora else None), row_blocks_used(dx_da, M)


# ------------------------------------------------------------------ DoRA

def dora_forward(x, weight, bias, lora_A, lora_B, scaling, colscale):
    """Y = c * (x W^T + s H B^T) + b, H = x A^T (no dropout: the layer applies DoRA's dropout outside);
    c fp32 (N,). A missing bias is passed as zeros, so DoRA compiles one flag combination."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    h = torch.empty((M, r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    bias = bias if bias is not None else torch.zeros(N, dtype=x.dtype, device=x.device)
    launcher("shrink", x, r, False)[rows_grid(M)](
        x, lora_A, h, *x.stride(), *lora_A.stride(), *h.stride(),
        M, K, r, 0, 0, 1.0, m_bucket(M), HAS_DROPOUT=False, BLOCK_R=block_r(r))
    launcher("dora_forward", x, r)[tiles_grid(M, N)](
        x, weight, bias, h, lora_B, y, colscale,
        *x.stride(), *weight.stride(), *h.stride(), *lora_B.stride(), *y.stride(),
        M, N, K, r, float(scaling), m_bucket(M), HAS_BIAS=True, HAS_COLSCALE=True, BLOCK_R=block_r(r))
    return y, h


def dora_backward(dy, x, weight, lora_A, lora_B, h, scaling, colscale, y, bias, need_dx, need_lora, need_dm):
    """With dY' = dY * c: dx = dY' W + G A, dA = G^T x, dB = s dY'^T H (G = s dY' B), and
    dm_num = sum_i dY (Y - b) per column, fp32. One dY pass (G, dB and dm partials; c * B, N x r, is
    formed here), one reduction of G and dm, the dX/dA kernel on c * W (an N x K temporary in W's
    dtype: smaller than an M x N dY' whenever M > K), one reduction of dA and dB."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    bias = bias if bias is not None else torch.zeros(N, dtype=x.dtype, device=x.device)
    bc = (lora_B.float() * colscale[:, None]).to(lora_B.dtype)
    dy_pass = launcher("dora_dy", x, r)
    chunk = dy_chunk(M, N)
    slots = row_blocks(dy_pass, M)
    g_ws = torch.empty((triton.cdiv(N, chunk), M, r), **f32)
    db_ws = torch.empty((slots, N, r), **f32)
    dm_ws = torch.empty((slots, N), **f32)
    dy_pass[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, chunk))](
        dy, bc, h, g_ws, db_ws, y, bias, colscale, dm_ws, *dy.stride(), *bc.stride(), *h.stride(), *y.stride(),
        M, N, r, chunk, float(scaling), m_bucket(M), HAS_DB=True, HAS_COLSCALE=True, BLOCK_R=block_r(r))
    used = row_blocks_used(dy_pass, M)
    g = torch.empty((M, r), dtype=x.dtype, device=x.device)
    dm_num = torch.empty(N, **f32)
    sum_partials((g_ws, g), (dm_ws[:used], dm_num))
    if not (need_dx or need_lora):
        return None, None, None, dm_num if need_dm else None
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    w = weight * colscale.to(weight.dtype)[:, None] if need_dx else weight
    dx_da = launcher("dx_da", x, r, False)
    da_ws = torch.empty((row_blocks(dx_da, M), r, K), **f32) if need_lora else g_ws
    dx_da[tiles_grid(M, K)](
        dy, w, g, lora_A, x, dx if need_dx else g, da_ws,
        *dy.stride(), *w.stride(), *g.stride(), *lora_A.stride(), *x.stride(),
        *(dx.stride() if need_dx else (0, 0)),
        M, N, K, r, 0, 0, 1.0, m_bucket(M),
        HAS_DX=need_dx, HAS_DA=need_lora, HAS_DROPOUT=False, BLOCK_R=block_r(r))
    dA = dB = None
    if need_lora:
        dA = torch.empty((r, K), dtype=lora_A.dtype, device=x.device)
        dB = torch.empty((N, r), dtype=lora_B.dtype, device=x.device)
        sum_partials((da_ws[:row_blocks_used(dx_da, M)], dA), (db_ws[:used], dB))
    return dx, dA, dB, dm_num if need_dm else None
