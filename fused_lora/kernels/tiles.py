"""Masked 2-D tile access shared by the kernels (int64 row offsets: no overflow on large tensors)."""
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
