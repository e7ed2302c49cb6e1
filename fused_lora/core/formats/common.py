"""What every quantized format shares: the error type, the weight checks before quantizing, the blockwise
rounding rule, and the row chunks the PyTorch path and the quantizers work in (bounded temporaries)."""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class QuantizationError(ValueError):
    """A weight that cannot be quantized or a packed layout that does not hold together."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fits(value: float, dtype: torch.dtype) -> bool:
    """Whether `value`, rounded to float32 (as the scales are) and then to `dtype`, is finite."""
    return bool(torch.isfinite(torch.tensor(value, dtype=torch.float64).float().to(dtype)))


def nonfinite(t: Tensor) -> Optional[str]:
    """"NaN" or "inf" when `t` holds one (NaN first), else None."""
    if not t.numel() or bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "inf"


def check_float_weight(weight, what: str, compute_dtype: Optional[torch.dtype] = None) -> None:
    """A float weight every format can quantize: 2-D, of a float dtype, with values, none NaN or inf, and none
    beyond float32's range (the scales) or the compute dtype's (the weight would dequantize to inf)."""
    if not isinstance(weight, Tensor):
        raise TypeError(f"{what}: expected a weight tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise QuantizationError(f"{what}: the weight must be 2-D (out_features x in_features), got shape "
                                f"{tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: the weight has dtype {weight.dtype}; expected a floating-point weight "
                        "(float32, float16, bfloat16 or float64)")
    if weight.is_meta:
        raise QuantizationError(f"{what}: the weight is on the meta device (no values to quantize)")
    if not weight.numel():
        return
    # one reduction without a temporary copy of the weight; NaN propagates through it
    peak = float(torch.linalg.vector_norm(weight, float("inf")))
    if math.isnan(peak) or math.isinf(peak):
        raise QuantizationError(f"{what}: the weight holds {'NaN' if math.isnan(peak) else 'inf'}")
    # The scales are float32 (a float64 weight's 1e300 made inf scales and NaN codes), and the weight is
    # dequantized in its compute dtype: each must hold the weight's largest value (the +-1 NF4 level and the
    # +-127 int8 code reproduce it, rounded to float32).
    for dtype, why in ((torch.float32, "NF4 and int8 scales are float32"),
                       (compute_dtype or weight.dtype, "the compute dtype: the weight would dequantize to inf")):
        if dtype in FLOAT_DTYPES and not fits(peak, dtype):
            raise QuantizationError(f"{what}: the weight holds {peak:g}, beyond {dtype_name(dtype)}'s range ({why})")


# Peaks below this are scaled up by 2^64 before their reciprocal is taken (1 / peak overflows float32 below
# 2.9e-39, 127 / peak below 3.7e-37); a zero peak divides by it instead of by 0.
TINY_PEAK = 1e-30


def times_reciprocal(x: Tensor, peak: Tensor, numerator: float = 1.0) -> Tensor:
    """x * (numerator / peak) in float32, peak broadcasting over x (a block's or row's largest magnitude).
    Where peak is tiny (a block of subnormals) the reciprocal would overflow float32 (or a clamp would distort
    it): x and peak are first multiplied by 2^64, exactly (a power of two). Ordinary peaks are computed as
    before, bit for bit (bitsandbytes' rule: times the reciprocal); zero ones give 0."""
    up = torch.where(peak < TINY_PEAK, 2.0 ** 64, 1.0)
    return (x * up) * (numerator / (peak * up).clamp(min=TINY_PEAK))


def blockwise(flat: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(indices into `code`, fp32 absmax per block) of a flat fp32 tensor: scale each block by
    1/absmax, round to the nearest code value (bitsandbytes' blockwise rule, ties to the upper value)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(times_reciprocal(blocks, absmax.view(-1, 1)), -1, 1).reshape(-1)
    if n % blocksize:
        am = flat[full:].abs().max()
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / torch.where(am > 0, am, 1.0), -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2  # code is sorted
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


CHUNK_ELEMENTS = 1 << 22  # the most weight elements dequantized at once on the PyTorch path (8 MiB in 16-bit)


def row_chunks(N: int, K: int, max_elements: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of an N x K weight, each at most `max_elements` (default
    CHUNK_ELEMENTS, read at each call) elements, at least one row."""
    limit = CHUNK_ELEMENTS if max_elements is None else max_elements
    step = max(1, limit // max(1, K))
    for start in range(0, N, step):
        yield start, min(N, start + step)
