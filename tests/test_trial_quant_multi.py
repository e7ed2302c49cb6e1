"""Regression tests from trying the quantized base and mixed-adapter batches as a new user would:
meta-device initialisation (to_empty, then a checkpoint), a loaded checkpoint under torch.compile,
re-quantizing a model. Each compares against an independent truth (the source layer's own output,
float64 over the dequantized weight)."""
import copy

import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, QuantizedLinear, quantize_model


def _layer(fmt, seed=0, nested=True):
    torch.manual_seed(seed)
    kwargs = dict(double_quant=nested) if fmt == "nf4" else {}
    layer = FusedLoRALinear.from_linear(QuantizedLinear.from_linear(nn.Linear(128, 64), fmt, **kwargs), r=4,
                                        lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    return layer


FORMATS = [("nf4", True), ("nf4", False), ("int8", True)]


@pytest.mark.parametrize("fmt,nested", FORMATS)
def test_to_empty_then_load_state_dict(fmt, nested):
    """Meta-device initialisation (accelerate / FSDP style): .to('meta'), to_empty(device), load a
    checkpoint; the layer then computes exactly what the source layer does, buffers in their dtypes."""
    src = _layer(fmt, nested=nested)
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
    src = _layer(fmt, nested=nested)
    m = _layer(fmt, seed=1, nested=nested)
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
