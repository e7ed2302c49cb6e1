"""One set of rules for adapter settings: LoraConfig, FusedLoRALinear and adapter files agree, every
refusal names the field, and a refused call leaves the model exactly as it was."""
import json
import math

import pytest
import torch
from torch import nn

from fused_lora import AdapterError, FusedLoRALinear, LoraConfig, LoraModel, get_lora_model
from fused_lora.cli.demo import MLP

# (field, bad value): each must be refused everywhere the field is taken.
LAYER_BAD = [
    ("lora_alpha", "8"), ("lora_alpha", None), ("lora_alpha", float("inf")), ("lora_alpha", float("nan")),
    ("lora_alpha", -float("inf")), ("lora_alpha", True), ("lora_alpha", 10 ** 400),
    # issue 18, attacker re-trial, finding 7 (a scale lora_alpha / r beyond float32) and its sibling (an r
    # beyond any tensor size: sqrt(r) for rsLoRA raised OverflowError)
    ("lora_alpha", 1e40), ("lora_alpha", -1e40), ("r", 2 ** 63), ("r", 10 ** 400),
    ("r", True), ("r", 0), ("r", 2.0), ("r", "4"), ("r", None),
    ("use_rslora", "no"), ("use_rslora", 1), ("use_rslora", None),
    ("lora_dropout", 1.0), ("lora_dropout", -0.1), ("lora_dropout", "0.1"), ("lora_dropout", float("nan")),
    ("lora_dropout", True), ("lora_dropout", None),
    ("init_lora_weights", "bogus"), ("init_lora_weights", 1), ("init_lora_weights", None),
]
CONFIG_ONLY_BAD = [
    ("target_modules", 5), ("target_modules", ["seq.0", 3]), ("target_modules", "seq.(0"),
    ("target_modules", {"seq.0": 1}), ("exclude_modules", "(["), ("exclude_modules", [None]),
    ("modules_to_save", "seq.4"), ("modules_to_save", [4]), ("bias", True), ("bias", "some"),
    ("fan_in_fan_out", "no"), ("task_type", 3), ("base_model_name_or_path", ["x"]),
]


def fresh():
    torch.manual_seed(0)
    return MLP(num_units_hidden=16)


def snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            model.training)


def assert_same(model, snap):
    mods, params, training = snapshot(model)
    assert mods == snap[0]
    assert params.keys() == snap[1].keys()
    for n, (t, rg) in params.items():
        assert torch.equal(t, snap[1][n][0]) and rg == snap[1][n][1], n
    assert training == snap[2]


@pytest.mark.parametrize("field,value", LAYER_BAD + CONFIG_ONLY_BAD)
def test_lora_config_refuses(field, value):
    with pytest.raises((TypeError, ValueError), match=field):
        LoraConfig(target_modules=["seq.0"], **{field: value})


@pytest.mark.parametrize("field,value", LAYER_BAD)
def test_layer_and_from_linear_refuse(field, value):
    with pytest.raises((TypeError, ValueError), match=field):
        FusedLoRALinear(4, 3, **{field: value})
    lin = nn.Linear(4, 3)
    with pytest.raises((TypeError, ValueError), match=field):
        FusedLoRALinear.from_linear(lin, **{field: value})
    assert lin.weight.requires_grad and lin.bias.requires_grad


@pytest.mark.parametrize("field,value", LAYER_BAD + CONFIG_ONLY_BAD)
def test_get_lora_model_refuses_a_config_changed_after_construction(field, value):
    """A LoraConfig is a mutable dataclass: get_lora_model checks again and changes nothing."""
    cfg = LoraConfig(target_modules=["seq.0", "seq.2"])
    setattr(cfg, field, value)
    model = fresh()
    model.seq[2].bias.requires_grad_(False)  # mixed flags must come back exactly
    snap = snapshot(model)
    with pytest.raises((TypeError, ValueError), match=field):
        get_lora_model(model, cfg)
    assert_same(model, snap)


def good_layer_values_agree():
    """What the layer accepts, the config accepts (and the other way round)."""
    for kw in ({"r": 1}, {"lora_alpha": 0}, {"lora_alpha": 2.5}, {"use_rslora": True}, {"lora_dropout": 0.0},
               {"lora_dropout": 0.5}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": False}):
        LoraConfig(target_modules=["a"], **kw)
        FusedLoRALinear(4, 3, **kw)


def test_good_values_accepted_everywhere():
    good_layer_values_agree()
    layer = FusedLoRALinear(4, 3, r=4, lora_alpha=2, use_rslora=True)
    assert layer.scaling == 2 / math.sqrt(4)


# ---------------------------------------------------------------- adapter files

def saved_adapter(tmp_path):
    lm = get_lora_model(fresh(), LoraConfig(r=2, target_modules=["seq.0", "seq.2"]))
    lm.save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


def refused_file(tmp_path, text, match):
    model = fresh()
    model.seq[0].weight.requires_grad_(False)
    model.eval()
    snap = snapshot(model)
    (tmp_path / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterError, match=match):
        LoraModel.from_pretrained(model, tmp_path)
    assert_same(model, snap)


@pytest.mark.parametrize("field,value", LAYER_BAD + CONFIG_ONLY_BAD)
def test_adapter_config_values_refused(tmp_path, field, value):
    cfg = saved_adapter(tmp_path)
    if value == 10 ** 400:
        text = json.dumps(cfg).replace('"lora_alpha": 8', '"lora_alpha": 1e400')
        assert "1e400" in text
    else:
        cfg[field] = value
        text = json.dumps(cfg)
    refused_file(tmp_path, text, field)


@pytest.mark.parametrize("text,match", [
    ("[1, 2]", "JSON object"), ("null", "JSON object"), ('"r"', "JSON object"),
    ("[" * 100_000 + "]" * 100_000, "adapter_config.json"),
    ('{"r": 2, "x": "' + "y" * (17 << 20) + '"}', "too large"),
    ('{"r": 2, "target_modules": ' + "[" * 5000 + "]" * 5000 + "}", "adapter_config.json"),
])
def test_bad_adapter_config_documents(tmp_path, text, match):
    saved_adapter(tmp_path)
    refused_file(tmp_path, text, match)


def test_failure_midway_leaves_model_exactly_as_it_was(tmp_path, monkeypatch):
    """A failure after some layers were wrapped (here: injected) undoes everything."""
    saved_adapter(tmp_path)
    real, calls = FusedLoRALinear.from_linear.__func__, [0]

    def failing(cls, *a, **k):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("injected failure")
        return real(cls, *a, **k)
    monkeypatch.setattr(FusedLoRALinear, "from_linear", classmethod(failing))
    for build in (lambda m: get_lora_model(m, LoraConfig(r=2, target_modules=["seq.0", "seq.2"],
                                                         modules_to_save=["seq.4"])),
                  lambda m: LoraModel.from_pretrained(m, tmp_path)):
        model = fresh()
        model.seq[4].bias.requires_grad_(False)
        snap = snapshot(model)
        calls[0] = 0
        with pytest.raises(RuntimeError, match="injected"):
            build(model)
        assert_same(model, snap)
        assert all(type(m) in (MLP, nn.Sequential, nn.Linear, nn.ReLU, nn.LogSoftmax) for m in model.modules())


def test_bad_backend_argument_to_from_pretrained_is_a_plain_value_error(tmp_path):
    saved_adapter(tmp_path)
    with pytest.raises(ValueError, match="unknown backend") as info:
        LoraModel.from_pretrained(fresh(), tmp_path, backend="gpu-please")
    assert not isinstance(info.value, AdapterError)


def test_save_refuses_a_config_changed_to_a_bad_value(tmp_path):
    lm = get_lora_model(fresh(), LoraConfig(r=2, target_modules=["seq.0"]))
    lm.peft_config["default"].lora_alpha = float("nan")
    with pytest.raises(ValueError, match="lora_alpha"):
        lm.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_config.json").exists()
