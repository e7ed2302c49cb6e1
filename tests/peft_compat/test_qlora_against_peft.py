"""A quantized base against the real thing: peft's QLoRA (LoRA over bitsandbytes' Linear4bit, fp32 compute on
CPU) and bitsandbytes' Linear8bitLt, on single layers and on a small transformers Llama; adapter files both ways.
"""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")

import fused_lora  # noqa: E402
from fused_lora import FusedLoRALinear, LoraConfig, LoraModel, QuantizedLinear, get_lora_model, quantize_model  # noqa: E402
from fused_lora.cli.finetune import LLAMA_TARGETS, counting_batches  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402

TOL = dict(atol=2e-5, rtol=2e-5)


def bnb_linear(linear: nn.Linear, kind: str = "nf4", nested: bool = True) -> nn.Module:
    """linear as bitsandbytes quantizes it (as transformers' BitsAndBytesConfig loading does): Linear4bit NF4
    with fp32 compute, or Linear8bitLt (has_fp16_weights=False), quantized on the move to the CPU."""
    if kind == "nf4":
        q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, quant_type="nf4", compress_statistics=nested)
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                has_fp16_weights=False, threshold=0.0)
    q.load_state_dict(linear.state_dict())
    return q.to("cpu")


def bnb_quantize(model: nn.Module, names, kind="nf4", nested=True) -> nn.Module:
    for name in [n for n, m in model.named_modules() if type(m) is nn.Linear and n.split(".")[-1] in names]:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, bnb_linear(model.get_submodule(name), kind, nested))
    # What transformers marks a bitsandbytes-loaded model with: peft then wraps the layers in its bnb classes.
    setattr(model, "is_loaded_in_4bit" if kind == "nf4" else "is_loaded_in_8bit", True)
    return model


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    # Every in_features a multiple of the NF4 block size (64).
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lora_grads(model):
    def key(name):
        return name[name.index("layers."):].replace(".default.weight", "").replace(".weight", "")
    return {key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------ one layer

@pytest.mark.parametrize("nested", [False, True])
def test_layer_over_linear4bit_matches_peft(nested):
    torch.manual_seed(0)
    base = bnb_linear(nn.Linear(128, 96), "nf4", nested)
    seq = nn.Sequential(copy.deepcopy(base))
    seq.is_loaded_in_4bit = True  # what transformers marks a bitsandbytes-loaded model with; peft reads it
    wrapped = peft.get_peft_model(seq,
                                  peft.LoraConfig(r=8, lora_alpha=16, target_modules=["0"], init_lora_weights=False))
    theirs = wrapped.base_model.model[0]
    assert isinstance(theirs, PeftLinear4bit)
    ours = FusedLoRALinear.from_linear(base, r=8, lora_alpha=16)
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    x1 = torch.randn(2, 5, 128, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    torch.testing.assert_close(y1, y2, **TOL)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x1.grad, x2.grad, **TOL)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, **TOL)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, **TOL)


def test_layer_over_linear8bitlt():
    """fused_lora computes x times the dequantized int8 weight; bitsandbytes also quantizes x to int8, so its
    output is within that activation rounding (about 1% of the output scale) of ours."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 96)
    base = bnb_linear(lin, "int8")
    ours = FusedLoRALinear.from_linear(base, r=4)
    assert ours.weight.qweight.data_ptr() == base.weight.data.data_ptr()
    x = torch.randn(6, 128)
    W = base.weight.data.float() * base.weight.SCB.float()[:, None] / 127
    torch.testing.assert_close(ours(x), nn.functional.linear(x, W, base.bias), atol=1e-5, rtol=1e-5)
    y_bnb = base(x)
    assert (ours(x) - y_bnb).abs().max() <= 0.02 * y_bnb.abs().max()

    # peft over the same Linear8bitLt, same adapter: the adapter's gradients do not involve W (equal);
    # dx = dY W + ... uses the dequantized int8 weight on both sides.
    seq = nn.Sequential(copy.deepcopy(base))
    seq.is_loaded_in_8bit = True
    theirs = peft.get_peft_model(seq, peft.LoraConfig(r=4, target_modules=["0"], init_lora_weights=False)).base_model.model[0]
    assert type(theirs).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        ours.lora_A.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.copy_(theirs.lora_B["default"].weight)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(6, 96)
    ours(x1).backward(dy)
    theirs(x2).backward(dy)
    torch.testing.assert_close(ours.lora_A.grad, theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.lora_B.grad, theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_linear4bit_refusals():
    lin = nn.Linear(128, 64)
    unquantized = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    with pytest.raises(ValueError, match="no quant_state"):
        FusedLoRALinear.from_linear(unquantized)
    fp4 = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="fp4")
    fp4.load_state_dict(lin.state_dict())
    with pytest.raises(ValueError, match="fp4"):
        FusedLoRALinear.from_linear(fp4.to("cpu"))
    repacked = bnb_linear(lin)
    repacked.weight.quant_state.packing_format_for_cpu = True  # what bitsandbytes' CPU eval-mode forward sets
    with pytest.raises(ValueError, match="repacked"):
        FusedLoRALinear.from_linear(repacked)
    odd = bnb_linear(nn.Linear(96, 64))  # bitsandbytes accepts it; rows are not whole blocks of 64
    with pytest.raises(ValueError, match="multiple of the NF4 block size"):
        FusedLoRALinear.from_linear(odd)
    model = nn.Sequential(bnb_linear(lin), odd)
    with pytest.raises(ValueError, match="cannot adapt 1"):
        get_lora_model(model, LoraConfig(r=4, target_modules=["0", "1"]))
    assert type(model[0]).__name__ == "Linear4bit"  # nothing half-applied


# ------------------------------------------------------------------ a Llama

def transformers_4bit_llama(tmp_path):
    """A Llama loaded by transformers with BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, fp32
    compute) on the CPU, as a QLoRA user loads one; put in training mode (on an eval-mode forward without
    grad, bitsandbytes repacks its CPU weights into a bf16 inference layout)."""
    from transformers import BitsAndBytesConfig, LlamaForCausalLM
    tiny_llama().save_pretrained(tmp_path / "base")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base", quantization_config=config, device_map="cpu",
                                             dtype=torch.float32)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear4bit"
    return model.train()


def llama_pair(tmp_path):
    """A Llama bitsandbytes quantized (NF4, loaded through transformers), adapted by fused_lora and by peft
    with the same adapter (ours saved, loaded into peft's QLoRA model)."""
    base = transformers_4bit_llama(tmp_path)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS,
                                                           init_lora_weights=False))
    ours.save_pretrained(tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter", is_trainable=True)
    return ours, theirs


def test_llama_over_linear4bit_matches_peft_qlora(tmp_path):
    ours, theirs = llama_pair(tmp_path)
    assert sum(isinstance(m, PeftLinear4bit) for m in theirs.modules()) == 14
    assert sum(layer.quantized for _, layer in ours.lora_layers()) == 14
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    tokens = next(counting_batches(256, 2, 16))
    out1, out2 = ours(input_ids=tokens, labels=tokens), theirs(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(out1.logits, out2.logits, atol=1e-5, rtol=1e-5)
    out1.loss.backward()
    out2.loss.backward()
    g1, g2 = lora_grads(ours), lora_grads(theirs)
    assert g1.keys() == g2.keys() and len(g1) == 28
    for k, v in g1.items():
        torch.testing.assert_close(v, g2[k], atol=1e-6, rtol=1e-4, msg=k)


def test_peft_qlora_adapter_loads_into_fused_lora(tmp_path):
    base = transformers_4bit_llama(tmp_path)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                      init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "adapter")
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    tokens = next(counting_batches(256, 2, 12, seed=3))
    torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)


def test_merge_and_unload_gives_16bit_merged_layers(tmp_path):
    ours, _ = llama_pair(tmp_path)
    tokens = next(counting_batches(256, 2, 12, seed=4))
    with torch.no_grad():
        expected = ours(input_ids=tokens).logits
        merged = ours.merge_and_unload()
        assert not any(type(m).__module__.startswith("bitsandbytes") for m in merged.modules())
        proj = merged.model.layers[0].self_attn.q_proj
        assert type(proj) is nn.Linear and proj.weight.dtype == torch.float32
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_our_quantization_with_peft_over_bitsandbytes_same_model(tmp_path):
    """quantize_model (no bitsandbytes) gives the codes bitsandbytes gives: a fused_lora QLoRA model over our
    NF4 equals peft's QLoRA over bitsandbytes' NF4 (unnested: the nested indices can differ at rounding ties)."""
    plain = tiny_llama()
    ours = get_lora_model(quantize_model(copy.deepcopy(plain), "nf4", target_modules=LLAMA_TARGETS, double_quant=False),
                          LoraConfig(r=4, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    assert isinstance(ours.model.model.layers[1].mlp.down_proj.weight, fused_lora.QuantizedWeight)
    ours.save_pretrained(tmp_path)
    # is_trainable: training mode (bitsandbytes repacks its CPU weights, in bf16, on an eval-mode forward)
    theirs = peft.PeftModel.from_pretrained(bnb_quantize(copy.deepcopy(plain), LLAMA_TARGETS, "nf4", nested=False),
                                            tmp_path, is_trainable=True)
    tokens = next(counting_batches(256, 2, 12, seed=5))
    torch.testing.assert_close(ours(input_ids=tokens).logits, theirs(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    back = ours.unload()
    assert isinstance(back.model.layers[0].self_attn.q_proj, QuantizedLinear)


@pytest.mark.parametrize("reentrant", [True, False])
def test_activation_checkpointing_with_dropout_gives_the_same_gradients(reentrant):
    """Over a quantized base, with dropout: checkpointing recomputes the forward (same seed, same mask) and
    gives the gradients of the plain run exactly."""
    model = get_lora_model(quantize_model(tiny_llama(), "nf4", target_modules=LLAMA_TARGETS),
                           LoraConfig(r=4, target_modules=LLAMA_TARGETS, lora_dropout=0.1, init_lora_weights=False))
    tokens = next(counting_batches(256, 2, 12))
    torch.manual_seed(0)
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    torch.manual_seed(0)
    again = model(input_ids=tokens, labels=tokens).loss
    again.backward()
    assert again.item() == loss.item()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, plain[n]), n
