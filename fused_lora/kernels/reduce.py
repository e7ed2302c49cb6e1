"""The deterministic reduction pass: sums of fp32 partials, in a fixed order, cast on store.

The backward kernels write per-program partial sums (of G, dA, dB) instead of adding into shared
buffers with atomics; this pass adds them up slot by slot, always in the same order, and writes the
result in its final dtype (so there is no separate zero-fill or cast). Two independent sums can
share one launch (dA and dB).
"""
import triton
import triton.language as tl

BLOCK = 1024  # elements per program


@triton.jit
def _sum_slots(ws_ptr, out_ptr, P, L, block_id, BLOCK: tl.constexpr):
    offs = block_id.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < L
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ptrs = ws_ptr + offs
    for _ in range(0, P):
        acc += tl.load(ptrs, mask=inside, other=0.0)
        ptrs += L  # pointer arithmetic is 64-bit: no overflow of p * L
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=inside)


@triton.jit
def sum_partials_kernel(ws0_ptr, out0_ptr, ws1_ptr, out1_ptr, P0, L0, P1, L1, BLOCK: tl.constexpr):
    """out0[i] = sum_p ws0[p, i] for i < L0 and out1[i] = sum_p ws1[p, i] for i < L1 (both contiguous):
    the first cdiv(L0, BLOCK) programs do the first sum, the rest the second."""
    pid = tl.program_id(0)
    first = tl.cdiv(L0, BLOCK)
    if pid < first:
        _sum_slots(ws0_ptr, out0_ptr, P0, L0, pid, BLOCK)
    else:
        _sum_slots(ws1_ptr, out1_ptr, P1, L1, pid - first, BLOCK)


def sum_partials(*sums) -> None:
    """Launch one reduction pass for one or two (workspace (P, ...) fp32, out) pairs."""
    (ws0, out0), (ws1, out1) = sums if len(sums) == 2 else (sums[0], sums[0])
    L0, L1 = out0.numel(), (out1.numel() if len(sums) == 2 else 0)
    grid = (triton.cdiv(L0, BLOCK) + triton.cdiv(L1, BLOCK),)
    sum_partials_kernel[grid](ws0, out0, ws1, out1, ws0.shape[0], L0, ws1.shape[0], L1, BLOCK=BLOCK)
