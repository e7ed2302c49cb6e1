"""Saving and loading a whole model that `quantize_model` quantized, and adapters over it (the supported way,
as the README's quantized section says): the model's state_dict (in memory, in a safetensors file, or the
file transformers' save_pretrained writes) loads into a fresh plain model of the same config once
quantize_model has given it the same layout; adapters saved by LoraModel.save_pretrained (several, peft's
layout) load into a freshly quantized model. Truth: the source model (every packed tensor bit for bit, the
same logits, mixed batches included); a checkpoint of another layout is refused naming the tensors."""
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from fused_lora import LoraConfig, LoraModel, QuantizedLinear, get_lora_model, quantize_model

LAYOUTS = [("nf4", dict(double_quant=True)), ("nf4", dict(double_quant=False)), ("int8", {})]
TARGETS = ["q_proj", "v_proj", "down_proj"]


def _plain(seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                        use_cache=False))


def _ids():
    return torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(0))


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("fmt,kwargs", LAYOUTS)
@pytest.mark.parametrize("via", ["memory", "safetensors", "transformers"])
def test_quantized_model_state_dict_loads_into_a_fresh_quantized_model(fmt, kwargs, via, tmp_path):
    src = quantize_model(_plain(0), fmt, **kwargs).eval()
    if via == "memory":
        state = src.state_dict()
    elif via == "safetensors":
        save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "m.safetensors"))
        state = load_file(str(tmp_path / "m.safetensors"))
    else:
        src.save_pretrained(str(tmp_path))
        state = load_file(str(tmp_path / "model.safetensors"))
    dst = quantize_model(_plain(1), fmt, **kwargs).eval()  # other random weights: every value must come from `state`
    result = dst.load_state_dict(state, strict=via != "transformers")
    if via == "transformers":  # transformers leaves out the tied output weight; nothing else may be missing
        assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}
    assert isinstance(dst.model.layers[1].mlp.down_proj, QuantizedLinear)
    _same_state(dst, src)
    with torch.no_grad():
        assert torch.equal(dst(input_ids=_ids()).logits, src(input_ids=_ids()).logits)


@pytest.mark.parametrize("fmt,kwargs", LAYOUTS)
def test_adapters_saved_over_a_quantized_base_load_into_a_freshly_quantized_model(fmt, kwargs, tmp_path):
    """Two adapters (peft's multi-adapter layout) saved over a quantized base, loaded back over the same
    base weights quantized afresh: the same logits with each adapter and in a mixed batch."""
    lm = get_lora_model(quantize_model(_plain(0), fmt, **kwargs),
                        LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lm.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    lm.eval()
    ids, names = _ids(), ["b", "__base__", "default"]
    with torch.no_grad():
        want_default = lm(input_ids=ids).logits
        want_mixed = lm(input_ids=ids, adapter_names=names).logits
    lm.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors", "b"]
    loaded = LoraModel.from_pretrained(quantize_model(_plain(0), fmt, **kwargs), str(tmp_path))
    loaded.load_adapter(str(tmp_path / "b"), "b")
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, want_default)
        assert torch.equal(loaded(input_ids=ids, adapter_names=names).logits, want_mixed)


@pytest.mark.parametrize("fmt,kwargs", LAYOUTS)
def test_whole_adapted_model_state_dict_round_trips(fmt, kwargs):
    """The whole adapted model's state_dict (packed base and adapters) into a fresh model adapted the same way."""
    def adapted(seed):
        lm = get_lora_model(quantize_model(_plain(seed), fmt, **kwargs),
                            LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
        lm.add_adapter("b", LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
        return lm.eval()
    src, dst = adapted(0), adapted(1)
    dst.load_state_dict(src.state_dict())
    _same_state(dst, src)
    with torch.no_grad():
        assert torch.equal(dst(input_ids=_ids(), adapter_names=["b", "default", "b"]).logits,
                           src(input_ids=_ids(), adapter_names=["b", "default", "b"]).logits)


@pytest.mark.parametrize("src_layout,dst_layout,message", [
    (("nf4", dict(double_quant=True)), ("int8", {}), "qweight"),
    (("nf4", dict(double_quant=True)), ("nf4", dict(double_quant=False)), "absmax"),
    (("nf4", dict(blocksize=64)), ("nf4", dict(blocksize=32)), "size mismatch"),
    (("int8", {}), None, "weight"),
])
def test_checkpoint_of_another_layout_is_refused_naming_the_tensors(src_layout, dst_layout, message):
    """A checkpoint of another format, nesting or block size (or a quantized checkpoint into a plain model)
    raises, naming the tensors. (A refused quantized weight, and its QuantizedLinear's bias, keep what they
    held; as for any module, torch's load_state_dict still loads the other modules before it raises.)"""
    src = quantize_model(_plain(0), src_layout[0], **src_layout[1])
    dst = _plain(1) if dst_layout is None else quantize_model(_plain(1), dst_layout[0], **dst_layout[1])
    with pytest.raises(RuntimeError, match=message):
        dst.load_state_dict(src.state_dict())
