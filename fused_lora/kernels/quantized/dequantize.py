"""The whole quantized weight dequantized in one launch: W[N, K] = dequantize(wq), written in the compute
dtype into a fresh buffer (the dequant-once row, `fused_lora.dispatch.dequant_once`, then runs the vendor
GEMMs on it).

Each program writes one BLOCK_N x BLOCK_K tile of W, made by the quantized GEMMs' own tile loader
(`quant_tiles.dequant_tile`: NF4 nested or not, aligned or general, int8), so W is, element for element,
what those GEMMs multiply by: the fp32 product level x absmax (int8: code x row scale), rounded once to the
output dtype, the reference's (`core.formats`) and bitsandbytes' dequantization bit for bit. The launcher
compiles it without floating-point contraction (`enable_fp_fusion=False`): the nested absmax
code2[q] * absmax2 + offset is then two roundings, as the reference and bitsandbytes compute it, not one
fused multiply-add.

The tile's columns are a run of one W row: BLOCK_K = 256 (runs of 64 inside, each within one NF4 block of
64 elements or more), or for NF4 blocks of 32 elements BLOCK_K = 32 (the aligned tile loader's run is then
the whole 32 columns, one block): `kernels.configs.dequant_configs`.
"""
import triton
import triton.language as tl

from ..tiles import store_tile
from .quant_tiles import dequant_tile


@triton.jit(do_not_specialize=["bs_shift", "bs2_shift"])  # small values: no alignment to find
def dequantize_kernel(
    q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, out_ptr,
    stride_on, stride_ok,
    N, K, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset,
    QUANT: tl.constexpr, NESTED: tl.constexpr, ALIGNED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[rows, cols] = W[rows, cols] of one BLOCK_N x BLOCK_K tile, in out's dtype."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    n_in = offs_n < N
    w = dequant_tile(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                     offs_n, n_in, k0, K, K_HALF, K_ODD, bs_shift, bs2_shift, n_blocks, offset,
                     QUANT, NESTED, BLOCK_K, ALIGNED)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    store_tile(out_ptr, w, offs_n, offs_k, stride_on, stride_ok, n_in, offs_k < K)
