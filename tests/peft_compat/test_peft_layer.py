"""One layer against real peft: same A and B give the same outputs and gradients (dropout 0)."""
import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from fused_lora import FusedLoRALinear  # noqa: E402


class One(nn.Module):
    def __init__(self, K, N):
        super().__init__()
        self.proj = nn.Linear(K, N)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_matches_peft_outputs_and_gradients(use_rslora):
    torch.manual_seed(0)
    K, N, r = 24, 18, 4
    base = One(K, N)
    ours = FusedLoRALinear.from_linear(nn.Linear(K, N), r=r, lora_alpha=16, use_rslora=use_rslora,
                                       init_lora_weights=False)
    ours.weight.data.copy_(base.proj.weight)
    ours.bias.data.copy_(base.proj.bias)
    cfg = peft.LoraConfig(r=r, lora_alpha=16, target_modules=["proj"], use_rslora=use_rslora, lora_dropout=0.0)
    pm = peft.get_peft_model(base, cfg)
    layer = pm.base_model.model.proj
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(ours.lora_A)
        layer.lora_B["default"].weight.copy_(ours.lora_B)
    assert layer.scaling["default"] == ours.scaling

    x1 = torch.randn(3, 5, K, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = pm(x1), ours(x2)
    torch.testing.assert_close(y2, y1)
    dy = torch.randn_like(y1)
    y1.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(ours.lora_A.grad, layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, layer.lora_B["default"].weight.grad)
