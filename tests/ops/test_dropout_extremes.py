"""Dropout at the edges of float16 on the PyTorch rows: an element dropped is exactly 0 in D x, however large x / (1 - p)
would be (x * 1 / (1 - p) overflowed to inf first and inf * 0 gave NaN in every output and gradient of its row,
where the Triton rows and the float64 reference are finite), and p next to 1 keeps nothing (core.dropout)."""
import pytest
import torch

from fused_lora.core.dropout import keep_mask
from fused_lora.ops.grouped import lora_linear_grouped
from fused_lora.ops.lora import lora_linear
from fused_lora.ops.multi import lora_linear_multi

M, K, N, R = 8, 16, 8, 4
P, SEED = 0.999, 11  # 1 / (1 - p) = 1000: |x| = 100 scales to 1e5, beyond float16 (65504)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.full((M, K), 100.0).half().requires_grad_(True)
    w, b = (torch.randn(N, K, generator=g) * 0.01).half(), torch.randn(N, generator=g).half()
    a = (torch.randn(R, K, generator=g) * 0.1).half().requires_grad_(True)
    bb = (torch.randn(N, R, generator=g) * 0.1).half().requires_grad_(True)
    assert not keep_mask(SEED, (M, K), P, "cpu").any()  # this seed's mask drops every element
    return x, w, b, a, bb


def _base_only(y, x, w, b):
    """With every element dropped the LoRA term is 0: y is the base, and the gradients finite."""
    want = (x.detach().double() @ w.double().t() + b.double())
    assert torch.isfinite(y).all()
    assert (y.double() - want).abs().max() <= 1e-2 * want.abs().max()
    grads = torch.autograd.grad(y.float().square().sum(), [t for t in (x,) if t.requires_grad], allow_unused=True)
    assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_lora_linear():
    x, w, b, a, bb = _inputs()
    _base_only(lora_linear(x, w, b, a, bb, 2.0, P, SEED, backend="torch"), x, w, b)


@pytest.mark.parametrize("k", [K, K - 1], ids=["batched", "loop"])
def test_lora_linear_grouped(k):
    x, w, b, a, bb = _inputs()
    x = x.detach()[:, :k].clone().requires_grad_(True)
    assert not keep_mask(SEED, (M, k), P, "cpu").any()
    y = lora_linear_grouped(x, torch.tensor([M]), w[None, :, :k], b[None], a[None, :, :k], bb[None], 2.0, P, SEED,
                            backend="torch")
    _base_only(y, x, w[:, :k], b)


@pytest.mark.parametrize("ranks", [[R], [40]], ids=["stacked", "per-run"])
def test_lora_linear_multi(ranks):
    x, w, b, _, _ = _inputs()
    g = torch.Generator().manual_seed(1)
    adapters = [((torch.randn(r, K, generator=g) * 0.1).half(), (torch.randn(N, r, generator=g) * 0.1).half(), 2.0, P)
                for r in ranks]
    y = lora_linear_multi(x, w, b, adapters, torch.zeros(M, dtype=torch.int64), torch.tensor(SEED), backend="torch")
    _base_only(y, x, w, b)
