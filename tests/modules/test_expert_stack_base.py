"""FusedLoRALinear over an expert stack (the EXPERTS base kind, issue 20 item 3): one 3-D parameter of an experts
module as the base; adapters lora_A (E, r, in), lora_B (E, out, r); forward with group_sizes through the grouped
op; merge / unmerge into the stack; the stack stays the experts module's parameter. Checked against the float64
reference of the grouped op (`core.reference.lora_linear_grouped_ref`, autograd for the gradients)."""
import math

import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear
from fused_lora.core.reference import lora_linear_grouped_ref
from fused_lora.modules.bases import EXPERTS, ExpertStack

E, K, N, R = 4, 6, 10, 3
SIZES = [3, 0, 5, 1]  # an expert no row reaches


def stack(transposed=False, bias=True, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, N, K, generator=g, dtype=dtype) / math.sqrt(K)
    if transposed:
        w = w.transpose(1, 2).contiguous()  # (E, K, N), as GPT-OSS stores it
    b = torch.randn(E, N, generator=g, dtype=dtype) if bias else None
    return nn.Parameter(w), None if b is None else nn.Parameter(b)


def layer_over(transposed=False, bias=True, dtype=torch.float64, **kw):
    w, b = stack(transposed, bias, dtype)
    kw.setdefault("init_lora_weights", False)
    return FusedLoRALinear.from_linear(ExpertStack(w, b, transposed), r=R, lora_alpha=6, **kw), w, b


def rows(dtype=torch.float64, sizes=SIZES, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(sum(sizes), K, generator=g, dtype=dtype, requires_grad=True), torch.tensor(sizes)


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_gradients_equal_the_reference(transposed, bias):
    layer, w, b = layer_over(transposed, bias)
    assert layer.base_kind is EXPERTS and layer.num_experts == E
    assert (layer.in_features, layer.out_features) == (K, N) and layer.fan_in_fan_out == transposed
    assert layer.lora_A.shape == (E, R, K) and layer.lora_B.shape == (E, N, R)
    x, sizes = rows()
    y = layer(x, group_sizes=sizes)
    ref = lora_linear_grouped_ref(x, sizes, w, b, layer.lora_A, layer.lora_B, layer.scaling, transposed=transposed)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    want = torch.autograd.grad(ref, (x, layer.lora_A, layer.lora_B), dy)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)
    assert got[1][1].abs().max() == 0 and got[2][1].abs().max() == 0  # expert 1 has no rows: no gradient
    assert w.grad is None and not w.requires_grad  # the stack is frozen


def test_the_stack_stays_the_experts_modules_parameter():
    layer, w, b = layer_over(transposed=True)
    assert layer.weight is w and layer.bias is b  # the very tensors: no copy
    assert [n for n, _ in layer.named_parameters()] == ["lora_A", "lora_B"]  # registered in their module only
    assert sorted(layer.state_dict()) == ["lora_A", "lora_B"]


def test_init_as_peft_bounds_and_b_zero():
    layer, *_ = layer_over(init_lora_weights=True)
    assert layer.lora_B.abs().max() == 0  # starts equal to the base
    bound = 1 / math.sqrt(K)  # peft: kaiming_uniform(a=sqrt(5)) on nn.Linear(in, r x experts): U(-1/sqrt(in), ..)
    assert 0.5 * bound < layer.lora_A.abs().max() <= bound


@pytest.mark.parametrize("transposed", [False, True])
def test_merge_writes_each_experts_delta_into_the_stack_and_unmerge_restores(transposed):
    layer, w, _ = layer_over(transposed)
    before = w.detach().clone()
    x, sizes = rows()
    y = layer(x, group_sizes=sizes).detach()
    layer.merge()
    delta = layer.scaling * torch.einsum("eor,eri->eoi", layer.lora_B.detach(), layer.lora_A.detach())
    expected = before + (delta.transpose(1, 2) if transposed else delta)
    torch.testing.assert_close(w.detach(), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer(x, group_sizes=sizes), y, rtol=1e-12, atol=1e-12)  # merged: the base alone
    layer.unmerge()
    torch.testing.assert_close(w.detach(), before, rtol=1e-12, atol=1e-12)


def test_several_adapters_and_disable():
    layer, w, b = layer_over()
    layer.add_adapter("other", r=2, lora_alpha=2, init_lora_weights=False)
    A2, B2 = layer.adapter_weights("other")
    assert A2.shape == (E, 2, K) and B2.shape == (E, N, 2) and not A2.requires_grad
    x, sizes = rows()
    layer.set_adapter("other")
    y = layer(x, group_sizes=sizes)
    torch.testing.assert_close(y, lora_linear_grouped_ref(x, sizes, w, b, A2, B2, 1.0), rtol=1e-12, atol=1e-12)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x, group_sizes=sizes), lora_linear_grouped_ref(x, sizes, w, b, None, None, 1.0),
                                   rtol=1e-12, atol=1e-12)


def test_dropout_in_training_only():
    layer, w, b = layer_over(lora_dropout=0.5, dtype=torch.float32)
    x, sizes = rows(torch.float32)
    torch.manual_seed(0)
    y1 = layer(x, group_sizes=sizes)
    y2 = layer(x, group_sizes=sizes)
    assert not torch.equal(y1, y2)  # a fresh mask per call
    layer.eval()
    ref = lora_linear_grouped_ref(x, sizes, w, b, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(layer(x, group_sizes=sizes), ref, rtol=1e-5, atol=1e-5)


def test_refusals_name_the_problem():
    layer, *_ = layer_over()
    x, sizes = rows()
    with pytest.raises(TypeError, match="group_sizes"):
        layer(x)
    with pytest.raises(ValueError, match="2-D"):
        layer(x.detach()[None], group_sizes=sizes)
    with pytest.raises(ValueError, match="adapter_names"):
        layer(x, adapter_names=["default"] * x.shape[0], group_sizes=sizes)
    with pytest.raises(TypeError, match="no nn.Linear form"):
        layer.to_linear()
    with pytest.raises(TypeError, match="group_sizes is for a layer over an expert stack"):
        FusedLoRALinear(K, N, r=2)(torch.randn(3, K), group_sizes=torch.tensor([3]))
    w, b = stack()
    with pytest.raises(ValueError, match="DoRA"):
        FusedLoRALinear.from_linear(ExpertStack(w, b), r=2, use_dora=True)
    with pytest.raises(ValueError, match="3-D"):
        FusedLoRALinear.from_linear(ExpertStack(nn.Parameter(torch.randn(N, K)), None), r=2)
    with pytest.raises(ValueError, match=r"bias is shape \(4, 7\)"):
        FusedLoRALinear.from_linear(ExpertStack(w, nn.Parameter(torch.randn(E, 7, dtype=w.dtype))), r=2)
    assert w.requires_grad  # refused before anything was frozen
