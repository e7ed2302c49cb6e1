"""The dX GEMM over a quantized frozen base: dX = D (G A) + dY W, W dequantized per N step.

Each step of the loop over the layer's N adds dY[:, n-step] W[n-step, k-tile], the W tile
dequantized in registers (`quant_tiles.dequant_tile`), onto an accumulator that starts from the
low-rank term:
- without dropout, G A computed here (summed over rank chunks of RANK_STEP: one variant serves
  every rank);
- with dropout, or on the general NF4 path (LOW_RANK_IN_DX), D (G A) read from dX itself, where
  `lora_dx_da_kernel` (run with N = 0: no dY W) wrote it beside the dA partials. Drawing the mask here would keep the tile's
  Philox numbers live beside the accumulator: the 256-row tiles the dequantization needs spill,
  and at 8 warps triton 3.6 serializes the wgmma (C7515). The price is one extra write and read
  of an M x K tile, about a tenth of this GEMM's time at 8192x4096x4096.
G, dB and the sums come from the unchanged dY pass and reduction.

The dequantized W tile is the MMA's second operand (dX tile = dY tile x W tile), staged in shared
memory as wgmma reads it. (Computed transposed, dX^T = W^T dY^T, the tile would be the register
operand, but a transposed register tile is converted through shared memory anyway: on sm_90, per
warp and step, 193 non-MMA instructions this way against 217 transposed under triton 3.9, 245
against 253 under 3.6; benchmarks/static_loop.py.) Config names are the generic GEMM's: the output
columns run over the layer's K (BLOCK_N, at most 128: a W row run crosses at most 3 absmax blocks)
and the reduction over the layer's N (BLOCK_K).
"""
import triton
import triton.language as tl

from ..tiles import grouped_tile, load_tile, store_tile
from .quant_tiles import dequant_tile


@triton.jit(do_not_specialize=["bs_shift", "bs2_shift"])  # small values: no alignment to find
def quant_dx_kernel(
    dy_ptr, q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, g_ptr, a_ptr, dx_ptr,
    stride_dym, stride_dyn, stride_gm, stride_gr, stride_ar, stride_ak, stride_dxm, stride_dxk,
    M, N, K, R, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset, M_BUCKET,
    QUANT: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr, LOW_RANK_IN_DX: tl.constexpr, RANK_STEP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (m, k) of dX = dY W + (G A, or with LOW_RANK_IN_DX the D (G A) dX already holds)."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    m_in = offs_m < M
    k_in = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if not LOW_RANK_IN_DX:
        for r0 in range(0, R, RANK_STEP):
            offs_r = r0 + tl.arange(0, RANK_STEP)
            r_in = offs_r < R
            g = load_tile(g_ptr, offs_m, offs_r, stride_gm, stride_gr, m_in, r_in)
            a = load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, r_in, k_in)
            acc = tl.dot(g, a, acc)
    for n0 in range(0, N, BLOCK_K):
        offs_n = n0 + tl.arange(0, BLOCK_K)
        n_in = offs_n < N
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, m_in, n_in)
        w = dequant_tile(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                         offs_n, n_in, pid_k * BLOCK_N, K, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset,
                         QUANT, NESTED, BLOCK_N, ALIGNED)  # W[offs_n, offs_k], fp32
        acc = tl.dot(dy, w.to(dy_ptr.dtype.element_ty), acc)
    if LOW_RANK_IN_DX:  # added after the loop: loaded before it, the tile's conversion to the
        # accumulator's layout spills the 256 x 128 tile (sm_90, triton 3.6)
        acc += load_tile(dx_ptr, offs_m, offs_k, stride_dxm, stride_dxk, m_in, k_in).to(tl.float32)
    store_tile(dx_ptr, acc, offs_m, offs_k, stride_dxm, stride_dxk, m_in, k_in)
