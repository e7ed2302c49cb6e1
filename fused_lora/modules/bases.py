"""The base axis of the adapted layer: what its frozen weight is, chosen once when the layer is built.

    DENSE      a 16-bit nn.Linear (or transformers' Conv1D, weight stored in x out: `fan_in_fan_out`)
    QUANTIZED  a frozen QuantizedWeight (fused_lora's NF4 / int8, or read from bitsandbytes / torchao):
               computed in the input's dtype as bitsandbytes casts to its compute dtype; merge() refused
               (folding the delta into 4-bit or 8-bit codes would re-quantize and lose most of the adapter:
               peft re-quantizes, we do not); to_linear() / merge_and_unload() give 16-bit layers holding
               dequantize(W) + s B A; unload() gives back the layer it was read from
    EXPERTS    one 3-D expert stack of a transformers experts module (`ExpertStack`: `gate_up_proj` (E, N, K),
               or (E, K, N) when the class is `is_transposed`, and its (E, N) bias), a weight per group: its
               adapter is lora_A (E, r, K), lora_B (E, N, r), the input's rows sorted by expert with
               `group_sizes` (`fused_lora.ops.grouped`); the stack stays the experts module's own parameter
               (the layer holds a reference, not a second registration), merge() writes W_e + s B_e A_e into it;
               no mixed batches (peft's ParamWrapper has none either)

Each base gives the layer its inputs (autocast), the base output alone, and the ops for one adapter and for
a mixed batch; the layer has one forward (`modules.layer`). Adding a base is a class here and its ops.
"""
from __future__ import annotations

import math
import sys
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.dropout import seed_for
from ..ops.grouped import lora_linear_grouped
from ..ops.multi import lora_linear_multi
from ..ops.quant import lora_linear_quant, lora_linear_quant_multi, quant_linear
from .autocast import autocast_input_and_bias, autocast_inputs
from .convert_bnb import as_quantized_linear, bnb_source, is_quantized_base, quantized_base_refusal
from .adapter_range import compute_adapter
from .quantized import QuantizedLinear, base_load_refused
from .variants import lora_forward

QDORA_REFUSAL = ("DoRA over a quantized base (QDoRA) is not implemented (DoRA's weight norm needs the dequantized "
                 "rows): use LoRA over the quantized base, or DoRA over a 16-bit one")


def conv1d_class():
    """transformers' Conv1D (GPT-2's projections: weight stored in x out), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def is_conv1d(module) -> bool:
    if isinstance(module, nn.Linear) or "transformers" not in sys.modules:
        return False  # no Conv1D can exist before transformers is imported: do not import it here
    conv1d = conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def base_refusal(module: nn.Module) -> Optional[str]:
    """Why `module` cannot be the base of a FusedLoRALinear (None when it can). The layer computes
    nn.Linear's function itself (Conv1D's, transposed), so a subclass with a forward of its own, a
    non-float (quantized) weight, or hooks that change what the module computes would silently be
    dropped: such modules are refused rather than adapted into something else."""
    if is_quantized_base(module):  # bitsandbytes Linear4bit / Linear8bitLt, QuantizedLinear
        return quantized_base_refusal(module)
    if isinstance(module, ExpertStack):
        return module.refusal()
    if not isinstance(module, nn.Linear) and not is_conv1d(module):
        return f"{type(module).__name__} is not an nn.Linear or a transformers Conv1D"
    kind = type(module)
    if type(module).__module__.startswith("bitsandbytes"):
        return f"{kind.__name__} is a quantized (bitsandbytes) layer fused_lora cannot read (Linear4bit NF4 and " \
               f"Linear8bitLt are supported)"
    if kind is not nn.Linear and kind.forward is not nn.Linear.forward and not is_conv1d(module):
        return f"{kind.__name__} overrides nn.Linear's forward, which the adapted layer would not run"
    if not module.weight.is_floating_point():
        return (f"its weight has dtype {module.weight.dtype}: a quantized base must be a bitsandbytes Linear4bit (NF4) / "
                "Linear8bitLt or a fused_lora QuantizedLinear (fused_lora.quantize_model)")
    hooks = [h for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
             if getattr(module, h, None)]
    if hooks:
        return f"it has {', '.join(h.strip('_') for h in hooks)}, which the adapted layer would not run"
    return None


def _on_rows(x: Tensor, out_features: int, fn) -> Tensor:
    """fn on x seen as 2-D (M x in), its output back in x's leading shape. math.prod, not -1: with
    in_features == 0 (or an empty batch) -1 is ambiguous."""
    lead = x.shape[:-1]
    return fn(x.reshape(math.prod(lead), x.shape[-1])).reshape(*lead, out_features)


class ExpertStack(nn.Module):
    """One 3-D parameter of a transformers experts module (an `@use_experts_implementation` class) seen as the
    base of a FusedLoRALinear: `weight` the (E, N, K) stack, or (E, K, N) with `transposed` (the class's
    `is_transposed`), `bias` its (E, N) bias or None. The tensors are the experts module's own: the layer built
    over it (`FusedLoRALinear.from_linear`) refers to them, it does not copy or re-register them."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor] = None, transposed: bool = False):
        super().__init__()
        self.__dict__.update(weight=weight, bias=bias, transposed=transposed)  # references, not registrations

    def refusal(self) -> Optional[str]:
        """Why this stack cannot be a layer's base (None when it can)."""
        w, b = self.weight, self.bias
        if not isinstance(w, Tensor) or w.dim() != 3:
            return f"an expert stack is a 3-D tensor (experts, out, in), got {_shape_of(w)}"
        if not w.is_floating_point():
            return f"the expert stack has dtype {w.dtype}, not a floating type"
        if w.shape[0] < 1:
            return f"the expert stack {tuple(w.shape)} has no experts"
        n = w.shape[2] if self.transposed else w.shape[1]
        if b is not None and (not isinstance(b, Tensor) or tuple(b.shape) != (w.shape[0], n) or b.dtype != w.dtype):
            return (f"its bias is {_shape_of(b)}{'' if not isinstance(b, Tensor) else ' ' + str(b.dtype)}; expected "
                    f"({w.shape[0]}, {n}) {w.dtype} for the stack {tuple(w.shape)}")
        return None

    def extra_repr(self) -> str:
        return f"weight={tuple(self.weight.shape)}, transposed={self.transposed}, bias={self.bias is not None}"


def _shape_of(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


class Routed(NamedTuple):
    """What the EXPERTS base hands its ops as the weight: the stack, x's rows per expert, the stack's layout."""
    weight: Tensor
    group_sizes: Tensor
    transposed: bool


def _no_group_sizes(group_sizes) -> None:
    if group_sizes is not None:
        raise TypeError("FusedLoRALinear: group_sizes is for a layer over an expert stack (ExpertStack); this layer "
                        "has one weight")


class DenseBase:
    """A 16-bit base weight (nn.Linear, or a Conv1D read through a transposed view)."""
    quantized = False
    grouped = False  # the input is a batch of rows of one weight, not rows sorted by expert

    def attach(self, linear: nn.Module) -> nn.Module:
        return linear

    def hold(self, layer, linear: nn.Module) -> None:
        """Give the layer the base's tensors as its `weight` and `bias` (registered: the layer owns them)."""
        layer.weight, layer.bias = linear.weight, linear.bias

    def stored_in_out(self, linear: nn.Module) -> bool:
        """Whether the weight is stored in x out (a Conv1D): the layer's `fan_in_fan_out`."""
        return is_conv1d(linear)

    def adapter_lead(self, layer) -> tuple:
        """The leading dimensions of an adapter's A (.. r x in) and B (.. out x r): none for one weight."""
        return ()


    def inputs(self, layer, x: Tensor, group_sizes=None) -> tuple:
        """(x, W as out x in, b) in the autocast dtype when autocast is on (as nn.Linear computes)."""
        _no_group_sizes(group_sizes)
        x, weight, bias = autocast_inputs(x, layer.base_weight(), layer.bias)
        if x.dtype != weight.dtype:
            raise TypeError(f"FusedLoRALinear: input dtype {x.dtype} does not match the base weight's "
                            f"{weight.dtype} (cast the input, or run under torch.autocast)")
        return x, weight, bias

    def plain(self, x: Tensor, weight, bias: Optional[Tensor]) -> Tensor:
        return F.linear(x, weight, bias)

    def lora(self, x: Tensor, weight, bias, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
             seed: Optional[Tensor], backend: str, name: str = "default") -> Tensor:
        """The base with one adapter (`name`: the adapter a refusal names, `modules.adapter_range`)."""
        return lora_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, name)

    def mixed(self, x: Tensor, weight, bias, adapters, row_adapter: Tensor, seed, backend: str) -> Tensor:
        return _on_rows(x, weight.shape[0],
                        lambda x2: lora_linear_multi(x2, weight, bias, adapters, row_adapter, seed, backend))

    merges_in_place = True  # merge() writes W + s B A into the weight; merge_and_unload keeps the tensors

    def refuse_merge(self, what: str) -> None:
        """Merging into a 16-bit weight is allowed."""

    def load_refused(self, layer, state_dict: dict, prefix: str, local_metadata: dict, strict: bool) -> bool:
        return False

    @torch.no_grad()
    def to_linear(self, layer, safe_merge: bool = False) -> nn.Module:
        """A new nn.Linear (a Conv1D for a Conv1D base) holding W + s B A of the active adapter (W itself when
        merged); the layer is not changed. With safe_merge, NaN or inf in W's dtype raises ValueError."""
        w = layer.weight.detach() if layer.merged else layer.merged_weight([layer.active_adapter],
                                                                           "FusedLoRALinear.to_linear")
        if safe_merge:
            layer.refuse_non_finite(w, f"FusedLoRALinear.to_linear: the merged weight has NaN or inf in "
                                       f"{layer.weight.dtype}")
        out = layer.plain_base(device=layer.weight.device, dtype=layer.weight.dtype)
        out.weight.copy_(w)
        out.weight.requires_grad_(layer.weight.requires_grad)
        if layer.bias is not None:
            out.bias.copy_(layer.bias)
            out.bias.requires_grad_(layer.bias.requires_grad)
        return out

    def unloaded(self, layer) -> nn.Module:
        """The base alone again, holding the very same tensors (no copy): nn.Linear or Conv1D."""
        new = layer.plain_base()  # on meta, then the layer's own tensors
        new.weight, new.bias = layer.weight, layer.bias
        return new


class QuantizedBase:
    """A frozen QuantizedWeight (the layer's `weight` is that module; `bias` its bias)."""
    quantized = True
    grouped = False

    def attach(self, linear: nn.Module) -> nn.Module:
        return as_quantized_linear(linear)  # weight: a frozen QuantizedWeight module

    def hold(self, layer, linear: nn.Module) -> None:
        layer.weight, layer.bias = linear.weight, linear.bias

    def stored_in_out(self, linear: nn.Module) -> bool:
        return False

    def adapter_lead(self, layer) -> tuple:
        return ()

    def inputs(self, layer, x: Tensor, group_sizes=None) -> tuple:
        """(x, the QuantizedWeight, b): x and b in the autocast dtype when autocast is on, else in x's dtype
        (the quantized codes have no dtype to mismatch)."""
        _no_group_sizes(group_sizes)
        x, bias = autocast_input_and_bias(x, layer.bias)
        return x, layer.weight, bias

    def plain(self, x: Tensor, weight, bias: Optional[Tensor]) -> Tensor:
        return _on_rows(x, weight.shape[0], lambda x2: quant_linear(x2, weight, bias))

    def lora(self, x: Tensor, weight, bias, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
             seed: Optional[Tensor], backend: str, name: str = "default") -> Tensor:
        A, B = compute_adapter(lora_A, lora_B, scaling, x.dtype, name)  # before any random draw
        if seed is None:
            seed = seed_for(dropout_p)
        return _on_rows(x, weight.shape[0], lambda x2: lora_linear_quant(
            x2, weight, bias, A, B, scaling, dropout_p, seed, backend))

    def mixed(self, x: Tensor, weight, bias, adapters, row_adapter: Tensor, seed, backend: str) -> Tensor:
        return _on_rows(x, weight.shape[0],
                        lambda x2: lora_linear_quant_multi(x2, weight, bias, adapters, row_adapter, seed, backend))

    merges_in_place = False  # merge() refused; merge_and_unload builds a 16-bit layer (to_linear)

    def refuse_merge(self, what: str) -> None:
        raise ValueError(f"{what}: the base weight is quantized; merging into it would re-quantize the weight and "
                         "lose most of the adapter (safe_merge cannot help). Use LoraModel.merge_and_unload() or "
                         "FusedLoRALinear.to_linear(), which return 16-bit layers holding dequantize(W) + s B A")

    def load_refused(self, layer, state_dict: dict, prefix: str, local_metadata: dict, strict: bool) -> bool:
        """No bias or adapter loaded beside a weight that refuses its entries (`base_load_refused`)."""
        return base_load_refused(layer, state_dict, prefix, local_metadata, strict)

    @torch.no_grad()
    def merged_weight(self, layer, adapter_names: Optional[Sequence[str]] = None, safe_merge: bool = False,
                      what: str = "FusedLoRALinear.to_linear") -> Tensor:
        """dequantize(W) + sum of s B A over the adapters (default: the active one), in fp32, rounded once to
        the compute dtype. ValueError with safe_merge if the result has NaN or inf."""
        names = [layer.active_adapter] if adapter_names is None else list(adapter_names)
        for name in names:
            layer.require_adapter(name)
        delta = layer.delta_weight(names[0])
        for name in names[1:]:
            delta = delta + layer.delta_weight(name)
        w = layer.weight.dequantize(delta.dtype).add_(delta).to(layer.weight.dtype)
        if safe_merge and not bool(torch.isfinite(w).all()):
            raise ValueError(f"{what}: the merged weight has NaN or inf in {layer.weight.dtype}")
        return w

    def to_linear(self, layer, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> nn.Linear:
        """A new 16-bit (compute dtype) nn.Linear holding dequantize(W) + s B A; the layer is not changed."""
        w = self.merged_weight(layer, adapter_names, safe_merge)
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        out.weight = nn.Parameter(w, requires_grad=False)
        if layer.bias is not None:
            out.bias = nn.Parameter(layer.bias.detach().to(w.dtype), requires_grad=layer.bias.requires_grad)
        return out

    def unloaded(self, layer) -> nn.Module:
        """The quantized base alone again: the bitsandbytes layer it was read from when it still holds the same
        packed tensors (peft's unload gives back its base layer), else a QuantizedLinear over them."""
        return bnb_source(layer.weight, layer.bias) or QuantizedLinear(layer.weight, layer.bias)


EXPERTS_NO_MIXED = ("adapter_names (several adapters in one batch) is not supported on expert weights (peft's "
                    "ParamWrapper has no mixed batches either): run each adapter's samples separately")


class ExpertsBase(DenseBase):
    """A 3-D expert stack (`ExpertStack`), one weight per group of rows: the grouped op
    (`fused_lora.ops.grouped.lora_linear_grouped`) computes y_e = x_e W_e^T + b_e + s B_e A_e (D x_e) for
    the rows of each expert, never forming W + s B A."""
    grouped = True

    def attach(self, linear: nn.Module) -> nn.Module:
        return linear

    def hold(self, layer, linear: nn.Module) -> None:
        """References to the experts module's tensors (its own parameters stay registered there only)."""
        layer.__dict__.update(weight=linear.weight, bias=linear.bias)

    def stored_in_out(self, linear: nn.Module) -> bool:
        return bool(linear.transposed)  # (E, in, out): read through its strides, as a Conv1D's weight

    def adapter_lead(self, layer) -> tuple:
        return (layer.num_experts,)

    def inputs(self, layer, x: Tensor, group_sizes=None) -> tuple:
        """(x (M, in) in the stack's dtype, as transformers' grouped_mm casts its input, Routed(stack, group_sizes,
        layout), bias)."""
        if group_sizes is None:
            raise TypeError("FusedLoRALinear over an expert stack: forward(x, group_sizes=...) takes x's rows sorted by "
                            "expert and the number of rows of each expert (an int64 tensor of shape (experts,))")
        if x.dim() != 2:
            raise ValueError(f"FusedLoRALinear over an expert stack: x must be 2-D (rows sorted by expert, in_features), "
                             f"got shape {tuple(x.shape)}")
        return x.to(layer.weight.dtype), Routed(layer.weight, group_sizes, layer.fan_in_fan_out), layer.bias

    def plain(self, x: Tensor, weight: Routed, bias: Optional[Tensor]) -> Tensor:
        return lora_linear_grouped(x, weight.group_sizes, weight.weight, bias, None, None, 0.0,
                                   transposed=weight.transposed)

    def lora(self, x: Tensor, weight: Routed, bias, lora_A: Tensor, lora_B: Tensor, scaling: float, dropout_p: float,
             seed: Optional[Tensor], backend: str, name: str = "default") -> Tensor:
        """The stack with one adapter (`name`: the adapter a refusal names, `modules.adapter_range`)."""
        A, B = compute_adapter(lora_A, lora_B, scaling, x.dtype, name)  # before any random draw
        if seed is None:
            seed = seed_for(dropout_p)
        return lora_linear_grouped(x, weight.group_sizes, weight.weight, bias, A, B, scaling, dropout_p, seed, backend,
                                   weight.transposed)

    def mixed(self, x: Tensor, weight, bias, adapters, row_adapter: Tensor, seed, backend: str) -> Tensor:
        raise ValueError(f"FusedLoRALinear over an expert stack: {EXPERTS_NO_MIXED}")

    def to_linear(self, layer, safe_merge: bool = False) -> nn.Module:
        raise TypeError("FusedLoRALinear over an expert stack has no nn.Linear form: merge() writes W_e + s B_e A_e "
                        "into the stack itself (LoraModel.merge_and_unload() gives the experts module back)")

    def unloaded(self, layer) -> nn.Module:
        """The stack alone again (the very same tensors)."""
        return ExpertStack(layer.weight, layer.bias, layer.fan_in_fan_out)


DENSE, QUANTIZED, EXPERTS = DenseBase(), QuantizedBase(), ExpertsBase()


def base_kind(module: nn.Module):
    """The base a FusedLoRALinear over `module` has: EXPERTS for an expert stack, QUANTIZED for a quantized layer,
    else DENSE."""
    if isinstance(module, ExpertStack):
        return EXPERTS
    return QUANTIZED if is_quantized_base(module) else DENSE
