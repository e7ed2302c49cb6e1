"""The grouped op's reference (issue 20 item 1): `lora_linear_grouped_ref` is, group by group, the single-adapter
reference `lora_linear_ref` on the group's rows with its expert's weight, bias and factors (and its rows of the
batch's dropout mask), in either weight layout; `group_membership` marks the rows written out by hand."""
import torch

from fused_lora.core.reference import (group_membership, lora_linear_grouped_ref, lora_linear_grouped_ref_h,
                                       lora_linear_ref, lora_linear_ref_h)


def test_membership_by_hand():
    rows = group_membership(torch.tensor([2, 0, 1, 0]), 3, torch.float64)
    assert rows.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    assert group_membership(torch.tensor([0, 0]), 0, torch.float32).shape == (0, 2)


def test_reference_is_the_single_adapter_reference_per_group():
    g = torch.Generator().manual_seed(0)
    sizes = [4, 0, 6, 3]
    E, M, K, N, r, s, p = 4, 13, 7, 5, 3, 0.7, 0.25
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(E, N, K, generator=g, dtype=torch.float64)
    b = torch.randn(E, N, generator=g, dtype=torch.float64)
    a = torch.randn(E, r, K, generator=g, dtype=torch.float64)
    bb = torch.randn(E, N, r, generator=g, dtype=torch.float64)
    keep = torch.rand(M, K, generator=g) >= p
    gs = torch.tensor(sizes)
    y = lora_linear_grouped_ref(x, gs, w, b, a, bb, s, keep, p)
    y_t = lora_linear_grouped_ref(x, gs, w.transpose(1, 2).contiguous(), b, a, bb, s, keep, p, transposed=True)
    h = lora_linear_grouped_ref_h(x, gs, a, keep, p)
    base = lora_linear_grouped_ref(x, gs, w, None, None, None, s)
    start = 0
    for e, m in enumerate(sizes):
        rows = slice(start, start + m)
        want = lora_linear_ref(x[rows], w[e], b[e], a[e], bb[e], s, keep[rows], p)
        torch.testing.assert_close(y[rows], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y_t[rows], want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h[rows], lora_linear_ref_h(x[rows], a[e], keep[rows], p), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(base[rows], x[rows] @ w[e].t(), rtol=1e-12, atol=1e-12)
        start += m
