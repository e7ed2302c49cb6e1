"""The quantized ops on the dequant-once row, asked for by name: one adapter and several in one batch give
the torch row's results (same dropout masks), and through a stack of layers, forward and backward, at most
one layer's dequantized weight exists at a time."""
import weakref

import pytest
import torch

from fused_lora import dispatch
from fused_lora.core import formats
from fused_lora.modules import quantized as quant
from fused_lora.ops.quant import lora_linear_quant, lora_linear_quant_multi


def _weights(n, N=24, K=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [quant.quantize_nf4(torch.randn(N, K, generator=g) * K ** -0.5, blocksize=64) for _ in range(n)]


def _lora(g, r, N, K):
    return ((torch.randn(r, K, generator=g) * K ** -0.5).requires_grad_(True),
            (torch.randn(N, r, generator=g) * r ** -0.5).requires_grad_(True))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_several_adapters_by_name_equal_the_torch_row(p):
    qw = quant.quantize_int8(torch.randn(24, 128, generator=torch.Generator().manual_seed(1)) * 0.1)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 128, generator=g).requires_grad_(True)
    bias = torch.randn(24, generator=g).requires_grad_(True)
    (a, b), (a2, b2) = _lora(g, 4, 24, 128), _lora(g, 2, 24, 128)
    adapters = [(a, b, 0.5, p), (a2, b2, 2.0, 0.0)]
    row_adapter = torch.randint(-1, 2, (30,), generator=g)
    seed = torch.tensor(77)
    results = {}
    for backend in ("torch", "dequant-once"):
        before = dispatch.calls[("quant_multi_bwd", backend)]
        y = lora_linear_quant_multi(x, qw, bias, adapters, row_adapter, seed, backend=backend)
        results[backend] = (y.detach(), *torch.autograd.grad(y.square().sum(), (x, bias, a, b, a2, b2)))
        assert dispatch.calls[("quant_multi_bwd", backend)] == before + 1
    for got, want in zip(results["dequant-once"], results["torch"]):
        # the same math in another summation order: in max norm, within 1e-5 of the largest entry
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()


def test_at_most_one_layers_weight_is_alive_through_a_stack_of_layers(monkeypatch):
    alive, peak, calls = [0], [0], []
    real = formats.dequantize

    def tracked(data, dtype):
        w = real(data, dtype)
        calls.append(data.shape)
        alive[0] += 1
        peak[0] = max(peak[0], alive[0])
        weakref.finalize(w, lambda: alive.__setitem__(0, alive[0] - 1))
        return w

    monkeypatch.setattr(formats, "dequantize", tracked)
    layers = _weights(3, N=128, K=128, seed=3)
    g = torch.Generator().manual_seed(4)
    loras = [_lora(g, 4, 128, 128) for _ in layers]
    h = torch.randn(16, 128, generator=g).requires_grad_(True)
    out = h
    for qw, (a, b) in zip(layers, loras):
        out = torch.relu(lora_linear_quant(out, qw, None, a, b, 0.5, 0.1, torch.tensor(5), backend="dequant-once"))
    assert peak[0] == 1 and alive[0] == 0  # each layer's W freed when its forward returned
    out.sum().backward()
    assert peak[0] == 1 and alive[0] == 0
    assert len(calls) == 2 * len(layers)  # once per forward, once per backward (dX asked for)
    assert all(t.grad is not None for t in (h, *[p for pair in loras for p in pair]))
