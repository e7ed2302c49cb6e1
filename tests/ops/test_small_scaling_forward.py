"""float16 forwards with a large B and a small scaling, on every PyTorch path and the Triton rows, against the
float64 reference (the forward sibling of test_small_scaling_gradients.py).

With s = 2^-10, |x| ~ 5, |A| ~ K^-1/2 and |B| ~ 1e4 (each a float16 value, and s B too: the adapter range rule,
modules.adapter_range) the low-rank product H B^T is beyond float16's range (65504) before the scaling and
well inside it after: s H B^T ~ 100. A path that forms H B^T in float16 and scales afterwards gets inf; one that
multiplies B (or H) by s first, or scales inside a float32 accumulation, stays finite. `_problem` asserts the
overflow, so each test can fail. Both without a bias (a plain product, then the scale) and with one (torch's
addmm with alpha). Tolerance: |y - y64| <= 1e-2 max |y64|: every output is a sum of K + r products of float16
values rounded to float16, each term within 2^-11 relative, the sum within a few units of 2^-11 of the scale.
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
from utils import TRITON_DEVICE, needs_triton

S = 2.0 ** -10
M, K, N, R = 48, 64, 32, 8
FP16_MAX = torch.finfo(torch.float16).max
ROWS = [pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton", marks=needs_triton(TRITON_DEVICE, torch.float16))]
BIAS = pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])


def _rnd(g, *shape, scale):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * scale


def _problem(k=K, n=N, r=R, experts=1, seed=0):
    """float64 x (M x k), W, b, A (experts x r x k), B (experts x n x r), rounded to float16 values, after
    checking that H B^T overflows float16 unscaled and s H B^T does not."""
    g = torch.Generator().manual_seed(seed)
    x, w, b = _rnd(g, M, k, scale=5.0), _rnd(g, experts, n, k, scale=0.05), _rnd(g, experts, n, scale=1.0)
    a, bb = _rnd(g, experts, r, k, scale=k ** -0.5), _rnd(g, experts, n, r, scale=1e4).clamp(-6e4, 6e4)
    x, w, b, a, bb = (t.half().double() for t in (x, w, b, a, bb))
    assert (S * bb).abs().max() < FP16_MAX and bb.abs().max() < FP16_MAX
    h = x @ a[0].t()
    assert torch.isinf((h.half() @ bb[0].half().t())).any(), "the test needs H B^T to overflow unscaled"
    assert (S * h @ bb[0].t()).abs().max() < FP16_MAX / 16
    return x, w, b, a, bb


def _check(got, want):
    assert got.dtype == torch.float16
    got = got.double().cpu()
    bad = int((~torch.isfinite(got)).sum())
    assert bad == 0, f"{bad} of {got.numel()} outputs not finite"
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()


def _on(device, *tensors):
    return [t.half().to(device) for t in tensors]


@pytest.mark.parametrize("backend", ROWS)
@BIAS
def test_lora_linear(backend, with_bias):
    x, w, b, a, bb = _problem()
    bias = b[0] if with_bias else None
    want = lora_linear_ref(x, w[0], bias, a[0], bb[0], S)
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    xd, wd, ad, bd = _on(device, x, w[0], a[0], bb[0])
    _check(lora_linear(xd, wd, None if bias is None else bias.half().to(device), ad, bd, S, backend=backend), want)


@BIAS
def test_lora_linear_quant(with_bias):
    x, w, b, a, bb = _problem()
    qw = quantize_nf4(w[0].float(), compute_dtype=torch.float16)
    bias = b[0] if with_bias else None
    want = lora_linear_ref(x, qw.dequantize(torch.float16).double(), bias, a[0], bb[0], S)
    xd, ad, bd = _on("cpu", x, a[0], bb[0])
    _check(lora_linear_quant(xd, qw, None if bias is None else bias.half(), ad, bd, S, backend="torch"), want)


@pytest.mark.parametrize("ranks,rows", [([R, R], "scattered"), ([40, 32], "runs"), ([40, 32], "scattered")],
                         ids=["stacked", "per-run-runs", "per-run-scattered"])
@BIAS
def test_several_adapters(ranks, rows, with_bias):
    """The mixed-batch torch row: the stacked path and the run-by-run path (views of runs, or rows by index)."""
    assert multi_impl.dense([(torch.empty(r, 1),) for r in ranks]) == (ranks == [R, R])
    row_adapter = (torch.tensor([0] * 24 + [-1] * 4 + [1] * 20) if rows == "runs" else torch.arange(M) % 3 - 1)
    x, w, b, _, _ = _problem()
    g = torch.Generator().manual_seed(5)
    loras = [(_rnd(g, r, K, scale=K ** -0.5).half().double(), _rnd(g, N, r, scale=1e4).clamp(-6e4, 6e4).half().double())
             for r in ranks]
    assert any(torch.isinf((x @ A.t()).half() @ B.half().t()).any() for A, B in loras)
    bias = b[0] if with_bias else None
    want = lora_linear_multi_ref(x, w[0], bias, [(A, B, S, 0.0) for A, B in loras], row_adapter)
    adapters = [(A.half(), B.half(), S, 0.0) for A, B in loras]
    _check(lora_linear_multi(x.half(), w[0].half(), None if bias is None else bias.half(), adapters, row_adapter,
                             backend="torch"), want)


@pytest.mark.parametrize("path", ["loop", pytest.param("triton", marks=needs_triton(TRITON_DEVICE, torch.float16))])
@BIAS
def test_lora_linear_grouped(path, with_bias):
    """Expert stacks: the torch row (float16 always takes its per-expert loop: torch_row.grouped.BATCHED_DTYPES)
    and the Triton grouped kernels."""
    x, w, b, a, bb = _problem(experts=3)
    sizes = torch.tensor([20, 0, M - 20])
    assert not grouped_impl.batched(x.half(), R, N)
    bias = b if with_bias else None
    want = lora_linear_grouped_ref(x, sizes, w, bias, a, bb, S)
    device = TRITON_DEVICE if path == "triton" else "cpu"
    backend = "triton" if path == "triton" else "torch"
    xd, wd, ad, bd = _on(device, x, w, a, bb)
    got = lora_linear_grouped(xd, sizes.to(device), wd, None if bias is None else bias.half().to(device), ad, bd, S,
                              backend=backend)
    _check(got, want)
