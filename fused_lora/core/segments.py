"""The row layout of a mixed batch (several adapters, one per row), shared by the ops, the PyTorch row and
the segment kernels (vLLM's token-to-adapter mapping, as segment kernels want it).

`segments` sorts the rows by adapter once (a stable sort, so each adapter's rows stay in increasing order)
and counts them; the rows of adapter a are `order[offsets[a + 1]:offsets[a + 2]]` (the base rows, index -1,
come first). Forward and backward share that layout. H, the activation kept for backward, is packed: every
adapter's H_a in one M x max(r_a) tensor, rows in the sorted order (`packed_h_shape`).
"""
from __future__ import annotations

from functools import cached_property
from typing import Sequence

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


def segments(row_adapter: Tensor, n_adapters: int) -> Segments:
    """The grouped layout of `row_adapter` (values in [-1, n_adapters), checked by the caller)."""
    return Segments(row_adapter, n_adapters)


def packed_h_shape(M: int, adapters: Sequence[Adapter]) -> tuple[int, int]:
    """The packed H: M x (largest rank), rows in the sorted order (see `h_of`)."""
    return M, max([0] + [a[0].shape[0] for a in adapters])


def h_of(h_packed: Tensor, segs: Segments, adapter: int, rank: int) -> Tensor:
    """H_a = (D_a x[rows_a]) A_a^T (m_a x r_a), a view into the packed H: its rows at the adapter's
    place in the sorted order, its first r_a columns (the rest is zero, never read)."""
    return h_packed[segs.offsets[adapter + 1]:segs.offsets[adapter + 2], :rank]
