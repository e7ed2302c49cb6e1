"""Forward kernels for several adapters in one batch (rows grouped by adapter, as vLLM's sgmv).

The launcher (`segments/launchers.py`) sorts nothing itself: it receives the rows sorted by adapter (`order`, the
stable sort of the per-row adapter index, base rows first) and cuts each adapter's run of sorted
positions into row tiles that never cross an adapter boundary (the tile table). Every program thus
has one adapter: one scalar rank, scaling, dropout seed and threshold, one A / B slice.

    multi_shrink_kernel:   H[i, :r_a] = (D_a x[order[i]]) A_a^T for the sorted positions i of a LoRA
                           tile; D_a drawn in-kernel from (adapter seed, row index within the
                           adapter, column), as the single-adapter shrink draws it on those rows alone.
    multi_forward_kernel:  Y[order[i]] = x[order[i]] W^T + b + s_a H[i] B_a^T, every tile (base tiles
                           have rank 0): the base GEMM once for the whole batch, its accumulator
                           started from the low-rank term as in the single-adapter kernel. W and b
                           may be one per segment (per-segment strides: the grouped op's experts,
                           `kernels/grouped/`); a mixed batch passes 0.

Tables (built by the launcher on the device, so grids are upper bounds): tiles int32 (T, 4) =
(adapter or -1, first sorted position, end, index of the first row within its adapter), the LoRA
tiles first, then the base tiles, then empty ones (first == end) whose programs return at once;
ints int64 (n, 3) = (rank, dropout threshold, dropout seed); floats fp32 (n, 2) = (scaling,
1 / (1 - p)). A is stacked (n, R, K), B (n, N, R), R the
largest rank (smaller ranks zero-padded, never read: loads are masked by the adapter's rank).
"""
import triton
import triton.language as tl

from ..dropout import keep_tile
from ..tiles import grouped_tile, load_tile, store_tile


@triton.jit
def segment_tile(tiles_ptr, t):
    """(adapter, first sorted position, end, index of the first row within its adapter) of tile t."""
    row = tiles_ptr + t * 4
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def adapter_rank(ints_ptr, adapter):
    """The adapter's rank; 0 for the base (adapter -1), so every low-rank load is masked off."""
    rank = tl.load(ints_ptr + tl.maximum(adapter, 0) * 3)
    return tl.where(adapter >= 0, rank, 0).to(tl.int32)


@triton.jit
def adapter_dropout(ints_ptr, floats_ptr, adapter):
    """(seed, threshold, 1 / (1 - p)) of an adapter (threshold 0 and scale 1: no dropout)."""
    a = tl.maximum(adapter, 0)
    return tl.load(ints_ptr + a * 3 + 2), tl.load(ints_ptr + a * 3 + 1).to(tl.int32), tl.load(floats_ptr + a * 2 + 1)


@triton.jit
def multi_shrink_kernel(
    x_ptr, a_ptr, h_ptr, order_ptr, tiles_ptr, ints_ptr, floats_ptr,
    stride_xm, stride_xk, stride_aa, stride_ar, stride_ak, stride_hm, stride_hr,
    K, tile0,
    HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One program per LoRA tile (tile0 + program id); a base or empty tile (adapter -1: the grid is an
    upper bound of the LoRA tiles) returns at once. BLOCK_N/GROUP_M unused."""
    adapter, first, end, local0 = segment_tile(tiles_ptr, tile0 + tl.program_id(0))
    if adapter < 0:
        return
    offs_i = first + tl.arange(0, BLOCK_M)
    m_in = offs_i < end
    rows = tl.load(order_ptr + offs_i, mask=m_in, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < adapter_rank(ints_ptr, adapter)
    a_base = a_ptr + adapter.to(tl.int64) * stride_aa
    if HAS_DROPOUT:
        seed, threshold, scale = adapter_dropout(ints_ptr, floats_ptr, adapter)
        local = local0 + tl.arange(0, BLOCK_M)  # the mask's row index: the row's place within its adapter
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, m_in, k_in)
        if HAS_DROPOUT:
            keep = keep_tile(seed, local, k0, K, threshold, BLOCK_K)
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        a = load_tile(a_base, offs_k, offs_r, stride_ak, stride_ar, k_in, r_in)  # A_a^T tile
        acc = tl.dot(x, a, acc)
    store_tile(h_ptr, acc, offs_i, offs_r, stride_hm, stride_hr, m_in, r_in)


@triton.jit
def multi_forward_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, y_ptr, order_ptr, tiles_ptr, ints_ptr, floats_ptr,
    stride_xm, stride_xk, stride_wa, stride_wn, stride_wk, stride_biasa, stride_hm, stride_hr, stride_bb,
    stride_bn, stride_br, stride_ym, stride_yn,
    N, K, n_tiles,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Y tile = x W_a^T + b_a + s_a H B_a^T over the rows of one tile (gathered and scattered through
    `order`), fp32 accumulation, one write. W_a and b_a: the segment's base weight and bias, at
    a * stride_wa and a * stride_biasa (0 for a mixed batch: one weight and bias for every row; the
    expert stack's strides for the grouped op, whose weight is read in either layout through
    stride_wn / stride_wk). The bias is always read (zeros when the layer has none: one variant fewer
    to compile, N elements of traffic)."""
    pid_t, pid_n = grouped_tile(tl.program_id(0), n_tiles * BLOCK_M, N, BLOCK_M, BLOCK_N, GROUP_M)
    adapter, first, end, _ = segment_tile(tiles_ptr, pid_t)
    if first >= end:  # an empty tile past the real ones (n_tiles is an upper bound)
        return
    offs_i = first + tl.arange(0, BLOCK_M)
    m_in = offs_i < end
    rows = tl.load(order_ptr + offs_i, mask=m_in, other=0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    n_in = offs_n < N
    r_in = offs_r < adapter_rank(ints_ptr, adapter)
    scaling = tl.load(floats_ptr + tl.maximum(adapter, 0) * 2)
    segment = tl.maximum(adapter, 0).to(tl.int64)
    w_base = w_ptr + segment * stride_wa
    # The low-rank term first (zero on base tiles: rank 0), then the K loop onto it: no second
    # BLOCK_M x BLOCK_N tile live across the loop (see forward.lora_forward_kernel).
    h = load_tile(h_ptr, offs_i, offs_r, stride_hm, stride_hr, m_in, r_in)
    bt = load_tile(b_ptr + segment * stride_bb, offs_r, offs_n, stride_br, stride_bn, r_in, n_in)
    acc = tl.dot(h, bt) * scaling
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_in = offs_k < K
        x = load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, m_in, k_in)
        w = load_tile(w_base, offs_k, offs_n, stride_wk, stride_wn, k_in, n_in)  # W_a^T tile
        acc = tl.dot(x, w, acc)
    acc += tl.load(bias_ptr + segment * stride_biasa + offs_n, mask=n_in, other=0.0).to(tl.float32)[None, :]
    store_tile(y_ptr, acc, rows, offs_n, stride_ym, stride_yn, m_in, n_in)
