"""Backward kernels.

    lora_dy_kernel:     one pass over dY: G = s dY B (M x r) and dB = s dY^T H (N x r)
    lora_dx_da_kernel:  dX = dY W + D (G A) with the low-rank term in the epilogue, and in the same
                        program dA += G^T (D x) for its tile; D regenerated in-kernel from the seed.

dB and dA are reductions over M: programs add their partial sums into fp32 buffers with atomics
(so the last bits of dA and dB may vary from run to run; dX and G are deterministic).
In lora_dx_da_kernel the GEMM's output columns run over the layer's K (BLOCK_N) and its
reduction over the layer's N (BLOCK_K): the config names are the generic GEMM's.
"""
import triton
import triton.language as tl

from .dropout import keep_tile
from .forward import grouped_tile
from .tiles import load_tile, store_tile, tile_ptrs


@triton.jit
def lora_dy_kernel(
    dy_ptr, b_ptr, h_ptr, g_ptr, db_ptr,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr, stride_gm, stride_gr,
    M, N, R, scaling, M_BUCKET,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per BLOCK_M rows of dY, looping over N. db_ptr: fp32 N x R, zeroed, row stride R."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    r_in = offs_r < R
    h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, m_in, r_in)
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, m_in, n_in)
        b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, n_in, r_in)
        acc_g = tl.dot(dy, b, acc_g)
        db_part = tl.dot(tl.trans(dy), h) * scaling
        tl.atomic_add(tile_ptrs(db_ptr, offs_n, offs_r, R, 1), db_part, mask=n_in[:, None] & r_in[None, :])
    store_tile(g_ptr, acc_g * scaling, offs_m, offs_r, stride_gm, stride_gr, m_in, r_in)


@triton.jit(do_not_specialize=["seed"])
def lora_dx_da_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, dx_ptr, da_ptr,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk,
    M, N, K, R, seed, threshold, scale, M_BUCKET,
    HAS_DX: tl.constexpr, HAS_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (m, k) of dX = dY W + D (G A), and its share of dA = G^T (D x) (fp32 r x K, zeroed)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    k_in = offs_k < K
    r_in = offs_r < R
    g = load_tile(g_ptr, offs_m, offs_r, stride_gm, stride_gr, m_in, r_in)
    if HAS_DROPOUT:
        keep = keep_tile(seed, offs_m, pid_k * BLOCK_N, K, threshold, BLOCK_N)
    if HAS_DX:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            offs_n = n0 + tl.arange(0, BLOCK_K)
            n_in = offs_n < N
            dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, m_in, n_in)
            w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, n_in, k_in)
            acc = tl.dot(dy, w, acc)
        lora = tl.dot(g, load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, r_in, k_in))
        if HAS_DROPOUT:
            lora = tl.where(keep, lora * scale, 0.0)
        store_tile(dx_ptr, acc + lora, offs_m, offs_k, stride_dxm, stride_dxk, m_in, k_in)
    if HAS_DA:
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_in, k_in)
        if HAS_DROPOUT:
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        tl.atomic_add(tile_ptrs(da_ptr, offs_r, offs_k, K, 1), tl.dot(tl.trans(g), x),
                      mask=r_in[:, None] & k_in[None, :])
