"""Forward kernels: the shrink pass H = (D x) A^T and the GEMM Y = x W^T + b + s H B^T.

The shrink pass reads x once and writes the small M x r matrix H (dropout drawn here, in-kernel).
The GEMM starts its accumulator from s * H B^T and adds the base product onto it, so Y is written
once and no M x N temporary exists. With HAS_COLSCALE (DoRA) the epilogue scales each output column
by c = m / n before the bias. Parameter order: pointers, strides, sizes, scalars, constexprs.
"""
import triton
import triton.language as tl

from ..dropout import keep_tile
from ..tiles import grouped_tile, load_tile, store_tile


@triton.jit(do_not_specialize=["seed"])
def lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    M, K, R, seed, threshold, scale, M_BUCKET,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """H[m, :] = sum_k (D x)[m, k] A[:, k]; one program per BLOCK_M rows. BLOCK_N/GROUP_M unused."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    r_in = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_in, k_in)
        if HAS_DROPOUT:
            keep = keep_tile(seed, offs_m, k0, K, threshold, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, k_in, r_in)  # A^T tile, BLOCK_K x BLOCK_R
        acc = tl.dot(x, a, acc)
    store_tile(h_ptr, acc, offs_m, offs_r, stride_hm, stride_hr, m_in, r_in)


@triton.jit
def lora_forward_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr, colscale_ptr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr, stride_bn, stride_br,
    stride_ym, stride_yn,
    M, N, K, R, scaling, M_BUCKET,
    HAS_BIAS: tl.constexpr, HAS_COLSCALE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y tile = x W^T (+ b) + scaling * H B^T, fp32 accumulation, one write.
    HAS_COLSCALE (DoRA): Y tile = c * (x W^T + scaling * H B^T) (+ b), c fp32 per column."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    n_in = offs_n < N
    r_in = offs_r < R
    # The low-rank term first: the accumulator starts as scaling * H B^T and the K loop adds onto
    # it. Adding it after the loop would keep a second BLOCK_M x BLOCK_N fp32 tile live (spills on
    # the large tiles, and serialized wgmma on Hopper).
    h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, m_in, r_in)
    bt = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r_in, n_in)  # B^T tile
    acc = tl.dot(h, bt) * scaling
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_in, k_in)
        w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, k_in, n_in)  # W^T tile
        acc = tl.dot(x, w, acc)
    if HAS_COLSCALE:  # in the epilogue: nothing more is live across the K loop
        acc = acc * tl.load(colscale_ptr + offs_n, mask=n_in, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, offs_m, offs_n, stride_ym, stride_yn, m_in, n_in)
