"""float16 with a tiny scaling on the PyTorch rows: s B below float16's normal range (6.1e-5) loses its precision
when rounded there (s = 2^-20, |B| ~ 1: s B keeps one or two significant bits), so s has to reach the products
inside their float32 accumulation (torch's addmm alpha), not through an operand rounded first (found by fuzzing:
19% off at s = 1e-7, where the Triton rows are exact). The forward's low-rank term and dA (through G = s dY B) are
checked against the float64 reference; W = 0 and no bias, so the output is the low-rank term alone, and |x| ~ 30,
|dY| ~ 1000 keep H, Y and G normal float16 values (`_problem` asserts both). Tolerance: |got - ref| <= 1e-2 max|ref|
(a handful of float16 roundings of normal values, each within 2^-11; the rounded s B alone was ~6% off).
"""
import pytest
import torch

from fused_lora.core.reference import lora_linear_grouped_ref, lora_linear_multi_ref, lora_linear_ref
from fused_lora.modules.quantized import quantize_nf4
from fused_lora.ops.grouped import lora_linear_grouped
from fused_lora.ops.lora import lora_linear
from fused_lora.ops.multi import lora_linear_multi
from fused_lora.ops.quant import lora_linear_quant
from fused_lora.torch_row import grouped as grouped_impl
from fused_lora.torch_row import multi as multi_impl

S = 2.0 ** -20
M, K, N, R = 24, 64, 16, 8
FP16_TINY = torch.finfo(torch.float16).tiny


def _problem(ranks=(R,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(M, K, generator=g) * 30).half().double()
    loras = [((torch.randn(r, K, generator=g) * 6).half().double(), torch.randn(N, r, generator=g).half().double())
             for r in ranks]
    dy = (torch.randn(M, N, generator=g) * 1000).half().double()
    for A, B in loras:
        assert (S * B.abs()).max() < FP16_TINY  # s B is subnormal in float16
        assert (S * (x @ A.t()) @ B.t()).abs().max() > 100 * FP16_TINY  # the low-rank term is normal
        assert (S * dy @ B).abs().max() > 100 * FP16_TINY  # and G too
    return x, loras, dy


def _check(op, ref, x, params, dy):
    """y and dA of op (float16) against ref (float64), on the same values."""
    xs = x.half().requires_grad_(True)
    ps = [p.half().requires_grad_(True) for p in params]
    y = op(xs, *ps)
    grads = torch.autograd.grad(y, ps[0::2], dy.half())  # dA of each adapter
    p64 = [p.clone().requires_grad_(True) for p in params]
    y64 = ref(x, *p64)
    grads64 = torch.autograd.grad(y64, p64[0::2], dy)
    for got, want in zip((y, *grads), (y64, *grads64)):
        got = got.double()
        assert torch.isfinite(got).all()
        assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def test_lora_linear():
    x, ((A, B),), dy = _problem()
    w = torch.zeros(N, K)
    _check(lambda x, A, B: lora_linear(x, w.half(), None, A, B, S, backend="torch"),
           lambda x, A, B: lora_linear_ref(x, w.double(), None, A, B, S), x, [A, B], dy)


def test_lora_linear_quant():
    x, ((A, B),), dy = _problem()
    qw = quantize_nf4(torch.zeros(N, K), compute_dtype=torch.float16)
    _check(lambda x, A, B: lora_linear_quant(x, qw, None, A, B, S, backend="torch"),
           lambda x, A, B: lora_linear_ref(x, torch.zeros(N, K, dtype=torch.float64), None, A, B, S), x, [A, B], dy)


@pytest.mark.parametrize("ranks,rows", [((R, R), "scattered"), ((40, 32), "runs"), ((40, 32), "scattered")],
                         ids=["stacked", "per-run-runs", "per-run-scattered"])
def test_several_adapters(ranks, rows):
    assert multi_impl.dense([(torch.empty(r, 1),) for r in ranks]) == (ranks == (R, R))
    row_adapter = torch.tensor([0] * 12 + [-1] * 2 + [1] * 10) if rows == "runs" else torch.arange(M) % 3 - 1
    x, loras, dy = _problem(ranks)
    w = torch.zeros(N, K)

    def adapters(flat):
        return [(flat[0], flat[1], S, 0.0), (flat[2], flat[3], 2 * S, 0.0)]
    _check(lambda x, *flat: lora_linear_multi(x, w.half(), None, adapters(flat), row_adapter, backend="torch"),
           lambda x, *flat: lora_linear_multi_ref(x, w.double(), None, adapters(flat), row_adapter),
           x, [t for pair in loras for t in pair], dy)


def test_lora_linear_grouped():
    """float16 takes the per-expert loop (the batched path's torch._grouped_mm has no alpha: it is kept to the
    dtypes of float32's range, float32 and bfloat16)."""
    x, ((A, B),), dy = _problem()
    assert not grouped_impl.batched(x.half(), R, N)
    sizes = torch.tensor([10, 0, M - 10])
    w = torch.zeros(3, N, K)
    a3, b3 = A.expand(3, R, K).contiguous(), B.expand(3, N, R).contiguous()
    _check(lambda x, A, B: lora_linear_grouped(x, sizes, w.half(), None, A, B, S, backend="torch"),
           lambda x, A, B: lora_linear_grouped_ref(x, sizes, w.double(), None, A, B, S), x, [a3, b3], dy)
