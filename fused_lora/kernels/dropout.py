"""In-kernel dropout: the mask of element (m, k) is a pure function of (seed, m * K + k).

Every kernel that needs D (forward shrink, backward dX epilogue, dA) calls `dropout_tile`, so the
mask regenerated in backward is bit-for-bit the one used in forward, and it is never stored.
"""
import torch
import triton
import triton.language as tl


@triton.jit
def keep_tile(seed, offs_m, offs_k, K, p):
    """Boolean keep mask of a tile: Philox(seed, m * K + k) >= p (int64 index: no overflow)."""
    idx = offs_m.to(tl.int64)[:, None] * K + offs_k.to(tl.int64)[None, :]
    return tl.rand(seed, idx) >= p


@triton.jit
def dropout_tile(x, seed, offs_m, offs_k, K, p, scale):
    """x * D for a tile: D = scale = 1 / (1 - p) where kept, else 0. x is fp32."""
    return tl.where(keep_tile(seed, offs_m, offs_k, K, p), x * scale, 0.0)


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, seed, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ones = tl.full((BLOCK_M, BLOCK_K), 1.0, tl.float32)
    kept = dropout_tile(ones, seed, offs_m, offs_k, K, p, 1.0)
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    out_ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(out_ptrs, (kept != 0).to(tl.int8), mask=inside)


def keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The boolean keep mask the Triton kernels use for `seed` on an M x K input."""
    M, K = shape
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if out.numel():
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        _keep_mask_kernel[grid](out, seed, M, K, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
