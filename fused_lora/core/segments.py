"""The row layout of a mixed batch (several adapters, one per row), shared by the ops, the PyTorch row and
the segment kernels (vLLM's token-to-adapter mapping, as segment kernels want it).

`segments` sorts the rows by adapter once (a stable sort, so each adapter's rows stay in increasing order)
and counts them; the rows of adapter a are `order[offsets[a + 1]:offsets[a + 2]]` (the base rows, index -1,
come first). Forward and backward share that layout. H, the activation kept for backward, is packed: every
adapter's H_a in one M x max(r_a) tensor, rows in the sorted order (`packed_h_shape`).

The grouped op (mixture-of-experts weights, `ops.grouped`) takes rows already sorted by group with the
groups' sizes: `grouped(group_sizes)` is the same layout (a `Segments`: `count`, `rows`, `h_of` as above,
with no base rows and `order` the identity), read from the sizes instead of a per-row index. Group g holds
rows `offsets[g + 1]:offsets[g + 2]` (`span(g)`, a slice); its H_g is H's rows there (H is M x r, rows
in x's order). What needs no host read stays on the device: `device_counts` and `device_offsets` (a
cumulative sum of the sizes), `row_adapter` (each row's group, by `repeat_interleave` with its output
size given); the host offsets are one read of the E sizes (`sizes`), made once per layout.
"""
from __future__ import annotations

from functools import cached_property
from typing import Optional, Sequence

import torch
from torch import Tensor

Adapter = tuple  # (lora_A (r x K), lora_B (N x r), scaling, dropout_p)


class Segments:
    """Rows grouped by adapter, from `row_adapter` (M,) and the number of adapters n: `order` (M,) the
    rows sorted by adapter (stable), `offsets` (n + 2 ints): adapter a (-1 = base) holds
    `order[offsets[a + 1]:offsets[a + 2]]`. Both are computed when first read, `offsets` on the host
    (a device-to-host sync): the dense path without dropout and the Triton launchers read only `order`
    (a sort on the device)."""

    def __init__(self, row_adapter: Tensor, n_adapters: int):
        self.row_adapter, self.n_adapters = row_adapter, n_adapters

    @cached_property
    def order(self) -> Tensor:
        return torch.argsort(self.row_adapter, stable=True)

    @cached_property
    def offsets(self) -> tuple:
        counts = torch.bincount(self.row_adapter + 1, minlength=self.n_adapters + 1)
        return tuple([0] + torch.cumsum(counts, 0).tolist())

    def count(self, adapter: int) -> int:
        return self.offsets[adapter + 2] - self.offsets[adapter + 1]

    def rows(self, adapter: int) -> Tensor:
        return self.order[self.offsets[adapter + 1]:self.offsets[adapter + 2]]

    def span(self, adapter: int) -> slice:
        """The adapter's (group's) positions in the sorted order, as a slice (H's rows, `h_of`)."""
        return slice(self.offsets[adapter + 1], self.offsets[adapter + 2])

    def hit(self) -> list[int]:
        """The adapters (groups) with at least one row, in increasing order."""
        return [a for a in range(self.n_adapters) if self.count(a)]

    @cached_property
    def device_counts(self) -> Tensor:
        """(n + 1,) int64 on the rows' device, base first: the rows per segment, with no device-to-host sync
        (an index_add, not bincount, whose output size would be read from the device)."""
        counts = torch.zeros(self.n_adapters + 1, dtype=torch.int64, device=self.row_adapter.device)
        return counts.index_add_(0, self.row_adapter + 1, torch.ones_like(self.row_adapter))

    @cached_property
    def device_offsets(self) -> Tensor:
        """(n + 2,) int64 on the device: `offsets` without a host read (the cumulative sum of `device_counts`)."""
        counts = self.device_counts
        return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


class GroupedSegments(Segments):
    """Rows already sorted by group, from the groups' sizes (`grouped`): the `Segments` layout with no base
    rows and `order` the identity. `group_sizes` (E,) int64 on the rows' device, summing to M (checked by
    the caller: `core.op_inputs.check_group_size_values(layout.sizes, M)`); `sizes` its values on the host,
    read once when first needed (or given)."""

    def __init__(self, group_sizes: Tensor, M: int, sizes: Optional[Sequence[int]] = None):
        self.group_sizes, self.M, self.n_adapters = group_sizes, M, group_sizes.shape[0]
        if sizes is not None:
            self.sizes = tuple(int(s) for s in sizes)

    @cached_property
    def sizes(self) -> tuple:
        """The groups' sizes on the host: one device-to-host read of E integers."""
        return tuple(self.group_sizes.tolist())

    @cached_property
    def offsets(self) -> tuple:
        ends = [0, 0]
        for size in self.sizes:
            ends.append(ends[-1] + size)
        return tuple(ends)

    @cached_property
    def order(self) -> Tensor:
        return torch.arange(self.M, device=self.group_sizes.device)

    @cached_property
    def row_adapter(self) -> Tensor:
        """Each row's group (M,), on the device without a sync (the output size is M, given)."""
        groups = torch.arange(self.n_adapters, device=self.group_sizes.device)
        return torch.repeat_interleave(groups, self.group_sizes, output_size=self.M)

    @cached_property
    def device_counts(self) -> Tensor:
        return torch.cat([self.group_sizes.new_zeros(1), self.group_sizes])


def segments(row_adapter: Tensor, n_adapters: int) -> Segments:
    """The grouped layout of `row_adapter` (values in [-1, n_adapters), checked by the caller)."""
    return Segments(row_adapter, n_adapters)


def grouped(group_sizes: Tensor, M: int, sizes: Optional[Sequence[int]] = None) -> GroupedSegments:
    """The layout of M rows already sorted by group, group g holding `group_sizes[g]` of them (E groups:
    empty ones allowed); `sizes`, when given, the same values already read on the host (no second read)."""
    return GroupedSegments(group_sizes, M, sizes)


def packed_h_shape(M: int, adapters: Sequence[Adapter]) -> tuple[int, int]:
    """The packed H: M x (largest rank), rows in the sorted order (see `h_of`)."""
    return M, max([0] + [a[0].shape[0] for a in adapters])


def h_of(h_packed: Tensor, segs: Segments, adapter: int, rank: int) -> Tensor:
    """H_a = (D_a x[rows_a]) A_a^T (m_a x r_a), a view into the packed H: its rows at the adapter's
    place in the sorted order, its first r_a columns (the rest is zero, never read)."""
    return h_packed[segs.offsets[adapter + 1]:segs.offsets[adapter + 2], :rank]
