"""In-kernel dropout: the mask of element (m, k) is a pure function of (seed, m, k).

Every kernel that needs D (forward shrink, backward dX epilogue and dA) calls `keep_tile`, so the
mask regenerated in backward is bit for bit the one used in forward, whatever the tile shapes of
the kernels, and it is never stored.

One Philox call gives four 32-bit numbers, so element (m, k) takes component k % 4 of
Philox(seed, counter = m * ceil(K / 4) + k // 4): a quarter of the Philox work of one call per
element. An element is kept when the top 24 bits of its number are >= round(p * 2^24), so the
keep probability is 1 - round(p * 2^24) / 2^24 (within 3e-8 of 1 - p).
"""
import torch
import triton
import triton.language as tl


def keep_threshold(p: float) -> int:
    """The integer threshold the kernels compare 24 random bits against."""
    return int(round(p * (1 << 24)))


@triton.jit
def keep_tile(seed, offs_m, k0, K, threshold, BLOCK_K: tl.constexpr):
    """Boolean keep mask of rows offs_m and columns k0 .. k0 + BLOCK_K (k0 a multiple of 4)."""
    quads = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    counter = offs_m.to(tl.int64)[:, None] * ((K + 3) // 4) + quads.to(tl.int64)[None, :]
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    r = tl.join(tl.join(r0, r1), tl.join(r2, r3))  # [..., quad, 2, 2]: component t at [t // 2, t % 2]
    r = tl.reshape(r, (offs_m.shape[0], BLOCK_K))
    return (r >> 8).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["seed"])
def _keep_mask_kernel(out_ptr, seed, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    keep = keep_tile(seed, offs_m, k0, K, threshold, BLOCK_K)
    inside = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=inside)


# Tiles unlike any kernel config's, so tests comparing against this mask also check that the
# mask does not depend on tiling.
_MASK_TILE = (16, 64)


def keep_mask(seed: int, shape, p: float, device) -> torch.Tensor:
    """The boolean keep mask the Triton kernels use for `seed` on an M x K input."""
    M, K = shape
    out = torch.empty((M, K), dtype=torch.int8, device=device)
    if out.numel():
        bm, bk = _MASK_TILE
        _keep_mask_kernel[(triton.cdiv(M, bm), triton.cdiv(K, bk))](out, seed, M, K, keep_threshold(p),
                                                                   BLOCK_M=bm, BLOCK_K=bk)
    return out.bool()
