"""Converters from bitsandbytes' quantized layers to fused_lora's `QuantizedWeight` / `QuantizedLinear`.

The packed data is read as bitsandbytes holds it, never through a 16-bit copy:
    Linear4bit (Params4bit, quant_type "nf4"): `weight.data` (uint8, or any quant_storage dtype, whose
        bytes are the same) is shared as `packed`; `quant_state.absmax` (fp32, or uint8 with
        `state2` when compress_statistics) and the code tables are shared as they are.
    Linear8bitLt (Int8Params, has_fp16_weights=False): `weight.data` (int8 N x K) is shared as
        `qweight`; the per-row scale is `SCB / 127` (N floats: the only new tensor).
With threshold > 0, bitsandbytes' Linear8bitLt quantizes the activations too (LLM.int8() with fp16
outlier columns); fused_lora computes x times the dequantized int8 weight (weight-only), so its
outputs are closer to the 16-bit layer's than bitsandbytes' own.

An nn.Linear whose weight is torchao's NF4Tensor (torchtune's QLoRA base): `convert_torchao` (packed bytes
shared, block scales repacked once to fp32).

bitsandbytes and torchao are imported only when a module from them is seen (`pip install -e ".[quant]"`).
"""
from __future__ import annotations

import sys
from typing import Optional

import torch
from torch import nn

from ..core.formats import Int8Data, NF4Data, QuantizationError, check_data, check_values
from .quantized import QuantizedLinear, QuantizedWeight
from . import convert_torchao

BNB_KINDS = ("Linear4bit", "LinearNF4", "Linear8bitLt")


def bnb_kind(module) -> Optional[str]:
    """"4bit" / "8bit" for bitsandbytes' Linear4bit (and subclasses) / Linear8bitLt, else None."""
    if "bitsandbytes" not in sys.modules or not type(module).__module__.startswith("bitsandbytes"):
        return None
    import bitsandbytes as bnb
    if isinstance(module, bnb.nn.Linear4bit):
        return "4bit"
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "8bit"
    return None


def is_quantized_base(module) -> bool:
    """A base layer fused_lora adapts as a quantized base: a QuantizedLinear, bitsandbytes'
    Linear4bit / Linear8bitLt, or an nn.Linear whose weight is torchao's NF4Tensor."""
    return isinstance(module, QuantizedLinear) or bnb_kind(module) is not None \
        or convert_torchao.is_nf4_linear(module)


def _nf4_from_params4bit(weight, what: str) -> NF4Data:
    state = getattr(weight, "quant_state", None)
    if state is None:
        raise QuantizationError(f"{what}: the Params4bit has no quant_state (not quantized yet: bitsandbytes "
                                "quantizes a Linear4bit when it is moved to a device, e.g. .to('cpu') or .cuda())")
    if getattr(state, "packing_format_for_cpu", False):
        raise QuantizationError(f"{what}: bitsandbytes has repacked this weight into its CPU inference format "
                                "(it does so on the first eval-mode forward without grad on a CPU with AVX512-BF16); "
                                "that layout is not bitsandbytes' NF4 layout. Adapt the layer before running it in "
                                "eval mode, or reload it")
    if state.quant_type != "nf4":
        raise QuantizationError(f"{what}: quant_type {state.quant_type!r} is not supported (NF4 only)")
    N, K = (int(s) for s in state.shape)
    packed = weight.data
    if packed.dtype != torch.uint8:  # quant_storage other than uint8: the same bytes
        packed = packed.reshape(-1).view(torch.uint8)
    packed = packed.reshape(-1)
    common = dict(shape=(N, K), packed=packed, code=state.code.reshape(-1), blocksize=int(state.blocksize))
    if state.state2 is not None:
        data = NF4Data(**common, qabsmax=state.absmax.reshape(-1), code2=state.state2.code.reshape(-1),
                       absmax2=state.state2.absmax.reshape(-1), blocksize2=int(state.state2.blocksize),
                       offset=float(state.offset))
    else:
        data = NF4Data(**common, absmax=state.absmax.reshape(-1))
    check_data(data, what)
    return data


def _int8_from_linear8bit(module, what: str) -> Int8Data:
    weight = module.weight
    if getattr(module.state, "has_fp16_weights", False) or weight.dtype != torch.int8:
        raise QuantizationError(f"{what}: the Linear8bitLt holds a {weight.dtype} weight (has_fp16_weights=True, or "
                                "not quantized yet: bitsandbytes quantizes it when it is moved to a device); "
                                "only has_fp16_weights=False after quantization is supported")
    scb = getattr(weight, "SCB", None)
    if scb is None:
        scb = getattr(module.state, "SCB", None)
    if scb is None:
        raise QuantizationError(f"{what}: the Linear8bitLt has no SCB (its per-row scales)")
    data = Int8Data(tuple(weight.shape), weight.data, scb.float() / 127.0)
    check_data(data, what)
    return data


def weight_from_bnb(module: nn.Module) -> QuantizedWeight:
    """The QuantizedWeight of a bitsandbytes Linear4bit (NF4) or Linear8bitLt, sharing its packed tensors.
    QuantizationError for what cannot be read (no quant state, FP4, a shape that is not whole blocks) or would
    compute NaN / inf (scales holding NaN or inf: `core.formats.value_problem`)."""
    kind = bnb_kind(module)
    what = f"{type(module).__name__}"
    if kind == "4bit":
        data = _nf4_from_params4bit(module.weight, what)
        state = module.weight.quant_state
        dtype = getattr(module, "compute_dtype", None) or state.dtype
    elif kind == "8bit":
        data = _int8_from_linear8bit(module, what)
        # no compute dtype is recorded: the bias's dtype (the model's), else the default dtype
        dtype = module.bias.dtype if module.bias is not None and module.bias.is_floating_point() \
            else torch.get_default_dtype()
    else:
        raise TypeError(f"weight_from_bnb expects a bitsandbytes Linear4bit or Linear8bitLt, got "
                        f"{type(module).__name__}")
    # bitsandbytes quantizes a weight holding NaN / inf without a word: refused here, naming the layer's class
    check_values(data, dtype, what)
    return QuantizedWeight(data, dtype)


def as_quantized_linear(module: nn.Module) -> QuantizedLinear:
    """A QuantizedLinear for a quantized base (itself if it is one; bitsandbytes' layers and torchao
    NF4Tensor Linears converted, packed tensors and bias shared, the source layer remembered for
    `bnb_source`)."""
    if isinstance(module, QuantizedLinear):
        return module
    weight = convert_torchao.weight_from_torchao(module) if convert_torchao.is_nf4_linear(module) \
        else weight_from_bnb(module)
    # a plain attribute (not a submodule, not in state_dict), the one QuantizedWeight's copies leave out
    object.__setattr__(weight, "_bnb_source", module)
    return QuantizedLinear(weight, module.bias)


def bnb_source(weight: QuantizedWeight, bias) -> Optional[nn.Module]:
    """The layer `weight` was read from (bitsandbytes', or an nn.Linear holding a torchao NF4Tensor), if it
    still holds the very same packed data and `bias` (what unload() gives back, as peft's does); None
    otherwise (e.g. after a device move or a deepcopy)."""
    module = weight.__dict__.get("_bnb_source")
    if module is None or module.bias is not bias:
        return None
    ours = weight.packed_codes()
    if convert_torchao.is_nf4_linear(module):
        theirs = convert_torchao.source_packed(module)
    elif bnb_kind(module) is not None:
        theirs = module.weight.data
    else:  # the module's weight was replaced since
        return None
    same = ours.device == theirs.device and ours.untyped_storage().data_ptr() == theirs.untyped_storage().data_ptr()
    return module if same else None


def quantized_base_refusal(module: nn.Module) -> Optional[str]:
    """Why a quantized base cannot be adapted (None when it can): unreadable packed data, a forward of its
    own, or hooks the adapted layer would not run."""
    if convert_torchao.is_nf4_linear(module):
        reason = convert_torchao.refusal(module)
        if reason:
            return reason
    elif bnb_kind(module) is not None:
        try:
            weight_from_bnb(module)
        except (QuantizationError, TypeError) as err:
            return str(err)
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(module, h, None)]
    if hooks:
        return f"it has {', '.join(h.strip('_') for h in hooks)}, which the adapted layer would not run"
    return None


def base_compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a base layer computes in: its weight's, or a quantized base's compute dtype."""
    if is_quantized_base(module):
        return as_quantized_linear(module).weight.dtype
    return module.weight.dtype
