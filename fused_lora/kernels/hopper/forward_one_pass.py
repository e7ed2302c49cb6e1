"""The single-pass forward: Y = x W^T + b + s H B^T and H = (D x) A^T in one kernel, no shrink pass.

Each Y tile's K loop already loads the x tiles of its row block; it also loads A's matching
columns and accumulates H for those rows (BLOCK_M x BLOCK_R, fp32) beside the main accumulator,
then adds s H B^T after the loop. That saves the shrink pass's second read of x (and a launch) at
the cost of recomputing H once per column tile: ~r / BLOCK_N more MMA work, and with dropout the
mask drawn once per column tile instead of once. Which wins depends on the shape: the
"triton-onepass" row is timed against the others and measurement decides.

H means exactly what the shrink pass writes: the same dropout mask (`dropout.keep_tile`, a pure
function of (seed, row, column)), accumulated in fp32 and stored in x's dtype, by the first
column tile of each row block (pid_n == 0) only. The backward kernels then regenerate the same
mask. The low-rank product uses s H rounded once to x's dtype (the pointer path rounds H, then
scales in fp32: the two differ by one rounding of a value already rounded once); it goes into the
main accumulator through tl.dot's accumulator argument, so no second BLOCK_M x BLOCK_N tile is
live (adding a separate product would be, see lora/forward.py).
"""
import triton
import triton.language as tl

from ..dropout import keep_tile
from ..tiles import grouped_tile, load_tile, store_tile


@triton.jit(do_not_specialize=["seed"])
def lora_forward_one_pass_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, y_ptr, h_ptr,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_hm, stride_hr,
    M, N, K, R, seed, threshold, scale, scaling,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y tile (m, n), and H rows of block m when n == 0."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    n_in = offs_n < N
    r_in = offs_r < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_h = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_in, k_in)
        w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, k_in, n_in)  # W^T tile
        a = load_tile(a_ptr, offs_k, offs_r, stride_ak, stride_ar, k_in, r_in)  # A^T tile
        acc = tl.dot(x, w, acc)
        if HAS_DROPOUT:
            # Drawn where it is used: nothing of the mask is live across iterations.
            keep = keep_tile(seed, offs_m, k0, K, threshold, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        acc_h = tl.dot(x, a, acc_h)
    if pid_n == 0:
        store_tile(h_ptr, acc_h, offs_m, offs_r, stride_hm, stride_hr, m_in, r_in)
    bt = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r_in, n_in)  # B^T tile
    acc = tl.dot((acc_h * scaling).to(x_ptr.dtype.element_ty), bt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, offs_m, offs_n, stride_ym, stride_yn, m_in, n_in)
