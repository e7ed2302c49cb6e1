"""Review of the mixed-batch paths: edge cases checked against independent truth (float64 math on each
adapter's own rows), on both of multi_impl's paths (dense and per run)."""
import pytest
import torch

from fused_lora.core import dropout as core_dropout
from fused_lora.core import segments as core_segments
from fused_lora.torch_row import multi as multi_impl

from test_multi_stacked_path import PATHS

M, K, N = 12, 16, 8
ROW_ADAPTER = torch.tensor([0, 0, 0, 1, 1, 1, -1, -1, 0, 1, 0, 1])


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g, dtype=torch.float64)
    w = torch.randn(N, K, generator=g, dtype=torch.float64)
    b = torch.randn(N, generator=g, dtype=torch.float64)
    adapters = [(torch.randn(4, K, generator=g, dtype=torch.float64),
                 torch.randn(N, 4, generator=g, dtype=torch.float64), s, 0.0) for s in (0.5, -2.0)]
    dy = torch.randn(M, N, generator=g, dtype=torch.float64)
    return x, w, b, adapters, dy


def _own_truth(x, w, b, adapter, dy, rows):
    """y on `rows` and (dA, dB) of one adapter from those rows alone (float64, autograd on plain math)."""
    A, B, s, _ = adapter
    A, B = A.clone().requires_grad_(), B.clone().requires_grad_()
    y = x[rows] @ w.t() + b + s * (x[rows] @ A.t()) @ B.t()
    y.backward(dy[rows])
    return y.detach(), A.grad, B.grad


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("poison", ["A", "B", "x", "dy"])
def test_non_finite_in_one_adapter_stays_in_its_rows(monkeypatch, path, poison):
    """A NaN/inf in adapter 1's weights or in adapter 1's rows of x / dY reaches neither adapter 0's rows
    nor the base rows nor adapter 0's gradients (each adapter's results come from its own rows only)."""
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS[path])
    x, w, b, adapters, dy = _problem()
    bad_row = int(torch.nonzero(ROW_ADAPTER == 1)[0])
    if poison == "A":
        adapters[1][0][0, 0] = float("inf")
    elif poison == "B":
        adapters[1][1][0, 0] = float("nan")
    elif poison == "x":
        x[bad_row, 0] = float("nan")
    else:
        dy[bad_row, 0] = float("inf")
    segs = core_segments.segments(ROW_ADAPTER, 2)
    y, h = multi_impl.forward(x, w, b, adapters, segs, 0)
    dx, pairs, _, _ = multi_impl.backward(dy, x, w, adapters, h, segs, 0, True, [True, True], False, False)
    own = ROW_ADAPTER == 0
    y_true, dA_true, dB_true = _own_truth(x, w, b, adapters[0], dy, own)
    torch.testing.assert_close(y[own], y_true)
    base = ROW_ADAPTER == -1
    torch.testing.assert_close(y[base], x[base] @ w.t() + b)
    torch.testing.assert_close(pairs[0][0], dA_true)
    torch.testing.assert_close(pairs[0][1], dB_true)
    torch.testing.assert_close(dx[base], dy[base] @ w)
    if poison != "x":  # adapter 0's rows of dx: dY W + their own low-rank term
        A, B, s, _ = adapters[0]
        torch.testing.assert_close(dx[own], dy[own] @ w + s * (dy[own] @ B) @ A)
    # The poisoned adapter's own results are not silently finite.
    if poison in ("A", "B", "x"):
        assert not torch.isfinite(y[ROW_ADAPTER == 1]).all()
    assert not torch.isfinite(torch.cat([pairs[1][0].flatten(), pairs[1][1].flatten()])).all()


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float64_is_float64_exact(monkeypatch, path, dropout):
    """float64 inputs are computed in float64 on both paths (scalings and 1 / (1 - p) not rounded to
    float32): against the float64 reference to ~1e-12, with scalings float32 cannot hold."""
    from fused_lora.core.dropout import keep_mask
    from fused_lora.core.reference import lora_linear_multi_ref
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS[path])
    x, w, b, adapters, dy = _problem(1)
    adapters = [(A, B, s, dropout) for (A, B, _, _), s in zip(adapters, (0.1, 1 / 3))]
    segs = core_segments.segments(ROW_ADAPTER, 2)
    y, h = multi_impl.forward(x, w, b, adapters, segs, 7)
    keeps = []
    for a in range(2):  # adapter a's mask over its own rows, in increasing row order (multi_impl's doc)
        keep = torch.ones(M, K, dtype=torch.bool)
        if dropout:
            keep[ROW_ADAPTER == a] = keep_mask(core_dropout.adapter_seed(7, a), (int((ROW_ADAPTER == a).sum()), K),
                                               dropout, "cpu")
        keeps.append(keep if dropout else None)
    torch.testing.assert_close(y, lora_linear_multi_ref(x, w, b, adapters, ROW_ADAPTER, keeps), atol=1e-12, rtol=1e-12)
    dx, pairs, _, _ = multi_impl.backward(dy, x, w, adapters, h, segs, 7, True, [True, True], False, False)
    xr = x.clone().requires_grad_()
    leaves = [(A.clone().requires_grad_(), B.clone().requires_grad_(), s, p) for A, B, s, p in adapters]
    lora_linear_multi_ref(xr, w, b, leaves, ROW_ADAPTER, keeps).backward(dy)
    tight = dict(atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dx, xr.grad, **tight)
    for (dA, dB), (A, B, _, _) in zip(pairs, leaves):
        torch.testing.assert_close(dA, A.grad, **tight)
        torch.testing.assert_close(dB, B.grad, **tight)


@pytest.mark.parametrize("ranks", [(32, 32), (32, 33)])  # total rank exactly DENSE_MAX_RANK (dense), one past it
def test_custom_ops_opcheck_on_both_sides_of_the_threshold(ranks):
    """The multi ops' contract (fake against real: shapes, dtypes, no aliasing) on the dense and the
    per-run paths: the opcheck tests elsewhere use small ranks, so only the dense path."""
    assert sum(ranks) - multi_impl.DENSE_MAX_RANK == ranks[1] - ranks[0]  # the threshold these ranks straddle
    g = torch.Generator().manual_seed(3)
    Mx, Kx, Nx = 11, 6, 5
    x, w, b = torch.randn(Mx, Kx, generator=g), torch.randn(Nx, Kx, generator=g), torch.randn(Nx, generator=g)
    As = [torch.randn(r, Kx, generator=g, requires_grad=True) for r in ranks]
    Bs = [torch.randn(Nx, r, generator=g, requires_grad=True) for r in ranks]
    row_adapter = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0, 1])
    for p in ([0.0, 0.0], [0.0, 0.3]):
        args = (x.requires_grad_(), w, b, As, Bs, [0.5, 2.0], p, row_adapter, torch.tensor(5), "torch")
        torch.library.opcheck(torch.ops.fused_lora.lora_linear_multi_fwd.default, args)
        _, h = torch.ops.fused_lora.lora_linear_multi_fwd(*args)
        assert h.shape == (Mx, max(ranks))
        dy = torch.randn(Mx, Nx, generator=g)
        for needs in [(True, [True, True], False, False), (False, [False, True], True, True)]:
            lists = [[t.detach() for t in ts] for ts in (As, Bs)]
            bwd = (dy, x.detach(), w, *lists, h.detach(), *args[5:10], needs[0], needs[1], *needs[2:])
            torch.library.opcheck(torch.ops.fused_lora.lora_linear_multi_bwd.default, bwd)


@pytest.mark.parametrize("seed", [0, 5, 2**62 - 1, 2**62, 2**63 - 1])  # every seed as_seed_tensor accepts
def test_adapter_seed_of_a_tensor_equals_the_int_one(seed):
    """adapter_seed on a 0-dim int64 tensor (traced, no host read) gives the int path's seed for every
    accepted seed (ints up to 2^63 - 1): seed + step may wrap around in int64, which must not change it
    modulo 2^62."""
    for a in range(4):
        got = core_dropout.adapter_seed(torch.tensor(seed, dtype=torch.int64), a)
        assert int(got) == core_dropout.adapter_seed(seed, a) == (seed + (a + 1) * core_dropout._SEED_MIX) % 2**62


@pytest.mark.parametrize("path", list(PATHS))
def test_non_finite_adapter_stays_in_its_rows_over_a_quantized_base(monkeypatch, path):
    """The quantized base's torch row composes multi_impl's low-rank halves (add_lora / lora_backward):
    adapter 1's NaN B reaches neither adapter 0's rows nor its gradients there either."""
    from torch import nn
    from fused_lora.modules.quantized import QuantizedLinear
    from fused_lora.ops.quant import lora_linear_quant_multi
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS[path])
    torch.manual_seed(0)
    qweight = QuantizedLinear.from_linear(nn.Linear(64, 32), "int8").weight
    x = torch.randn(M, 64)
    adapters = [(torch.randn(4, 64, requires_grad=True), torch.randn(32, 4, requires_grad=True), s, 0.0)
                for s in (0.5, 2.0)]
    with torch.no_grad():
        adapters[1][1][3, 1] = float("nan")
    y = lora_linear_quant_multi(x, qweight, None, adapters, ROW_ADAPTER, backend="torch")
    own = ROW_ADAPTER == 0
    A, B = (t.detach().clone().requires_grad_() for t in adapters[0][:2])
    want_y = x[own] @ qweight.dequantize(torch.float32).t() + 0.5 * (x[own] @ A.t()) @ B.t()
    torch.testing.assert_close(y[own], want_y, atol=1e-4, rtol=1e-4)
    assert torch.isnan(y[ROW_ADAPTER == 1]).any()
    (y[own] * 2).sum().backward()
    (want_y * 2).sum().backward()
    torch.testing.assert_close(adapters[0][0].grad, A.grad, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adapters[0][1].grad, B.grad, atol=1e-4, rtol=1e-4)
