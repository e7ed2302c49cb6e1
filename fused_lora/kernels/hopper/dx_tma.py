"""Hopper dX GEMM: dX = D (G A) + dY W with TMA descriptors and a persistent grid, and in the same
program the row block's partial of dA = G^T (D x), exactly as `lora.backward.lora_dx_da_kernel` writes it.

Why dA stays in this kernel: its partial needs G and the x tile of the same (rows, columns) as the
dX tile and the same dropout mask, which this program already has; a separate dA pass would read
G and x again and draw the mask again. Only dX's main loop (dY and W, the N-long reduction) and
dX's store go through TMA; G, A and x are loaded once per tile with pointer loads (G and A are
small; x is read once per tile, for dA only). Everything that uses the dropout mask comes before
the main loop, so neither the mask nor the x tile is live across it. The layer's K is this
GEMM's output column dimension (BLOCK_N) and the layer's N its reduction (BLOCK_K), as in
lora/backward.py. When dX is not needed the launcher runs the pointer kernel's HAS_DX=False variant.

Persistent grid and grouped tile order as in `forward_tma` (Triton's tutorial 09).
"""
import triton
import triton.language as tl

from ..dropout import keep_tile
from ..tiles import grouped_tile, load_tile, store_tile
from .forward_tma import epilogue_parts


def descriptor_blocks(cfg) -> dict:
    """The block shape of each descriptor argument under a config."""
    k = cfg.kwargs
    return {"dy_desc": [k["BLOCK_M"], k["BLOCK_K"]], "w_desc": [k["BLOCK_K"], k["BLOCK_N"]],
            "dx_desc": [k["BLOCK_M"], k["BLOCK_N"] // epilogue_parts(cfg)]}


@triton.jit(do_not_specialize=["seed"])
def lora_dx_tma_kernel(
    dy_desc, w_desc, dx_desc, g_ptr, a_ptr, x_ptr, da_ws_ptr,
    stride_gm, stride_gr, stride_ar, stride_ak, stride_xm, stride_xk,
    M, N, K, R, NUM_PROGRAMS, seed, threshold, scale,
    HAS_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program p computes dX tiles p, p + NUM_PROGRAMS, ... and (HAS_DA) their dA partials:
    da_ws_ptr fp32 (cdiv(M, BLOCK_M), R, K), slot m gets G[rows]^T (D x)[rows, tile columns]."""
    dtype = dx_desc.dtype
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(K, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_k = grouped_tile(tile_id, M, K, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_k * BLOCK_N
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_k = col0 + tl.arange(0, BLOCK_N)
        m_in = offs_m < M
        k_in = offs_k < K
        g = load_tile(g_ptr, offs_m, offs_r, stride_gm, stride_gr, m_in, r_in)
        if HAS_DROPOUT:
            keep = keep_tile(seed, offs_m, col0, K, threshold, BLOCK_N)
        if HAS_DA:
            x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_in, k_in)
            if HAS_DROPOUT:
                x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(dtype)
            da_slot = da_ws_ptr + pid_m.to(tl.int64) * R * K
            store_tile(da_slot, tl.dot(tl.trans(g), x), offs_r, offs_k, K, 1, r_in, k_in)
        # The accumulator starts from the (masked) low-rank term; the N loop adds dY W onto it.
        acc = tl.dot(g, load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, r_in, k_in))
        if HAS_DROPOUT:
            acc = tl.where(keep, acc * scale, 0.0)
        for n0 in range(0, N, BLOCK_K):
            dy = dy_desc.load([row0, n0])
            w = w_desc.load([n0, col0])
            acc = tl.dot(dy, w, acc)
        if BLOCK_N >= 256:  # in two halves, as forward_tma
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            dx_desc.store([row0, col0], left.to(dtype))
            dx_desc.store([row0, col0 + BLOCK_N // 2], right.to(dtype))
        else:
            dx_desc.store([row0, col0], acc.to(dtype))
