"""The PyTorch path for several adapters in one batch (a per-row adapter index), forward and backward.

    y[m] = x[m] W^T + b + s_a B_a A_a (D_a x[m])      a = row_adapter[m]; a = -1: no adapter

Layout: `fused_lora.core.segments` (the rows sorted by adapter, shared by every implementation); here
each adapter's rows are further cut into `pieces` (runs of consecutive rows, or chunks of scattered ones).

Two ways to compute the low-rank terms, chosen per call by the adapters' total rank (`dense`):

- Dense ("stacked adapters", total rank <= DENSE_MAX_RANK): the adapters stacked into
  A_cat = [A_1; ...; A_n] (R x K, R = sum of ranks) and B_cat = [B_1 ... B_n] (N x R), and a row/column mask S (M x R),
  S[m, c] = s_a when column c belongs to adapter a = row_adapter[m], else 0 (base rows: all 0):
      forward   H = (D x) A_cat^T;  y += (H * S) B_cat^T
      backward  G = (dY B_cat) * S;  dB_cat^T = (H * S)^T dY;  dA_cat = G^T (D x);  dx += D (G A_cat)
  One GEMM per product for the whole batch, whatever the number of adapters and runs, no gather of
  x or dY, no host work (without dropout no device-to-host sync at all). S zeroes every other
  adapter's columns, so each adapter's gradients still come from its own rows only; since 0 * NaN is
  NaN, the operands shared across adapters are made finite first and an adapter whose own weights or
  rows held a NaN/inf gets NaN results (its rows' outputs, or its gradients; `_Stacked._bad_adapters`):
  one adapter's NaN/inf never reaches another's rows or gradients, as on the per-run path (where the
  bad adapter's own results are non-finite entry by entry, not all NaN). The price: the
  six low-rank GEMMs are R wide instead of r_a (n times their FLOPs for n equal adapters).
  Why DENSE_MAX_RANK = 64 (2048 x 1024 x 1024, r = 16 per adapter, 16 runs of 128 rows;
  benchmarks/RESULTS.md, "several adapters: the dense path"): on one thread the run-by-run path is
  cheaper at every R (forward+backward 1.11x the base GEMMs against 1.28x dense at R = 64, 1.40x at
  R = 128, 1.80x at R = 256): its small GEMMs cost little there. On 2 threads of a loaded machine each
  small op pays a thread synchronisation, and the 6 x (number of runs) ops of the run-by-run path
  cost 2-4x the base GEMMs against 1.8-2.5x dense at every R. Up to R = 64 (4 adapters of rank 16)
  the dense path's extra FLOPs stay within ~15% of the base GEMMs, about what the run-by-run path's
  overhead costs on a quiet 2-core machine, and it wins by far on a busy one; past it the extra
  FLOPs grow with R while the run-by-run path's overhead does not.
- Per run (larger total rank), on each adapter's rows only:
  - rows that form long runs of consecutive rows (the usual case: one adapter per sample of a
    sequence) are read and written run by run through views: H = (D x[s:e]) A^T, then
    y[s:e] += s H B^T in place (addmm_), no gather, no M x N temporary;
  - scattered rows (runs shorter than MIN_RUN_ROWS on average) are gathered with index_select and
    written back with index_add_, in chunks of at most CHUNK_ROWS rows, so temporaries stay
    CHUNK_ROWS x N (never M x N). The indices within a chunk are distinct, so index_add_ writes every
    element once: deterministic on every device.
  dA_a, dB_a are sums over that adapter's rows only, accumulated chunk after chunk in a fixed order
  (in float32 for float16/bfloat16 inputs when there is more than one chunk), so deterministic too.
The base GEMM runs once for the whole batch (y = x W^T + b, dx = dY W). Both paths return the same
packed H (`packed_h_shape`: the custom ops' contract) and draw the same dropout masks, so the two
agree up to rounding and backward may take either path whatever forward took.

Dropout: adapter a's keep mask is `keep_mask(adapter_seed(seed, a), (m_a, K), p_a)` over its m_a
rows in increasing row order, drawn for its rows only (cheap: M x K bits in all, whatever the number
of adapters) and drawn again in backward; the dense path places them into one M x K mask (row m
scaled by its adapter's 1 / (1 - p_a)). So a mixed batch computes, for each adapter, exactly what
the single-adapter op computes on that adapter's rows with the seed `adapter_seed(seed, a)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor

from ..core.dropout import adapter_seed, keep_mask
from ..core.segments import Adapter, Segments, h_of, packed_h_shape
from .dense import dropped, scaled_mm

CHUNK_ROWS = 512  # scattered rows are handled this many at a time: temporaries of CHUNK_ROWS x N at most
MIN_RUN_ROWS = 32  # runs of consecutive rows at least this long (on average) are used through views
DENSE_MAX_RANK = 64  # the dense path runs while the adapters' ranks sum to at most this (module doc)
Rows = Union[slice, Tensor]


@dataclass(frozen=True)
class Piece:
    """Some rows of one adapter: `rows` of x (a slice, or distinct int64 indices), which are its
    rows `lo:hi` in the adapter's own (increasing) row order."""
    rows: Rows
    lo: int
    hi: int


def pieces(segs: Segments, adapter: int) -> list[Piece]:
    """The adapter's rows as slices, one per run of consecutive rows, when its runs are long (at least
    MIN_RUN_ROWS rows on average: e.g. one adapter per sample of a sequence), else as chunks of at most
    CHUNK_ROWS indices."""
    m = segs.count(adapter)
    if m == 0:
        return []
    rows = segs.rows(adapter)
    starts = torch.nonzero(rows[1:] - rows[:-1] != 1).squeeze(1)  # increasing rows: a run ends where +1 fails
    if m >= MIN_RUN_ROWS * (starts.numel() + 1):
        lo = [0] + (starts + 1).tolist()
        hi = lo[1:] + [m]
        return [Piece(slice(first, first + e - s), s, e) for first, s, e in zip(rows[lo].tolist(), lo, hi)]
    return [Piece(rows[lo:lo + CHUNK_ROWS], lo, min(m, lo + CHUNK_ROWS)) for lo in range(0, m, CHUNK_ROWS)]


def _take(t: Tensor, rows: Rows) -> Tensor:
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def _add_rows(out: Tensor, rows: Rows, src: Tensor, alpha: float = 1.0) -> None:
    """out[rows] += alpha * src."""
    if isinstance(rows, slice):
        out[rows].add_(src, alpha=alpha)
    else:
        out.index_add_(0, rows, src, alpha=alpha)


def _add_product(out: Tensor, rows: Rows, a: Tensor, b: Tensor, alpha: float) -> None:
    """out[rows] += alpha * a @ b; in place through a view for a slice (no temporary)."""
    if isinstance(rows, slice):
        out[rows].addmm_(a, b, alpha=alpha)
    else:  # alpha inside the product, not after a float16 a @ b (dense.scaled_mm)
        out.index_add_(0, rows, scaled_mm(a, b, alpha))


def _mask(seed: int, adapter: int, m: int, K: int, p: float, device, mask_fn=keep_mask) -> Optional[Tensor]:
    return mask_fn(adapter_seed(seed, adapter), (m, K), p, device) if p > 0.0 else None


# ------------------------------------------------------------------ the dense path (stacked adapters)

def dense(adapters: Sequence[Adapter]) -> bool:
    """Whether the dense path (the adapters stacked, module doc) computes these adapters' low-rank terms:
    their ranks sum to at most DENSE_MAX_RANK (and to more than 0)."""
    return 0 < sum(a[0].shape[0] for a in adapters) <= DENSE_MAX_RANK


def _device_table(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host table on `device`; on CUDA through pinned memory without blocking (a plain copy from
    pageable memory waits for the GPU's queue: a sync)."""
    table = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def _scale_dtype(x: Tensor) -> torch.dtype:
    """The dense path's scalings (s_a, 1 / (1 - p_a)) in float32, in float64 for float64 inputs (a float32
    s_a would round float64 results at ~1e-8)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _Stacked:
    """One call's adapters stacked (A_cat R x K, B_cat N x R, R the sum of ranks) and the tables that
    place the columns: adapter a owns columns starts[a]:starts[a] + r_a."""

    def __init__(self, x: Tensor, adapters: Sequence[Adapter], segs: Segments):
        device = x.device
        ranks = [a[0].shape[0] for a in adapters]
        self.starts = [0]
        for r in ranks:
            self.starts.append(self.starts[-1] + r)
        self.R, self.rw = self.starts[-1], max(ranks)
        self.a_cat = torch.cat([a[0] for a in adapters])  # R x K
        self.b_cat = torch.cat([a[1] for a in adapters], 1)  # N x R
        # Per column: its adapter, its place within the adapter; per row (index a + 1, the base first):
        # the first column and the rank of the row's adapter.
        cols = _device_table([[a for a, r in enumerate(ranks) for _ in range(r)],
                              [j for r in ranks for j in range(r)]], torch.int64, device)
        per_row = _device_table([[0] + self.starts[:-1], [0] + ranks], torch.int64, device)
        self.col_scale = _device_table([float(a[2]) for a, r in zip(adapters, ranks) for _ in range(r)],
                                       _scale_dtype(x), device)
        self.col_pos, self.col_adapter, self.n = cols[1], cols[0], len(adapters)
        # The columns of an adapter with a NaN/inf weight scaled by NaN (`_bad_adapters`): its rows' results NaN.
        weight_bad = ~(torch.isfinite(self.a_cat).all(1) & torch.isfinite(self.b_cat).all(0))
        self.col_scale = torch.where(self._bad_columns(self._bad_adapters(self.col_adapter, weight_bad)),
                                     float("nan"), self.col_scale)
        # The scalings reach the GEMMs as s_a / peak on an operand and peak through the GEMM's alpha
        # (dense.scaled_mm): with one s for every adapter (the usual case) the operand is not scaled at all, and
        # a float16 s_a B_a never falls below the normal range where s_a dY B_a is a normal value.
        self.peak = max((abs(float(a[2])) for a in adapters), default=0.0) or 1.0
        self.col_scale = self.col_scale / self.peak
        row = segs.row_adapter + 1
        self.row_start, self.row_rank = per_row[0].index_select(0, row), per_row[1].index_select(0, row)
        self.match = segs.row_adapter.unsqueeze(1) == cols[0].unsqueeze(0)  # M x R: column c is row m's

    # A GEMM over all stacked columns (or all rows) multiplies another adapter's NaN/inf by S's zeros: NaN.
    # So the operands that GEMMs share across adapters are made finite first (weights element by element,
    # activations row by row) and an adapter whose own weights or rows held a NaN/inf gets NaN results
    # (its columns' scale NaN, its gradients NaN). Adapter-level and on the device: no sync, and without
    # M x N masks (one reduction and one select per activation, in backward only).
    def _bad_adapters(self, index: Tensor, flags: Tensor) -> Tensor:
        """(n + 1,) bool: entry a + 1 whether some item i with index[i] == a has flags[i] (0/1 counts in
        float32: exact, so deterministic)."""
        table = torch.zeros(self.n + 1, dtype=torch.float32, device=flags.device)
        return table.index_add_(0, index + 1, flags.to(torch.float32)) > 0

    def _bad_columns(self, bad: Tensor) -> Tensor:
        """(R,) bool: the columns of the adapters `bad` ((n + 1,) from `_bad_adapters`) marks."""
        return bad.index_select(0, self.col_adapter + 1)

    @staticmethod
    def finite(t: Tensor) -> Tensor:
        """t with every NaN/inf replaced by 0 (nan_to_num: one fast pass)."""
        return torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0)

    def finite_rows(self, t: Tensor, segs: Segments) -> tuple[Tensor, Optional[Tensor]]:
        """(`finite`(t), (R, 1) bool: the columns of the adapters owning a row of t with a NaN/inf), or (t, None)
        when every row is finite. A row counts as non-finite when its sum is (in float32, float64 for float64:
        a NaN or inf anywhere in it, or finite values beyond float32's range, where the gradient GEMMs would
        overflow anyway). On the CPU the all-finite case (the usual one) is read on the host and skips the
        copy (no sync there); on an accelerator that read would be a sync, so the copy is always made."""
        row_bad = ~torch.isfinite(t.sum(1, dtype=_scale_dtype(t)))
        if t.device.type == "cpu" and not bool(row_bad.any()):
            return t, None
        return self.finite(t), self._bad_columns(self._bad_adapters(segs.row_adapter, row_bad)).unsqueeze(1)

    def masked(self, t: Tensor) -> Tensor:
        """t * S / peak (M x R): row m's own adapter's columns scaled by its s_a / peak, every other column 0 (a
        select, so nothing of another adapter's columns leaks, not even a NaN). Scaled in float32 (float64 for
        float64), rounded once; the GEMM that takes it multiplies by peak (alpha)."""
        return torch.where(self.match, t * self.col_scale, 0.0).to(t.dtype)

    def scaled_b(self) -> Tensor:
        """B_cat with each column scaled by its s_a / peak (NaN for an adapter marked bad), rounded once to B's
        dtype: G = (dY B_cat) * S is formed as peak dY (B_cat diag(s / peak)), peak through the GEMM's alpha,
        since in float16 the unscaled dY B_cat can overflow where s_a dY B_a does not (dense.scaled_mm)."""
        return (self.b_cat * self.col_scale).to(self.b_cat.dtype)

    def own(self, t: Tensor) -> Tensor:
        """t (M x R) with every column but row m's own adapter's set to 0 (a select: no NaN leaks)."""
        return torch.where(self.match, t, 0.0)

    def pack(self, h: Tensor, segs: Segments) -> Tensor:
        """The packed H (packed_h_shape, rows in the sorted order) of H = (D x) A_cat^T (M x R): row m's
        own adapter's columns, zero beyond its rank (and for a base row)."""
        j = torch.arange(self.rw, device=h.device)
        idx = (self.row_start.unsqueeze(1) + j).clamp_(max=self.R - 1)
        own = torch.where(j < self.row_rank.unsqueeze(1), h.gather(1, idx), 0.0)
        return own.index_select(0, segs.order)

    def unpack(self, h_packed: Tensor, segs: Segments) -> Tensor:
        """H * S (M x R) from the packed H (`pack`'s inverse, then `masked`)."""
        own = torch.empty_like(h_packed).index_copy_(0, segs.order, h_packed)  # back to row order
        return self.masked(own.gather(1, self.col_pos.expand(own.shape[0], self.R)))


def _dense_dropout(x: Tensor, adapters: Sequence[Adapter], segs: Segments, seed: int):
    """(keep (M x K bool), scale (M x 1, `_scale_dtype`)) of the whole batch: row m of D x is x[m] * scale[m] *
    keep[m], its adapter's mask and 1 / (1 - p_a) (all kept, scale 1, for base rows and adapters without
    dropout); None when no adapter has dropout. Each adapter's own mask, drawn as the per-run path draws it."""
    if all(a[3] == 0.0 for a in adapters):
        return None
    M, K = x.shape
    keep = torch.ones((M, K), dtype=torch.bool, device=x.device)
    scale = torch.ones((M, 1), dtype=_scale_dtype(x), device=x.device)
    for a, (_, _, _, p) in enumerate(adapters):
        m = segs.count(a)
        if p > 0.0 and m:
            rows = segs.rows(a)
            keep.index_copy_(0, rows, _mask(seed, a, m, K, p, x.device))
            scale.index_fill_(0, rows, 1.0 / (1.0 - p))
    return keep, scale


def _apply_dropout(t: Tensor, drop) -> Tensor:
    """D t (a new tensor; t itself without dropout): as `dense.dropped`, in t's dtype."""
    if drop is None:
        return t
    keep, scale = drop
    return t.mul(keep).mul(scale).to(t.dtype)  # the mask first (torch_row.dense.dropped)


def _dense_lora(x: Tensor, adapters: Sequence[Adapter], segs: Segments, seed: int):
    """(stacked adapters, H * S (M x R), packed H): the forward's low-rank inputs. H's other columns are
    dropped by a select (`masked`, `pack`), so A_cat may hold another adapter's NaN here; B_cat may not
    (the caller multiplies by `_Stacked.finite(b_cat)`)."""
    st = _Stacked(x, adapters, segs)
    h = torch.mm(_apply_dropout(x, _dense_dropout(x, adapters, segs, seed)), st.a_cat.t())
    return st, st.masked(h), st.pack(h, segs)


def _poisoned(grad: Tensor, bad: Optional[Tensor]) -> Tensor:
    """A stacked gradient (R x D) NaN in the columns (rows here) `bad` marks (`_Stacked.finite_rows`)."""
    return grad if bad is None else grad.masked_fill_(bad, float("nan"))


def _dense_lora_backward(dx: Optional[Tensor], need_dx: bool, dy: Tensor, x: Tensor, adapters: Sequence[Adapter],
                         h_packed: Tensor, segs: Segments, seed: int, need_lora: Sequence[bool]):
    """(dx, [(dA_a, dB_a) or None]) on the dense path: D (G A_cat) added to dx in place when dx is given,
    else returned as a new tensor when need_dx (None otherwise)."""
    st = _Stacked(x, adapters, segs)
    g = st.own(scaled_mm(dy, st.scaled_b(), st.peak))  # G = (dY B_cat) * S, M x R, S inside the product
    drop = _dense_dropout(x, adapters, segs, seed)
    if need_dx:
        a_cat = st.finite(st.a_cat)  # another adapter's NaN/inf kept out (`_Stacked`); a bad adapter's G is NaN
        if drop is None and dx is not None:
            dx.addmm_(g, a_cat)
        else:
            lora_dx = _apply_dropout(torch.mm(g, a_cat), drop)
            dx = lora_dx if dx is None else dx.add_(lora_dx)
    pairs = [None] * len(adapters)
    if any(need_lora):  # sums over all rows: other adapters' non-finite rows of dY and D x kept out
        dy_f, dy_bad = st.finite_rows(dy, segs)
        x_f, x_bad = st.finite_rows(_apply_dropout(x, drop), segs)
        dB_t = _poisoned(scaled_mm(st.unpack(h_packed, segs).t(), dy_f, st.peak), dy_bad)  # R x N: faster
        dA = _poisoned(torch.mm(g.t(), x_f), x_bad)  # R x K
        for a, want in enumerate(need_lora):
            lo, hi = st.starts[a], st.starts[a + 1]
            if want:  # own tensors (not views of one): the custom op's outputs may not alias each other
                pairs[a] = (dA[lo:hi].clone(), dB_t[lo:hi].t().contiguous())
    return dx, pairs


def forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Adapter], segs: Segments,
            seed: int) -> tuple[Tensor, Tensor]:
    """(Y, H): Y (M x N) as in the module doc; H every adapter's H_a packed into one M x max(r_a) tensor
    (`h_of`), the only activation kept for backward besides x (one static shape: custom ops need it)."""
    if dense(adapters):  # the low-rank term first, the base GEMM accumulates onto it (beta = 1): one pass over y
        st, hs, h_packed = _dense_lora(x, adapters, segs, seed)
        b_t = st.finite(st.b_cat).t()  # another adapter's NaN/inf kept out of each row (`_Stacked`)
        y = scaled_mm(hs, b_t, st.peak) if bias is None else torch.addmm(bias, hs, b_t, alpha=st.peak)
        return y.addmm_(x, weight.t()), h_packed
    y = torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())
    return y, add_lora(y, x, adapters, segs, seed)


def add_lora(y: Tensor, x: Tensor, adapters: Sequence[Adapter], segs: Segments, seed: int) -> Tensor:
    """y[rows_a] += s_a H_a B_a^T for every adapter, in place (y holds the base output); returns the packed H.
    The low-rank half of `forward`, on its own for a base computed elsewhere (a quantized base)."""
    if dense(adapters):
        st, hs, h_packed = _dense_lora(x, adapters, segs, seed)
        y.addmm_(hs, st.finite(st.b_cat).t(), alpha=st.peak)  # another adapter's NaN/inf kept out (`_Stacked`)
        return h_packed
    h_packed = x.new_zeros(packed_h_shape(x.shape[0], adapters))
    for a, (lora_A, lora_B, scaling, p) in enumerate(adapters):
        m = segs.count(a)
        h = h_of(h_packed, segs, a, lora_A.shape[0])
        keep = _mask(seed, a, m, x.shape[1], p, x.device)
        for piece in pieces(segs, a):
            lo, hi = piece.lo, piece.hi
            h[lo:hi] = torch.mm(dropped(_take(x, piece.rows), None if keep is None else keep[lo:hi], p), lora_A.t())
            _add_product(y, piece.rows, h[lo:hi], lora_B.t(), scaling)
    return h_packed


def backward(dy: Tensor, x: Tensor, weight: Tensor, adapters: Sequence[Adapter], h_packed: Tensor,
             segs: Segments, seed: int, need_dx: bool, need_lora: Sequence[bool], need_dw: bool, need_db: bool):
    """(dx, [(dA_a, dB_a)], dW, db), None where not needed (a pair is None when need_lora[a] is False).

    Per adapter, on its rows: G = s dY B;  dB = s dY^T H;  dA = G^T (D x);  dx += D (G A).
    """
    if dense(adapters) and (need_dx or any(need_lora)):  # dx: the low-rank term first, then dY W onto it
        dx, lora_grads = _dense_lora_backward(None, need_dx, dy, x, adapters, h_packed, segs, seed, need_lora)
        if need_dx:
            dx.addmm_(dy, weight)
    else:
        dx = torch.mm(dy, weight) if need_dx else None
        lora_grads = lora_backward(dx, dy, x, adapters, h_packed, segs, seed, need_lora)
    dW = torch.mm(dy.t(), x) if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, lora_grads, dW, db


def lora_backward(dx: Optional[Tensor], dy: Tensor, x: Tensor, adapters: Sequence[Adapter], h_packed: Tensor,
                  segs: Segments, seed: int, need_lora: Sequence[bool]) -> list:
    """[(dA_a, dB_a) or None]; adds each adapter's D (G A) to dx in place when dx is given (it holds dY W).
    The low-rank half of `backward`, on its own for a base computed elsewhere (a quantized base)."""
    need_dx = dx is not None
    if dense(adapters) and (need_dx or any(need_lora)):
        return _dense_lora_backward(dx, need_dx, dy, x, adapters, h_packed, segs, seed, need_lora)[1]
    lora_grads = []
    for a, (lora_A, lora_B, scaling, p) in enumerate(adapters):
        want = need_lora[a]
        if not (want or need_dx):
            lora_grads.append(None)
            continue
        parts = pieces(segs, a)
        acc = torch.float32 if len(parts) > 1 and x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        dA = torch.zeros(lora_A.shape, dtype=acc, device=x.device) if want else None
        dB_t = torch.zeros(lora_B.shape[::-1], dtype=acc, device=x.device) if want else None  # r x N
        keep = _mask(seed, a, segs.count(a), x.shape[1], p, x.device)
        for piece in parts:
            rows, lo, hi = piece.rows, piece.lo, piece.hi
            dya = _take(dy, rows)
            g = scaled_mm(dya, lora_B, scaling)  # m x r; s inside the products with dY (dense.scaled_mm)
            keep_p = None if keep is None else keep[lo:hi]
            if want:
                h = h_of(h_packed, segs, a, lora_A.shape[0])
                dB_t.add_(scaled_mm(h[lo:hi].t(), dya, scaling))  # r x N: the faster orientation
                dA.add_(torch.mm(g.t(), dropped(_take(x, rows), keep_p, p)))
            if need_dx:
                if keep_p is None:
                    _add_product(dx, rows, g, lora_A, 1.0)
                else:
                    _add_rows(dx, rows, torch.mm(g, lora_A).mul_(keep_p), 1.0 / (1.0 - p))
        lora_grads.append((dA.to(x.dtype), dB_t.t().contiguous().to(x.dtype)) if want else None)
    return lora_grads


def differentiable_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters: Sequence[Adapter],
                           segs: Segments, seed: int, mask_fn=keep_mask) -> Tensor:
    """Y as `forward` computes it (same masks), with out-of-place autograd-differentiable ops: what
    double backward differentiates (recomputed there, so the fast path keeps no graph). `mask_fn`:
    the keep_mask of the backend that ran the forward (each backend draws its own masks from the
    adapters' seeds)."""
    y = torch.nn.functional.linear(x, weight, bias)
    for a, (lora_A, lora_B, scaling, p) in enumerate(adapters):
        m = segs.count(a)
        if m == 0:
            continue
        rows = segs.rows(a)
        keep = _mask(seed, a, m, x.shape[1], p, x.device, mask_fn)
        xa = x.index_select(0, rows)
        xa = xa if keep is None else xa * keep / (1.0 - p)
        y = y.index_add(0, rows, (xa @ lora_A.t()) @ lora_B.t(), alpha=scaling)
    return y
