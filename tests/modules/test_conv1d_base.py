"""GPT-2's Conv1D layers (weight stored in x out): adapted as peft adapts them (fan_in_fan_out)."""
import copy
import warnings

import peft
import pytest
import torch
import transformers
from transformers.pytorch_utils import Conv1D

from fused_lora import FusedLoRALinear, LoraConfig, LoraModel, get_lora_model
from fused_lora.cli.demo import MLP

PROJECTIONS = {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                     "mlp.c_proj")}


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


TOKENS = torch.arange(24).reshape(2, 12) * 5 % 128


def peft_gpt2(**cfg):
    torch.manual_seed(1)
    return peft.get_peft_model(gpt2(), peft.LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                                          "init_lora_weights": False, **cfg}))


@pytest.mark.parametrize("backend", ["torch", "triton"])  # triton: the kernels read the transposed (strided) weight
def test_conv1d_layer_equals_its_float64_reference(backend):
    torch.manual_seed(0)
    conv = Conv1D(6, 5)  # nf=6 out, nx=5 in: weight 5 x 6
    torch.nn.init.normal_(conv.bias)
    layer = FusedLoRALinear.from_linear(conv, r=3, lora_alpha=6, init_lora_weights=False, backend=backend)
    assert layer.fan_in_fan_out and (layer.in_features, layer.out_features) == (5, 6)
    assert layer.weight is conv.weight  # shared, not copied
    x = torch.randn(4, 5, requires_grad=True)
    y = layer(x)
    x64 = x.detach().double().requires_grad_(True)
    a64, b64 = layer.lora_A.detach().double().requires_grad_(True), layer.lora_B.detach().double().requires_grad_(True)
    y64 = x64 @ conv.weight.double() + conv.bias.double() + 2.0 * (x64 @ a64.t()) @ b64.t()
    torch.testing.assert_close(y, y64.detach().float())  # float32 tolerances
    dy = torch.randn(4, 6)
    y.backward(dy)
    y64.backward(dy.double())
    for got, want in ((x.grad, x64.grad), (layer.lora_A.grad, a64.grad), (layer.lora_B.grad, b64.grad)):
        torch.testing.assert_close(got, want.float())


def test_conv1d_merge_unmerge_to_linear_keep_the_conv1d_form():
    torch.manual_seed(0)
    conv = Conv1D(6, 5)
    original = conv.weight.detach().clone()
    layer = FusedLoRALinear.from_linear(conv, r=3, init_lora_weights=False)
    x = torch.randn(4, 5)
    want = layer(x).detach()
    plain = layer.to_linear()
    assert type(plain) is Conv1D and plain.weight.shape == (5, 6)
    torch.testing.assert_close(plain(x), want)
    layer.merge()
    torch.testing.assert_close(conv(x), want)  # the merged weight is in Conv1D's own layout
    torch.testing.assert_close(layer(x), want)
    layer.unmerge()
    torch.testing.assert_close(conv.weight, original)


def test_all_linear_matches_peft_and_fan_in_fan_out_is_set_with_a_warning():
    ref = peft_gpt2()
    want = {n.removeprefix("base_model.model.") for n, m in ref.named_modules() if isinstance(m, peft.tuners.lora.Linear)}
    config = LoraConfig(r=4, target_modules="all-linear")
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to False but the target module .* is `Conv1D`"):
        lm = get_lora_model(gpt2(), config)
    assert {n for n, _ in lm.lora_layers()} == want == PROJECTIONS  # lm_head (the output layer) left out
    assert config.fan_in_fan_out is True  # as peft records it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once it is True: no warning
        get_lora_model(gpt2(), LoraConfig(r=4, target_modules="all-linear", fan_in_fan_out=True))


def test_fan_in_fan_out_on_a_linear_warns_and_is_set_false():
    config = LoraConfig(target_modules=["seq.0"], fan_in_fan_out=True)
    with pytest.warns(UserWarning, match="fan_in_fan_out is set to True but the target module 'seq.0' is `Linear`"):
        lm = get_lora_model(MLP(num_units_hidden=8), config)
    assert config.fan_in_fan_out is False and not dict(lm.lora_layers())["seq.0"].fan_in_fan_out


@pytest.mark.parametrize("bias", ["none", "all"])
def test_peft_gpt2_adapter_loads_with_equal_outputs_and_gradients(tmp_path, bias):
    ref = peft_gpt2(bias=bias)
    ref.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(gpt2(), tmp_path, is_trainable=True)
    out_ref = ref(input_ids=TOKENS, labels=TOKENS)
    out_ours = ours(input_ids=TOKENS, labels=TOKENS)
    torch.testing.assert_close(out_ours.logits, out_ref.logits)
    out_ref.loss.backward()
    out_ours.loss.backward()
    theirs = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
              for n, p in ref.named_parameters() if p.requires_grad}
    mine = {n.removeprefix("model."): p.grad for n, p in ours.named_parameters() if p.requires_grad}
    mine = {k.replace("lora_A", "lora_A.weight").replace("lora_B", "lora_B.weight"): v for k, v in mine.items()}
    theirs = {k.replace(".base_layer.", "."): v for k, v in theirs.items()}
    assert mine.keys() == theirs.keys() and len(mine) >= 16
    for k in mine:
        torch.testing.assert_close(mine[k], theirs[k], msg=k)


def test_our_gpt2_adapter_loads_in_peft(tmp_path):
    torch.manual_seed(2)
    lm = get_lora_model(gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", fan_in_fan_out=True,
                                           init_lora_weights=False))
    lm.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(gpt2(), tmp_path)
    assert ref.peft_config["default"].fan_in_fan_out is True
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=TOKENS).logits, lm(input_ids=TOKENS).logits)


def test_merge_and_unload_and_unload_give_conv1d_back(tmp_path):
    ref = peft_gpt2()
    ref.save_pretrained(tmp_path)
    base = gpt2()
    original = copy.deepcopy(base.state_dict())
    ours = LoraModel.from_pretrained(base, tmp_path)
    with torch.no_grad():
        want = ref(input_ids=TOKENS).logits
        merged_ref = ref.merge_and_unload()
        merged = LoraModel.from_pretrained(gpt2(), tmp_path).merge_and_unload()
        for name in PROJECTIONS:
            m = merged.get_submodule(name)
            assert type(m) is Conv1D
            torch.testing.assert_close(m.weight, merged_ref.get_submodule(name).weight)
        torch.testing.assert_close(merged(input_ids=TOKENS).logits, want)
        plain = ours.unload()
    assert all(type(plain.get_submodule(n)) is Conv1D for n in PROJECTIONS)
    for k, v in plain.state_dict().items():
        assert torch.equal(v, original[k]), k
