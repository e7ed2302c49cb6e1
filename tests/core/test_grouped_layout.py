"""The grouped row layout (issue 20 item 1): `core.segments.grouped` is the mixed-batch `Segments` layout read
from group sizes (rows already sorted by group, no base rows), so everything written for segments (count, rows,
h_of, the device-side counts and offsets the tile tables want) works on it unchanged."""
import torch

from fused_lora.core.segments import GroupedSegments, Segments, grouped, h_of, segments


def test_grouped_layout_is_the_segments_layout_of_its_row_index():
    sizes = [3, 0, 5, 0, 1]
    layout = grouped(torch.tensor(sizes), 9)
    assert isinstance(layout, Segments) and isinstance(layout, GroupedSegments)
    row_adapter = torch.tensor([0, 0, 0, 2, 2, 2, 2, 2, 4])  # written out by hand
    assert torch.equal(layout.row_adapter, row_adapter)
    mixed = segments(row_adapter, 5)
    assert layout.offsets == mixed.offsets == (0, 0, 3, 3, 8, 8, 9)
    assert torch.equal(layout.order, mixed.order) and torch.equal(layout.order, torch.arange(9))
    for g in range(5):
        assert layout.count(g) == mixed.count(g) == sizes[g]
        assert torch.equal(layout.rows(g), mixed.rows(g))
        assert layout.span(g) == mixed.span(g)
    assert layout.hit() == mixed.hit() == [0, 2, 4]
    for lay in (layout, mixed):
        assert lay.device_counts.tolist() == [0, 3, 0, 5, 0, 1]
        assert lay.device_offsets.tolist() == list(lay.offsets)
    h = torch.arange(27.0).reshape(9, 3)
    assert torch.equal(h_of(h, layout, 2, 2), h[3:8, :2])


def test_mixed_layout_device_counts_include_the_base_rows():
    layout = segments(torch.tensor([1, -1, 0, 1, -1, -1]), 3)
    assert layout.device_counts.tolist() == [3, 1, 2, 0]
    assert layout.device_offsets.tolist() == list(layout.offsets) == [0, 3, 4, 6, 6]


def test_sizes_given_are_not_read_again_and_device_values_need_no_read():
    """With the sizes already read on the host (the op's value check reads them), the offsets come from them; the
    device-side values (row index, counts, offsets) are built without reading the sizes: here on the meta device,
    which holds no values at all."""
    layout = grouped(torch.empty(3, dtype=torch.int64, device="meta"), 7, sizes=[3, 0, 4])
    assert layout.offsets == (0, 0, 3, 3, 7) and layout.hit() == [0, 2] and layout.span(2) == slice(3, 7)
    assert layout.row_adapter.shape == (7,) and layout.device_offsets.shape == (5,) and layout.order.shape == (7,)


def test_edges():
    assert grouped(torch.tensor([0, 0]), 0).hit() == []
    one = grouped(torch.tensor([0, 6, 0]), 6)
    assert one.hit() == [1] and one.span(1) == slice(0, 6) and one.rows(0).numel() == 0
