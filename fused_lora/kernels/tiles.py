"""Tile helpers shared by the kernels: masked 2-D tile access (int64 row offsets: no overflow on large
tensors) and the grouped program-to-tile order of the GEMMs."""
import triton
import triton.language as tl


@triton.jit
def tile_ptrs(ptr, offs_0, offs_1, stride_0, stride_1):
    return ptr + offs_0.to(tl.int64)[:, None] * stride_0 + offs_1.to(tl.int64)[None, :] * stride_1


@triton.jit
def load_tile(ptr, offs_0, offs_1, stride_0, stride_1, in_0, in_1):
    """ptr[offs_0, offs_1] where in_0 & in_1, zero elsewhere."""
    return tl.load(tile_ptrs(ptr, offs_0, offs_1, stride_0, stride_1), mask=in_0[:, None] & in_1[None, :], other=0.0)


@triton.jit
def store_tile(ptr, value, offs_0, offs_1, stride_0, stride_1, in_0, in_1):
    """ptr[offs_0, offs_1] = value (cast to ptr's dtype) where in_0 & in_1."""
    tl.store(tile_ptrs(ptr, offs_0, offs_1, stride_0, stride_1), value.to(ptr.dtype.element_ty),
             mask=in_0[:, None] & in_1[None, :])


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (tile row, tile column), GROUP_M row tiles at a time for L2 reuse."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % in_group) % group_size)
    pid_n = (pid % in_group) // group_size
    return pid_m, pid_n
