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


@triton.jit
def lora_dy_kernel(
    dy_ptr, b_ptr, h_ptr, g_ptr, db_ptr,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr, stride_gm, stride_gr,
    M, N, R, scaling, M_BUCKET,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per BLOCK_M rows of dY, looping over N. db_ptr: fp32 N x R, zeroed, row stride R."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n0 = tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    r_in = offs_r < R
    h = tl.load(h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_r[None, :] * stride_hr,
                mask=m_in[:, None] & r_in[None, :], other=0.0)
    dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + offs_n0
        n_in = offs_n < N
        dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_in[:, None] & n_in[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_r[None, :] * stride_br,
                    mask=n_in[:, None] & r_in[None, :], other=0.0)
        acc_g = tl.dot(dy, b, acc_g)
        db_part = tl.dot(tl.trans(dy), h) * scaling
        tl.atomic_add(db_ptr + offs_n.to(tl.int64)[:, None] * R + offs_r[None, :], db_part,
                      mask=n_in[:, None] & r_in[None, :])
    g_ptrs = g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_r[None, :] * stride_gr
    tl.store(g_ptrs, (acc_g * scaling).to(g_ptr.dtype.element_ty), mask=m_in[:, None] & r_in[None, :])


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
    g = tl.load(g_ptr + offs_m.to(tl.int64)[:, None] * stride_gm + offs_r[None, :] * stride_gr,
                mask=m_in[:, None] & r_in[None, :], other=0.0)
    if HAS_DROPOUT:
        keep = keep_tile(seed, offs_m, pid_k * BLOCK_N, K, threshold, BLOCK_N)
    if HAS_DX:
        offs_n0 = tl.arange(0, BLOCK_K)
        dy_rows = dy_ptr + offs_m.to(tl.int64)[:, None] * stride_dym
        w_cols = w_ptr + offs_k.to(tl.int64)[None, :] * stride_wk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_K):
            offs_n = n0 + offs_n0
            n_in = offs_n < N
            dy = tl.load(dy_rows + offs_n[None, :] * stride_dyn, mask=m_in[:, None] & n_in[None, :], other=0.0)
            w = tl.load(w_cols + offs_n.to(tl.int64)[:, None] * stride_wn, mask=n_in[:, None] & k_in[None, :],
                        other=0.0)
            acc = tl.dot(dy, w, acc)
        a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=r_in[:, None] & k_in[None, :], other=0.0)
        lora = tl.dot(g, a)
        if HAS_DROPOUT:
            lora = tl.where(keep, lora * scale, 0.0)
        acc += lora
        dx_ptrs = dx_ptr + offs_m.to(tl.int64)[:, None] * stride_dxm + offs_k[None, :] * stride_dxk
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=m_in[:, None] & k_in[None, :])
    if HAS_DA:
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=m_in[:, None] & k_in[None, :], other=0.0)
        if HAS_DROPOUT:
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        da_part = tl.dot(tl.trans(g), x)
        tl.atomic_add(da_ptr + offs_r[:, None] * K + offs_k[None, :], da_part, mask=r_in[:, None] & k_in[None, :])
