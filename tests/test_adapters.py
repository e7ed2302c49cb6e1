"""Adapters on disk: our files load in peft, peft's load here, bad files are refused cleanly."""
import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model
from fused_lora.demo import MLP

peft = pytest.importorskip("peft")

X = torch.rand(8, 20, generator=torch.Generator().manual_seed(3))


def base_mlp():
    torch.manual_seed(0)
    return MLP()


def trained_lora(**cfg):
    lm = get_lora_model(base_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"], **cfg))
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = lm(X).exp().pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm


@pytest.mark.parametrize("cfg", [{}, {"modules_to_save": ["seq.4"]}, {"bias": "lora_only"}, {"use_rslora": True}])
def test_roundtrip_and_peft_loads_ours(tmp_path, cfg):
    lm = trained_lora(**cfg)
    with torch.no_grad():
        want = lm(X)
    lm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = LoraModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)
    pm = peft.PeftModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(X), want)


@pytest.mark.parametrize("cfg", [{}, {"modules_to_save": ["seq.4"]}, {"bias": "all"}])
def test_we_load_peft_adapters(tmp_path, cfg):
    pm = peft.get_peft_model(base_mlp(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["seq.0", "seq.2"],
                                                         init_lora_weights=False, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        want = pm(X)
    pm.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)


def test_is_trainable_flag(tmp_path):
    trained_lora().save_pretrained(tmp_path)
    frozen = LoraModel.from_pretrained(base_mlp(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    live = LoraModel.from_pretrained(base_mlp(), tmp_path, is_trainable=True)
    assert live.get_nb_trainable_parameters()[0] == 12_660


def untouched(model, state):
    return (all(type(m).__name__ in ("MLP", "Sequential", "Linear", "ReLU", "LogSoftmax") for m in model.modules())
            and all(torch.equal(t, state[k]) for k, t in model.state_dict().items()))


def check_refused(directory, match):
    model = base_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=match):
        LoraModel.from_pretrained(model, directory)
    assert untouched(model, state)


def saved(tmp_path):
    trained_lora(modules_to_save=["seq.4"]).save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "adapter_model.safetensors")


def test_missing_files(tmp_path):
    check_refused(tmp_path, "adapter_config.json not found")
    d, _ = saved(tmp_path)
    os.remove(d / "adapter_model.safetensors")
    check_refused(d, "adapter_model.safetensors not found")


def test_pickle_is_refused(tmp_path):
    d, tensors = saved(tmp_path)
    os.remove(d / "adapter_model.safetensors")
    torch.save(tensors, d / "adapter_model.bin")
    check_refused(d, "pickle")


def test_wrong_shape(tmp_path):
    d, tensors = saved(tmp_path)
    tensors["base_model.model.seq.2.lora_B.weight"] = torch.zeros(200, 4)
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, r"seq.2.lora_B.weight' has shape \(200, 4\), the model needs \(200, 3\)")


def test_key_for_missing_module(tmp_path):
    d, tensors = saved(tmp_path)
    tensors["base_model.model.seq.9.lora_A.weight"] = torch.zeros(3, 20)
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, "seq.9.lora_A.weight' names no tensor")


def test_missing_key(tmp_path):
    d, tensors = saved(tmp_path)
    del tensors["base_model.model.seq.4.bias"]
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, "seq.4.bias' is missing")


def test_config_naming_absent_modules_and_corrupt_files(tmp_path):
    d, _ = saved(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    check_refused(d, "does not fit this model")
    cfg["target_modules"] = ["seq.0"]
    cfg["use_dora"] = True
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    check_refused(d, "use_dora")
    (d / "adapter_config.json").write_text("{not json")
    check_refused(d, "adapter_config.json")
    d2 = tmp_path / "corrupt"
    saved(d2)
    (d2 / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    check_refused(d2, "not a readable safetensors")


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    lm = trained_lora()
    lm.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import fused_lora.adapters as adapters

    def exploding_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        trained_lora(modules_to_save=["seq.4"]).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_peft_only_init_in_config_still_loads(tmp_path):
    lm = trained_lora()
    with torch.no_grad():
        want = lm(X)
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    loaded = LoraModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), want)
    assert loaded.peft_config.init_lora_weights == "pissa"
