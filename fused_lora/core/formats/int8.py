"""int8 weight-only, one scale per output row (bitsandbytes' Linear8bitLt codes at threshold 0):
W[n, k] = qweight[n, k] * scale[n].

The format's functions (the interface `fused_lora.core.formats` names) are below.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from .common import QuantizationError, check_float_weight, dtype_name, nonfinite, row_chunks, times_reciprocal

NAME = "int8"
FLOAT_BUFFERS = ("scale",)
CODES = "qweight"  # the buffer of codes (the rest are scales)
CODES_READ_BY_VALUE_CHECK = True  # value_problem reads the rows whose scale could overflow
OPTIONS = ()  # quantize() takes the weight and compute dtype only
LAYOUT_CODES = (2,)  # op_args' layout code (the custom ops' `meta[0]`)


@dataclass(frozen=True)
class Int8Data:
    """An N x K weight as int8 with one fp32 scale per output row."""
    format: ClassVar[str] = NAME
    shape: tuple  # (N, K)
    qweight: torch.Tensor  # int8, N x K
    scale: torch.Tensor  # fp32[N]

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of W in fp32."""
        return self.qweight[start:stop].float() * self.scale[start:stop, None].float()


DATA = Int8Data  # the layout class of this format


@torch.no_grad()
def quantize(weight: Tensor, compute_dtype: Optional[torch.dtype] = None, what: str = "quantize_int8") -> Int8Data:
    """int8 weight-only, one scale per output row: q = round(W * 127 / absmax_row), scale = absmax_row / 127
    (bitsandbytes' int8_vectorwise_quant codes, threshold 0). A zero row gets scale 0.

    Two float32 edges: a row of tiny values (subnormal absmax, e.g. 1e-40) has a reciprocal 127 / absmax
    beyond float32, which garbled its codes; such rows are scaled up by 2^64 first (exact: a power of two,
    `common.times_reciprocal`), so their codes are the row's own. And a row reaching float32's largest value has absmax / 127 rounded
    up so far that 127 * scale, its largest element dequantized, overflows float32: that scale is taken
    one unit lower (the element then dequantizes 6e-8 below it, far inside int8's rounding)."""
    check_float_weight(weight, what, compute_dtype)
    if weight.numel() == 0:
        raise QuantizationError(f"{what}: the weight is empty (shape {tuple(weight.shape)})")
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    row_max = torch.empty(N, dtype=torch.float32, device=weight.device)
    for start, stop in row_chunks(N, K):  # bounded temporaries
        w = weight[start:stop].float()
        peak = w.abs().max(dim=1).values
        row_max[start:stop] = peak
        q[start:stop] = torch.round(times_reciprocal(w, peak.unsqueeze(-1), 127.0))
    scale = row_max / 127.0
    return Int8Data(tuple(weight.shape), q, torch.where(torch.isfinite(scale * 127.0), scale,
                                                        torch.nextafter(scale, torch.zeros_like(scale))))


def check(data: Int8Data, what: str, same_device: bool = True) -> None:
    """The layout holds together: sizes, dtypes and (`same_device`) one device."""
    N, K = data.shape
    if data.qweight.dtype != torch.int8 or tuple(data.qweight.shape) != (N, K):
        raise QuantizationError(f"{what}: qweight must be int8 of shape {(N, K)}, got {data.qweight.dtype} "
                                f"{tuple(data.qweight.shape)}")
    if tuple(data.scale.shape) != (N,) or not data.scale.is_floating_point():
        raise QuantizationError(f"{what}: scale must be float of shape ({N},), got {data.scale.dtype} "
                                f"{tuple(data.scale.shape)}")
    devices = {data.qweight.device, data.scale.device}
    if same_device and len(devices) > 1:
        raise QuantizationError(f"{what}: the packed tensors are on several devices: {sorted(map(str, devices))}")


def value_problem(data: Int8Data, compute_dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why `data` would dequantize to NaN or inf (see `fused_lora.core.formats.value_problem`)."""
    if data.scale.is_meta:
        return None
    bad = nonfinite(data.scale)
    if bad:
        return f"scale holds {bad}"
    # A row's largest value is |q| <= 128 times its scale: only rows where that bound overflows are read
    scale = data.scale.float().abs()
    bound = scale * 128
    over = ~torch.isfinite(bound) | ~torch.isfinite(bound.to(compute_dtype))
    if not bool(over.any()):
        return None
    rows = over.nonzero().squeeze(1)
    q = data.qweight[rows.to(data.qweight.device)].to(scale.device)
    row_peak = q.to(torch.int16).abs().amax(dim=1).float() * scale[rows]
    if not bool(torch.isfinite(row_peak).all()):
        return f"the weight dequantizes to inf in float32 (scale up to {float(scale.max()):g})"
    peak = row_peak.max()
    if not bool(torch.isfinite(peak.to(compute_dtype))):
        return (f"the weight's largest value {float(peak):g} is beyond {dtype_name(compute_dtype)}'s range, its "
                "compute dtype (it would dequantize to inf)")
    return None


def dequantize_rows(data: Int8Data, start: int, stop: int) -> Tensor:
    """Rows start..stop-1 of W in fp32, bit for bit `Int8Data.dequantize_rows`, scaled in place."""
    return data.qweight[start:stop].float().mul_(data.scale[start:stop, None].float())


def dequantize(data: Int8Data, dtype: torch.dtype) -> Tensor:
    """The whole weight in `dtype`, bit for bit `dequantize_rows(data, 0, N).to(dtype)`: each code times its row's
    scale computed in fp32 (the int8 codes are exact there) and rounded once as it is stored in `dtype`, in row
    chunks of at most `common.CHUNK_ELEMENTS` (the int8-to-fp32 conversion's temporaries stay bounded)."""
    out = torch.empty(data.shape, dtype=dtype, device=data.qweight.device)
    scale = data.scale.float()[:, None]
    for start, stop in row_chunks(*data.shape):
        torch.mul(data.qweight[start:stop], scale[start:stop], out=out[start:stop])
    return out


def layout_name(data: Int8Data) -> tuple[str, int]:
    return NAME, 0


def op_args(data: Int8Data) -> tuple[list, list, float]:
    N, K = data.shape
    return [data.qweight, data.scale], [LAYOUT_CODES[0], N, K, 0, 0], 0.0


def from_op_args(tensors: list, meta: list, offset: float) -> Int8Data:
    _, N, K, _, _ = meta
    return Int8Data((N, K), tensors[0], tensors[1])


# ---- the container's view (fused_lora.modules.quantized.QuantizedWeight holds the buffers)

def attributes(data: Int8Data) -> dict:
    return {}


def buffers(data: Int8Data) -> dict[str, Tensor]:
    return {"qweight": data.qweight.contiguous(),  # no copy when it is (the usual case)
            "scale": data.scale.float().contiguous()}


def layout(shape: tuple, tensors: dict, attrs: dict, offset: str = "value") -> Int8Data:
    return Int8Data(tuple(shape), tensors["qweight"], tensors["scale"])


def settle(tensors: dict) -> None:
    pass


def describe(attrs: dict, tensors: dict) -> str:
    return "int8 per-row scale"


def is_nested(tensors: dict) -> bool:
    return False
