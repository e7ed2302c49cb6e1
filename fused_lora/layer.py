"""FusedLoRALinear: a drop-in `nn.Linear` with a LoRA adapter whose forward and backward are fused."""
from __future__ import annotations

import contextlib
import math
import sys
import warnings
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import backends
from .dropout import new_seed, no_seed
from .ops import lora_linear
from .reference import lora_delta_weight
from .validation import check_adapter_args, lora_scaling

InitSpec = Union[bool, str]


def _conv1d_class():
    """transformers' Conv1D (GPT-2's projections: weight stored in x out), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _is_conv1d(module) -> bool:
    if isinstance(module, nn.Linear) or "transformers" not in sys.modules:
        return False  # no Conv1D can exist before transformers is imported: do not import it here
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for this device type, or None (also for types without autocast, e.g. meta)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


class FusedLoRALinear(nn.Module):
    """y = x W^T + b + s * B A dropout(x), with W and b frozen and A, B trainable.

    Args:
        in_features, out_features: sizes, as for `nn.Linear`.
        r: LoRA rank (>= 1).
        lora_alpha: scaling numerator; s = lora_alpha / r (or / sqrt(r) with `use_rslora`).
        lora_dropout: dropout probability in [0, 1) on the LoRA branch's input, training mode only.
        bias: whether the frozen base layer has a bias.
        init_lora_weights: True (A kaiming-uniform, B zero), "gaussian" (A ~ N(0, 1/r), B zero),
            or False (both random, for tests). With B zero the layer starts equal to its base.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "torch" or "triton";
            FUSED_LORA_BACKEND overrides "auto".
        device, dtype: of the base weight; the adapter weights use `adapter_dtype` (default: dtype).

    Attributes: `weight`, `bias` (frozen base), `lora_A` (r x in), `lora_B` (out x r), `scaling`,
    `r`, `lora_alpha`, `lora_dropout`, `merged`, `fan_in_fan_out` (True when the base is a
    transformers `Conv1D`, whose `weight` is stored in x out, as in peft).

    Inputs have any leading shape (..., in_features) and dtype float32, float16 or bfloat16; under
    autocast everything is computed in the autocast dtype. Adapter weights of another dtype than the
    input are cast for the computation and receive gradients in their own dtype.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
        init_lora_weights: InitSpec = True, backend: str = "auto", device=None, dtype=None,
        adapter_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__()
        check_adapter_args(r, lora_dropout, init_lora_weights, backend, lora_alpha, use_rslora)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_base(base)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, adapter_dtype)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: InitSpec = True, backend: str = "auto",
        adapter_dtype: Optional[torch.dtype] = None,
    ) -> "FusedLoRALinear":
        """Wrap an existing `nn.Linear` (or a transformers `Conv1D`, as peft does: its in x out weight is
        read through a transposed view, `fan_in_fan_out`): weight and bias are shared (same storage)
        and frozen."""
        if not isinstance(linear, nn.Linear) and not _is_conv1d(linear):
            raise TypeError(f"from_linear expects an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        # before the linear is frozen
        check_adapter_args(r, lora_dropout, init_lora_weights, backend, lora_alpha, use_rslora)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach_base(linear)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, adapter_dtype)
        return self

    def _attach_base(self, linear: nn.Module) -> None:
        self.fan_in_fan_out = _is_conv1d(linear)
        self.out_features, self.in_features = self._base_weight(linear.weight).shape
        self.weight = linear.weight
        self.bias = linear.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def _init_adapter(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, adapter_dtype):
        self.r, self.lora_alpha, self.use_rslora = r, lora_alpha, use_rslora
        self.lora_dropout = float(lora_dropout)
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.backend = backend
        self.merged = False
        self._disabled = False
        factory = {"device": self.weight.device, "dtype": adapter_dtype or self.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self.reset_lora_parameters(init_lora_weights)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: InitSpec = True) -> None:
        """Re-initialise A and B as peft does (see the class docstring)."""
        if init_lora_weights == "gaussian":
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B)

    def _base_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """The base weight as out x in (a transposed view of a Conv1D's in x out weight: the op takes strides)."""
        weight = self.weight if weight is None else weight
        return weight.t() if self.fan_in_fan_out else weight

    # ---------------------------------------------------------------- forward

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"FusedLoRALinear expects a tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"FusedLoRALinear: input's last dimension is {tuple(x.shape)[-1:] or '()'} "
                             f"but in_features is {self.in_features} (input shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"FusedLoRALinear: input dtype {x.dtype} is not a floating-point type")
        if x.device != self.weight.device or x.device != self.lora_A.device:
            raise ValueError(f"FusedLoRALinear: input is on {x.device} but the base weight is on "
                             f"{self.weight.device} and the adapter on {self.lora_A.device}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        weight, bias = self._base_weight(), self.bias
        dtype = _autocast_dtype(x.device.type)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        elif x.dtype != weight.dtype:
            raise TypeError(f"FusedLoRALinear: input dtype {x.dtype} does not match the base weight's "
                            f"{weight.dtype} (cast the input, or run under torch.autocast)")
        if self.merged or self._disabled:
            return F.linear(x, weight, bias)
        lora_A, lora_B = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        p = self.lora_dropout if self.training else 0.0
        seed = new_seed() if p > 0.0 else no_seed()
        lead = x.shape[:-1]
        # math.prod, not -1: with in_features == 0 (or an empty batch) -1 is ambiguous
        y = lora_linear(x.reshape(math.prod(lead), self.in_features), weight, bias, lora_A, lora_B,
                        self.scaling, p, seed, self.backend)
        return y.reshape(*lead, self.out_features)

    # ---------------------------------------------------------------- merging

    def delta_weight(self) -> Tensor:
        """s * B @ A (out x in) in float32 (float64 if the weight or adapter is float64): what merging adds
        to the base weight (transposed for a Conv1D base, whose weight is in x out)."""
        acc = torch.promote_types(self.weight.dtype, self.lora_A.dtype)
        if acc != torch.float64:
            acc = torch.float32
        return lora_delta_weight(self.lora_A.detach().to(acc), self.lora_B.detach().to(acc), self.scaling)

    def _weight_with_delta(self, sign: int) -> Tensor:
        """W + sign * s * B @ A, computed in delta_weight's precision, rounded once to W's dtype."""
        delta = self._base_weight(self.delta_weight())  # in the weight's own layout
        return torch.add(self.weight.detach().to(delta.dtype), delta, alpha=sign).to(self.weight.dtype)

    @staticmethod
    def _refuse_non_finite(w: Tensor, message: str) -> None:
        # Checked after rounding to the weight's dtype: a float32 sum can be finite and still
        # overflow float16 (max 65504) when written.
        if not w.is_meta and not bool(torch.isfinite(w).all()):
            raise ValueError(message)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Fold s * B @ A into the base weight (computed in float32, rounded once).

        With `safe_merge` (peft's option), the merged weight is checked to be finite in the
        weight's own dtype before anything is written; a NaN or inf (e.g. a delta that overflows
        float16) raises ValueError and leaves the weight and `merged` untouched.
        Merging a merged layer warns and does nothing.
        """
        if self.merged:
            warnings.warn("FusedLoRALinear.merge: already merged; nothing done", stacklevel=2)
            return
        merged = self._weight_with_delta(+1)
        if safe_merge:
            self._refuse_non_finite(merged, f"FusedLoRALinear.merge: the merged weight has NaN or inf in "
                                            f"{self.weight.dtype}; weight left unchanged")
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s * B @ A from the base weight again. Unmerging an unmerged layer warns and does nothing.

        In float32 this restores the weight to rounding error; in float16/bfloat16 the two
        roundings may leave the weight a few ulps from where it was (as with any merge/unmerge).
        If the result has NaN or inf (the merge, made without `safe_merge`, overflowed the
        weight's dtype), the base weight cannot be restored: ValueError, layer left as it is.
        """
        if not self.merged:
            warnings.warn("FusedLoRALinear.unmerge: not merged; nothing done", stacklevel=2)
            return
        unmerged = self._weight_with_delta(-1)
        self._refuse_non_finite(unmerged, f"FusedLoRALinear.unmerge: the unmerged weight would have NaN or inf "
                                          f"(the merge overflowed {self.weight.dtype}?); the base weight cannot be "
                                          f"restored, layer left merged")
        self.weight.copy_(unmerged)
        self.merged = False

    @torch.no_grad()
    def to_linear(self, safe_merge: bool = False) -> nn.Module:
        """A plain `nn.Linear` (a `Conv1D` for a Conv1D base) holding W + s * B @ A (a new tensor; this
        layer is not changed).

        With `safe_merge`, a merged weight with NaN or inf in the weight's dtype raises ValueError.
        """
        w = self.weight.detach() if self.merged else self._weight_with_delta(+1)
        if safe_merge:
            self._refuse_non_finite(w, f"FusedLoRALinear.to_linear: the merged weight has NaN or inf in "
                                       f"{self.weight.dtype}")
        out = self._plain_base(device=self.weight.device, dtype=self.weight.dtype)
        out.weight.copy_(w)
        out.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            out.bias.copy_(self.bias)
            out.bias.requires_grad_(self.bias.requires_grad)
        return out

    def _plain_base(self, device=None, dtype=None) -> nn.Module:
        """A new module of the base's kind and shape (nn.Linear, or Conv1D when fan_in_fan_out)."""
        if self.fan_in_fan_out:
            with torch.device(device or "meta"):  # Conv1D takes no device/dtype arguments
                out = _conv1d_class()(self.out_features, self.in_features)
            return out.to(dtype) if dtype is not None else out
        return nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=device or "meta",
                         dtype=dtype)

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block, the layer computes its base output only."""
        if self.merged:
            raise RuntimeError("FusedLoRALinear.disable_adapter: the adapter is merged into the weight; "
                               "call unmerge() first")
        previous, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = previous

    def extra_repr(self) -> str:
        runs = backends.describe(self.weight.device, self.weight.dtype, self.r, self.backend)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {'fan_in_fan_out=True, ' if self.fan_in_fan_out else ''}"
                f"r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, merged={self.merged}, "
                f"backend={runs}")
