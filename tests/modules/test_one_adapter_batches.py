"""A mixed batch whose samples all name one adapter runs the single-adapter op (no per-row machinery):
the same outputs, gradients and dropout masks as the mixed-batch op would give, since adapter a's mask
in a mixed batch is the single-adapter op's with the seed core_dropout.adapter_seed(seed, a)."""
import pytest
import torch

from fused_lora.core import dropout as core_dropout
from fused_lora import FusedLoRALinear
from fused_lora import dispatch as backends
from fused_lora.core import dropout as dropout_mod
from fused_lora.modules import layer as layer_mod
from fused_lora.ops.multi import lora_linear_multi


def _layer(p):
    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 16, r=4, lora_dropout=p, init_lora_weights=False, backend="torch")
    layer.add_adapter("other", r=3, lora_alpha=6, lora_dropout=p, init_lora_weights=False)
    layer.set_requires_grad(["default", "other"])
    return layer


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("name", ["default", "other"])
def test_one_named_adapter_takes_the_single_adapter_op(monkeypatch, p, name):
    seed = torch.tensor(123456789, dtype=torch.int64)
    monkeypatch.setattr(layer_mod, "seed_for", lambda p: seed.clone())
    layer = _layer(p).train()
    x = torch.randn(3, 5, 24, requires_grad=True)
    backends.calls.clear()
    y = layer(x, adapter_names=[name] * 3)
    assert backends.calls[("fwd", "torch")] == 1 and not backends.calls[("multi_fwd", "torch")]
    dy = torch.randn_like(y)
    y.backward(dy)
    got = [x.grad] + [t.grad for t in layer.adapter_weights(name)]

    # What the mixed-batch op computes for the same call (adapter 0 of a one-adapter list, same seed).
    x2 = x.detach().clone().requires_grad_(True)
    A, B = (t.detach().clone().requires_grad_(True) for t in layer.adapter_weights(name))
    s = layer.adapter_settings(name)
    want_y = lora_linear_multi(x2.reshape(15, 24), layer.weight, layer.bias, [(A, B, s.scaling, p)],
                               torch.zeros(15, dtype=torch.int64), seed, "torch").reshape(3, 5, 16)
    want_y.backward(dy)
    torch.testing.assert_close(y, want_y)
    for g, w in zip(got, [x2.grad, A.grad, B.grad]):
        torch.testing.assert_close(g, w)
    other = "other" if name == "default" else "default"
    assert all(t.grad is None for t in layer.adapter_weights(other))


def test_base_rows_or_two_adapters_stay_mixed():
    layer = _layer(0.0).eval()
    x = torch.randn(2, 4, 24)
    backends.calls.clear()
    layer(x, adapter_names=["default", "__base__"])
    layer(x, adapter_names=["default", "other"])
    assert backends.calls[("multi_fwd", "torch")] == 2 and not backends.calls[("fwd", "torch")]


def test_adapter_seed_of_a_tensor_seed_equals_the_int_one():
    from fused_lora.core.dropout import adapter_seed
    for seed in (0, 1, 2**62 - 1, 987654321987654321):
        for a in (0, 1, 7):
            assert int(adapter_seed(torch.tensor(seed), a)) == adapter_seed(seed, a)
    assert dropout_mod.SEED_HIGH == 2**62


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_one_named_adapter_over_a_quantized_base(monkeypatch, p):
    from fused_lora.modules import quantized as quant
    from fused_lora.ops.quant import lora_linear_quant_multi
    seed = torch.tensor(42, dtype=torch.int64)
    monkeypatch.setattr(layer_mod, "seed_for", lambda p: seed.clone())
    torch.manual_seed(0)
    linear = quant.QuantizedLinear.from_linear(torch.nn.Linear(64, 16), "nf4", blocksize=32)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_dropout=p, init_lora_weights=False, backend="torch")
    layer.add_adapter("other", r=2, lora_dropout=p, init_lora_weights=False)
    layer.set_requires_grad(["default", "other"])
    layer.train()
    x = torch.randn(2, 3, 64)
    backends.calls.clear()
    y = layer(x, adapter_names=["other", "other"])
    assert backends.calls[("quant_fwd", "torch")] == 1 and not backends.calls[("quant_multi_fwd", "torch")]
    A, B = layer.adapter_weights("other")
    want = lora_linear_quant_multi(x.reshape(6, 64), layer.weight, layer.bias,
                                   [(A, B, layer.adapter_settings("other").scaling, p)],
                                   torch.zeros(6, dtype=torch.int64), seed, "torch")
    torch.testing.assert_close(y, want.reshape(2, 3, 16))


def test_one_named_adapter_with_dropout_compiles_fullgraph(monkeypatch):
    seed = torch.tensor(7, dtype=torch.int64)
    monkeypatch.setattr(layer_mod, "seed_for", lambda p: seed.clone())
    layer = _layer(0.2).train()
    x = torch.randn(3, 5, 24)
    want = layer(x, adapter_names=["other"] * 3)
    f = torch.compile(lambda t: layer(t, adapter_names=["other"] * 3), backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(f(x), want)  # the seed for adapter 0 is tensor arithmetic: traced, same masks
