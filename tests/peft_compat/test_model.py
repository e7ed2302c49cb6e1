"""Model adaptation: targets, counts, freezing, modules_to_save, merge_and_unload, unload, disable_adapter."""
import copy

import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, LoraConfig, get_lora_model
from fused_lora.cli.demo import MLP


def fresh_mlp():
    torch.manual_seed(0)
    return MLP()


def test_tutorial_counts_exact(capsys):
    lm = get_lora_model(fresh_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"]))
    assert lm.get_nb_trainable_parameters() == (12_660, 455_262)
    lm.print_trainable_parameters()
    assert capsys.readouterr().out.strip() == "trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808"
    lm2 = get_lora_model(fresh_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    assert lm2.get_nb_trainable_parameters() == (13_062, 455_664)


def test_injection_shares_weights_and_freezes():
    model = fresh_mlp()
    w0 = model.seq[0].weight
    lm = get_lora_model(model, LoraConfig(r=3, target_modules=["seq.0", "seq.2"]))
    assert isinstance(model.seq[0], FusedLoRALinear) and model.seq[0].weight is w0
    assert isinstance(model.seq[4], nn.Linear) and not model.seq[4].weight.requires_grad
    trainable = sorted(n for n, p in lm.named_parameters() if p.requires_grad)
    assert trainable == ["model.seq.0.lora_A", "model.seq.0.lora_B", "model.seq.2.lora_A", "model.seq.2.lora_B"]


def test_target_forms():
    def targets(spec, **kw):
        lm = get_lora_model(fresh_mlp(), LoraConfig(target_modules=spec, **kw))
        return sorted(n for n, _ in lm.lora_layers())
    assert targets(["0", "2"]) == ["seq.0", "seq.2"]  # dotted suffixes
    assert targets(r"seq\.[02]") == ["seq.0", "seq.2"]  # regex over full names
    assert targets(["seq.0", "seq.2", "seq.4"], exclude_modules=["seq.4"]) == ["seq.0", "seq.2"]
    assert targets("all-linear") == ["seq.0", "seq.2", "seq.4"]  # no get_output_embeddings: every Linear


def test_bad_targets_are_clear_and_leave_model_alone():
    model = fresh_mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="matches no module.*seq.0, seq.2, seq.4"):
        get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"not nn.Linear or Conv1D: seq.1 \(ReLU\)"):
        get_lora_model(model, LoraConfig(target_modules=["seq.1"]))
    with pytest.raises(ValueError, match="modules_to_save entries"):
        get_lora_model(model, LoraConfig(target_modules=["seq.0"], modules_to_save=["head"]))
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.LogSoftmax, nn.Sequential, MLP)) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    with pytest.raises(ValueError, match="target_modules is required: MLP has no transformers config.model_type"):
        get_lora_model(model, LoraConfig())  # no peft default for the model type to take
    assert all(isinstance(m, (nn.Linear, nn.ReLU, nn.LogSoftmax, nn.Sequential, MLP)) for m in model.modules())


def trained(lm, steps=3):
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.1)
    x = torch.rand(16, 20, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        loss = lm(x).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm


def test_merge_and_unload_gives_plain_model_with_same_outputs():
    lm = trained(get_lora_model(fresh_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"],
                                                          modules_to_save=["seq.4"])))
    x = torch.rand(8, 20)
    with torch.no_grad():
        want = lm(x)
    merged = lm.merge_and_unload()
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.LogSoftmax, nn.Sequential, MLP) for m in merged.modules())
    assert sum(p.numel() for p in merged.parameters()) == 442_602
    assert sum(p.numel() for p in merged.parameters() if p.requires_grad) == 402  # the trained seq.4 copy
    torch.testing.assert_close(merged(x), want)


def test_unload_and_disable_adapter_give_base_outputs():
    model = fresh_mlp()
    base = copy.deepcopy(model)
    lm = trained(get_lora_model(model, LoraConfig(r=3, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])))
    x = torch.rand(8, 20)
    with torch.no_grad():
        assert not torch.allclose(lm(x), base(x))
        with lm.disable_adapter():
            torch.testing.assert_close(lm(x), base(x))
        assert not torch.allclose(lm(x), base(x))
    trained_head = copy.deepcopy(lm.model.seq[4].trainable)
    plain = lm.unload()
    base.seq[4] = trained_head  # as peft's unload: adapters dropped, the trained modules_to_save copy kept
    torch.testing.assert_close(plain(x), base(x))
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.LogSoftmax, nn.Sequential, MLP) for m in plain.modules())


def test_low_precision_base_gets_fp32_adapters():
    model = fresh_mlp().to(torch.bfloat16)
    lm = get_lora_model(model, LoraConfig(r=3, target_modules=["seq.0"]))
    assert model.seq[0].lora_A.dtype == torch.float32 and model.seq[0].weight.dtype == torch.bfloat16
    out = lm(torch.rand(4, 20, dtype=torch.bfloat16))
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and model.seq[0].lora_B.grad.dtype == torch.float32


def test_attribute_passthrough():
    lm = get_lora_model(fresh_mlp(), LoraConfig(target_modules=["seq.0"]))
    assert lm.seq is lm.model.seq


def test_invalid_adapter_settings_change_nothing():
    model = fresh_mlp()
    with pytest.raises(ValueError, match="init_lora_weights"):
        get_lora_model(model, LoraConfig(target_modules=["seq.0", "seq.2"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="backend"):
        get_lora_model(model, LoraConfig(target_modules=["seq.0"], backend="gpu-please"))
    assert all(type(m) in (nn.Linear, nn.ReLU, nn.LogSoftmax, nn.Sequential, MLP) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())


def test_merge_and_unload_takes_peft_arguments_and_safe_merge():
    lm = trained(get_lora_model(fresh_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"])))
    x = torch.rand(8, 20)
    with torch.no_grad():
        want = lm(x)
    merged = lm.merge_and_unload(progressbar=False, safe_merge=True, adapter_names=None)
    torch.testing.assert_close(merged(x), want)
    lm = get_lora_model(fresh_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"]))
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        lm.merge_and_unload(adapter_names=["other"])
    lm.merge_and_unload(adapter_names=["default"])


def test_safe_merge_failure_replaces_nothing():
    model = fresh_mlp()
    lm = get_lora_model(model, LoraConfig(r=3, target_modules=["seq.0", "seq.2"]))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.seq[2].lora_B.fill_(1e30)  # W + s B A overflows float32 in the second layer
        model.seq[2].lora_A.fill_(1e30)
    with pytest.raises(ValueError, match="NaN or inf"):
        lm.merge_and_unload(safe_merge=True)
    assert all(isinstance(model.seq[i], FusedLoRALinear) and not model.seq[i].merged for i in (0, 2))
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)
