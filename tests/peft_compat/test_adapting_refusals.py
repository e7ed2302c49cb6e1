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


def test_a_peft_config_is_taken_as_ours_and_anything_else_is_a_type_error():
    """A peft LoraConfig is read as ours (issue 18 item 22: one rule with add_adapter, which took it while
    get_lora_model refused it); an object that is no config at all is a TypeError naming both kinds."""
    theirs = get_lora_model(Net(), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a"], init_lora_weights=False))
    ours = get_lora_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["a"], init_lora_weights=False))
    assert theirs.peft_config == ours.peft_config
    with pytest.raises(TypeError, match="expected a LoraConfig \\(fused_lora's or peft's\\), got dict"):
        get_lora_model(Net(), {"r": 2, "target_modules": ["a"]})


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


# ---------------------------------------------------------------- issue 18 item 23: error messages

def test_layers_refused_for_one_reason_are_named_together_with_the_reason_once():
    """Issue 18 item 23: adapting a bitsandbytes model whose layers are refused (here: Linear4bit not yet
    quantized) repeated the same ~270-character reason after every layer; the layers are now grouped
    by reason, as patch_peft's report does, every reason said once."""
    bnb = pytest.importorskip("bitsandbytes")
    model = nn.Sequential(*[bnb.nn.Linear4bit(64, 64, compute_dtype=torch.float32, quant_type="nf4")
                            for _ in range(8)], nn.Linear(64, 8))
    model[7] = ScaledLinear(64, 64)  # a second reason
    with pytest.raises(ValueError) as err:
        get_lora_model(model, LoraConfig(r=4, target_modules="all-linear"))
    message = str(err.value)
    assert message.count("no quant_state") == 1 and message.count("overrides nn.Linear's forward") == 1
    assert "cannot adapt 0, 1, 2, 3, 4 and 2 more (Linear4bit: the Params4bit has no quant_state" in message
    assert "; 7 (ScaledLinear overrides" in message
    assert len(message) < 700
    assert type(model[0]).__name__ == "Linear4bit"  # nothing half-applied


def test_qdora_refusal_names_the_layers_not_an_internal_function():
    """Issue 18 item 23: get_lora_model(use_dora=True) over a quantized base answered "from_linear:
    use_dora=True over a quantized base ..." (an internal function, and no layer); it now names the
    layers, before anything is changed."""
    from fused_lora import quantize_model
    from fused_lora.modules.quantized import QuantizedLinear
    model = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 8)), "nf4",
                           target_modules=["0", "2"])
    with pytest.raises(ValueError) as err:
        get_lora_model(model, LoraConfig(r=4, target_modules=["0", "2", "3"], use_dora=True))
    message = str(err.value)
    assert "from_linear" not in message
    assert message.startswith("use_dora=True: cannot adapt 0, 2 (QuantizedLinear): DoRA over a quantized base "
                              "(QDoRA) is not implemented"), message
    assert isinstance(model[0], QuantizedLinear) and type(model[3]) is nn.Linear
    with pytest.raises(ValueError, match=r"FusedLoRALinear.from_linear: use_dora=True over a quantized base"):
        FusedLoRALinear.from_linear(model[0], r=4, use_dora=True)  # called directly, the method names itself


@pytest.mark.parametrize("quantized", [False, True])
def test_wrong_input_width_is_said_as_a_number(quantized):
    """Issue 18 item 23: "input's last dimension is (15,)" printed a tuple; it is a number now, and a
    0-dim input says so."""
    from fused_lora import quantize_model
    base = nn.Linear(64, 8)
    layer = FusedLoRALinear.from_linear(quantize_model(nn.Sequential(base), "int8")[0] if quantized else base, r=2)
    with pytest.raises(ValueError) as err:
        layer(torch.randn(3, 15))
    assert "input's last dimension is 15 but in_features is 64 (input shape (3, 15))" in str(err.value)
    with pytest.raises(ValueError, match="input is a 0-dim tensor but in_features is 64"):
        layer(torch.tensor(1.0))
