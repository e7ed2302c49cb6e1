"""How a QuantizedWeight holds its tensors: buffers (the default), or frozen Parameters for FSDP2
(`hold_as_parameters` / `shardable_quantized`, which `cli.distributed.wrap` applies before `fully_shard`; the
sharding itself is tested with two processes in tests/cli/test_distributed.py). Both holdings compute the
same, save and load the same state_dict both ways, refuse the same checkpoints without changing anything,
move alike (`.to(dtype)` changes only the compute dtype), count the same, and never train the base."""
import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fused_lora import LoraConfig, QuantizedLinear, get_lora_model, quantize_model
from fused_lora.modules.quantized import QuantizedWeight, held_quantized_nbytes, shardable_quantized
from utils import quantized_adapted_layer

FORMATS = [("nf4", True), ("nf4", False), ("int8", False)]
IDS = ["nf4-nested", "nf4", "int8"]


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt,nested", FORMATS, ids=IDS)
def test_held_as_parameters_same_tensors_state_dict_and_output(fmt, nested):
    src = quantized_adapted_layer(fmt, nested)
    m = copy.deepcopy(src)
    w = m.weight
    before = dict(w.named_buffers())
    assert not w.held_as_parameters and not list(w.parameters())
    assert w.hold_as_parameters() is w and w.held_as_parameters
    params, buffers = dict(w.named_parameters()), dict(w.named_buffers())
    # Every tensor of at least one dimension is a frozen Parameter on the very same storage; the 0-dim nested
    # offset stays a buffer (FSDP2 cannot shard it; it is read once per change of the buffer).
    assert set(params) == {n for n, t in before.items() if t.dim() > 0}
    assert set(buffers) == ({"offset"} if nested else set())
    for name, p in params.items():
        assert isinstance(p, nn.Parameter) and not p.requires_grad
        assert p.data_ptr() == before[name].data_ptr() and p.dtype == before[name].dtype
    _assert_same_state(m.state_dict(), src.state_dict())
    assert w.nbytes() == src.weight.nbytes() == held_quantized_nbytes(m)
    x = torch.randn(5, 128, requires_grad=True)
    y, y_ref = m(x), src(x)
    assert torch.equal(y, y_ref)
    dy = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0])
    assert w.hold_as_buffers() is w and not w.held_as_parameters and not list(w.parameters())
    _assert_same_state(m.state_dict(), src.state_dict())


@pytest.mark.parametrize("fmt,nested", FORMATS, ids=IDS)
def test_checkpoints_load_both_ways(fmt, nested, tmp_path):
    """A safetensors file of either holding loads into the other (strict, also with assign=True), after which
    the layer computes what the source does; assign=True keeps the Parameters frozen and the tables fp32."""
    x = torch.randn(3, 128)
    for save_as_parameters in (False, True):
        src = quantized_adapted_layer(fmt, nested)
        want = src(x)
        if save_as_parameters:
            src.weight.hold_as_parameters()
        save_file(src.state_dict(), tmp_path / "layer.safetensors")
        for assign in (False, True):
            dst = quantized_adapted_layer(fmt, nested, seed=1)
            if not save_as_parameters:
                dst.weight.hold_as_parameters()
            dst.load_state_dict(load_file(tmp_path / "layer.safetensors"), assign=assign)
            assert dst.weight.held_as_parameters != save_as_parameters
            assert torch.equal(dst(x), want)
            for name, p in dst.weight.named_parameters():
                assert isinstance(p, nn.Parameter) and not p.requires_grad, name
    # An fp16 table taken with assign=True is made fp32 again, and stays a frozen Parameter.
    src = quantized_adapted_layer(fmt, nested)
    want = src(x)
    state = src.state_dict()
    table = "code" if fmt == "nf4" else "scale"
    state[f"weight.{table}"] = state[f"weight.{table}"].half()
    dst = quantized_adapted_layer(fmt, nested, seed=1)
    dst.weight.hold_as_parameters()
    dst.load_state_dict(state, assign=True)
    p = dict(dst.weight.named_parameters())[table]
    assert isinstance(p, nn.Parameter) and not p.requires_grad and p.dtype == torch.float32
    assert {n for n, _ in dst.weight.named_buffers()} == ({"offset"} if nested else set())
    assert torch.allclose(dst(x), want, atol=1e-2)  # the checkpoint's table was rounded to fp16


@pytest.mark.parametrize("fmt,nested", FORMATS, ids=IDS)
def test_refused_checkpoint_changes_nothing_when_held_as_parameters(fmt, nested):
    m = quantized_adapted_layer(fmt, nested)
    m.weight.hold_as_parameters()
    kept = _state(m)
    scale = "absmax2" if nested else ("absmax" if fmt == "nf4" else "scale")
    bad = _state(quantized_adapted_layer(fmt, nested, seed=1))
    bad[f"weight.{scale}"][0] = float("nan")
    with pytest.raises(RuntimeError, match=f"{scale} holds NaN"):
        m.load_state_dict(bad)
    _assert_same_state(m.state_dict(), kept)  # nothing half-loaded: the adapter and bias neither
    short = _state(quantized_adapted_layer(fmt, nested, seed=1))
    del short[f"weight.{scale}"]
    with pytest.raises(RuntimeError, match=f"Missing key.*weight.{scale}"):
        m.load_state_dict(short)
    _assert_same_state(m.state_dict(), kept)
    assert m.weight.load_refusal(bad, "weight.") == f"{scale} holds NaN"


@pytest.mark.parametrize("fmt,nested", FORMATS, ids=IDS)
def test_to_dtype_changes_only_the_compute_dtype(fmt, nested):
    m = quantized_adapted_layer(fmt, nested)
    w = m.weight.hold_as_parameters()
    params = dict(w.named_parameters())
    dtypes = {k: v.dtype for k, v in w.state_dict().items()}
    m.to(torch.float16)
    assert w.dtype == torch.float16 and {k: v.dtype for k, v in w.state_dict().items()} == dtypes
    assert all(dict(w.named_parameters())[k] is p for k, p in params.items())  # the same Parameters
    m.to(torch.float32).to("cpu")
    assert w.dtype == torch.float32 and dict(w.named_parameters()).keys() == params.keys()


@pytest.mark.parametrize("fmt,nested", FORMATS, ids=IDS)
def test_meta_then_to_empty_then_load_when_held_as_parameters(fmt, nested):
    """Device moves move the Parameters, frozen: the meta-device initialisation path (.to("meta"), to_empty,
    load_state_dict) gives the source layer back."""
    src = quantized_adapted_layer(fmt, nested)
    m = copy.deepcopy(src)
    m.weight.hold_as_parameters()
    names = {n for n, _ in m.weight.named_parameters()}
    dtypes = {k: v.dtype for k, v in src.state_dict().items()}
    m.to("meta")
    assert m.weight.is_meta and all(p.is_meta for p in m.weight.parameters())
    m.to_empty(device="cpu")
    params = dict(m.weight.named_parameters())
    assert params.keys() == names and {k: v.dtype for k, v in m.state_dict().items()} == dtypes
    assert all(isinstance(p, nn.Parameter) and not p.requires_grad and p.device.type == "cpu" for p in params.values())
    m.load_state_dict(src.state_dict())
    x = torch.randn(3, 128)
    assert torch.equal(m(x), src(x))


def _quantized_mlp(fmt):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8))
    quantize_model(model, fmt, target_modules=["0", "2"])
    return get_lora_model(model, LoraConfig(r=4, target_modules=["0", "2"]))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_counts_and_optimizers_unchanged(fmt):
    """peft's counts (a quantized weight counts its N x K elements once, never as trainable) are the same in
    both holdings; an optimizer over model.parameters() leaves every quantized tensor as it was."""
    lora = _quantized_mlp(fmt)
    counts = lora.get_nb_trainable_parameters()
    # trainable: the LoRA weights of the two layers; all: those, the last Linear, the biases and 128x128 + 64x128
    lora_elements = 4 * (128 + 128) + 4 * (128 + 64)
    assert counts == (lora_elements, lora_elements + 128 * 128 + 64 * 128 + 128 + 64 + 64 * 8 + 8)
    assert shardable_quantized(lora) == 2
    assert lora.get_nb_trainable_parameters() == counts
    weights = [m for m in lora.modules() if isinstance(m, QuantizedWeight)]
    quantized = {id(p) for w in weights for p in w.parameters()}
    assert len(quantized) == sum(len(list(w.parameters())) for w in weights) > 0
    assert not any(p.requires_grad for p in lora.parameters() if id(p) in quantized)
    kept = [t.clone() for w in weights for t in w.state_dict().values()]
    opt = torch.optim.AdamW(lora.parameters(), lr=1e-2, weight_decay=0.1)
    lora(torch.randn(4, 128)).square().sum().backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(kept, (t for w in weights for t in w.state_dict().values())))


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_a_quantized_parameter_made_trainable_or_cast_is_refused(fmt):
    """Held as Parameters the base is still frozen: one set to require a gradient (e.g. by the model's
    requires_grad_(True)) is refused at the forward, naming it; so is a float table cast away from fp32, as
    FSDP2's MixedPrecisionPolicy(param_dtype=...) would cast it when gathering."""
    m = quantized_adapted_layer(fmt, nested=False)
    w = m.weight.hold_as_parameters()
    x = torch.randn(2, 128)
    scale = "absmax" if fmt == "nf4" else "scale"
    getattr(w, scale).requires_grad_(True)
    with pytest.raises(TypeError, match=f"{scale} requires a gradient, but the quantized base weight is frozen"):
        m(x)
    getattr(w, scale).requires_grad_(False)
    with torch.no_grad():
        getattr(w, scale).data = getattr(w, scale).data.bfloat16()
    with pytest.raises(TypeError, match=f"{scale} is torch.bfloat16, not float32: FSDP2's MixedPrecisionPolicy"):
        m(x)


def test_compiled_fullgraph_when_held_as_parameters():
    """torch.compile(fullgraph=True) traces the layer over a weight held as Parameters (the custom ops, the
    nested offset still a buffer): the eager output and gradients. (aot_eager: the tracing is what differs
    from the buffers' case, tested with inductor in test_quantized.py.)"""
    m = quantized_adapted_layer("nf4", nested=True)
    m.weight.hold_as_parameters()
    x = torch.randn(6, 128, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y1 = compiled(x)
    g1 = torch.autograd.grad(y1.square().sum(), (x, m.lora_A, m.lora_B))
    y2 = m(x)
    g2 = torch.autograd.grad(y2.square().sum(), (x, m.lora_A, m.lora_B))
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # a write to the offset buffer is seen by the next compiled call
        m.weight.offset += 0.01
    torch.testing.assert_close(compiled(x), m(x), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(compiled(x), y2)


def test_held_bytes_count_each_storage_once():
    lora = _quantized_mlp("nf4")
    whole = sum(w.nbytes() for w in lora.modules() if isinstance(w, QuantizedWeight))
    assert held_quantized_nbytes(lora) == whole
    shardable_quantized(lora)
    assert held_quantized_nbytes(lora) == whole
    shared = nn.ModuleList([lora, lora])  # the same weights twice
    assert held_quantized_nbytes(shared) == whole


def test_held_as_parameters_lets_go_of_a_bitsandbytes_layer():
    """A weight read from bitsandbytes' layer (sharing its packed bytes) remembers that layer for unload();
    held for sharding it lets go of it (the layer would keep the whole packed weight on every process), and
    unload() gives a QuantizedLinear over the same tensors, computing the same."""
    pytest.importorskip("bitsandbytes")
    from test_qlora_against_peft import bnb_linear
    source = bnb_linear(nn.Linear(128, 64), "nf4")
    lora = get_lora_model(nn.Sequential(source), LoraConfig(r=4, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = lora(x)
    assert lora.model[0].weight.__dict__.get("_bnb_source") is source
    shardable_quantized(lora)
    assert "_bnb_source" not in lora.model[0].weight.__dict__
    packed = lora.model[0].weight.packed
    with torch.no_grad():
        assert torch.equal(lora(x), want)
    back = lora.unload()
    assert isinstance(back[0], QuantizedLinear) and back[0].weight.packed is packed
