"""Launchers for several adapters in one batch, with the interface of `fused_lora.torch_row.multi`:

    multi_forward(x, W, b, adapters, segs, seed) -> (Y, packed H)
    multi_backward(dY, x, W, adapters, H, segs, seed, need_dx, need_lora, need_dw, need_db)
        -> (dx, [(dA_a, dB_a) or None], dW, db)

`adapters` is ((A_a, B_a, s_a, p_a), ...); `segs` the grouped layout (`fused_lora.core.segments.Segments`: its
`row_adapter` and `order`, the rows sorted by adapter, base rows first; its host-side `offsets` are
never read: the tile table is built on the device, so the launchers make no device-to-host sync).
The packed H is `core.segments.packed_h_shape`: M x R (R the largest rank), row i for sorted position
i, its first r_a columns used (the rest zero).

Scheduling (vLLM's sgmv): each adapter's run of sorted positions is cut into row tiles that never
cross into another adapter's rows (`tile_table`, torch ops on the device; the grids take its upper
bound cdiv(M, BLOCK_M) + n + 1, programs past the real tiles return at once), so every program has
one adapter (a scalar rank, scaling and seed, one A / B slice; no per-row adapter logic in the GEMM
loops). The base GEMM runs once for the whole batch over all tiles (the base rows' tiles have rank
0). The price: at most one partial tile per adapter (a fraction ~ n_adapters * BLOCK_M / M of the
GEMMs' MMA work, ~4% at 4 adapters and M = 8192 with 128-row tiles); a per-row adapter index in the
GEMMs' low-rank prologue would avoid it at the cost of a loop over the adapters present in each tile.

Adapters' A and B are passed stacked and zero-padded to the largest rank, (n, R, K) and (n, N, R)
(a copy of n r x K and N x r tensors per call, small beside x; none when the ranks are equal, as
torch.stack then does the same copy), with small per-adapter tables for rank, scaling, dropout.

Dropout: adapter a's mask is the Triton backend's own `keep_mask(adapter_seed(seed, a), (m_a, K), p_a)`
(`adapter_seed`: fused_lora.core.dropout's, the one every implementation uses)
over its rows in increasing order, drawn in-kernel (Philox of (seed, row within the adapter,
column)), regenerated in backward, never stored: exactly what this backend's single-adapter op
draws on that adapter's rows alone with that seed. (The torch backend draws its own masks from the
same seeds with its own generator, as for one adapter.)

dA_a and dB_a: fp32 partials per tile, summed per adapter in slot order (`multi_sum_kernel`):
bit-identical run to run.

The machinery is shared with the grouped op (expert weights, `kernels/grouped/`): `SegmentBatch` (the
stacks, tables and tile tables of one call), `BaseWeight` (the base weight one per segment or shared),
`segment_forward` and `segment_lora_backward` (the launches). An expert stack is a segment layout with
no base rows whose segments (experts) each have their own W, b, A and B, and one dropout mask over the
whole batch (`tile_table_of_counts(..., global_rows=True)`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ...core.dropout import adapter_seed
from .. import configs
from ..dropout import keep_threshold
from ..launch import arch_of, dy_chunk
from ..reduce import BLOCK as SUM_BLOCK
from ..reduce import sum_partials
from .multi_backward import multi_dx_da_kernel, multi_dy_kernel, multi_sum_kernel
from .multi_forward import multi_forward_kernel, multi_shrink_kernel

__all__ = ["KERNELS", "multi_forward", "multi_backward", "tile_table", "tile_table_of_counts", "tile_count_bounds",
           "adapter_seed", "BaseWeight", "SegmentBatch", "segment_forward", "segment_lora_backward", "to_device",
           "launch_options"]

KERNELS = {"multi_shrink": multi_shrink_kernel, "multi_forward": multi_forward_kernel,
           "multi_dy": multi_dy_kernel, "multi_dx_da": multi_dx_da_kernel, "multi_sum": multi_sum_kernel}

def tile_count_bounds(M: int, n_adapters: int, block_m: int) -> tuple[int, int]:
    """(all tiles, LoRA tiles): upper bounds of the tile table's sizes that need no row count: the
    segments' ceil(m_a / block_m) sum to at most cdiv(M, block_m) + (number of segments) - 1."""
    lora = triton.cdiv(M, block_m) + n_adapters
    return lora + 1, lora


def tile_table(row_adapter: torch.Tensor, n_adapters: int, block_m: int):
    """The row tiles of the grouped layout, built on row_adapter's device with torch ops (no sync):
    (int32 (T, 4) rows (adapter or -1, first sorted position, end, index of the first row within its
    adapter), int32 (n + 1,) bounds: adapter a's tiles are bounds[a] .. bounds[a + 1]).

    T = tile_count_bounds(...)[0]. The LoRA tiles come first (adapter 0's, then 1's, ...), then the
    base rows' tiles (adapter -1; sorted positions 0.. hold the base rows), then empty tiles
    (first == end, adapter -1) up to T: their programs return at once. So a grid of the LoRA bound
    covers every LoRA tile, one of T every tile, and workspace slot t is LoRA tile t."""
    counts = torch.zeros(n_adapters + 1, dtype=torch.int64, device=row_adapter.device)
    counts.index_add_(0, row_adapter + 1, torch.ones_like(row_adapter))  # [base, adapter 0, ...]; no sync
    return tile_table_of_counts(counts, row_adapter.shape[0], n_adapters, block_m)


def tile_table_of_counts(counts: torch.Tensor, M: int, n_adapters: int, block_m: int, global_rows: bool = False):
    """`tile_table` from the segments' row counts (int64 (n + 1,) on the device, base first, summing to M),
    with no sync. The grouped op's layout (`core.segments.grouped`: rows already sorted by expert, no base
    rows) gives its counts without a per-row index (`device_counts`); with `global_rows` the last column
    holds the tile's first row in the whole batch (its sorted position, which is its row there) instead
    of its index within its segment: the dropout mask's row, one mask over the whole batch."""
    device = counts.device
    n = n_adapters
    starts = torch.cumsum(counts, 0) - counts  # each segment's first sorted position
    seg_order = torch.arange(1, n + 2, device=device) % (n + 1)  # the segments in table order: adapters, base
    c, st = counts[seg_order], starts[seg_order]
    n_seg_tiles = (c + block_m - 1) // block_m
    tile_end = torch.cumsum(n_seg_tiles, 0)
    t = torch.arange(tile_count_bounds(M, n, block_m)[0], device=device)
    seg = torch.searchsorted(tile_end, t, right=True)  # n + 1 past the last real tile
    real = seg <= n
    seg = seg.clamp_(max=n)
    within = (t - (tile_end - n_seg_tiles)[seg]) * block_m
    first = st[seg] + within
    end = torch.minimum(first + block_m, st[seg] + c[seg])
    zero = torch.zeros_like(t)
    rows = torch.stack([torch.where(real, seg_order[seg] - 1, -1), torch.where(real, first, zero),
                        torch.where(real, end, zero), torch.where(real, first if global_rows else within, zero)], 1)
    bounds = torch.cat([tile_end.new_zeros(1), tile_end[:n]])
    return rows.to(torch.int32), bounds.to(torch.int32)


@dataclass(frozen=True)
class BaseWeight:
    """The base weight as the segment kernels read it: segment a's W_a (N x K) at a * `strides[0]`, its
    element (n, k) at n * `strides[1]` + k * `strides[2]` from there. One weight for every segment
    (`shared`: a mixed batch) or one per segment (`experts`: the grouped op's stack, either layout)."""
    tensor: torch.Tensor
    strides: tuple  # (per segment, per output row n, per input column k)
    N: int

    @staticmethod
    def shared(weight: torch.Tensor) -> "BaseWeight":
        """A mixed batch's N x K weight: the same for every segment."""
        return BaseWeight(weight, (0, *weight.stride()), weight.shape[0])

    @staticmethod
    def experts(weight: torch.Tensor, transposed: bool) -> "BaseWeight":
        """An expert stack (E, N, K), or (E, K, N) when transposed, through its strides (never copied)."""
        se, s1, s2 = weight.stride()
        return BaseWeight(weight, (se, s2, s1) if transposed else (se, s1, s2),
                          weight.shape[2] if transposed else weight.shape[1])


class SegmentBatch:
    """What every launch of one call shares: the factors stacked per segment, A (n, R, K) and B (n, N, R)
    (R the packed width), the per-segment tables (ints int64 (n, 3): rank, dropout threshold, dropout seed;
    floats fp32 (n, 2): scaling, 1 / (1 - p)), the layout's rows in sorted order and its tile tables.
    `of_adapters` builds it for a mixed batch, `kernels.grouped` for an expert stack: a layout with no base rows
    given by `counts` (int64 (n + 1,) on the device, base first and 0: the tile table is built from them, and
    each row's dropout index is its row in the batch, one mask over the whole batch)."""

    def __init__(self, x, segs, a_stack, b_stack, rw: int, ints: list, floats: list, dropout: bool,
                 counts: Optional[torch.Tensor] = None):
        self.x, self.segs, self.device = x, segs, x.device
        self.n = len(ints)
        self.K = x.shape[1]
        self.a_stack, self.b_stack, self.rw = a_stack, b_stack, rw
        self.block_r = configs.multi_block_r(rw)
        self.arch = arch_of(x.device)
        self.elt = x.element_size()
        self.dropout = dropout
        self.ints = to_device(torch.tensor(ints or [(0, 0, 0)], dtype=torch.int64), x.device)
        self.floats = to_device(torch.tensor(floats or [(0.0, 1.0)], dtype=torch.float32), x.device)
        self.order = segs.order.to(torch.int32)  # int32 row indices: fewer registers in the GEMM loops
        self.counts = counts  # None: the tile table from segs.row_adapter (a mixed batch, base rows allowed)
        self.has_base_rows = counts is None
        self._tiles = {}

    @staticmethod
    def of_adapters(x, weight, adapters, segs, seed: int) -> "SegmentBatch":
        """A mixed batch: adapters ((A_a, B_a, s_a, p_a), ...) stacked and zero-padded to the largest rank,
        adapter a's mask drawn from adapter_seed(seed, a) at its rows' indices within the adapter."""
        ranks = [a[0].shape[0] for a in adapters]
        rw = max([0] + ranks)  # the packed width: core.segments.packed_h_shape
        a_stack, b_stack = _stacked(x, weight.shape[0], adapters, ranks, rw)
        ints = [(r, keep_threshold(p), adapter_seed(seed, a))
                for a, (r, (_, _, _, p)) in enumerate(zip(ranks, adapters))]
        floats = [(s, 1.0 / (1.0 - p)) for _, _, s, p in adapters]
        return SegmentBatch(x, segs, a_stack, b_stack, rw, ints, floats, any(a[3] > 0.0 for a in adapters))

    def tiles(self, block_m: int):
        """(tiles on the device, grid bound for every tile, grid bound for the LoRA tiles, bounds on the
        device): `tile_table`, once per block size and call."""
        if block_m not in self._tiles:
            M = self.order.shape[0]
            if self.counts is None:
                tiles, bounds = tile_table(self.segs.row_adapter, self.n, block_m)
            else:
                tiles, bounds = tile_table_of_counts(self.counts, M, self.n, block_m, global_rows=True)
            self._tiles[block_m] = (tiles, *tile_count_bounds(M, self.n, block_m), bounds)
        return self._tiles[block_m]

    def config(self, kernel: str, dropout: bool = False):
        return configs.multi_config(kernel, self.arch, self.block_r, self.elt, dropout)


def _stacked(x, N, adapters, ranks, rw):
    """A (n, R, K) and B (n, N, R): torch.stack where the ranks are equal, else zero-padded copies."""
    K = x.shape[1]
    if adapters and all(r == rw for r in ranks):
        return torch.stack([a[0] for a in adapters]), torch.stack([a[1] for a in adapters])
    width = max(rw, 1)
    a_stack = x.new_zeros((max(len(adapters), 1), width, K))
    b_stack = x.new_zeros((max(len(adapters), 1), N, width))
    for i, (lora_A, lora_B, _, _) in enumerate(adapters):
        a_stack[i, :lora_A.shape[0]] = lora_A
        b_stack[i, :, :lora_B.shape[1]] = lora_B
    return a_stack, b_stack


def to_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host table on the device without waiting for the GPU's queue (a plain copy from
    pageable memory synchronizes the stream): pinned, non-blocking."""
    if device.type != "cuda":
        return table.to(device)
    return table.pin_memory().to(device, non_blocking=True)


def launch_options(cfg) -> dict:
    """A config's launch keywords: its block sizes, warps and stages."""
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def multi_forward(x, weight, bias, adapters, segs, seed):
    batch = SegmentBatch.of_adapters(x, weight, adapters, segs, seed)
    return segment_forward(batch, BaseWeight.shared(weight), bias, 0)


def segment_forward(batch: SegmentBatch, base: BaseWeight, bias, bias_stride: int):
    """(Y, packed H) of the segment layout `batch`: the shrink pass over the LoRA tiles (none at width 0),
    then the base GEMM over every tile with the low-rank term in its accumulator. `bias`: None, or (N,)
    with bias_stride 0, or one row per segment (n, N) with bias_stride its row stride (unit columns)."""
    x = batch.x
    M = x.shape[0]
    N = base.N
    rw = batch.rw
    h = x.new_zeros((M, rw))
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y, h
    h_arg, h_strides = (h, h.stride()) if rw else (y, (0, 0))  # nothing of H is read at rank 0
    if rw:
        cfg = batch.config("multi_shrink", batch.dropout)
        tiles, _, n_lora, _ = batch.tiles(cfg.kwargs["BLOCK_M"])
        multi_shrink_kernel[(n_lora,)](
            x, batch.a_stack, h, batch.order, tiles, batch.ints, batch.floats,
            *x.stride(), *batch.a_stack.stride(), *h.stride(),
            batch.K, 0, HAS_DROPOUT=batch.dropout, BLOCK_R=batch.block_r, **launch_options(cfg))
    cfg = batch.config("multi_forward")
    tiles, n_tiles, _, _ = batch.tiles(cfg.kwargs["BLOCK_M"])  # with the empty tiles past the real ones
    if bias is None:
        bias, bias_stride = x.new_zeros(N), 0
    multi_forward_kernel[(n_tiles * triton.cdiv(N, cfg.kwargs["BLOCK_N"]),)](
        x, base.tensor, bias, h_arg, batch.b_stack, y, batch.order, tiles, batch.ints, batch.floats,
        *x.stride(), *base.strides, bias_stride, *h_strides, *batch.b_stack.stride(), *y.stride(),
        N, batch.K, n_tiles, BLOCK_R=batch.block_r, **launch_options(cfg))
    return y, h


def multi_backward(dy, x, weight, adapters, h, segs, seed, need_dx, need_lora, need_dw, need_db):
    M, K = x.shape
    need_lora = list(need_lora)
    dx, stacks = None, None
    if need_dx or any(need_lora):
        batch = SegmentBatch.of_adapters(x, weight, adapters, segs, seed)
        if batch.rw == 0 or min(M, weight.shape[0], K) == 0:  # no low-rank term anywhere: the base GEMM alone
            dx = torch.mm(dy, weight) if need_dx else None
        else:
            dx, stacks = segment_lora_backward(batch, dy, BaseWeight.shared(weight), h, need_dx, any(need_lora))
    pairs = []
    for a, (lora_A, lora_B, _, _) in enumerate(adapters):
        if not need_lora[a]:
            pairs.append(None)
            continue
        r = lora_A.shape[0]
        if stacks is None:  # nothing to sum (no LoRA rows, or an empty size): zeros
            pairs.append((torch.zeros_like(lora_A, dtype=x.dtype), torch.zeros_like(lora_B, dtype=x.dtype)))
        else:
            # Own tensors, not views of the stacks: the custom op's outputs may not alias each other.
            pairs.append((stacks[0][a, :r].clone(), stacks[1][a, :, :r].clone(memory_format=torch.contiguous_format)))
    dW = torch.mm(dy.t(), x) if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, pairs, dW, db


def segment_lora_backward(batch: SegmentBatch, dy, base: BaseWeight, h, need_dx: bool, need_lora: bool = True):
    """(dx or None, (dA stacked (n, R, K), dB stacked (n, N, R)) or None without need_lora) of the segment
    layout `batch` (M, N, K > 0). At width 0 (no low-rank term: the grouped op's base alone) the dY pass is
    skipped and dX is the base GEMM over the tiles, each with its segment's weight."""
    x = batch.x
    M, K = x.shape
    N = base.N
    rw, n = batch.rw, batch.n
    # The row counts stay on the device (no sync): grids and workspaces take the tile table's upper
    # bounds, and G is indexed by sorted position over all M rows: its partials start at zero, so the
    # base rows' part (no program writes it, none reads it) sums to zero, not to uninitialised memory.
    f32 = dict(dtype=torch.float32, device=x.device)
    if rw:
        # 1. The dY pass: partials of G (one per column chunk) and of dB (one per LoRA tile).
        cfg = batch.config("multi_dy")
        tiles, _, n_lora, db_bounds = batch.tiles(cfg.kwargs["BLOCK_M"])
        chunk = dy_chunk(M, N)
        # (With no base rows, the grouped op's layout, every row of every slot is written: no zero fill.)
        g_ws = (torch.zeros if batch.has_base_rows else torch.empty)((triton.cdiv(N, chunk), M, rw), **f32)
        db_ws = torch.empty((n_lora, N, rw), **f32)
        multi_dy_kernel[(n_lora, triton.cdiv(N, chunk))](
            dy, batch.b_stack, h, g_ws, db_ws, batch.order, tiles, batch.ints, batch.floats,
            *dy.stride(), *batch.b_stack.stride(), *h.stride(),
            M, N, rw, chunk, 0, 0, BLOCK_R=batch.block_r, **launch_options(cfg))
        g = torch.empty((M, rw), dtype=x.dtype, device=x.device)
        sum_partials((g_ws, g))
        g_strides = g.stride()
    else:  # nothing of G (nor of A) is read at width 0: every load is masked by the rank
        g, g_strides = dy, (0, 0)
    # 2. dX (every tile) and the dA partials (one per LoRA tile).
    cfg = batch.config("multi_dx_da", batch.dropout)
    tiles, n_all, n_lora, da_bounds = batch.tiles(cfg.kwargs["BLOCK_M"])
    n_tiles = n_all if need_dx else n_lora  # the LoRA tiles come first in the table
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    da_ws = torch.empty((n_lora, rw, K), **f32)
    multi_dx_da_kernel[(n_tiles * triton.cdiv(K, cfg.kwargs["BLOCK_N"]),)](
        dy, base.tensor, g, batch.a_stack, x, dx if need_dx else g, da_ws, batch.order, tiles, batch.ints,
        batch.floats, *dy.stride(), *base.strides, *g_strides, *batch.a_stack.stride(), *x.stride(),
        *(dx.stride() if need_dx else (0, 0)),
        N, K, rw, n_tiles, 0, 0, 0,
        HAS_DX=need_dx, HAS_DROPOUT=batch.dropout, BLOCK_R=batch.block_r, **launch_options(cfg))
    if not (need_lora and rw):
        return dx, None
    # 3. Each segment's dA and dB: its slots summed in a fixed order.
    dA = torch.empty((n, rw, K), dtype=x.dtype, device=x.device)
    dB = torch.empty((n, N, rw), dtype=x.dtype, device=x.device)
    for ws, out, bounds in ((da_ws, dA, da_bounds), (db_ws, dB, db_bounds)):
        L = out[0].numel()
        multi_sum_kernel[(n, triton.cdiv(L, SUM_BLOCK))](ws, out, bounds, L, BLOCK=SUM_BLOCK)
    return dx, (dA, dB)
