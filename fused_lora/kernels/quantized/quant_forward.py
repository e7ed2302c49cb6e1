"""Forward GEMM over a quantized frozen base: Y = x W^T + b + s H B^T, W dequantized per K step.

Like `forward.lora_forward_kernel`, but the W^T tile of each K step is made in registers from the
packed weight (`quant_tiles.dequant_tile`: NF4, nested or not, or int8), so no 16-bit copy of W
exists in memory. H comes from the unchanged shrink pass. The low-rank term is summed over rank
chunks of RANK_STEP (a loop, not a padded BLOCK_R), so one compiled variant serves every rank.
Parameter order: pointers, strides, sizes, scalars, constexprs.
"""
import triton
import triton.language as tl

from ..tiles import grouped_tile, load_tile, store_tile
from .quant_tiles import dequant_tile


@triton.jit(do_not_specialize=["bs_shift", "bs2_shift"])  # small values: no alignment to find
def quant_forward_kernel(
    x_ptr, q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, bias_ptr, h_ptr, b_ptr, y_ptr,
    stride_xm, stride_xk, stride_hm, stride_hr, stride_bn, stride_br, stride_ym, stride_yn,
    M, N, K, R, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset, scaling, M_BUCKET,
    QUANT: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y tile = x W^T (+ b) + scaling * H B^T, fp32 accumulation, one write. BLOCK_K <= 64."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    n_in = offs_n < N
    # Computed transposed, Y^T tile = W x^T + ..., so that the dequantized W tile is the MMA's
    # first operand, which Hopper's wgmma reads from registers: no shared-memory round trip for it,
    # so the wgmma of one step runs while the next step's tile is being dequantized.
    # The accumulator starts as scaling * B H^T (no second tile live across the K loop).
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for r0 in range(0, R, RANK_STEP):
        offs_r = r0 + tl.arange(0, RANK_STEP)
        r_in = offs_r < R
        b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, n_in, r_in)
        ht = load_tile(h_ptr, offs_r, offs_m, stride_hr, stride_hm, r_in, m_in)  # H^T tile
        acc = tl.dot(b, ht, acc)
    acc = acc * scaling
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xt = load_tile(x_ptr, offs_k, offs_m, stride_xk, stride_xm, offs_k < K, m_in)  # x^T tile
        w = dequant_tile(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                         offs_n, n_in, k0, K, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset,
                         QUANT, NESTED, BLOCK_K, ALIGNED)  # W[offs_n, offs_k], fp32
        acc = tl.dot(w.to(x_ptr.dtype.element_ty), xt, acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[:, None]
    store_tile(y_ptr, acc, offs_n, offs_m, stride_yn, stride_ym, n_in, m_in)
