"""The PyTorch row's grouped op (LoRA on expert weights), forward and backward: a loop over the groups hit.

    Y[rows of e] = x_e W_e^T + b_e + s H_e B_e^T,   H_e = (D x_e) A_e^T       e = 0 .. E - 1

x (M x K) holds its rows sorted by group (`core.segments.grouped`: group e is one slice of rows), so every
product reads x and dY and writes Y, H and dX through views of that slice: no gather, no scatter. Y's slice
is first written with b_e + s H_e B_e^T (torch.addmm's out=) and the base product accumulated onto it by the
GEMM itself (addmm_, beta = 1), so besides Y no M x N temporary exists; dX likewise (D (G_e A_e) first, then
dY_e W_e onto it). Groups with no row (experts no token reaches) are skipped: their dA, dB (and dW, db when
asked) are zero. The base weight is read through its strides (W_e^T is a view of `weight[e]`, either layout),
never copied as a stack.

The base products are a loop, not torch._grouped_mm: it is exactly as accurate (the same per-group GEMMs:
identical float32 results, measured) but writes no output in place, so the base and low-rank terms would
need an M x N temporary to be added, and where the groups carry real work it is no faster (one thread,
2048 x 512 -> 1024, fp32: 8 experts 30.9 ms loop / 30.9 ms grouped_mm, 64 experts of ~32 rows 63.0 /
58.2 ms). The low-rank products are another matter: thin GEMMs (one side r wide) whose per-call cost
dominates, six per expert and projection. On the CPU, in the dtypes torch._grouped_mm takes (not float64:
the reference's and gradcheck's), each runs as one grouped call over every expert (`batched`): H and the
low-rank term of Y (which then starts Y: the base product is accumulated onto it, no temporary), G, dA, dB
and G A (which starts dX); experts no row reaches get zero dA, dB from it. Measured on 2 cores, 8 experts of
128 rows, K 512, N 2048, r 16: 159 against 210 us for H, 682 against 773 us for dY B. Elsewhere the loop
below computes them. Reading the group offsets on the host is one device-to-host read of E integers per
call (made once per layout: the op's value check reads the same); the Triton row builds its tile table on
the device instead.

Dropout: one M x K keep mask for the whole batch, `keep_mask(seed, (M, K), p)` (this row's generator,
`core.dropout`), each group reading its rows: row m's mask does not depend on how the rows are grouped, and
is drawn again in backward (never stored). With one group it is the single-adapter op's mask on x.

Backward (per group e, on its rows; s applied to the small operand before each product with dY):
    G_e = dY_e (s B_e);  dB_e = dY_e^T (s H_e);  dA_e = G_e^T (D x_e);  dX_e = D (G_e A_e) + dY_e W_e
    dW_e = dY_e^T x_e (x_e^T dY_e transposed), db_e = the sum of dY_e's rows, when asked.
Each gradient of expert e is one GEMM over its rows, in a fixed order: deterministic.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.dropout import keep_mask
from ..core.segments import GroupedSegments
from .dense import dropped, scaled_mm


def out_features(weight: Tensor, transposed: bool) -> int:
    """N of the expert stack: weight is (E, N, K), or (E, K, N) when transposed."""
    return weight.shape[2] if transposed else weight.shape[1]


def expert_t(weight: Tensor, e: int, transposed: bool) -> Tensor:
    """W_e^T (K x N), a view of expert e's weight in either layout."""
    return weight[e] if transposed else weight[e].t()


def _keep(x: Tensor, rank: int, dropout_p: float, seed: int, mask_fn=keep_mask) -> Optional[Tensor]:
    """The whole batch's M x K keep mask (None without dropout or without a low-rank term)."""
    return mask_fn(seed, x.shape, dropout_p, x.device) if dropout_p > 0.0 and rank else None


# torch._grouped_mm's dtypes of float32's range: it has no alpha, so s is put on a thin operand there, which float16
# can hold too coarsely (dense.scaled_mm): float16 takes the loop
BATCHED_DTYPES = (torch.float32, torch.bfloat16)


def batched(x: Tensor, rank: int, n: int, dy: Optional[Tensor] = None) -> bool:
    """Whether the low-rank products run as one torch._grouped_mm each (see the module doc): on the CPU, in its
    dtypes, where every operand and result it would make has rows of whole 16-byte units (its layout rule: K,
    N and r multiples of 16 bytes; x and dY contiguous and aligned). The loop runs everything else."""
    if not (rank > 0 and x.device.type == "cpu" and x.dtype in BATCHED_DTYPES and hasattr(torch, "_grouped_mm")):
        return False
    unit = 16 // x.element_size()
    dense = [t for t in (x, dy) if t is not None]
    return (all(d % unit == 0 for d in (x.shape[1], n, rank))
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 for t in dense))


def group_ends(segs: GroupedSegments, device: torch.device) -> Tensor:
    """The groups' end rows (E,), int32: torch._grouped_mm's offsets."""
    return torch.tensor(segs.offsets[2:], dtype=torch.int32, device=device)


def grouped_forward(x: Tensor, segs: GroupedSegments, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                    lora_B: Tensor, scaling: float, dropout_p: float, seed: int,
                    transposed: bool) -> tuple[Tensor, Tensor]:
    """(Y (M x N), H (M x r)) as in the module doc; lora_A (E x r x K), lora_B (E x N x r); r = 0 is the base
    alone (H is M x 0)."""
    M, r = x.shape[0], lora_A.shape[1]
    keep = _keep(x, r, dropout_p, seed)
    if batched(x, r, out_features(weight, transposed)):
        ends = group_ends(segs, x.device)
        # the thin stacks in their own layout (a copy only for views such as peft's factors: E x r x (K + N))
        h = torch._grouped_mm(dropped(x, keep, dropout_p), lora_A.contiguous().transpose(1, 2), offs=ends)
        sB = (lora_B * scaling).contiguous()  # no alpha in torch._grouped_mm: s on the thin B (BATCHED_DTYPES)
        y = torch._grouped_mm(h, sB.transpose(1, 2), offs=ends)
        for e in segs.hit():
            rows = segs.span(e)
            ye = y[rows]
            if bias is not None:
                ye.add_(bias[e])
            ye.addmm_(x[rows], expert_t(weight, e, transposed))
        return y, h
    y = x.new_empty(M, out_features(weight, transposed))
    h = x.new_empty(M, r)
    for e in segs.hit():
        rows = segs.span(e)
        xe, ye, w_t = x[rows], y[rows], expert_t(weight, e, transposed)
        if r == 0:
            if bias is None:
                torch.mm(xe, w_t, out=ye)
            else:
                torch.addmm(bias[e], xe, w_t, out=ye)
            continue
        he = h[rows]
        torch.mm(dropped(xe, None if keep is None else keep[rows], dropout_p), lora_A[e].t(), out=he)
        if bias is None:  # s inside the product (dense.scaled_mm)
            ye.addmm_(he, lora_B[e].t(), beta=0, alpha=scaling)
        else:
            torch.addmm(bias[e], he, lora_B[e].t(), alpha=scaling, out=ye)
        ye.addmm_(xe, w_t)
    return y, h


def grouped_backward(dy: Tensor, x: Tensor, segs: GroupedSegments, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                     h: Tensor, scaling: float, dropout_p: float, seed: int, transposed: bool,
                     need_dx: bool, need_lora: bool, need_dw: bool, need_db: bool) -> tuple[Optional[Tensor], ...]:
    """(dx (M x K), dA (E x r x K), dB (E x N x r), dW (weight's shape), db (E x N)), None where not needed."""
    E, r = lora_A.shape[:2]
    N = out_features(weight, transposed)
    keep = _keep(x, r, dropout_p, seed)
    scale = 1.0 / (1.0 - dropout_p)
    hit = segs.hit()
    dW = x.new_empty(weight.shape) if need_dw else None
    db = x.new_empty(E, N) if need_db else None
    for e in set(range(E)) - set(hit):  # experts no row reaches
        for grad in (dW, db):
            if grad is not None:
                grad[e].zero_()
    if batched(x, r, N, dy):
        return _batched_backward(dy, x, segs, weight, lora_A, lora_B, h, scaling, dropout_p, keep, transposed,
                                 need_dx, need_lora, dW, db)
    dx = x.new_empty(x.shape) if need_dx else None  # every row is in one group: every row is written
    dA = x.new_zeros(lora_A.shape) if need_lora else None
    dB_t = x.new_zeros(E, r, N) if need_lora else None  # r x N per expert: the faster orientation, then transposed
    for e in hit:
        rows = segs.span(e)
        dye, xe = dy[rows], x[rows]
        keep_e = None if keep is None else keep[rows]
        g = scaled_mm(dye, lora_B[e], scaling) if r and (need_dx or need_lora) else None  # m_e x r
        if need_lora and r:
            dB_t[e].addmm_(h[rows].t(), dye, beta=0, alpha=scaling)
            torch.mm(g.t(), dropped(xe, keep_e, dropout_p), out=dA[e])
        if need_dx:
            dxe, w = dx[rows], expert_t(weight, e, transposed).t()  # W_e: N x K
            if r == 0:
                torch.mm(dye, w, out=dxe)
            elif keep_e is None:
                torch.mm(g, lora_A[e], out=dxe).addmm_(dye, w)
            else:
                torch.mm(g, lora_A[e], out=dxe).mul_(keep_e).addmm_(dye, w, beta=scale)
        _base_gradients(e, dye, xe, dW, db, transposed)
    dB = dB_t.transpose(1, 2).contiguous() if need_lora else None
    return dx, dA, dB, dW, db


def _batched_backward(dy: Tensor, x: Tensor, segs: GroupedSegments, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      h: Tensor, scaling: float, dropout_p: float, keep: Optional[Tensor], transposed: bool,
                      need_dx: bool, need_lora: bool, dW: Optional[Tensor], db: Optional[Tensor]) -> tuple:
    """`grouped_backward` with each low-rank product one torch._grouped_mm over every expert (`batched`); the
    same formulas, s applied to the thin operand before each product with dY. dW and db (allocated, experts
    not hit already zero) are filled here."""
    ends = group_ends(segs, x.device)
    dx = dA = dB = None
    g = torch._grouped_mm(dy, lora_B.contiguous() * scaling, offs=ends) if need_dx or need_lora else None  # M x r
    if need_lora:
        dB = torch._grouped_mm((h * scaling).t(), dy, offs=ends).transpose(1, 2).contiguous()  # E x N x r
        dA = torch._grouped_mm(g.t(), dropped(x, keep, dropout_p), offs=ends)  # E x r x K
    if need_dx:
        dx = torch._grouped_mm(g, lora_A.contiguous(), offs=ends)  # G A, then D, then dY_e W_e onto it
        if keep is not None:
            dx.mul_(keep)
    beta = 1.0 if keep is None else 1.0 / (1.0 - dropout_p)
    for e in segs.hit():
        rows = segs.span(e)
        dye, xe = dy[rows], x[rows]
        if need_dx:
            dx[rows].addmm_(dye, expert_t(weight, e, transposed).t(), beta=beta)
        _base_gradients(e, dye, xe, dW, db, transposed)
    return dx, dA, dB, dW, db


def _base_gradients(e: int, dye: Tensor, xe: Tensor, dW: Optional[Tensor], db: Optional[Tensor],
                    transposed: bool) -> None:
    """Expert e's dW_e (in the stack's layout) and db_e from its rows, where asked for (not None)."""
    if dW is not None:
        if transposed:
            torch.mm(xe.t(), dye, out=dW[e])
        else:
            torch.mm(dye.t(), xe, out=dW[e])
    if db is not None:
        torch.sum(dye, 0, out=db[e])


def differentiable_forward(x: Tensor, segs: GroupedSegments, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                           lora_B: Tensor, scaling: float, dropout_p: float, seed: int, transposed: bool,
                           mask_fn=keep_mask) -> Tensor:
    """Y as `grouped_forward` computes it (same mask), with out-of-place autograd-differentiable ops: what double
    backward differentiates (recomputed there, so the fast path keeps no graph). `mask_fn`: the keep_mask of
    the row that ran the forward."""
    r = lora_A.shape[1]
    keep = _keep(x, r, dropout_p, seed, mask_fn)
    parts = []
    for e in range(lora_A.shape[0]):
        rows = segs.span(e)
        xe = x[rows]
        ye = xe @ expert_t(weight, e, transposed)
        if bias is not None:
            ye = ye + bias[e]
        if r:
            xd = xe if keep is None else xe * keep[rows] / (1.0 - dropout_p)
            ye = ye + scaling * ((xd @ lora_A[e].t()) @ lora_B[e].t())
        parts.append(ye)
    return torch.cat(parts)
