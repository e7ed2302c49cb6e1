"""The dX GEMM over a quantized frozen base: dX = D (G A) + dY W, W dequantized per N step.

Like the dX half of `backward.lora_dx_da_kernel`: the accumulator starts from the low-rank term
G A (summed over rank chunks of RANK_STEP, one variant for every rank), masked and scaled by the
dropout mask regenerated from the seed, then each step of the loop over the layer's N adds
dY[:, n-step] W[n-step, k-tile], the W tile dequantized in registers (`quant_tiles.dequant_tile`).
The dA partials come from `lora_dx_da_kernel` with HAS_DX off (it reads no W); G, dB and the sums
from the unchanged dY pass and reduction.

Config names are the generic GEMM's: the output columns run over the layer's K (BLOCK_N, at most
128: a W row run crosses at most 3 absmax blocks) and the reduction over the layer's N (BLOCK_K).
"""
import triton
import triton.language as tl

from .dropout import keep_tile
from .forward import grouped_tile
from .quant_tiles import dequant_tile
from .tiles import load_tile, store_tile


@triton.jit(do_not_specialize=["seed"])
def quant_dx_kernel(
    dy_ptr, q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, g_ptr, a_ptr, dx_ptr,
    stride_dym, stride_dyn, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    M, N, K, R, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset, seed, threshold, scale, M_BUCKET,
    QUANT: tl.constexpr, NESTED: tl.constexpr, HAS_DROPOUT: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (m, k) of dX = D (G A) + dY W."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    k_in = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, RANK_STEP):
        offs_r = r0 + tl.arange(0, RANK_STEP)
        r_in = offs_r < R
        g = load_tile(g_ptr, offs_m, offs_r, stride_gm, stride_gr, m_in, r_in)
        a = load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, r_in, k_in)
        acc = tl.dot(g, a, acc)
    if HAS_DROPOUT:  # D applies to the low-rank term alone; the mask is dead before the main loop
        keep = keep_tile(seed, offs_m, pid_k * BLOCK_N, K, threshold, BLOCK_N)
        acc = tl.where(keep, acc * scale, 0.0)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        n_in = offs_n < N
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, m_in, n_in)
        w = dequant_tile(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                         offs_n, n_in, pid_k * BLOCK_N, K, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset,
                         QUANT, NESTED, BLOCK_N)  # W[offs_n, offs_k], fp32
        acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc)
    store_tile(dx_ptr, acc, offs_m, offs_k, stride_dxm, stride_dxk, m_in, k_in)
