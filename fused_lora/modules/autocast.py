"""The dtype a layer computes in under torch.autocast, as nn.Linear does (shared by every base)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for this device type, or None (also for types without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """(x, W, b) in the autocast dtype when autocast is on for x's device (as nn.Linear computes
    under autocast), else as given."""
    dtype = autocast_dtype(x.device.type)
    if dtype is None:
        return x, weight, bias
    return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None


def autocast_input_and_bias(x: Tensor, bias: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """x and bias in the autocast dtype when autocast is on for x's device, else in x's dtype (a quantized
    base has no float weight to cast: it computes in the input's dtype, as bitsandbytes' layers do)."""
    dtype = autocast_dtype(x.device.type) or x.dtype
    return x.to(dtype), None if bias is None else bias.to(dtype)
