"""Backward kernels for several adapters in one batch, on the tile table of `multi_forward`.

    multi_dy_kernel:     one pass over dY, LoRA tiles x column chunks of N: partials of
                         G = s_a dY B_a (one per chunk, at the tile's sorted positions) and of
                         dB_a = s_a dY^T H_a (one slot per LoRA tile), fp32.
    multi_dx_da_kernel:  dX[order[i]] = dY W + D_a (G A_a) over every tile (the base GEMM once for the
                         whole batch, W per segment where the grouped op's experts give one;
                         base tiles have rank 0), and the tile's partial of
                         dA_a = G^T (D_a x) in its own slot; D_a regenerated in-kernel exactly as the
                         shrink pass drew it.
    multi_sum_kernel:    dA_a, dB_a = the sums of adapter a's slots. A tile belongs to one adapter
                         and an adapter's tiles are consecutive, so its slots are one range; they are
                         added in slot order, so the gradients are bit-identical run to run (no
                         atomics).

Workspaces are R wide (the largest rank): columns at and past an adapter's rank hold zeros (its
loads are masked), so the stacked sums are fully written.
"""
import triton
import triton.language as tl

from ..dropout import keep_tile
from ..tiles import grouped_tile, load_tile, store_tile
from .multi_forward import adapter_dropout, adapter_rank, segment_tile


@triton.jit
def multi_dy_kernel(
    dy_ptr, b_ptr, h_ptr, g_ws_ptr, db_ws_ptr, order_ptr, tiles_ptr, ints_ptr, floats_ptr,
    stride_dym, stride_dyn, stride_bb, stride_bn, stride_br, stride_hm, stride_hr,
    M_LORA, N, RW, N_CHUNK, tile0, pos0,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program (t, j): LoRA tile tile0 + t, columns j * N_CHUNK.. (N_CHUNK a multiple of BLOCK_N).

    g_ws_ptr: fp32 (cdiv(N, N_CHUNK), M_LORA, RW), slot j rows i - pos0 (the LoRA positions).
    db_ws_ptr: fp32 (LoRA tiles, N, RW), slot t.
    """
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    adapter, first, end, _ = segment_tile(tiles_ptr, tile0 + t)
    offs_i = first + tl.arange(0, BLOCK_M)
    m_in = offs_i < end
    rows = tl.load(order_ptr + offs_i, mask=m_in, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    r_in = offs_r < adapter_rank(ints_ptr, adapter)
    w_in = offs_r < RW  # the workspace's columns: zeros past the rank
    scaling = tl.load(floats_ptr + tl.maximum(adapter, 0) * 2)
    b_base = b_ptr + tl.maximum(adapter, 0).to(tl.int64) * stride_bb
    h = load_tile(h_ptr, offs_i, offs_r, stride_hm, stride_hr, m_in, r_in)
    db_slot = db_ws_ptr + t.to(tl.int64) * N * RW
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_n * N_CHUNK
    # A base or empty tile (adapter -1: the grid is an upper bound of the LoRA tiles) runs no iteration
    # and stores zeros for G; through the loop's bound, not an early return (which spilled on sm_80).
    n_stop = tl.where(adapter >= 0, tl.minimum(n_start + N_CHUNK, N), n_start)
    for n0 in range(n_start, n_stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        dy = load_tile(dy_ptr, rows, offs_n, stride_dym, stride_dyn, m_in, n_in)
        b = load_tile(b_base, offs_n, offs_r, stride_bn, stride_br, n_in, r_in)
        acc_g = tl.dot(dy, b, acc_g)
        store_tile(db_slot, tl.dot(tl.trans(dy), h) * scaling, offs_n, offs_r, RW, 1, n_in, w_in)
    g_slot = g_ws_ptr + pid_n.to(tl.int64) * M_LORA * RW
    store_tile(g_slot, acc_g * scaling, offs_i - pos0, offs_r, RW, 1, m_in, w_in)


@triton.jit
def multi_dx_da_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, dx_ptr, da_ws_ptr, order_ptr, tiles_ptr, ints_ptr, floats_ptr,
    stride_dym, stride_dyn, stride_wa, stride_wn, stride_wk, stride_gm, stride_gr, stride_aa, stride_ar,
    stride_ak, stride_xm, stride_xk, stride_dxm, stride_dxk,
    N, K, RW, n_tiles, tile0, lora_tile0, pos0,
    HAS_DX: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (t, k), t = tile0 + its row-tile index: the dA partial (LoRA tiles: slot t - lora_tile0,
    da_ws_ptr fp32 (LoRA tiles, RW, K)) and (HAS_DX) the dX tile. Without HAS_DX only the LoRA tiles
    are launched (tile0 = lora_tile0). G (M_LORA x RW) is indexed by sorted position - pos0.
    The GEMM's output columns run over the layer's K (BLOCK_N), its reduction over N (BLOCK_K).
    W_a, the tile's segment's base weight, is at a * stride_wa (0 for a mixed batch's one weight)."""
    pid_t, pid_k = grouped_tile(tl.program_id(0), n_tiles * BLOCK_M, K, BLOCK_M, BLOCK_N, GROUP_M)
    t = tile0 + pid_t
    adapter, first, end, local0 = segment_tile(tiles_ptr, t)
    # An empty tile past the real ones (n_tiles is an upper bound; adapter -1, no rows) skips the main
    # loop through its bound, not an early return: that costs registers (a spill on sm_90, triton 3.6).
    n_stop = tl.where(first < end, N, 0)
    offs_i = first + tl.arange(0, BLOCK_M)
    m_in = offs_i < end
    rows = tl.load(order_ptr + offs_i, mask=m_in, other=0)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    k_in = offs_k < K
    r_in = offs_r < adapter_rank(ints_ptr, adapter)
    is_lora = adapter >= 0
    g = load_tile(g_ptr, offs_i - pos0, offs_r, stride_gm, stride_gr, m_in, r_in)
    # Everything that uses the dropout mask comes before the main loop (nothing of it live across).
    if HAS_DROPOUT:
        seed, threshold, scale = adapter_dropout(ints_ptr, floats_ptr, adapter)
        keep = keep_tile(seed, local0 + tl.arange(0, BLOCK_M), pid_k * BLOCK_N, K, threshold, BLOCK_N)
    if is_lora:
        x = load_tile(x_ptr, rows, offs_k, stride_xm, stride_xk, m_in, k_in)
        if HAS_DROPOUT:
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        da_slot = da_ws_ptr + (t - lora_tile0).to(tl.int64) * RW * K
        store_tile(da_slot, tl.dot(tl.trans(g), x), offs_r, offs_k, K, 1, offs_r < RW, k_in)
    if HAS_DX:
        a_base = a_ptr + tl.maximum(adapter, 0).to(tl.int64) * stride_aa
        w_base = w_ptr + tl.maximum(adapter, 0).to(tl.int64) * stride_wa
        acc = tl.dot(g, load_tile(a_base, offs_r, offs_k, stride_ar, stride_ak, r_in, k_in))
        if HAS_DROPOUT:
            acc = tl.where(keep, acc * scale, 0.0)
        for n0 in range(0, n_stop, BLOCK_K):
            offs_n = n0 + tl.arange(0, BLOCK_K)
            n_in = offs_n < N
            dy = load_tile(dy_ptr, rows, offs_n, stride_dym, stride_dyn, m_in, n_in)
            w = load_tile(w_base, offs_n, offs_k, stride_wn, stride_wk, n_in, k_in)
            acc = tl.dot(dy, w, acc)
        store_tile(dx_ptr, acc, rows, offs_k, stride_dxm, stride_dxk, m_in, k_in)


@triton.jit
def multi_sum_kernel(ws_ptr, out_ptr, bounds_ptr, L, BLOCK: tl.constexpr):
    """out[a, i] = sum over slots s in [bounds[a], bounds[a + 1]) of ws[s, i], in slot order, for
    i < L (ws (slots, L) fp32 and out (n, L) contiguous); program (a, block of L)."""
    a = tl.program_id(0)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < L
    lo = tl.load(bounds_ptr + a)
    hi = tl.load(bounds_ptr + a + 1)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + lo.to(tl.int64) * L + offs
    for _ in range(lo, hi):
        acc += tl.load(ptrs, mask=inside, other=0.0)
        ptrs += L  # pointer arithmetic is 64-bit
    tl.store(out_ptr + a.to(tl.int64) * L + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)
