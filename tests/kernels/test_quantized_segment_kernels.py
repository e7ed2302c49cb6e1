"""The triton row of several adapters in one batch over a quantized base (fused_lora.kernels.quantized.multi,
under TRITON_INTERPRET=1 on CPU) against the float64 reference of the mixed-batch formula over the
dequantized weight (W rounded to the compute dtype, as the kernels round it), with the dropout masks the
triton multi path documents (adapter a: kernels.keep_mask(adapter_seed(seed, a), (m_a, K), p_a) over its
rows in increasing order). Tolerance: the project's rule (error <= 2 x the same-precision eager error +
atol). Also: the backend table's check rule for these ops, and the layer with backend="triton"."""
import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, QuantizedLinear
from fused_lora import dispatch as backends
from fused_lora.modules.quantized import quantize_int8, quantize_nf4
from fused_lora.ops.quant import lora_linear_quant_multi
from utils import assert_close_rule, auto_on_cpu, mixed_batch_keeps, needs_triton

pytestmark = needs_triton("cpu")

K, N, SEED = 128, 48, 1234


def _qweight(fmt, seed=0):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * K ** -0.5
    if fmt == "int8":
        return quantize_int8(w)
    return quantize_nf4(w, blocksize=64, double_quant=fmt == "nf4-nested")


def _adapters(ranks, ps, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for a, (r, p) in enumerate(zip(ranks, ps)):
        A = (torch.randn(r, K, generator=g) * K ** -0.5).to(dtype).requires_grad_()
        B = (torch.randn(N, r, generator=g) * r ** -0.5).to(dtype).requires_grad_()
        out.append((A, B, 0.5 + a, p))
    return out


def _reference(x, W, b, adapters, row_adapter, keeps):
    """y of the mixed batch, differentiable (any dtype): x W^T + b + s_a (D_a x) A_a^T B_a^T on adapter a's rows."""
    y = x @ W.T + b
    for a, ((A, B, s, p), keep) in enumerate(zip(adapters, keeps)):
        rows = (row_adapter == a).to(x.dtype)[:, None]
        xa = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
        y = y + s * ((xa * rows) @ A.T) @ B.T
    return y


def _grads(y, inputs, dy):
    return torch.autograd.grad(y, inputs, dy)


ROW_LAYOUTS = {
    "runs": torch.tensor([0] * 5 + [-1] * 3 + [2] * 4 + [1] * 6),  # one run per adapter (views, no gather)
    "scattered": torch.tensor([1, 0, -1, 2, 1, 1, 0, -1, 2, 0, 1, 2, 2, -1, 0, 1, 0, 1]),
    "one": torch.tensor([0] * 7 + [-1] * 2 + [0] * 4),
    "all-one": torch.zeros(11, dtype=torch.int64),  # a single group: Y is that group's output
}

CASES = [  # (format, dtype, ranks, dropout per adapter, layout)
    ("nf4-nested", torch.float32, (4, 8, 2), (0.0, 0.0, 0.0), "scattered"),
    ("nf4-nested", torch.float16, (4, 8, 2), (0.25, 0.0, 0.5), "runs"),
    ("nf4", torch.float32, (4, 8, 2), (0.25, 0.1, 0.0), "scattered"),
    ("nf4", torch.float16, (16,), (0.0,), "one"),
    ("int8", torch.float32, (16,), (0.3,), "one"),
    ("int8", torch.float16, (4, 8, 2), (0.0, 0.2, 0.0), "scattered"),
    ("int8", torch.float32, (4,), (0.0,), "all-one"),
]


@pytest.mark.parametrize("fmt,dtype,ranks,ps,layout", CASES)
def test_triton_row_matches_float64_reference(fmt, dtype, ranks, ps, layout):
    from fused_lora.kernels import keep_mask
    qw = _qweight(fmt)
    row_adapter = ROW_LAYOUTS[layout]
    M = row_adapter.shape[0]
    g = torch.Generator().manual_seed(3)
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    b = (torch.randn(N, generator=g) * 0.1).to(dtype).requires_grad_()
    adapters = _adapters(ranks, ps, dtype)
    dy = torch.randn(M, N, generator=g).to(dtype)
    before = backends.calls[("quant_multi_fwd", "triton")], backends.calls[("quant_multi_bwd", "triton")]
    y = lora_linear_quant_multi(x, qw, b, adapters, row_adapter, SEED, backend="triton")
    inputs = [x, b] + [t for a in adapters for t in a[:2]]
    got = _grads(y, inputs, dy)
    assert (backends.calls[("quant_multi_fwd", "triton")], backends.calls[("quant_multi_bwd", "triton")]) == \
        (before[0] + 1, before[1] + 1)
    keeps = mixed_batch_keeps(row_adapter, K, [(r, p) for r, p in zip(ranks, ps)], SEED, keep_mask)
    W = qw.dequantize(dtype)  # the kernels' W: exact fp32 dequantization rounded to the compute dtype
    outs = {}
    for name, cast in (("64", torch.float64), ("eager", dtype)):
        ins = [t.detach().to(cast).requires_grad_() for t in inputs]
        ad = [(ins[2 + 2 * a], ins[3 + 2 * a], s, p) for a, (_, _, s, p) in enumerate(adapters)]
        ref = _reference(ins[0], W.to(cast), ins[1], ad, row_adapter, keeps)
        outs[name] = [ref.detach()] + list(_grads(ref, ins, dy.to(cast)))
    names = ["y", "dx", "db"] + [f"d{t}_{a}" for a in range(len(adapters)) for t in "AB"]
    for what, mine, eager, ref64 in zip(names, [y.detach()] + list(got), outs["eager"], outs["64"]):
        assert mine.dtype == dtype and mine.shape == ref64.shape, what
        assert_close_rule(mine, eager, ref64, dtype, what=f"{fmt} {what}")


def test_adapter_without_rows_gets_zero_gradients_and_empty_batch_runs():
    qw = _qweight("nf4-nested")
    adapters = _adapters((4, 2), (0.0, 0.0), torch.float32)
    row_adapter = torch.tensor([0, -1, 0])
    x = torch.randn(3, K, requires_grad=True)
    y = lora_linear_quant_multi(x, qw, None, adapters, row_adapter, backend="triton")
    dA1, dB1 = torch.autograd.grad(y.sum(), adapters[1][:2])
    assert not dA1.any() and not dB1.any()
    empty = torch.randn(0, K)
    assert lora_linear_quant_multi(empty, qw, None, adapters, torch.zeros(0, dtype=torch.int64),
                                   backend="triton").shape == (0, N)


def test_layer_with_triton_backend_equals_torch_backend():
    """FusedLoRALinear over an NF4 base, forward(adapter_names=...) with backend="triton" and "torch" (no
    dropout: the two rows draw different masks) in training: same outputs and gradients."""
    torch.manual_seed(0)
    layer = FusedLoRALinear.from_linear(QuantizedLinear.from_linear(nn.Linear(K, N), "nf4"), r=4, lora_alpha=8)
    layer.add_adapter("b", r=8, lora_alpha=4)
    with torch.no_grad():
        for name in ("default", "b"):
            for t in layer.adapter_weights(name):
                t.normal_(0, 0.3)
    layer.set_requires_grad(["default", "b"])
    x = torch.randn(4, 3, K)
    names = ["b", "__base__", "default", "b"]
    results = []
    for backend in ("triton", "torch"):
        layer.backend = backend
        xi = x.clone().requires_grad_()
        y = layer(xi, adapter_names=names)
        y.backward(torch.ones_like(y))
        results.append([y.detach(), xi.grad] + [t.grad.clone() for n in ("default", "b")
                                                for t in layer.adapter_weights(n)])
        layer.zero_grad()
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_check_rule_covers_the_triton_row_for_quant_multi_ops():
    """Auto never picks the triton row for these ops before its output matched the torch row's on inputs
    with random adapters and dropout off; a backward with dropout follows its forward's row."""
    triton_row = backends.get("triton")
    cuda = torch.device("cuda")
    for op, dropout, want in [("quant_multi_fwd", False, "torch"), ("quant_multi_fwd", True, "torch"),
                              ("quant_multi_bwd", False, "torch"), ("quant_multi_bwd", True, None)]:
        assert triton_row.check_against(backends.Problem(op, cuda, torch.float16, 64, N, K, 8, dropout)) == want
    assert backends.Problem("quant_multi_bwd", cuda, torch.float16, 64, N, K, 8).forward_twin().op.name == "quant_multi_fwd"


@pytest.mark.parametrize("broken", [False, True])
def test_auto_checks_the_triton_row_before_choosing_it(tmp_path, monkeypatch, broken):
    """Auto with timing (on the CPU under the interpreter, every later row timed faster): the triton row wins
    when its output matches the torch row's, and is recorded as failed (the next fastest right row, dequant-once,
    runs) when it does not."""
    from fused_lora import kernels as quant_multi
    reg = auto_on_cpu(tmp_path, monkeypatch)
    if broken:
        real = quant_multi.quant_multi_forward
        monkeypatch.setattr(quant_multi, "quant_multi_forward",
                            lambda *a: (lambda y, h: (y + 1.0, h))(*real(*a)))
    qw = _qweight("int8")
    adapters = _adapters((4, 2), (0.0, 0.0), torch.float32)
    with torch.no_grad():  # fresh adapters' B = 0 would hide a wrong low-rank term: the probe randomises them
        adapters[0][1].zero_()
    x = torch.randn(6, K)
    row_adapter = torch.tensor([0, 1, -1, 0, 1, 1])
    before = backends.calls[("quant_multi_fwd", "dequant-once")]
    with torch.no_grad():
        lora_linear_quant_multi(x, qw, None, adapters, row_adapter, backend="auto")
    key = backends.Problem("quant_multi_fwd", x.device, x.dtype, 6, N, K, 4, base="int8").key()
    choice = reg.choices[("test-device", key)]
    assert choice.winner == ("dequant-once" if broken else "triton")
    assert ("triton" in choice.errors) == broken
    assert backends.calls[("quant_multi_fwd", "dequant-once")] == before + broken
