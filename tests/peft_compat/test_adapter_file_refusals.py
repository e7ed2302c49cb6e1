"""Adapter files: the clear refusals a new user's trial asked for (found by trying the library)."""
import os

import pytest
import torch
from torch import nn

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model

peft = pytest.importorskip("peft")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return self.b(self.a(x))


class Other(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Linear(8, 4)

    def forward(self, x):
        return self.c(x)


def saved(tmp_path, **cfg):
    lm = get_lora_model(Net(), LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False, **cfg))
    lm.save_pretrained(tmp_path)
    return lm


def test_modules_the_file_names_and_the_model_lacks_are_named(tmp_path):
    saved(tmp_path)
    with pytest.raises(AdapterError, match="the weights adapt 'a', which is not a module of this model"):
        LoraModel.from_pretrained(Other(), tmp_path)


def test_saving_onto_a_file_is_a_clear_error(tmp_path):
    lm = get_lora_model(Net(), LoraConfig(r=2, target_modules=["a"]))
    path = tmp_path / "afile"
    path.write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        lm.save_pretrained(path)
    assert path.read_text() == "x"


@pytest.mark.parametrize("what", ["directory", "device"])
def test_a_config_that_is_not_a_regular_file_says_so(tmp_path, what):
    saved(tmp_path)
    cfg = tmp_path / "adapter_config.json"
    cfg.unlink()
    if what == "directory":
        cfg.mkdir()
    else:
        os.symlink("/dev/zero", cfg)
    with pytest.raises(AdapterError, match="exists but is not a regular file"):
        LoraModel.from_pretrained(Net(), tmp_path)


def test_a_config_edited_after_adapting_is_not_saved_as_if_the_layers_used_it(tmp_path):
    """Changing peft_config's lora_alpha leaves the layers' scaling as it was: the file would
    describe another model than the one in memory."""
    lm = get_lora_model(Net(), LoraConfig(r=2, lora_alpha=4, target_modules=["a"]))
    lm.peft_config["default"].lora_alpha = 16
    with pytest.raises(ValueError, match="lora_alpha is 16 but layer 'a' computes with 4"):
        lm.save_pretrained(tmp_path)
    assert not os.listdir(tmp_path)


def test_peft_embedding_lora_is_refused_by_name(tmp_path):
    class Emb(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.out = nn.Embedding(10, 8), nn.Linear(8, 4)

        def forward(self, ids):
            return self.out(self.emb(ids))

    pm = peft.get_peft_model(Emb(), peft.LoraConfig(r=2, target_modules=["emb", "out"]))
    pm.save_pretrained(tmp_path)
    with pytest.raises(AdapterError, match="embedding layer"):
        LoraModel.from_pretrained(Emb(), tmp_path)


def test_non_finite_weights_in_a_file_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    saved(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("b.lora_B.weight"))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, path)  # no config record in the header now: read as a peft-written file
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterError, match="NaN or inf"):
        LoraModel.from_pretrained(model, tmp_path)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_from_pretrained_on_an_adapted_model_says_so(tmp_path):
    lm = saved(tmp_path)
    with pytest.raises(ValueError, match="already holds LoRA adapters"):
        LoraModel.from_pretrained(lm.model, tmp_path)


class PeftWords(nn.Module):
    """Layers whose names hold the words peft uses for its redundant modules_to_save keys."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.ModuleDict({"original_module": nn.Linear(6, 6), "modules_to_save": nn.Linear(6, 6)})
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.enc["modules_to_save"](self.enc["original_module"](x)))


PEFT_WORDS = ["enc.original_module", "enc.modules_to_save"]


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter", "load_weights_into"])
def test_a_layer_named_like_peft_s_redundant_keys_is_loaded(tmp_path, loader):
    """A target whose path holds `.original_module.` or `.modules_to_save.` is loaded like any other:
    only keys under a real modules_to_save module are peft's redundant copies (issue 18 item 2: the
    copy loop skipped every such key, leaving B = 0 after every check passed)."""
    from fused_lora.peft_compat.adapters import load_weights_into
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    lm = get_lora_model(PeftWords(), LoraConfig(r=2, target_modules=PEFT_WORDS, init_lora_weights=False))
    with torch.no_grad():
        want = lm(x)
    lm.save_pretrained(tmp_path)
    if loader == "from_pretrained":
        back = LoraModel.from_pretrained(PeftWords(), tmp_path)
    else:
        back = get_lora_model(PeftWords(), LoraConfig(r=2, target_modules=PEFT_WORDS))  # B = 0
        if loader == "load_adapter":
            back.load_adapter(tmp_path, "x")
            back.set_adapter("x")
        else:
            load_weights_into(back, tmp_path)
    with torch.no_grad():
        assert not torch.allclose(PeftWords()(x), want)  # the adapter changes the output: the test can fail
        torch.testing.assert_close(back(x), want, rtol=0, atol=0)


def test_peft_s_redundant_modules_to_save_keys_are_accepted_and_unused(tmp_path):
    """peft's bias="all" file holds head.original_module.bias and head.modules_to_save.bias beside
    head.bias: accepted (they sit under a real modules_to_save module) and not loaded; the model
    computes what peft's does, through from_pretrained and load_weights_into (issue 18 item 2: the
    other half of the one rule)."""
    from fused_lora.peft_compat.adapters import load_weights_into
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    config = dict(r=2, target_modules=PEFT_WORDS, modules_to_save=["head"], bias="all", init_lora_weights=False)
    pm = peft.get_peft_model(PeftWords(), peft.LoraConfig(**config))
    with torch.no_grad():
        pm.base_model.model.head.modules_to_save["default"].bias.add_(1.0)
        pm.base_model.model.head.original_module.bias.sub_(5.0)  # a redundant key that must not be loaded
        want = pm(x)
    pm.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert "base_model.model.head.original_module.bias" in load_file(tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(LoraModel.from_pretrained(PeftWords(), tmp_path)(x), want)
        ours = get_lora_model(PeftWords(), LoraConfig(**config))
        load_weights_into(ours, tmp_path)
        torch.testing.assert_close(ours(x), want)


class WrappedHead(nn.Module):
    """A module whose own children are called original_module and modules_to_save (peft's words)."""

    def __init__(self):
        super().__init__()
        self.original_module, self.modules_to_save = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.modules_to_save(self.original_module(x))


class PeftWordsHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.enc, self.head = nn.Linear(6, 6), WrappedHead()

    def forward(self, x):
        return self.head(self.enc(x))


@pytest.mark.parametrize("loader", ["from_pretrained", "load_weights_into"])
def test_a_modules_to_save_module_with_children_named_like_peft_s_copies_loads(tmp_path, loader):
    """modules_to_save=["head"] where head's children are original_module and modules_to_save: its tensors
    head.original_module.weight ... are the module's own, not peft's redundant copies. Every loader follows
    one rule (a key is a redundant copy only if it names no tensor of the model's adapter); before, the
    resume path dropped them and refused its own checkpoint ("key ... is missing"). Issue 18, attacker
    re-trial, finding 5."""
    from fused_lora.peft_compat.adapters import load_weights_into
    x = torch.rand(3, 6, generator=torch.Generator().manual_seed(2))
    config = dict(r=2, target_modules=["enc"], modules_to_save=["head"], init_lora_weights=False)
    lm = get_lora_model(PeftWordsHead(), LoraConfig(**config))
    with torch.no_grad():
        for _, module in lm.saved_modules():
            for p in module.trainable.parameters():
                p.add_(1.0)  # the trained copy differs from the base head: loading it matters
        want = lm(x)
    lm.save_pretrained(tmp_path)
    if loader == "from_pretrained":
        back = LoraModel.from_pretrained(PeftWordsHead(), tmp_path)
    else:
        back = get_lora_model(PeftWordsHead(), LoraConfig(**config))
        load_weights_into(back, tmp_path)
    with torch.no_grad():
        assert not torch.allclose(get_lora_model(PeftWordsHead(), LoraConfig(**config))(x), want)
        torch.testing.assert_close(back(x), want, rtol=0, atol=0)
