"""Launchers for several adapters in one batch over a quantized frozen base, with the interface of the
table's ops "quant_multi_fwd" / "quant_multi_bwd" (see fused_lora.ops.quant):

    quant_multi_forward(x, wq, b, adapters, segs, seed) -> (Y, packed H)
    quant_multi_backward(dY, x, wq, adapters, H, segs, seed, need_dx, need_lora, need_db)
        -> (dx, [(dA_a, dB_a) or None], db)

`wq` is a `core.formats` layout (NF4Data / Int8Data), `adapters` ((A_a, B_a, s_a, p_a), ...), `segs` the grouped
layout (`core.segments.Segments`: `order`, the rows sorted by adapter, base rows first, and the `offsets` of
each adapter's run), H packed as the multi-adapter ops pack it (M x largest rank, row i for sorted
position i, its first r_a columns used, the rest zero).

Composed of the single-adapter quantized launchers (`quantized.launchers.forward_quant` / `backward_quant`: the W
tiles dequantized in the GEMMs' K loops), no kernel of its own: one call per adapter present on its rows
(a view when they are one run of consecutive rows, else gathered, and the results scattered back), and
one for the base rows (a zero rank-1 adapter). So the base GEMM's work is done once for the batch, in
pieces; the price against segment kernels (one launch over every row) is a launch sequence per adapter,
the gathers and scatters of scattered rows (x and Y in forward; dY, x and dX in backward) and small GEMMs
for adapters with few rows. auto times it against the torch row per shape, and checks it first.

Dropout: adapter a's mask is the single-adapter kernels' mask for the seed `core.dropout.adapter_seed(seed, a)`
over its rows in increasing order, which is the segment kernels' (`kernels.segments`) mask too: the triton
row draws one mask for a mixed batch whichever launcher runs it.
"""
from __future__ import annotations

import torch

from ...core.dropout import adapter_seed
from .launchers import backward_quant, check_quant_weight, forward_quant

__all__ = ["quant_multi_forward", "quant_multi_backward"]


def _groups(segs, n: int):
    """[(adapter index or -1, sorted positions lo..hi, rows)] for every group with rows; `rows` is a slice
    when they are one run of consecutive rows (one host read for all groups), else the int64 indices."""
    bounds = [(a, segs.offsets[a + 1], segs.offsets[a + 2]) for a in range(-1, n)]
    bounds = [(a, lo, hi) for a, lo, hi in bounds if hi > lo]
    if not bounds:
        return []
    order = segs.order
    firsts = order[torch.tensor([lo for _, lo, _ in bounds], device=order.device)]
    lasts = order[torch.tensor([hi - 1 for _, _, hi in bounds], device=order.device)]
    spans = torch.stack([firsts, lasts]).tolist()
    out = []
    for (a, lo, hi), first, last in zip(bounds, *spans):
        rows = slice(first, first + hi - lo) if last - first == hi - lo - 1 else order[lo:hi]
        out.append((a, lo, hi, rows))
    return out


def _take(t: torch.Tensor, rows) -> torch.Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _put(out: torch.Tensor, rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        out[rows] = src
    else:
        out.index_copy_(0, rows, src)


def _zero_adapter(x: torch.Tensor, N: int):
    """The base rows' stand-in adapter: rank 1, all zeros (its low-rank term adds exact zeros)."""
    return x.new_zeros(1, x.shape[1]), x.new_zeros(N, 1)


def quant_multi_forward(x, wq, bias, adapters, segs, seed):
    """(Y, packed H): Y[rows_a] = x[rows_a] W^T + b + s_a H_a B_a^T, H_a = (D_a x[rows_a]) A_a^T."""
    check_quant_weight(wq, x)
    M, N = x.shape[0], wq.shape[0]
    h = x.new_zeros((M, max([0] + [a[0].shape[0] for a in adapters])))
    groups = _groups(segs, len(adapters))
    y = None if len(groups) == 1 and isinstance(groups[0][3], slice) else torch.empty((M, N), dtype=x.dtype,
                                                                                        device=x.device)
    for a, lo, hi, rows in groups:
        if a < 0:
            lora_A, lora_B = _zero_adapter(x, N)
            ya, _ = forward_quant(_take(x, rows), wq, bias, lora_A, lora_B, 0.0, 0.0, 0)
        else:
            lora_A, lora_B, scaling, p = adapters[a]
            ya, ha = forward_quant(_take(x, rows), wq, bias, lora_A, lora_B, scaling, p, adapter_seed(seed, a))
            h[lo:hi, :lora_A.shape[0]] = ha
        if y is None:  # one group holding every row in order: its output is Y
            y = ya
        else:
            _put(y, rows, ya)
    return y, h


def quant_multi_backward(dy, x, wq, adapters, h, segs, seed, need_dx, need_lora, need_db):
    """(dx, [(dA_a, dB_a) or None], db): per adapter on its rows dx = dY W + D_a (G_a A_a) and dA_a, dB_a
    (the single-adapter backward with the adapter's seed), dY W alone on the base rows; db = dY's column sum."""
    check_quant_weight(wq, x)
    M, K = x.shape
    N = wq.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    pairs = [None] * len(adapters)
    for a, lo, hi, rows in _groups(segs, len(adapters)):
        want = a >= 0 and bool(need_lora[a])
        if not (need_dx or want):
            continue
        if a < 0:
            lora_A, lora_B = _zero_adapter(x, N)
            dxa, _, _, _ = backward_quant(_take(dy, rows), _take(x, rows), wq, lora_A, lora_B,
                                          x.new_zeros(hi - lo, 1), 0.0, 0.0, 0, need_dx, False)
        else:
            lora_A, lora_B, scaling, p = adapters[a]
            dxa, dA, dB, _ = backward_quant(_take(dy, rows), _take(x, rows), wq, lora_A, lora_B,
                                            h[lo:hi, :lora_A.shape[0]], scaling, p, adapter_seed(seed, a),
                                            need_dx, want)
            if want:
                pairs[a] = (dA, dB)
        if need_dx:
            _put(dx, rows, dxa)
    for a, (lora_A, lora_B, _, _) in enumerate(adapters):
        if need_lora[a] and pairs[a] is None:  # an adapter with no rows in the batch: zero gradients
            pairs[a] = (torch.zeros_like(lora_A), torch.zeros_like(lora_B))
    return dx, pairs, (dy.sum(0) if need_db else None)
