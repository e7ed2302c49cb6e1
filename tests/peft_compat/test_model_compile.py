"""torch.compile(fullgraph=True) of a whole LoraModel holding several adapters, called with
adapter_names (a mixed batch), in eval and in training: same outputs and gradients as eager."""
import copy

import pytest
import torch
from torch import nn

from fused_lora import LoraConfig, get_lora_model


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down, self.head = nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 8)

    def forward(self, x):
        return self.head(self.down(torch.relu(self.up(x))))


def two_adapters():
    torch.manual_seed(0)
    lm = get_lora_model(Small(), LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False,
                                            modules_to_save=["head"]))
    with torch.no_grad():
        lm.model.head.trainable.weight.mul_(1.5)  # the first adapter's copy differs from the original
    lm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False))
    lm.set_requires_grad(["default", "other"])
    return lm


@pytest.mark.parametrize("training", [False, True])
def test_compiled_model_with_adapter_names_matches_eager(training):
    # The names used to reach the layers through forward pre-hooks registered during the call, which
    # dynamo cannot trace ("setattr() is not supported on type type"): fullgraph=True raised.
    lm = two_adapters().train(training)
    eager = copy.deepcopy(lm)
    compiled = torch.compile(lm, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 16)
    for names in (["other", "default", "__base__"], ["default", "other", "other"]):
        lm.zero_grad(set_to_none=True)
        eager.zero_grad(set_to_none=True)
        got, want = compiled(x, adapter_names=names), eager(x, adapter_names=names)
        torch.testing.assert_close(got, want)
        (got * torch.arange(8.0)).sum().backward()
        (want * torch.arange(8.0)).sum().backward()
        for (name, p), q in zip(lm.named_parameters(), eager.parameters()):
            if q.grad is not None:
                torch.testing.assert_close(p.grad, q.grad, msg=name)
    torch.testing.assert_close(compiled(x), eager(x))  # and without names: the active adapter alone
    layer = lm.model.up
    assert getattr(layer, "_call_adapter_names", None) is None  # nothing of the call is left behind
    assert lm.model.head.sample_uses_trainable is None


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_compiled_quantized_model_with_adapter_names_matches_eager(fmt):
    # A whole LoraModel over a quantized base (quantize_model), several adapters, a mixed batch in training:
    # fullgraph traces it (the layer's mixed batch is a custom op; the model passes names by attribute).
    from fused_lora.modules import quantized as quant
    from fused_lora import quantize_model

    torch.manual_seed(0)
    model = Small()
    model.up, model.down, model.head = nn.Linear(16, 64), nn.Linear(64, 64), nn.Linear(64, 8)  # rows of whole blocks
    base = quantize_model(model, fmt, target_modules=["down"], blocksize=32)
    lm = get_lora_model(base, LoraConfig(r=4, target_modules=["up", "down"], init_lora_weights=False))
    lm.add_adapter("other", LoraConfig(r=2, lora_alpha=6, target_modules=["up", "down"], init_lora_weights=False))
    lm.set_requires_grad(["default", "other"])
    assert isinstance(lm.model.down.weight, quant.QuantizedWeight)  # a quantized base under the adapter
    lm.train()
    eager = copy.deepcopy(lm)
    compiled = torch.compile(lm, backend="aot_eager", fullgraph=True)
    x = torch.randn(3, 5, 16)
    names = ["other", "__base__", "default"]
    got, want = compiled(x, adapter_names=names), eager(x, adapter_names=names)
    torch.testing.assert_close(got, want)
    (got * torch.arange(8.0)).sum().backward()
    (want * torch.arange(8.0)).sum().backward()
    grads = [(n, p.grad, q.grad) for (n, p), q in zip(lm.named_parameters(), eager.parameters()) if q.grad is not None]
    assert any("other" in n for n, _, _ in grads) and any("lora_A" in n for n, _, _ in grads)
    for name, g, h in grads:
        torch.testing.assert_close(g, h, msg=name)
