"""Backward kernels.

    lora_dy_kernel:     one pass over dY on a 2-D grid (row blocks x column chunks of N): partial
                        sums of G = s dY B (one per column chunk) and of dB = s dY^T H (one per
                        row block), both fp32, each program writing only its own slots; with
                        HAS_COLSCALE (DoRA) also the partials of dm's column sums of dY * (Y - b).
    lora_dx_da_kernel:  dX = D (G A) + dY W, the accumulator started from the low-rank term, and
                        in the same program its row block's partial of dA = G^T (D x); D is
                        regenerated in-kernel from the seed.

The partials are summed in a fixed order by `reduce.sum_partials_kernel`, so G, dA and dB are
bit-identical from run to run and no atomic (nor its memory fence) sits in a loop.
In lora_dx_da_kernel the GEMM's output columns run over the layer's K (BLOCK_N) and its
reduction over the layer's N (BLOCK_K): the config names are the generic GEMM's.
"""
import triton
import triton.language as tl

from ..dropout import keep_tile
from ..tiles import grouped_tile, load_tile, store_tile


@triton.jit
def lora_dy_kernel(
    dy_ptr, b_ptr, h_ptr, g_ws_ptr, db_ws_ptr, y_ptr, bias_ptr, colscale_ptr, dm_ws_ptr,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr, stride_ym, stride_yn,
    M, N, R, N_CHUNK, scaling, M_BUCKET,
    HAS_DB: tl.constexpr, HAS_COLSCALE: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program (i, j): rows i * BLOCK_M.., columns j * N_CHUNK.. (N_CHUNK a multiple of BLOCK_N).

    g_ws_ptr: fp32 (cdiv(N, N_CHUNK), M, R), slot j gets s dY[rows, chunk] B[chunk].
    db_ws_ptr: fp32 (cdiv(M, BLOCK_M), N, R), slot i gets s dY[rows, chunk]^T H[rows] (HAS_DB).
    HAS_COLSCALE (DoRA, dY' = dY * c columnwise): b_ptr holds c * B (so G = s dY' B), the dB partial's
    rows are scaled by c (s dY'^T H), and dm_ws_ptr fp32 (cdiv(M, BLOCK_M), N), slot i gets
    sum over its rows of dY * (Y - b) per column (Y the forward's output, b its bias).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    r_in = offs_r < R
    if HAS_DB:
        h = load_tile(h_ptr, offs_m, offs_r, stride_hm, stride_hr, m_in, r_in)
        db_slot = db_ws_ptr + pid_m.to(tl.int64) * N * R
    acc_g = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    n_start = pid_n * N_CHUNK
    for n0 in range(n_start, tl.minimum(n_start + N_CHUNK, N), BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_in = offs_n < N
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, m_in, n_in)
        b = load_tile(b_ptr, offs_n, offs_r, stride_bn, stride_br, n_in, r_in)
        acc_g = tl.dot(dy, b, acc_g)
        if HAS_DB:
            part = tl.dot(tl.trans(dy), h) * scaling
            if HAS_COLSCALE:
                part = part * tl.load(colscale_ptr + offs_n, mask=n_in, other=0.0)[:, None]
            store_tile(db_slot, part, offs_n, offs_r, R, 1, n_in, r_in)
        if HAS_COLSCALE:
            y = load_tile(y_ptr, offs_m, offs_n, stride_ym, stride_yn, m_in, n_in).to(tl.float32)
            bias = tl.load(bias_ptr + offs_n, mask=n_in, other=0.0).to(tl.float32)
            dm = tl.sum(dy.to(tl.float32) * (y - bias[None, :]), axis=0)
            tl.store(dm_ws_ptr + pid_m.to(tl.int64) * N + offs_n, dm, mask=n_in)
    g_slot = g_ws_ptr + pid_n.to(tl.int64) * M * R
    store_tile(g_slot, acc_g * scaling, offs_m, offs_r, R, 1, m_in, r_in)


@triton.jit(do_not_specialize=["seed"])
def lora_dx_da_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, x_ptr, dx_ptr, da_ws_ptr,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gr, stride_ar, stride_ak,
    stride_xm, stride_xk, stride_dxm, stride_dxk,
    M, N, K, R, seed, threshold, scale, M_BUCKET,
    HAS_DX: tl.constexpr, HAS_DA: tl.constexpr, HAS_DROPOUT: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Tile (m, k) of dX = D (G A) + dY W, and (HAS_DA) slot m of the dA partials:
    da_ws_ptr fp32 (cdiv(M, BLOCK_M), R, K), slot m gets G[rows]^T (D x)[rows, tile columns]."""
    pid_m, pid_k = grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    m_in = offs_m < M
    k_in = offs_k < K
    r_in = offs_r < R
    g = load_tile(g_ptr, offs_m, offs_r, stride_gm, stride_gr, m_in, r_in)
    # Everything that uses the dropout mask comes before the main loop, so neither the mask nor
    # the x tile is live across it.
    if HAS_DROPOUT:
        keep = keep_tile(seed, offs_m, pid_k * BLOCK_N, K, threshold, BLOCK_N)
    if HAS_DA:
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, m_in, k_in)
        if HAS_DROPOUT:
            x = tl.where(keep, x.to(tl.float32) * scale, 0.0).to(x_ptr.dtype.element_ty)
        da_slot = da_ws_ptr + pid_m.to(tl.int64) * R * K
        store_tile(da_slot, tl.dot(tl.trans(g), x), offs_r, offs_k, K, 1, r_in, k_in)
    if HAS_DX:
        # The accumulator starts from the low-rank term (masked: D applies to it alone), so no
        # second BLOCK_M x BLOCK_N tile is live across the loop.
        acc = tl.dot(g, load_tile(a_ptr, offs_r, offs_k, stride_ar, stride_ak, r_in, k_in))
        if HAS_DROPOUT:
            acc = tl.where(keep, acc * scale, 0.0)
        for n0 in range(0, N, BLOCK_K):
            offs_n = n0 + tl.arange(0, BLOCK_K)
            n_in = offs_n < N
            dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, m_in, n_in)
            w = load_tile(w_ptr, offs_n, offs_k, stride_wn, stride_wk, n_in, k_in)
            acc = tl.dot(dy, w, acc)
        store_tile(dx_ptr, acc, offs_m, offs_k, stride_dxm, stride_dxk, m_in, k_in)
