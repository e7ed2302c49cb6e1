"""float16/bfloat16 gradients with large activations and a small scaling (issue 18 item 4), on every
row of every op against the float64 reference.

With s = 2^-10, |x| ~ 5, |B| ~ 4 and |dY| ~ 3000 the products dY B (M x r) and H^T dY (r x N) are
beyond float16's range (65504) before the scaling and well inside it after: the reference (and peft)
scales dY before those products (autograd of s * (H B^T)), so every gradient is finite there. A path
that forms the unscaled product in float16 and scales afterwards gets inf in G, hence dA and dx, and
in dB. `_problem` asserts that the unscaled products do overflow, so each test can fail.

Rows: the torch row of lora_linear, lora_linear_quant (NF4 base), lora_linear_multi and
lora_linear_quant_multi (the stacked "dense" path and the run-by-run path, runs and scattered rows),
dora_linear (W folded, or dY scaled), and the same ops' Triton kernels (under TRITON_INTERPRET=1 on the
CPU: float16 only, the interpreter's bfloat16 dot being wrong). Tolerance: the project's rule (error <=
2 x the same-precision eager error + atol, tests/utils.py), the eager run being the reference formula
in the same dtype (which scales dY first, as peft does).
"""
import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.torch_row import multi as multi_impl
from fused_lora.core.dora_norm import weight_norm
from fused_lora.ops.dora import dora_linear
from fused_lora.ops.lora import lora_linear
from fused_lora.ops.multi import lora_linear_multi
from fused_lora.modules.quantized import quantize_nf4
from fused_lora.ops.quant import lora_linear_quant, lora_linear_quant_multi
from fused_lora.core.reference import dora_linear_ref, lora_linear_multi_ref, lora_linear_ref
from utils import TRITON_DEVICE, assert_close_rule, needs_triton

S = 2.0 ** -10
M, K, N = 64, 64, 256
FP16_MAX = torch.finfo(torch.float16).max

CUDA = torch.cuda.is_available()
# The Triton rows in bfloat16 only compiled on a GPU (the interpreter's bf16 dot is wrong: not a row there).
ROWS = [pytest.param("torch", torch.float16, id="torch-fp16"),
        pytest.param("torch", torch.bfloat16, id="torch-bf16"),
        pytest.param("triton", torch.float16, id="triton-fp16", marks=needs_triton(TRITON_DEVICE, torch.float16))]
ROWS += [pytest.param("triton", torch.bfloat16, id="triton-bf16", marks=needs_triton(TRITON_DEVICE, torch.bfloat16))
         ] if CUDA else []


def _device(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


def _problem(ranks, row_adapter=None, m=M, seed=0):
    """float64 x (m x K, |x| ~ 5), W (|W| ~ 0.05), b, [(A_a, B_a)] (|A| ~ K^-1/2, |B| ~ 4), dY (|dY| ~ 3000),
    after checking that for every adapter (on its rows) dY B_a and H_a^T dY overflow float16 unscaled while
    the gradients' float64 values stay within a quarter of its range."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    x, w, b = rnd(m, K, scale=5.0), rnd(N, K, scale=0.05), rnd(N, scale=1.0)
    loras = [(rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=4.0)) for r in ranks]
    dy = rnd(m, N, scale=3000.0)
    for a, (A, B) in enumerate(loras):
        rows = slice(None) if row_adapter is None else (row_adapter == a).nonzero().squeeze(1).cpu()
        h16, dy16 = (x[rows] @ A.t()).half(), dy[rows].half()
        assert torch.isinf(torch.mm(dy16, B.half())).any(), "the test needs dY B to overflow unscaled"
        assert torch.isinf(torch.mm(h16.t(), dy16)).any(), "the test needs H^T dY to overflow unscaled"
        assert (S * (dy[rows] @ B)).abs().max() < FP16_MAX / 4
    return x, w, b, loras, dy


def _grads(fn, tensors, dy, create_graph=False):
    """(y, the gradients of `tensors` for the output gradient dy)."""
    tensors = [t.detach().clone().requires_grad_(True) for t in tensors]
    y = fn(*tensors)
    return [y.detach()] + [g.detach() for g in torch.autograd.grad(y, tensors, dy, create_graph=create_graph)]


def _check(names, got, eager, ref64, dtype):
    """Each output finite, in `dtype`, and within the project's rule of the float64 reference."""
    for name, g, e, r in zip(names, got, eager, ref64):
        assert g.dtype == dtype, name
        bad = int((~torch.isfinite(g)).sum())
        assert bad == 0, f"{name}: {bad} of {g.numel()} not finite"
        assert_close_rule(g, e, r, dtype, name)


def _compare(op, ref, tensors, dy, dtype, device, names, create_graph=False):
    """op and the reference formula in `dtype` against the reference in float64, on the same inputs (the op's
    gradients with their own graph when `create_graph`: the double-backward path)."""
    low = [t.to(dtype).to(device) for t in tensors]
    got = _grads(op, low, dy.to(dtype).to(device), create_graph)
    eager = _grads(ref, low, dy.to(dtype).to(device))
    ref64 = _grads(ref, [t.to(device) for t in tensors], dy.to(device))
    _check(names, got, eager, ref64, dtype)


@pytest.mark.parametrize("backend,dtype", ROWS)
def test_lora_linear(backend, dtype):
    """issue 18 item 4: lora_linear's gradients (dx, dA, dB) are finite and accurate where scaling after
    the products would overflow."""
    x, w, b, ((A, B),), dy = _problem([8])
    device = _device(backend)
    wd, bd = w.to(dtype).to(device), b.to(dtype).to(device)
    _compare(lambda x, A, B: lora_linear(x, wd, bd, A, B, S, backend=backend),
             lambda x, A, B: lora_linear_ref(x, wd.to(x.dtype), bd.to(x.dtype), A, B, S),
             [x, A, B], dy, dtype, device, ["y", "dx", "dA", "dB"])


def test_lora_linear_double_backward_path():
    """issue 18 item 4: the differentiable backward (create_graph=True, double backward) gives the same
    finite gradients."""
    x, w, b, ((A, B),), dy = _problem([8])
    wd, bd = w.half(), b.half()
    before = backends.calls[("bwd_differentiable", "torch")]
    _compare(lambda x, A, B: lora_linear(x, wd, bd, A, B, S, backend="torch"),
             lambda x, A, B: lora_linear_ref(x, wd.to(x.dtype), bd.to(x.dtype), A, B, S),
             [x, A, B], dy, torch.float16, "cpu", ["y", "dx", "dA", "dB"], create_graph=True)
    assert backends.calls[("bwd_differentiable", "torch")] == before + 1


def test_several_adapters_double_backward_path():
    """issue 18 item 4: lora_linear_multi's differentiable backward (create_graph=True) likewise."""
    row_adapter = _row_adapter("runs")
    x, w, b, loras, dy = _problem([8, 8], row_adapter)
    wd, bd = w.half(), b.half()

    def adapters(flat):
        return [(flat[0], flat[1], S, 0.0), (flat[2], flat[3], 2 * S, 0.0)]

    before = backends.calls[("multi_bwd_differentiable", "torch")]
    _compare(lambda x, *flat: lora_linear_multi(x, wd, bd, adapters(flat), row_adapter, backend="torch"),
             lambda x, *flat: lora_linear_multi_ref(x, wd.to(x.dtype), bd.to(x.dtype), adapters(flat), row_adapter),
             [x] + [t for pair in loras for t in pair], dy, torch.float16, "cpu",
             ["y", "dx", "dA0", "dB0", "dA1", "dB1"], create_graph=True)
    assert backends.calls[("multi_bwd_differentiable", "torch")] == before + 1


@pytest.mark.parametrize("backend,dtype", ROWS)
def test_lora_linear_quant_nf4(backend, dtype):
    """issue 18 item 4: the same over an NF4 base (the reference on the dequantized weight)."""
    x, w, b, ((A, B),), dy = _problem([8])
    device = _device(backend)
    qw = quantize_nf4(w.float(), compute_dtype=dtype).to(device)
    wd, bd = qw.dequantize(dtype), b.to(dtype).to(device)
    _compare(lambda x, A, B: lora_linear_quant(x, qw, bd, A, B, S, backend=backend),
             lambda x, A, B: lora_linear_ref(x, wd.to(x.dtype), bd.to(x.dtype), A, B, S),
             [x, A, B], dy, dtype, device, ["y", "dx", "dA", "dB"])


# Several adapters. The torch row: ranks summing to at most multi_impl.DENSE_MAX_RANK take the stacked path
# (whatever the layout), more the run-by-run path, with "runs" (one long run per adapter: views) or
# "scattered" rows (gathered by index). The Triton row (segment kernels): one path, both layouts.
MULTI = {"dense": [8, 8], "per-run": [40, 32], "segments": [8, 40]}


def _multi_cases():
    cases = []
    for row in ROWS:
        backend, dtype = row.values
        pairs = ([("dense", "scattered"), ("per-run", "runs"), ("per-run", "scattered")] if backend == "torch"
                 else [("segments", "runs"), ("segments", "scattered")])
        cases += [pytest.param(backend, dtype, path, kind, id=f"{row.id}-{path}-{kind}", marks=row.marks)
                  for path, kind in pairs]
    return cases


def _row_adapter(kind):
    if kind == "runs":  # adapter 0, the base, adapter 1: runs long enough for the view path
        return torch.tensor([0] * 32 + [-1] * 4 + [1] * 28)
    return torch.arange(M) % 3 - 1  # -1, 0, 1, -1, ...: every run one row long


@pytest.mark.parametrize("backend,dtype,path,kind", _multi_cases())
@pytest.mark.parametrize("quantized", [False, True], ids=["dense-base", "nf4-base"])
def test_several_adapters(backend, dtype, path, kind, quantized):
    """issue 18 item 4: lora_linear_multi and lora_linear_quant_multi, every adapter's gradients."""
    ranks = MULTI[path]
    if backend == "torch":
        assert multi_impl.dense([(torch.empty(r, 1),) for r in ranks]) == (path == "dense")
    row_adapter = _row_adapter(kind)
    x, w, b, loras, dy = _problem(ranks, row_adapter)
    device = _device(backend)
    rows = row_adapter.to(device)
    scalings = [S, 2 * S]
    bd = b.to(dtype).to(device)
    if quantized:
        qw = quantize_nf4(w.float(), compute_dtype=dtype).to(device)
        wd = qw.dequantize(dtype)
    else:
        wd = w.to(dtype).to(device)

    def adapters(flat):
        return [(flat[2 * a], flat[2 * a + 1], s, 0.0) for a, s in enumerate(scalings)]

    def op(x, *flat):
        if quantized:
            return lora_linear_quant_multi(x, qw, bd, adapters(flat), rows, backend=backend)
        return lora_linear_multi(x, wd, bd, adapters(flat), rows, backend=backend)

    def ref(x, *flat):
        return lora_linear_multi_ref(x, wd.to(x.dtype), bd.to(x.dtype), adapters(flat), rows)

    names = ["y", "dx"] + [f"d{t}{a}" for a in range(len(ranks)) for t in "AB"]
    _compare(op, ref, [x] + [t for pair in loras for t in pair], dy, dtype, device, names)


@pytest.mark.parametrize("backend,dtype", ROWS)
@pytest.mark.parametrize("m", [M, 32], ids=["W-folded", "dY-scaled"])  # dora_torch.fold_weight: N K <= M N
def test_dora_linear(backend, dtype, m):
    """issue 18 item 4: dora_linear's gradients (dx, dA, dB, dm), column scales c = m / n around 1."""
    x, w, b, ((A, B),), dy = _problem([8], m=m)
    device = _device(backend)
    norm = weight_norm(w, A, B, S)
    mag = norm * (0.5 + torch.rand(N, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    wd, bd = w.to(dtype).to(device), b.to(dtype).to(device)

    def op(x, A, B, mag):
        return dora_linear(x, wd, bd, A, B, mag.float() if dtype != torch.float64 else mag, S, backend=backend)

    def ref(x, A, B, mag):
        return dora_linear_ref(x, wd.to(x.dtype), bd.to(x.dtype), A, B, mag.to(x.dtype), S)

    low = [t.to(dtype).to(device) for t in (x, A, B)] + [mag.float().to(device)]
    got = _grads(op, low, dy.to(dtype).to(device))
    eager = _grads(ref, low, dy.to(dtype).to(device))
    ref64 = _grads(ref, [t.to(device) for t in (x, A, B, mag)], dy.to(device))
    _check(["y", "dx", "dA", "dB"], got[:4], eager[:4], ref64[:4], dtype)
    assert got[4].dtype == torch.float32 and bool(torch.isfinite(got[4]).all())
    assert_close_rule(got[4], eager[4], ref64[4], dtype, "dm")  # dm: in the magnitude's dtype, from 16-bit Y
