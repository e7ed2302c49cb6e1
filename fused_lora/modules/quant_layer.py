"""What FusedLoRALinear does differently over a quantized base (called from small hooks in layer.py
and model.py, so the layer keeps one code path for everything else).

A FusedLoRALinear over a quantized base holds `weight`, a frozen `QuantizedWeight` module (shape,
dtype = the compute dtype, device, like a weight tensor) and `bias`. Decisions:
- forward computes in the input's dtype (after autocast), as bitsandbytes' layers cast to their compute
  dtype: the quantized codes have no dtype to mismatch.
- merge() / unmerge-by-merge are refused: folding the delta into 4-bit or 8-bit codes would re-quantize
  and lose most of the adapter (peft does re-quantize; we do not). `to_linear()` and
  `LoraModel.merge_and_unload()` return 16-bit (compute dtype) nn.Linear layers holding
  dequantize(W) + s B A; `unload()` gives back a `QuantizedLinear` holding the same packed tensors.
- several adapters in one batch (forward(adapter_names=...)): `quant_ops.lora_linear_quant_multi`, through
  the backend table (ops "quant_multi_fwd" / "quant_multi_bwd") and its custom ops under torch.compile.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from ..core.dropout import new_seed, no_seed
from .quantized import QuantizedLinear, QuantizedWeight
from ..ops.quant import lora_linear_quant, lora_linear_quant_multi, quant_linear


def is_quantized(layer) -> bool:
    return isinstance(layer.__dict__.get("_modules", {}).get("weight"), QuantizedWeight)


def autocast_inputs(x: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x and bias in the autocast dtype when autocast is on for x's device, else in x's dtype."""
    from .layer import _autocast_dtype
    dtype = _autocast_dtype(x.device.type) or x.dtype
    return x.to(dtype), None if bias is None else bias.to(dtype)


def forward(layer, x: Tensor, adapter_names: Optional[Sequence[str]] = None) -> Tensor:
    """The layer's forward over a quantized base (see the module doc)."""
    layer._check_input(x)
    if adapter_names is not None:
        used, row_adapter = layer._row_adapters(x, adapter_names)
    x, bias = autocast_inputs(x, layer.bias)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), layer.in_features)
    if layer._disabled:
        y = quant_linear(x2, layer.weight, bias)
    elif adapter_names is not None and (one := layer._one_adapter_of(used, adapter_names, x.dtype)) is not None:
        y = lora_linear_quant(x2, layer.weight, bias, *one, layer.backend)  # every sample names one adapter
    elif adapter_names is not None:
        adapters, seed = layer._mixed_adapters(used, x.dtype)
        y = lora_linear_quant_multi(x2, layer.weight, bias, adapters, row_adapter, seed, layer.backend)
    else:
        p = layer.lora_dropout if layer.training else 0.0
        seed = new_seed() if p > 0.0 else no_seed()
        y = lora_linear_quant(x2, layer.weight, bias, layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype),
                              layer.scaling, p, seed, layer.backend)
    return y.reshape(*lead, layer.out_features)


def refuse_merge(what: str) -> None:
    raise ValueError(f"{what}: the base weight is quantized; merging into it would re-quantize the weight and "
                     "lose most of the adapter (safe_merge cannot help). Use LoraModel.merge_and_unload() or "
                     "FusedLoRALinear.to_linear(), which return 16-bit layers holding dequantize(W) + s B A")


@torch.no_grad()
def merged_weight(layer, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
                  what: str = "FusedLoRALinear.to_linear") -> Tensor:
    """dequantize(W) + sum of s B A over the adapters (default: the active one), in fp32, rounded once to
    the compute dtype. ValueError with safe_merge if the result has NaN or inf."""
    names = [layer._active_adapter] if adapter_names is None else list(adapter_names)
    for name in names:
        layer._require_adapter(name)
    delta = layer.delta_weight(names[0])
    for name in names[1:]:
        delta = delta + layer.delta_weight(name)
    w = layer.weight.dequantize(delta.dtype).add_(delta).to(layer.weight.dtype)
    if safe_merge and not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: the merged weight has NaN or inf in {layer.weight.dtype}")
    return w


def to_linear(layer, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Linear:
    """A new 16-bit (compute dtype) nn.Linear holding dequantize(W) + s B A; the layer is not changed."""
    w = merged_weight(layer, adapter_names, safe_merge)
    out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    out.weight = nn.Parameter(w, requires_grad=False)
    if layer.bias is not None:
        out.bias = nn.Parameter(layer.bias.detach().to(w.dtype), requires_grad=layer.bias.requires_grad)
    return out


def unloaded(layer) -> nn.Module:
    """The quantized base alone again: the bitsandbytes layer it was read from when it still holds the same
    packed tensors (peft's unload gives back its base layer), else a QuantizedLinear over them."""
    from .convert_bnb import bnb_source
    return bnb_source(layer.weight, layer.bias) or QuantizedLinear(layer.weight, layer.bias)


def quantized_parameter_count(model: nn.Module) -> int:
    """The weights held quantized in `model` (buffers, not parameters), counted as peft counts a 4-bit
    weight: its N x K elements."""
    return sum(math.prod(m.shape) for m in model.modules() if isinstance(m, QuantizedWeight))
