"""The expert stack's own gradients, asked for only when the base is trained: per expert, over its rows.

    grouped_wgrad_kernel:   out[e] = U_e^T V_e (I x J), U_e and V_e expert e's rows of U (M x I) and V (M x J):
                            dW_e = dY_e^T x_e for an (E, N, K) stack (U = dY, V = x), x_e^T dY_e for an
                            (E, K, N) one (U = x, V = dY), so both layouts are one kernel writing a
                            contiguous gradient of the weight's shape.
    grouped_colsum_kernel:  out[e] = the sum of expert e's rows of dY (db_e).

Expert e's rows are offsets[e] .. offsets[e + 1] (int32 (E + 1,), on the device: `core.segments`'
device_offsets, no host read). One program per output tile loops over its expert's rows (fp32
accumulator, one store): no partials, no atomics, so both are bit-identical run to run; an expert no
row reaches runs no iteration and stores zeros.
"""
import triton
import triton.language as tl

from ..tiles import grouped_tile, load_tile, store_tile


@triton.jit
def grouped_wgrad_kernel(
    u_ptr, v_ptr, out_ptr, offsets_ptr,
    stride_um, stride_ui, stride_vm, stride_vj, stride_oe, stride_oi, stride_oj,
    I, J, n_tiles,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Program e * n_tiles + t: tile t (BLOCK_M x BLOCK_N, n_tiles of them per expert) of out[e]; the
    reduction runs over the expert's rows, BLOCK_K at a time."""
    pid = tl.program_id(0)
    e = pid // n_tiles
    pid_i, pid_j = grouped_tile(pid % n_tiles, I, J, BLOCK_M, BLOCK_N, GROUP_M)
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    offs_i = pid_i * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = pid_j * BLOCK_N + tl.arange(0, BLOCK_N)
    i_in = offs_i < I
    j_in = offs_j < J
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_K):
        offs_m = m0 + tl.arange(0, BLOCK_K)
        m_in = offs_m < end
        u = load_tile(u_ptr, offs_i, offs_m, stride_ui, stride_um, i_in, m_in)  # U_e^T tile
        v = load_tile(v_ptr, offs_m, offs_j, stride_vm, stride_vj, m_in, j_in)
        acc = tl.dot(u, v, acc)
    store_tile(out_ptr + e.to(tl.int64) * stride_oe, acc, offs_i, offs_j, stride_oi, stride_oj, i_in, j_in)


@triton.jit
def grouped_colsum_kernel(
    dy_ptr, out_ptr, offsets_ptr,
    stride_dym, stride_dyn, stride_oe,
    N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Program (e, j): columns j * BLOCK_N.. of out[e] = the sum of dY's rows offsets[e] .. offsets[e + 1]
    (out (E, N), unit column stride), BLOCK_M rows at a time in fp32."""
    e = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < N
    start = tl.load(offsets_ptr + e)
    end = tl.load(offsets_ptr + e + 1)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dy = load_tile(dy_ptr, offs_m, offs_n, stride_dym, stride_dyn, offs_m < end, n_in)
        acc += tl.sum(dy.to(tl.float32), axis=0)
    tl.store(out_ptr + e.to(tl.int64) * stride_oe + offs_n, acc.to(out_ptr.dtype.element_ty), mask=n_in)
