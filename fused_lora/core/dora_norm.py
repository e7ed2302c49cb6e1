"""DoRA's weight norm without the out x in matrix W + s B A (peft's `use_dora=True`: n_j = ||W_j + s B_j A||):

    n_j^2 = ||W_j||^2 + 2 s B_j . (A W_j^T) + s^2 B_j (A A^T) B_j^T

in float32 (float64 for float64 inputs). ||W_j||^2 is recomputed per forward, in the same read of W
as A W^T (one more pass over W in fp32, none extra for a low-precision W, whose fp32 row chunks serve
both): a cache keyed on the weight's version missed writes through `.data` and, under autocast,
keyed a per-call cast copy whose address the allocator reuses. A W^T is an r x out product (2 r in
out FLOPs: r/M of the forward GEMM) and A A^T is r x r. The identity cancels when W_j + s B_j A is small against W_j
(||W_j||^2 + s^2 ||B_j A||^2 over n_j^2 large); such rows (n_j^2 < 2^-6 of that sum, so the
identity's rounding stays below ~64 ulp of n_j^2) are recomputed directly (a rows x in temporary,
rows = the few bad ones; on CUDA, without a host sync, always the DIRECT_ROWS rows nearest to
cancelling, and more such rows in one layer raise through torch._assert_async).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

CANCELLATION = 2.0 ** -6  # n^2 below this fraction of ||W_j||^2 + s^2 ||B_j A||^2: computed directly


_CHUNK_ELEMENTS = 1 << 24  # rows of a low-precision W cast to fp32 at a time (64 MiB)


# On CUDA nothing here waits for the GPU (a host sync per layer would stall the launch queue): the
# DIRECT_ROWS rows nearest to cancelling are always recomputed directly (the DoRA op does the same for
# its zero columns: ops.dora.ZERO_COLUMNS), and more than that many cases raise through torch._assert_async.
DIRECT_ROWS = 64


SYNC_FREE: Optional[bool] = None  # None: on CUDA only (tests set True to run that path on the CPU)


def sync_free(t: Tensor) -> bool:
    """Whether to take the paths that never wait for the device (CUDA; SYNC_FREE overrides)."""
    return t.is_cuda if SYNC_FREE is None else SYNC_FREE


def acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_chunks(weight: Tensor, acc: torch.dtype):
    """(start, rows of W as `acc`) in chunks, so a low-precision W is never copied whole to fp32."""
    N, K = weight.shape
    step = N if weight.dtype == acc else max(1, _CHUNK_ELEMENTS // max(K, 1))
    for i in range(0, N, step):
        yield i, weight[i:i + step].to(acc)


@torch.no_grad()
def weight_sq_norms(weight: Tensor, acc: Optional[torch.dtype] = None) -> Tensor:
    """||W_j||^2 per row of W (N x K), in `acc` (default fp32, fp64 for fp64 W)."""
    acc = acc or acc_dtype(weight)
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for i, rows in _row_chunks(weight, acc):
        out[i:i + rows.shape[0]] = (rows * rows).sum(1)
    return out


@torch.no_grad()
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                weight_sq: Optional[Tensor] = None) -> Tensor:
    """n_j = ||W_j + s B_j A|| for W (N x K), A (r x K), B (N x r), without forming W + s B A;
    fp32 (fp64 if any input is fp64), as ||W_j|| sqrt(1 + t_j) with t_j = (2 s B_j . (A W_j^T) +
    s^2 ||B_j A||^2) / ||W_j||^2. Where the low-rank terms of row j are exactly zero (B_j = 0: a fresh
    adapter) n_j is peft's ||W_j|| bit for bit: torch.linalg.norm over W's rows in W's dtype and layout, as
    peft reduces W + s B A, so peft's initial magnitude gives a column scale of exactly 1 and the layer is its
    base. Elsewhere ||W_j|| is reduced in fp32 (for a 16-bit W, peft's norm rounded to W's dtype would cost
    the identity its accuracy; the two differ by that rounding). `weight_sq`: ||W_j||^2 if already known
    (`weight_sq_norms`; its square root then stands for ||W_j||, at zero low-rank terms too); otherwise
    computed here, from the same reads of W as the cross term (W is read as it is now: a cache would miss
    writes through `.data`, which bump no version counter)."""
    acc = acc_dtype(weight, lora_A, lora_B)
    A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
    weight = weight.detach()
    # peft's ||W_j||: the same reduction peft runs (in W's dtype, over W's own layout), one pass over W
    peft_norm = torch.linalg.norm(weight, dim=1).to(acc) if weight_sq is None else None
    if weight.dtype == acc:  # B_j . (A W_j^T), W read in place; peft's reduction is the fp32 one
        cross = torch.mm(weight, A.t()).mul_(B).sum(1)
        w_norm = peft_norm
    else:  # a low-precision W: fp32 copies of row chunks only, each read for both terms
        cross = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
        w_norm = torch.empty_like(cross) if weight_sq is None else None
        for i, rows in _row_chunks(weight, acc):
            cross[i:i + rows.shape[0]] = (torch.mm(rows, A.t()) * B[i:i + rows.shape[0]]).sum(1)
            if w_norm is not None:
                w_norm[i:i + rows.shape[0]] = torch.linalg.vector_norm(rows, dim=1)
    if weight_sq is not None:
        w_norm = weight_sq.to(acc).sqrt()
        peft_norm = w_norm
    weight_sq = w_norm.square()
    lora_sq = torch.mm(B, torch.mm(A, A.t())).mul_(B).sum(1)  # ||B_j A||^2
    s = float(scaling)
    lora_sq.mul_(s * s)
    low = torch.add(lora_sq, cross, alpha=2.0 * s)  # n_j^2 - ||W_j||^2
    n2 = weight_sq + low
    # ||W_j|| sqrt(1 + t_j); a zero row of W: sqrt(n_j^2) (= s ||B_j A||)
    n = torch.where(weight_sq > 0, w_norm * (low / weight_sq).add_(1.0).clamp_min_(0.0).sqrt_(),
                    n2.clamp_min(0.0).sqrt())
    zero = (lora_sq == 0) & (cross == 0)  # row j's low-rank term is zero (B_j = 0: a fresh adapter)
    if n.is_meta:  # a model built on the meta device (weights come later): shapes only, no values to guard
        return n
    ratio = n2 / (weight_sq + lora_sq)  # 1 without cancellation, 0 where W_j + s B_j A vanishes
    if sync_free(n2):
        k = min(n2.shape[0], DIRECT_ROWS)
        bad = torch.topk(ratio, k, largest=False).indices  # the rows nearest to cancelling, recomputed
        torch._assert_async(ratio.kthvalue(k).values > CANCELLATION if k < n2.shape[0] else torch.tensor(True),
                            f"DoRA weight norm: more than {k} rows of one layer cancel (||W_j + s B_j A|| tiny "
                            "beside ||W_j||); raise fused_lora.core.dora_norm.DIRECT_ROWS")
    else:
        bad = (ratio <= CANCELLATION).nonzero().flatten() if bool((ratio <= CANCELLATION).any()) else None
    if bad is not None:
        rows = weight.detach()[bad].to(acc) + s * torch.mm(B[bad], A)
        n[bad] = torch.linalg.vector_norm(rows, dim=1)
    return torch.where(zero, peft_norm, n)  # after the direct rows: the sync-free path recomputes any k rows
