"""Hopper forward GEMM: Y = x W^T + b + s H B^T with TMA descriptors and a persistent grid.

The same computation as `forward.lora_forward_kernel` (H from the shrink pass; the accumulator
started from s H B^T so no second BLOCK_M x BLOCK_N tile is live across the K loop), organised as
Triton's tutorial 09 (persistent matmul, host-side `TensorDescriptor`s):

- x, W and Y move through TMA descriptors: the main loop's operand tiles are bulk copies into
  shared memory (no address arithmetic, no masks: out-of-range rows and columns read as zero and
  are clipped on store), and Y's tile leaves through one TMA store.
- The grid is at most one program per SM; each program walks tiles tile_id, tile_id + programs,
  ... in the grouped order of `forward.grouped_tile` (GROUP_M row tiles at a time for L2 reuse),
  so there is one launch wave and the next tile's loads overlap the previous tile's epilogue.
- H and B (M x r and N x r, small, r often not 16-byte aligned) stay pointer loads, once per tile.

Descriptors need 16-byte aligned row strides and a unit last stride: the launcher in
`fused_lora.kernels.hopper.tma` checks that and otherwise runs the pointer kernel.
Parameter order: descriptors and pointers, strides, sizes, scalars, constexprs.
"""
import triton
import triton.language as tl

from ..tiles import grouped_tile, load_tile


def descriptor_blocks(cfg) -> dict:
    """The block shape of each descriptor argument under a config (the launcher builds the
    descriptors with these; the static gate compiles with them)."""
    k = cfg.kwargs
    return {"x_desc": [k["BLOCK_M"], k["BLOCK_K"]], "w_desc": [k["BLOCK_N"], k["BLOCK_K"]],
            "y_desc": [k["BLOCK_M"], k["BLOCK_N"] // epilogue_parts(cfg)]}


def epilogue_parts(cfg) -> int:
    """Y tiles 256 wide leave in two halves (tutorial 09's epilogue subtiling): half the shared
    memory staged for the TMA store, which lets a 128x256 tile's pipeline fit."""
    return 2 if cfg.kwargs["BLOCK_N"] >= 256 else 1


@triton.jit
def lora_forward_tma_kernel(
    x_desc, w_desc, y_desc, bias_ptr, h_ptr, b_ptr,
    stride_hm, stride_hr, stride_bn, stride_br,
    M, N, K, R, NUM_PROGRAMS, scaling,
    HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program p computes Y tiles p, p + NUM_PROGRAMS, ... (grouped order)."""
    dtype = y_desc.dtype
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < R
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_PROGRAMS):
        pid_m, pid_n = grouped_tile(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        row0 = pid_m * BLOCK_M
        col0 = pid_n * BLOCK_N
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = col0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        # Low-rank term first (see forward.py): the K loop accumulates onto it.
        h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, offs_m < M, r_in)
        bt = load_tile(b_ptr, offs_r, offs_n, stride_br, stride_bn, r_in, n_in)  # B^T tile
        acc = tl.dot(h, bt) * scaling
        for k0 in range(0, K, BLOCK_K):
            x = x_desc.load([row0, k0])
            w = w_desc.load([col0, k0])
            acc = tl.dot(x, w.T, acc)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
        if BLOCK_N >= 256:
            halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
            left, right = tl.split(halves)
            y_desc.store([row0, col0], left.to(dtype))
            y_desc.store([row0, col0 + BLOCK_N // 2], right.to(dtype))
        else:
            y_desc.store([row0, col0], acc.to(dtype))
