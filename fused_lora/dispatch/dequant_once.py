"""The dequant-once row's module: `torch_row.dequant_once.DequantOnce` (the 16-bit LoRA path's GEMMs on W
dequantized whole) composed with the dequantizer for the weight's device:

    on CUDA    one Triton launch (`fused_lora.kernels.quantized.launchers.dequantize`), loaded on first use
               (no Triton work at package import)
    elsewhere  `core.formats.dequantize`, the fastest exact PyTorch dequantization measured on the CPU
               (benchmarks/RESULTS.md)

Both are bit for bit `core.formats.dequantize_rows(data, 0, N).to(dtype)` (tests/kernels, tests/torch_row).
"""
from __future__ import annotations

import importlib
from functools import lru_cache

import torch
from torch import Tensor

from ..core import formats
from ..torch_row.dequant_once import DequantOnce

TRITON_DEQUANTIZER = "fused_lora.kernels.quantized.launchers"  # its `dequantize(data, dtype)`


def weight_device(data) -> torch.device:
    """The device of a `core.formats` layout (its packed codes')."""
    return getattr(data, formats.format_of(data).CODES).device


def dequantize(data, dtype: torch.dtype) -> Tensor:
    """W (N x K) in `dtype`, whole: one Triton launch for a weight on CUDA, else `core.formats.dequantize`."""
    if weight_device(data).type == "cuda":
        return importlib.import_module(TRITON_DEQUANTIZER).dequantize(data, dtype)
    return formats.dequantize(data, dtype)


@lru_cache(maxsize=None)
def module() -> DequantOnce:
    """The row's module (its op functions and keep_mask), built once."""
    return DequantOnce(dequantize)
