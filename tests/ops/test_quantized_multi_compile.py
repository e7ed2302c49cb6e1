"""Several adapters in one batch over a quantized base under torch.compile(fullgraph=True): the custom ops
fused_lora::lora_linear_quant_multi_fwd / _bwd are traced without a graph break, in eval and in training,
and give the eager path's outputs and gradients (same backend, same dropout masks from the same seed).
Truths: the eager path (itself held against float64 over the dequantized weight in
test_trial_quant_multi.py) and, for the layer, float64 over the dequantized weight."""
import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, QuantizedLinear
from fused_lora.core import formats as quant
from fused_lora.ops.quant import lora_linear_quant_multi
from utils import compiled_and_eager_mixed, two_random_adapters

FORMATS = [("nf4", True), ("nf4", False), ("int8", None)]


def _layer(fmt, nested, dropout=0.0):
    torch.manual_seed(0)
    kwargs = dict(double_quant=nested) if fmt == "nf4" else {}
    base = QuantizedLinear.from_linear(nn.Linear(128, 64), fmt, **kwargs)
    layer = FusedLoRALinear.from_linear(base, r=4, lora_alpha=8, lora_dropout=dropout)
    layer.add_adapter("b", r=8, lora_alpha=4, lora_dropout=dropout)
    layer.add_adapter("c", r=2, lora_alpha=2, lora_dropout=dropout)
    with torch.no_grad():
        for name in ("default", "b", "c"):
            for t in layer.adapter_weights(name):
                t.normal_(0, 0.3)
    layer.set_requires_grad(["default", "b", "c"])
    return layer


def _float64(layer, x, names):
    """y and d(sum y * dy)/dx in float64 over the dequantized weight, one sample at a time."""
    W = layer.weight.dequantize(torch.float64)
    b = layer.bias.double()
    ys = []
    for i, name in enumerate(names):
        xi = x[i].double()
        y = xi @ W.T + b
        if name != "__base__":
            A, B = (t.detach().double() for t in layer.adapter_weights(name))
            y = y + layer._adapter_settings[name].scaling * (xi @ A.T) @ B.T
        ys.append(y)
    return torch.stack(ys)


@pytest.mark.parametrize("fmt,nested", FORMATS)
def test_compiled_mixed_batch_eval_matches_eager_and_float64(fmt, nested):
    layer = _layer(fmt, nested).eval()
    names = ["b", "default", "__base__", "c", "b"]
    x = torch.randn(5, 3, 128)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)  # a graph break raises
    with torch.no_grad():
        got = compiled(x, adapter_names=names)
        want = layer(x, adapter_names=names)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got.double(), _float64(layer, x, names), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,nested", FORMATS)
def test_compiled_mixed_batch_training_matches_eager(fmt, nested):
    """Training mode (no dropout, so the call's seed does not matter): outputs, dx, db and every adapter's
    dA, dB equal the eager path's."""
    layer = _layer(fmt, nested).train()
    layer.bias.requires_grad_(True)
    names = ["b", "default", "__base__", "b"]
    x = torch.randn(4, 3, 128)
    dy = torch.randn(4, 3, 64)
    outs = compiled_and_eager_mixed(layer, x, names, dy, ("default", "b", "c"))
    for got, want in zip(*outs):
        if want is None:  # adapter "c" is not in the batch: no gradient, in both paths
            assert got is None or not got.any()
            continue
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt,nested", [("nf4", True), ("int8", None)])
def test_compiled_op_with_dropout_matches_eager(fmt, nested):
    """With dropout and a fixed seed, the compiled op draws the eager path's masks: same values and gradients."""
    layer = _layer(fmt, nested)
    qw = layer.weight
    g = torch.Generator().manual_seed(2)
    adapters = two_random_adapters(g, 128, 64)
    row_adapter = torch.tensor([1, 0, -1, 1, 1, 0, -1, 0, 0])
    bias = layer.bias.detach().clone().requires_grad_(True)

    def f(x, bias, a0, b0, a1, b1):
        return lora_linear_quant_multi(x, qw, bias, [(a0, b0, 0.5, 0.3), (a1, b1, 2.0, 0.6)], row_adapter, seed=99)

    x = torch.randn(9, 128, generator=g, requires_grad=True)
    dy = torch.randn(9, 64, generator=g)
    inputs = (x, bias, *(t for a in adapters for t in a[:2]))
    torch._dynamo.reset()
    got_y = torch.compile(f, fullgraph=True)(*inputs)
    got = torch.autograd.grad(got_y, inputs, dy)
    want_y = f(*inputs)
    want = torch.autograd.grad(want_y, inputs, dy)
    torch.testing.assert_close(got_y, want_y, atol=1e-6, rtol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_custom_ops_opcheck():
    from fused_lora.ops import quant as quant_ops
    layer = _layer("nf4", True)
    M, K = 9, 128
    x = torch.randn(M, K, requires_grad=True)
    A0, B0 = torch.randn(4, K, requires_grad=True), torch.randn(64, 4, requires_grad=True)
    A1, B1 = torch.randn(2, K, requires_grad=True), torch.randn(64, 2, requires_grad=True)
    row_adapter = torch.tensor([1, 0, -1, 1, 1, 0, -1, 0, 0])
    args = (x, *quant.op_args(layer.weight.data()), layer.bias.detach(), [A0, A1], [B0, B1], [0.5, 2.0], [0.0, 0.3],
            row_adapter, torch.tensor(7), "torch")
    torch.library.opcheck(quant_ops.lora_linear_quant_multi_fwd, args)
    _, h = quant_ops.lora_linear_quant_multi_fwd(*args)
    assert h.shape == (M, 4)
    dy = torch.randn(M, 64)
    for need_dx, need_lora, need_db in [(True, [True, True], False), (False, [False, True], True)]:
        bwd = (dy, x.detach(), *args[1:4], [A0.detach(), A1.detach()], [B0.detach(), B1.detach()], h.detach(),
               *args[7:12], need_dx, need_lora, need_db)
        torch.library.opcheck(quant_ops.lora_linear_quant_multi_bwd, bwd)
        dx, dA, dB, db = quant_ops.lora_linear_quant_multi_bwd(*bwd)
        assert dx.shape == ((M, K) if need_dx else (0,)) and db.shape == ((64,) if need_db else (0,))
        assert [t.shape for t in dA] == [(4, K) if need_lora[0] else (0,), (2, K)]


def test_compiled_bad_row_adapter_is_refused_clearly():
    """Under torch.compile, a row_adapter of the wrong length is refused by the fake (a clear ValueError)."""
    layer = _layer("int8", None)
    A, B = (t.detach() for t in layer.adapter_weights("default"))

    def f(x):
        return lora_linear_quant_multi(x, layer.weight, None, [(A, B, 1.0, 0.0)], torch.zeros(3, dtype=torch.int64))

    torch._dynamo.reset()
    with pytest.raises(Exception, match="row_adapter has shape"):
        torch.compile(f, fullgraph=True)(torch.randn(4, 128))
