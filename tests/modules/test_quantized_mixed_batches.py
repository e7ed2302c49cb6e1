"""Regression tests from trying the quantized base and mixed-adapter batches as a new user would:
meta-device initialisation and checkpoints (to_empty, assign=True, torch.compile after loading),
re-quantizing and shared/classifier layers in quantize_model, memory kept for backward by a
non-adapted quantized layer, autocast, requires_grad on the frozen weight, mixed-adapter batches over
a quantized base, unload() over bitsandbytes' layers. Each compares against an independent truth
(float64 over the dequantized weight, the single-adapter op, transformers' and peft's behaviour)."""
import copy

import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, QuantizedLinear, quantize_model
from utils import quantized_adapted_layer, two_random_adapters


FORMATS = [("nf4", True), ("nf4", False), ("int8", True)]


@pytest.mark.parametrize("fmt,nested", FORMATS)
def test_to_empty_then_load_state_dict(fmt, nested):
    """Meta-device initialisation (accelerate / FSDP style): .to('meta'), to_empty(device), load a
    checkpoint; the layer then computes exactly what the source layer does, buffers in their dtypes."""
    src = quantized_adapted_layer(fmt, nested=nested)
    x = torch.randn(3, 128)
    m = copy.deepcopy(src).to("meta")
    m.to_empty(device="cpu")
    assert {k: v.dtype for k, v in m.state_dict().items()} == {k: v.dtype for k, v in src.state_dict().items()}
    m.load_state_dict(src.state_dict())
    assert torch.equal(m(x), src(x))


@pytest.mark.parametrize("fmt,nested", FORMATS)
def test_loaded_checkpoint_runs_under_torch_compile(fmt, nested):
    """A layer that loaded a state_dict is traced by torch.compile(fullgraph=True) (the NF4 offset is
    a plain float again, not a tensor read inside the graph) and gives the source layer's output."""
    src = quantized_adapted_layer(fmt, nested=nested)
    m = quantized_adapted_layer(fmt, seed=1, nested=nested)
    m.load_state_dict(src.state_dict())
    x = torch.randn(3, 128)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), src(x), atol=1e-6, rtol=1e-6)


def test_quantize_model_again_says_already_quantized():
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    quantize_model(model, "nf4", target_modules=["0", "1"])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "nf4", target_modules=["0", "1"])
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")


# ------------------------------------------------------------------ a quantized base layer that is not adapted

def _saved_elements(fn):
    """(result, elements of every tensor autograd saves while fn runs)."""
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_linear_backward_keeps_no_dequantized_weight(fmt, monkeypatch):
    """A QuantizedLinear that is not adapted (quantize_model's default targets every Linear; peft's usual
    LoRA targets only some) still passes gradients to its input. Its forward must not leave the
    dequantized weight (all chunks together: a full 16-bit copy) saved for backward; dx and db equal
    float64 over the dequantized weight."""
    from fused_lora.core import formats as quant
    from fused_lora.core.formats import common as formats_common
    monkeypatch.setattr(formats_common, "CHUNK_ELEMENTS", 64 * 64)  # several chunks
    torch.manual_seed(0)
    ql = QuantizedLinear.from_linear(nn.Linear(128, 256), fmt)
    ql.bias.requires_grad_(True)
    x = torch.randn(2, 3, 128, requires_grad=True)
    y, saved = _saved_elements(lambda: ql(x))
    assert saved < 256 * 128 // 2, f"{saved} elements saved for backward (the weight has {256 * 128})"
    dy = torch.randn_like(y)
    y.backward(dy)
    W = ql.weight.dequantize(torch.float64)
    torch.testing.assert_close(y.double(), x.double() @ W.T + ql.bias.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), dy.double() @ W, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ql.bias.grad.double(), dy.double().sum((0, 1)), atol=1e-5, rtol=1e-5)


def test_disabled_adapter_over_quantized_base_keeps_no_dequantized_weight():
    layer = quantized_adapted_layer("nf4")
    x = torch.randn(4, 128, requires_grad=True)
    with layer.disable_adapter():
        y, saved = _saved_elements(lambda: layer(x))
    assert saved < 64 * 128 // 2
    y.sum().backward()
    W = layer.weight.dequantize(torch.float64)
    torch.testing.assert_close(x.grad.double(), torch.ones(4, 64, dtype=torch.float64) @ W, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_quantized_linear_under_torch_compile(fmt):
    torch.manual_seed(0)
    ql = QuantizedLinear.from_linear(nn.Linear(128, 64), fmt)
    x = torch.randn(5, 128, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(ql, fullgraph=True)
    y1 = compiled(x)
    (g1,) = torch.autograd.grad(y1.square().sum(), x)
    y2 = ql(x)
    (g2,) = torch.autograd.grad(y2.square().sum(), x)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_quant_linear_custom_op_opcheck():
    from fused_lora.core import formats as quant
    from fused_lora.ops import quant as quant_ops
    torch.manual_seed(0)
    qw = QuantizedLinear.from_linear(nn.Linear(128, 64), "nf4").weight
    x = torch.randn(5, 128, requires_grad=True)
    b = torch.randn(64, requires_grad=True)
    torch.library.opcheck(quant_ops.quant_linear_fwd, (x, *quant.op_args(qw.data()), b))
    torch.library.opcheck(quant_ops.quant_linear_fwd, (x, *quant.op_args(qw.data()), None))


def test_quantized_linear_follows_autocast_like_nn_linear():
    """Under torch.autocast a QuantizedLinear computes in the autocast dtype, as nn.Linear and the adapted
    layer over it do (a non-adapted quantized layer in float32 would cost twice the memory and time)."""
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    ql = QuantizedLinear.from_linear(lin, "nf4")
    x = torch.randn(2, 128)
    with torch.autocast("cpu", torch.bfloat16):
        y = ql(x)
        assert y.dtype == lin(x).dtype == torch.bfloat16
    ref = nn.functional.linear(x.bfloat16().double(), ql.weight.dequantize(torch.bfloat16).double(),
                               ql.bias.bfloat16().double())
    torch.testing.assert_close(y.double(), ref, atol=0.05, rtol=0.02)


def test_quantize_model_replaces_a_shared_linear_everywhere():
    """A Linear registered under two names (shared / tied modules) becomes one QuantizedLinear under both
    names, not a quantized copy under the first and the float layer under the second."""
    shared = nn.Linear(64, 64)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    x = torch.randn(3, 64)
    W = None
    quantize_model(model, "int8", target_modules=["0", "2"])
    assert isinstance(model[0], QuantizedLinear) and model[2] is model[0]
    W = model[0].weight.dequantize(torch.float64)
    h = torch.relu(x.double() @ W.T + shared.bias.double())
    torch.testing.assert_close(model(x).double(), h @ W.T + shared.bias.double(), atol=1e-5, rtol=1e-5)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    quantize_model(model, "nf4")  # default targets
    assert isinstance(model[2], QuantizedLinear) and model[2] is model[0]


def test_load_state_dict_assign_keeps_the_layout_contract():
    """load_state_dict(assign=True) (meta-device loading) takes the checkpoint's tensors as they are: packed
    data of the wrong dtype is refused by name (not an IndexError deep in dequantization, nor wrong codes),
    and float tables come out float32 as the launchers rely on."""
    torch.manual_seed(0)
    src = QuantizedLinear.from_linear(nn.Linear(128, 64), "nf4")
    x = torch.randn(2, 128)
    bad = dict(src.state_dict())
    bad["weight.packed"] = bad["weight.packed"].view(torch.int8)
    m = copy.deepcopy(src).to("meta")
    with pytest.raises(RuntimeError, match="packed"):
        m.load_state_dict(bad, assign=True)
    half = {k: (v.half() if k in ("weight.absmax2", "weight.code") else v) for k, v in src.state_dict().items()}
    m = copy.deepcopy(src).to("meta")
    m.load_state_dict(half, assign=True)
    assert m.weight.absmax2.dtype == m.weight.code.dtype == torch.float32
    torch.testing.assert_close(m(x), src(x), atol=1e-3, rtol=1e-3)  # the checkpoint's tables were rounded to fp16
    i8 = QuantizedLinear.from_linear(nn.Linear(128, 64), "int8")
    bad = dict(i8.state_dict())
    bad["weight.qweight"] = bad["weight.qweight"].view(torch.uint8)
    m = copy.deepcopy(i8).to("meta")
    with pytest.raises(RuntimeError, match="qweight"):
        m.load_state_dict(bad, assign=True)


def test_quantized_weight_refuses_to_become_trainable():
    """Asking the quantized base weight for gradients is refused clearly (it has no float values to train;
    silently staying frozen would look like training it); freezing it and whole-model requires_grad_ work."""
    layer = quantized_adapted_layer("nf4")
    with pytest.raises(TypeError, match="frozen"):
        layer.weight.requires_grad_(True)
    with pytest.raises(TypeError, match="frozen"):
        layer.weight.requires_grad = True
    layer.weight.requires_grad_(False)
    layer.weight.requires_grad = False
    assert layer.weight.requires_grad is False
    layer.requires_grad_(True)  # the module-wide switch touches parameters only
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["bias", "lora_A", "lora_B"]


def test_quantize_model_default_keeps_the_classification_head_like_transformers():
    """Default targets leave unquantized what transformers' bitsandbytes loading leaves (its
    get_keys_to_not_convert: output embeddings and the model's last module), e.g. a sequence
    classifier's `score` head, which task_type="SEQ_CLS" then trains through modules_to_save."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification
    from transformers.quantizers.base import get_keys_to_not_convert
    from fused_lora import LoraConfig, get_lora_model
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, num_labels=3, pad_token_id=0)
    for cls in (LlamaForSequenceClassification, LlamaForCausalLM):
        torch.manual_seed(0)
        model = cls(config)
        keep = {k.removesuffix(".weight").removesuffix(".bias") for k in get_keys_to_not_convert(model)}
        quantize_model(model, "nf4")
        for name in keep:
            assert type(model.get_submodule(name)) is nn.Linear, (cls.__name__, name)
        assert isinstance(model.model.layers[0].self_attn.q_proj, QuantizedLinear)
    lm = get_lora_model(quantize_model(LlamaForSequenceClassification(config), "nf4"),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    assert any(p.requires_grad and "score" in n for n, p in lm.named_parameters())


# ------------------------------------------------------------------ several adapters in one batch over a quantized base

def _multi_quant_layer(fmt, dropout=(0.0, 0.0)):
    torch.manual_seed(0)
    layer = FusedLoRALinear.from_linear(QuantizedLinear.from_linear(nn.Linear(128, 64), fmt), r=4, lora_alpha=8,
                                        lora_dropout=dropout[0])
    layer.add_adapter("b", r=8, lora_alpha=4, lora_dropout=dropout[1])
    with torch.no_grad():
        for name in ("default", "b"):
            for t in layer.adapter_weights(name):
                t.normal_(0, 0.3)
    layer.set_requires_grad(["default", "b"])
    return layer


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_mixed_batch_over_quantized_base_matches_float64(fmt):
    """forward(adapter_names=...) over a quantized base: each sample gets dequantize(W) x + b + its adapter's
    term (none for "__base__"), and each adapter's gradients come from its own samples only."""
    layer = _multi_quant_layer(fmt)
    names = ["b", "default", "__base__", "b"]
    x = torch.randn(4, 3, 128, requires_grad=True)
    y = layer(x, adapter_names=names)
    W = layer.weight.dequantize(torch.float64)
    b = layer.bias.double()
    dy = torch.randn_like(y)
    y.backward(dy)
    xd = x.detach().double()
    ref_dx = dy.double() @ W
    for i, name in enumerate(names):
        ref = xd[i] @ W.T + b
        if name != "__base__":
            A, B = (t.double() for t in layer.adapter_weights(name))
            s = layer._adapter_settings[name].scaling
            ref = ref + s * (xd[i] @ A.T) @ B.T
            ref_dx[i] += s * (dy[i].double() @ B) @ A
        torch.testing.assert_close(y[i].double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_dx, atol=1e-5, rtol=1e-5)
    for name in ("default", "b"):
        rows = [i for i, n in enumerate(names) if n == name]
        A, B = (t.detach().double() for t in layer.adapter_weights(name))
        s = layer._adapter_settings[name].scaling
        xr, dyr = xd[rows].reshape(-1, 128), dy[rows].double().reshape(-1, 64)
        gA, gB = layer.adapter_weights(name)
        torch.testing.assert_close(gB.grad.double(), s * dyr.T @ (xr @ A.T), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gA.grad.double(), s * (dyr @ B).T @ xr, atol=1e-5, rtol=1e-5)


def test_mixed_batch_over_quantized_base_with_dropout_is_each_adapter_alone():
    """With dropout, adapter a's rows get exactly what the single-adapter op over the quantized base computes
    on those rows alone with the seed adapter_seed(seed, a) (values and gradients)."""
    from fused_lora import lora_linear_quant
    from fused_lora.torch_row.multi import adapter_seed
    from fused_lora.ops.quant import lora_linear_quant_multi
    layer = _multi_quant_layer("nf4")
    qw = layer.weight
    g = torch.Generator().manual_seed(1)
    adapters = two_random_adapters(g, 128, 64)
    row_adapter = torch.tensor([1, 0, -1, 1, 1, 0, -1, 0])
    x = torch.randn(8, 128, generator=g, requires_grad=True)
    dy = torch.randn(8, 64, generator=g)
    y = lora_linear_quant_multi(x, qw, layer.bias, adapters, row_adapter, seed=99)
    y.backward(dy)
    base_rows = (row_adapter == -1).nonzero().squeeze(1)
    W = qw.dequantize(torch.float64)
    torch.testing.assert_close(y[base_rows].double(), x[base_rows].double() @ W.T + layer.bias.double(),
                               atol=1e-5, rtol=1e-5)
    for a, (A, B, s, p) in enumerate(adapters):
        rows = (row_adapter == a).nonzero().squeeze(1)
        xa = x.detach()[rows].clone().requires_grad_()
        A2, B2 = A.detach().clone().requires_grad_(), B.detach().clone().requires_grad_()
        ya = lora_linear_quant(xa, qw, layer.bias, A2, B2, s, p, adapter_seed(99, a), backend="torch")
        ya.backward(dy[rows])
        # The two paths sum in different orders in fp32: an element that cancels (dB's sums of ~20-sized terms
        # to ~0.01) carries the rounding of its terms, so each tensor is compared in max norm against its
        # largest entry (1e-5 of it: far below what a lost or misplaced term gives).
        for got, want in ((y[rows], ya), (x.grad[rows], xa.grad), (A.grad, A2.grad), (B.grad, B2.grad)):
            torch.testing.assert_close(got, want, atol=1e-5 * float(want.abs().max()), rtol=1e-5)


def test_mixed_batch_over_quantized_base_bad_input_and_backends():
    from fused_lora.dispatch import BackendUnavailable
    layer = _multi_quant_layer("int8")
    x = torch.randn(2, 3, 128)
    with pytest.raises(ValueError, match="unknown adapter"):
        layer(x, adapter_names=["b", "zz"])
    with pytest.raises(ValueError, match="one per sample"):
        layer(x, adapter_names=["b"])
    layer.backend = "triton-tma"  # a row that cannot run it: refused by name, nothing runs
    with pytest.raises(BackendUnavailable, match="triton-tma backend was requested but cannot run"):
        layer(x, adapter_names=["b", "default"])
    layer.backend = "auto"
    with layer.disable_adapter():  # disabled: the base alone for every sample
        torch.testing.assert_close(layer(x, adapter_names=["b", "default"]),
                                   layer(x, adapter_names=["__base__", "__base__"]), atol=1e-6, rtol=1e-6)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: layer(t, adapter_names=["b", "default"]), fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x, adapter_names=["b", "default"]), atol=1e-6, rtol=1e-6)


def test_model_mixed_batch_over_quantized_base_equals_per_sample_set_adapter():
    from transformers import LlamaConfig, LlamaForCausalLM
    from fused_lora import LoraConfig, get_lora_model
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                         use_cache=False))
    targets = ["q_proj", "v_proj", "down_proj"]
    quantize_model(model, "nf4", target_modules=targets)
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=targets, init_lora_weights=False))
    lm.add_adapter("b", LoraConfig(r=8, lora_alpha=4, target_modules=targets, init_lora_weights=False))
    lm.eval()
    ids = torch.randint(0, 128, (3, 6))
    names = ["b", "__base__", "default"]
    with torch.no_grad():
        mixed = lm(input_ids=ids, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == "__base__":
                with lm.disable_adapter():
                    alone = lm(input_ids=ids[i:i + 1]).logits
            else:
                lm.set_adapter(name)
                alone = lm(input_ids=ids[i:i + 1]).logits
            torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ unload over bitsandbytes' layers

@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_unload_gives_back_the_bitsandbytes_layers(kind):
    """unload() of a model adapted over bitsandbytes' layers gives back those very layers (peft's unload
    does), so transformers' bitsandbytes model (save_pretrained, its quantizer) sees its own modules again;
    the model computes what it computed before adaptation."""
    pytest.importorskip("bitsandbytes")
    from fused_lora import LoraConfig, get_lora_model
    from test_qlora_against_peft import bnb_quantize, tiny_llama
    model = bnb_quantize(tiny_llama(), ["q_proj", "v_proj"], kind)
    before = {n: m for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    tokens = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        expected = model(input_ids=tokens).logits
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    back = lm.unload()
    for name, module in before.items():
        assert back.get_submodule(name) is module
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)


def test_copies_do_not_carry_the_bitsandbytes_layer():
    """The remembered bitsandbytes layer is a reference for unload(), not part of the weight: deepcopy and
    pickling do not copy it (that would store the packed data twice)."""
    pytest.importorskip("bitsandbytes")
    import io
    from test_qlora_against_peft import bnb_linear
    layer = FusedLoRALinear.from_linear(bnb_linear(nn.Linear(128, 64), "nf4"), r=4, init_lora_weights=False)
    assert "_bnb_source" not in copy.deepcopy(layer).weight.__dict__
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert "_bnb_source" not in loaded.weight.__dict__
    x = torch.randn(2, 128)
    assert torch.equal(loaded(x), layer(x))


def test_modules_to_save_over_a_quantized_module_is_refused():
    """A quantized layer's weight cannot be trained: a trainable copy of it would silently train
    nothing, so get_lora_model says so and leaves the model as it was."""
    from fused_lora import LoraConfig, get_lora_model, quantize_model
    from fused_lora.modules.quantized import QuantizedLinear
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    quantize_model(model, "nf4", target_modules=["0", "2"])
    with pytest.raises(ValueError, match="modules_to_save.*quantized"):
        get_lora_model(model, LoraConfig(r=4, target_modules=["0"], modules_to_save=["2"]))
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[2], QuantizedLinear)
