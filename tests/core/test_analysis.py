"""amplification_factor (the LoRA paper's definition) and low_rank_approx."""
import pytest
import torch

from fused_lora.core.analysis import amplification_factor, low_rank_approx


def test_low_rank_approx_is_optimal_and_exact_at_full_rank():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(6, 5, generator=g, dtype=torch.float64)
    s = torch.linalg.svdvals(m)
    for k in range(6):
        approx = low_rank_approx(m, k)
        assert torch.linalg.matrix_rank(approx) == k
        # Eckart-Young: the error is the norm of the dropped singular values
        assert torch.isclose(torch.linalg.matrix_norm(m - approx), s[k:].norm())
    with pytest.raises(ValueError):
        low_rank_approx(m, 6)


def test_amplification_factor_follows_the_paper():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 20, generator=g, dtype=torch.float64)
    u = torch.linalg.qr(torch.randn(30, 2, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(20, 2, generator=g, dtype=torch.float64))[0]
    delta = u @ torch.diag(torch.tensor([3.0, 1.0], dtype=torch.float64)) @ v.t()
    expected = torch.linalg.matrix_norm(delta) / torch.linalg.matrix_norm(u.t() @ w @ v)
    assert amplification_factor(delta, w, 2) == pytest.approx(expected.item(), rel=1e-9)
    # Not the tutorial's full-SVD reduction ||dW|| / ||W||:
    assert amplification_factor(delta, w, 2) != pytest.approx((delta.norm() / w.norm()).item(), rel=1e-3)
    with pytest.raises(ValueError, match="differ"):
        amplification_factor(delta[:5], w, 2)
