"""Adapting a model: what a user can hand get_lora_model / from_linear that it must refuse, and
what a refused or finished operation leaves behind (found by trying the library as a new user)."""
import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, LoraConfig, get_lora_model

peft = pytest.importorskip("peft")


class ScaledLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2.0


class Net(nn.Module):
    def __init__(self, first=None):
        super().__init__()
        torch.manual_seed(0)
        self.a = first if first is not None else nn.Linear(8, 8)
        self.b = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, \
        {n: p.requires_grad for n, p in model.named_parameters()}


def _unchanged(model, before):
    sd, flags = _state(model)
    assert sd.keys() == before[0].keys() and all(torch.equal(sd[k], before[0][k]) for k in sd)
    assert flags == before[1]


@pytest.mark.parametrize("make", ["subclass", "forward_hook", "pre_hook"])
def test_a_target_whose_function_the_layer_would_drop_is_refused(make):
    """A Linear subclass with its own forward, or a hooked Linear, computes something nn.Linear does
    not: adapting it would silently change the model's outputs (peft keeps it as its base layer)."""
    torch.manual_seed(0)
    model = Net(ScaledLinear(8, 8) if make == "subclass" else None)
    if make == "forward_hook":
        model.a.register_forward_hook(lambda m, i, o: o * 3)
    elif make == "pre_hook":
        model.a.register_forward_pre_hook(lambda m, i: (i[0] * 3,))
    before = _state(model)
    with pytest.raises(ValueError, match="cannot adapt a"):
        get_lora_model(model, LoraConfig(r=2, target_modules=["a", "b"]))
    _unchanged(model, before)
    assert type(model.a) is not FusedLoRALinear
    with pytest.raises(ValueError, match="from_linear"):
        FusedLoRALinear.from_linear(model.a, r=2)


def test_all_linear_over_a_subclass_is_refused_too():
    model = Net(ScaledLinear(8, 8))
    with pytest.raises(ValueError, match="overrides nn.Linear's forward"):
        get_lora_model(model, LoraConfig(r=2, target_modules="all-linear"))


def test_a_quantized_weight_is_refused_by_name():
    model = Net()
    model.a.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(ValueError, match="quantized"):
        get_lora_model(model, LoraConfig(r=2, target_modules=["a"]))


@pytest.mark.parametrize("wrap", ["ours", "peft"])
def test_adapting_an_adapted_model_is_refused(wrap):
    model = Net()
    if wrap == "ours":
        adapted = get_lora_model(model, LoraConfig(r=2, target_modules=["a"]))
    else:
        adapted = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["a"]))
    before = _state(adapted)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        get_lora_model(adapted, LoraConfig(r=4, target_modules=["b"]))
    _unchanged(adapted, before)


def test_a_peft_config_is_a_type_error_pointing_to_ours():
    with pytest.raises(TypeError, match="fused_lora.LoraConfig"):
        get_lora_model(Net(), peft.LoraConfig(r=2, target_modules=["a"]))


def test_refused_safe_merge_and_unload_leaves_every_weight_exactly():
    """Every layer's merged weight is checked before any is written: merge-then-unmerge would leave
    rounding changes in the layers merged before the failing one."""
    lm = get_lora_model(Net(), LoraConfig(r=2, target_modules=["a", "b", "head"], init_lora_weights=False))
    with torch.no_grad():
        lm.model.head.lora_B[0, 0] = float("inf")
    before = _state(lm)
    with pytest.raises(ValueError, match="head"):
        lm.merge_and_unload(safe_merge=True)
    _unchanged(lm, before)
    assert all(not layer.merged for _, layer in lm.lora_layers())


@pytest.mark.parametrize("how", ["unload", "merge_and_unload"])
def test_unload_keeps_the_trained_modules_to_save_as_peft_does(how):
    x = torch.randn(5, 8)
    ours = get_lora_model(Net(), LoraConfig(r=2, target_modules=["a"], modules_to_save=["head"]))
    theirs = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["a"], modules_to_save=["head"]))
    with torch.no_grad():
        for m in (ours, theirs):
            for n, p in m.named_parameters():
                if p.requires_grad and "head" in n:
                    p.add_(1.0)
    got, want = getattr(ours, how)(), getattr(theirs, how)()
    with torch.no_grad():
        torch.testing.assert_close(got(x), want(x))
    assert isinstance(got.head, nn.Linear)


def test_a_refused_unmerge_during_unload_swaps_no_layer():
    """unload() of merged layers unmerges them all before swapping any: when one refuses (its weight
    cannot be restored), the model keeps every adapted layer."""
    lm = get_lora_model(Net(), LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    lm.model.a.merge()
    lm.model.b.merge()
    with torch.no_grad():
        lm.model.b.weight[0, 0] = float("inf")  # unmerge refuses: the weight cannot be restored
    with pytest.raises(ValueError):
        lm.unload()
    assert isinstance(lm.model.a, FusedLoRALinear) and isinstance(lm.model.b, FusedLoRALinear)
