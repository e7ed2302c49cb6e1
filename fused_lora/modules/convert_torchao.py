"""Reading torchao's `NF4Tensor` (torchtune's QLoRA base weight) into fused_lora's NF4 layout.

A torchtune / torchao model holds a frozen base as an nn.Linear whose `weight` is an NF4Tensor
parameter (torchao.quantization.NF4Tensor; older torchao: torchao.dtypes.nf4tensor.NF4Tensor), made
by `to_nf4(w, block_size, scaler_block_size)`. Its fields, and how they map onto `core.formats.NF4Data`:

    quantized_data      uint8[N*K/2], the flattened row-major weight two codes a byte, element 2i in
                        the high nibble: bitsandbytes' order. Shared as `packed`, as it is (no copy).
    nf4                 the 16 levels in the tensor's dtype (rounded to 4 decimals, then to that dtype:
                        not bitsandbytes' exact levels). Taken as `code` (widened to fp32: exact).
    quantized_scalers   int8[n_blocks], quantization_factor[n_blocks / scaler_block_size] and
    scaler_mean         (both in the tensor's dtype): block j's scale is, in torchao's arithmetic,
                            s[j] = dt(dt(q[j] / factor[j // scaler_block_size]) + mean)
                        (dt: rounded to the tensor's dtype; a division, two roundings).

The scales cannot be written as our nested absmax (code2[q] * absmax2 + offset, one fp32 rounding
and a product, not a quotient), so they are repacked once into a plain fp32 `absmax` with
torchao's own arithmetic (a tensor of n_blocks floats, the only new tensor: 4 bytes per block, no
16-bit copy of the weight is ever made). Every W[n, k] = code[idx] * s[j] is then the fp32 product of
two values of the tensor's dtype, exact in fp32, so our dequantization rounded to that dtype equals
`get_original_weight()` bit for bit, and the Triton kernels read it as any un-nested NF4 weight.
The cost: 0.5 + 4 / block_size bytes per parameter (0.5625 at block 64) instead of torchao's ~0.516.
An input of another dtype computes with the unrounded fp32 product (torchao first rounds W to its
dtype, e.g. bf16, then casts): at most half an ulp of that dtype per element of W apart.

Blocks: torchao's blocks run over the flattened weight (only numel % block_size == 0 is needed),
ours must be whole blocks per row. We use the largest of `quant.NF4_BLOCKSIZES` dividing both
torchao's block size and in_features, each torchao scale repeated block_size / ours times; a weight
where none divides (e.g. in_features 48 at block 64) is refused by name.

torchao is imported only when a tensor from it is seen (it is in the "quant" and "test" extras).
"""
from __future__ import annotations

import math
import sys
from typing import Optional

import torch
from torch import nn

from ..core.formats import NF4Data, QuantizationError, check_data, check_values
from ..core.formats.nf4 import BLOCKSIZES as NF4_BLOCKSIZES
from .quantized import QuantizedWeight

TORCHAO_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# torchtune's frozen NF4 Linear: an nn.Linear subclass whose forward is linear_nf4(x, weight) + bias,
# nn.Linear's function; any other subclass with a forward of its own is refused.
SAME_FUNCTION_SUBCLASSES = {("torchtune.modules.low_precision.nf4_linear", "FrozenNF4Linear")}


def _nf4_tensor_classes() -> tuple:
    """torchao's NF4Tensor class(es) importable here (new and old module paths)."""
    classes = []
    for path in ("torchao.quantization.quantize_.workflows.nf4.nf4_tensor", "torchao.dtypes.nf4tensor"):
        try:
            module = __import__(path, fromlist=["NF4Tensor"])
        except ImportError:
            continue
        classes.append(module.NF4Tensor)
    return tuple(classes)


def is_nf4_tensor(tensor) -> bool:
    """Whether `tensor` is torchao's NF4Tensor (never imports torchao: a tensor from it means it is loaded)."""
    if "torchao" not in sys.modules or not isinstance(tensor, torch.Tensor) \
            or not type(tensor).__module__.startswith("torchao"):
        return False
    return isinstance(tensor, _nf4_tensor_classes())


def is_nf4_linear(module) -> bool:
    """An nn.Linear (or subclass) whose weight is a torchao NF4Tensor: torchtune's QLoRA base layer."""
    return isinstance(module, nn.Linear) and is_nf4_tensor(module._parameters.get("weight"))


def _blocksize(block_size: int, in_features: int) -> Optional[int]:
    """Our block size for torchao's: the largest allowed one dividing both (None if there is none)."""
    common = math.gcd(block_size, in_features)
    fits = [b for b in NF4_BLOCKSIZES if common % b == 0]
    return max(fits) if fits else None


def nf4_data(tensor, what: str = "NF4Tensor") -> NF4Data:
    """The `NF4Data` of a torchao NF4Tensor: its packed bytes shared as they are, its double-quantized
    scales repacked once into fp32 absmax (see the module doc). QuantizationError for what cannot be read."""
    if tensor.dim() != 2:
        raise QuantizationError(f"{what}: expected a 2-D (out_features x in_features) NF4Tensor, got shape "
                                f"{tuple(tensor.shape)}")
    N, K = (int(s) for s in tensor.shape)
    if tensor.is_meta or tensor.quantized_data.is_meta:
        raise QuantizationError(f"{what}: the NF4Tensor is on the meta device (no packed data to read); "
                                "quantize or load the real weight first")
    if tensor.dtype not in TORCHAO_DTYPES:
        raise QuantizationError(f"{what}: an NF4Tensor of dtype {tensor.dtype} is not supported (its scales "
                                "and levels must be exact in fp32: bfloat16, float16 or float32)")
    if tuple(tensor.stride()) != (K, 1) or tensor.storage_offset() != 0:
        raise QuantizationError(f"{what}: the NF4Tensor is a strided view (strides {tuple(tensor.stride())}, "
                                f"offset {tensor.storage_offset()}), not a row-major {N} x {K} weight")
    block, scaler_block = int(tensor.block_size), int(tensor.scaler_block_size)
    n_blocks = N * K // block if block > 0 else 0
    sizes = {"quantized_data": (N * K // 2, torch.uint8), "quantized_scalers": (n_blocks, torch.int8),
             "quantization_factor": (n_blocks // max(scaler_block, 1), None),
             "scaler_mean": (1, None), "nf4": (16, None)}
    if block <= 0 or scaler_block <= 0 or (N * K) % block or n_blocks % scaler_block or (N * K) % 2:
        raise QuantizationError(f"{what}: block_size {block} / scaler_block_size {scaler_block} do not divide "
                                f"the {N} x {K} weight")
    for name, (numel, dtype) in sizes.items():
        t = getattr(tensor, name)
        if t.numel() != numel or (dtype is not None and t.dtype != dtype):
            raise QuantizationError(f"{what}: {name} holds {t.numel()} {t.dtype}, expected {numel}"
                                    f"{'' if dtype is None else f' {dtype}'} (an NF4Tensor sliced or built by hand?)")
    ours = _blocksize(block, K)
    if ours is None:
        raise QuantizationError(f"{what}: block_size {block} with in_features {K}: no NF4 block size of "
                                f"{NF4_BLOCKSIZES} divides both (every row must be whole blocks)")
    with torch.no_grad():
        # torchao's dequantize_scalers, in its dtype and order of roundings, once (n_blocks values)
        scales = (tensor.quantized_scalers.reshape(-1, scaler_block)
                  / tensor.quantization_factor.reshape(-1, 1)).reshape(-1).to(tensor.dtype)
        absmax = (scales + tensor.scaler_mean).float()
        if ours != block:
            absmax = absmax.repeat_interleave(block // ours)
    data = NF4Data(shape=(N, K), packed=tensor.quantized_data.reshape(-1), code=tensor.nf4.reshape(-1).float(),
                   blocksize=ours, absmax=absmax)
    check_data(data, what)
    return data


def weight_from_torchao(module: nn.Module) -> QuantizedWeight:
    """The QuantizedWeight of an nn.Linear holding a torchao NF4Tensor (compute dtype: the tensor's dtype)."""
    what = f"{type(module).__name__} with a torchao NF4Tensor weight"
    weight = module.weight
    data = nf4_data(weight, what)
    check_values(data, weight.dtype, what)  # to_nf4 quantizes a weight holding NaN / inf without a word
    return QuantizedWeight(data, weight.dtype)


def refusal(module: nn.Module) -> Optional[str]:
    """Why an nn.Linear holding an NF4Tensor cannot be adapted (None when it can)."""
    kind = type(module)
    if kind is not nn.Linear and kind.forward is not nn.Linear.forward \
            and (kind.__module__, kind.__name__) not in SAME_FUNCTION_SUBCLASSES:
        return f"{kind.__name__} overrides nn.Linear's forward, which the adapted layer would not run"
    try:
        weight_from_torchao(module)
    except QuantizationError as err:
        return str(err)
    return None


def source_packed(module: nn.Module) -> torch.Tensor:
    """The packed bytes an NF4Tensor Linear holds (what a converted weight shares)."""
    return module.weight.quantized_data
