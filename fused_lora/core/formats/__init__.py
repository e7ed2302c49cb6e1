"""Quantized base formats: one module per format behind one registry (`FORMATS`).

A format module (nf4.py, int8.py) is plain torch, and offers:
    NAME, LAYOUT_CODES, FLOAT_BUFFERS      its name, its codes in op_args' meta, the float buffers it keeps
    OPTIONS                               quantize()'s options beside the weight (quantize_model passes these)
    CODES, CODES_READ_BY_VALUE_CHECK      the buffer of packed codes, and whether value_problem reads it
    DATA, a frozen dataclass (NF4Data, Int8Data): the layout the PyTorch path and the kernels read, with
                                          `format` (= NAME), `shape` and the reference `dequantize_rows`
    quantize(weight, ..., compute_dtype=None, what=...) -> layout
    check(data, what, same_device)        the packed layout holds together (QuantizationError)
    value_problem(data, compute_dtype)    why it would dequantize to NaN or inf, or None
    dequantize_rows(data, start, stop)    rows in fp32, bit for bit the reference, fewer temporaries
    dequantize(data, dtype)               the whole weight in dtype, bit for bit dequantize_rows(data, 0, N)
                                          .to(dtype), the fastest way measured on a CPU
    layout_name(data) -> (str, int)       what the backend table keys and refuses on
    op_args(data) / from_op_args(...)     the layout as a custom op's arguments, and back
    attributes, buffers, layout, settle, describe, is_nested
                                          the container's view (fused_lora.modules.quantized.QuantizedWeight)

Adding a format is a module here and one entry in FORMATS, with LAYOUT_CODES no other format uses. The
functions below dispatch on `data.format`. A Triton path for it is a branch of the quantized kernels' tile
loader (`kernels/quantized/quant_tiles.dequant_tile`), an entry of their per-format table
(`kernels/quantized/launchers.FORMATS`), its variants in the static gate (`kernels/compile_check.py`) and its
layout in `core/limits.KERNEL_LAYOUTS` (until then the dispatch table refuses the triton row for it).
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from . import int8, nf4
from .common import FLOAT_DTYPES, QuantizationError, row_chunks  # noqa: F401  (CHUNK_ELEMENTS: in .common)
from .int8 import Int8Data
from .nf4 import NF4Data

FORMATS = {nf4.NAME: nf4, int8.NAME: int8}  # the registry: name -> the format's module
QuantData = Union[NF4Data, Int8Data]
_BY_CODE = {code: fmt for fmt in FORMATS.values() for code in fmt.LAYOUT_CODES}
assert len(_BY_CODE) == sum(len(fmt.LAYOUT_CODES) for fmt in FORMATS.values()), "two formats share a layout code"


def format_named(name: str):
    """The format module called `name` (ValueError naming the known ones)."""
    if name not in FORMATS:
        raise ValueError(f"unknown quant_type {name!r}; expected one of {', '.join(FORMATS)}")
    return FORMATS[name]


def format_of(data, what: str = "QuantizedWeight"):
    """The format module of a layout (TypeError for anything else)."""
    fmt = FORMATS.get(getattr(type(data), "format", None))
    if fmt is None or not isinstance(data, fmt.DATA):
        names = " or ".join(f.DATA.__name__ for f in FORMATS.values())
        raise TypeError(f"{what}: expected {names}, got {type(data).__name__}")
    return fmt


def is_layout(data) -> bool:
    try:
        format_of(data)
    except TypeError:
        return False
    return True


def check_data(data: QuantData, what: str = "QuantizedWeight", same_device: bool = True) -> None:
    """The packed layout holds together: sizes, dtypes and (`same_device`) one device (QuantizationError /
    TypeError naming the field)."""
    format_of(data, what).check(data, what, same_device)


def value_problem(data: QuantData, compute_dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why `data` (a layout `check_data` accepts) would dequantize to NaN or inf, in float32 or in
    `compute_dtype`: a scale, code table or nested offset holding NaN / inf (named), or a largest weight
    value beyond the dtype's range. None when every value is finite. Reads the scales and tables, never
    the packed NF4 codes; a meta layout has no values (None)."""
    return format_of(data).value_problem(data, compute_dtype)


def check_values(data: QuantData, compute_dtype: torch.dtype = torch.float32, what: str = "QuantizedWeight") -> None:
    """QuantizationError naming the field when `data` would dequantize to NaN or inf (`value_problem`)."""
    problem = value_problem(data, compute_dtype)
    if problem:
        raise QuantizationError(f"{what}: {problem}")


def dequantize_rows(data: QuantData, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop-1 of W in fp32, bit for bit the layout's reference `dequantize_rows`."""
    return format_of(data).dequantize_rows(data, start, stop)


def dequantize(data: QuantData, dtype: torch.dtype) -> torch.Tensor:
    """The whole N x K weight in `dtype` (a fresh tensor), bit for bit `dequantize_rows(data, 0, N).to(dtype)`:
    the dequant-once row's dequantization off CUDA, the fastest exact way measured on a CPU
    (benchmarks/RESULTS.md, "the dequant-once row")."""
    return format_of(data).dequantize(data, dtype)


def layout_name(data) -> tuple[str, int]:
    """(format, blocksize) of a weight's layout, as the backends table keys and refuses on it:
    ("int8", 0), ("nf4", blocksize) or ("nf4-nested", blocksize)."""
    return format_of(data).layout_name(data)


def op_args(data: QuantData) -> tuple[list, list, float]:
    """The layout as a custom op's arguments: (tensors, [layout code, N, K, blocksize, blocksize2], offset)."""
    return format_of(data).op_args(data)


def from_op_args(tensors: list, meta: list, offset: float) -> QuantData:
    """The inverse of `op_args`."""
    return _BY_CODE[meta[0]].from_op_args(tensors, meta, offset)
