"""The reference itself: checked against independent formulations of the same math."""
import torch

from fused_lora.core.reference import dropout_scale, lora_delta_weight, lora_linear_ref, lora_linear_ref_h
from utils import make_problem


def test_reference_equals_merged_linear():
    x, w, b, a, bb = make_problem(9, 13, 11, 3, torch.float64, requires_grad=False)
    merged = w + 0.7 * bb @ a
    torch.testing.assert_close(lora_linear_ref(x, w, b, a, bb, 0.7), torch.nn.functional.linear(x, merged, b))


def test_reference_dropout_scales_kept_inputs():
    x, w, b, a, bb = make_problem(6, 5, 4, 2, torch.float64, requires_grad=False)
    keep = torch.rand(6, 5, generator=torch.Generator().manual_seed(0)) > 0.3
    h = lora_linear_ref_h(x, a, keep, 0.3)
    torch.testing.assert_close(h, (torch.where(keep, x / 0.7, 0.0)) @ a.t())
    all_kept = torch.ones_like(keep)
    torch.testing.assert_close(lora_linear_ref(x, w, b, a, bb, 2.0, all_kept, 0.0), lora_linear_ref(x, w, b, a, bb, 2.0))
    assert dropout_scale(keep, 0.5, torch.float64).max().item() == 2.0


def test_delta_weight_dtype_and_value():
    a = torch.randn(2, 3, dtype=torch.bfloat16)
    bb = torch.randn(4, 2, dtype=torch.bfloat16)
    d = lora_delta_weight(a, bb, 3.0)
    assert d.dtype == torch.float32
    torch.testing.assert_close(d, 3.0 * bb.float() @ a.float())
