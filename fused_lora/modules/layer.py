"""FusedLoRALinear: a drop-in `nn.Linear` with a LoRA adapter whose forward and backward are fused.

The layer is the meeting point of the axes: its base (`modules.bases`: dense, quantized or an expert stack, chosen
once when it is built), its adapters (one, or several in a mixed batch), and each adapter's variant
(`modules.variants`: LoRA or DoRA). It has one forward; what differs per base or variant lives there.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .. import dispatch
from ..core.dropout import adapter_seed, seed_for
from ..core.reference import lora_delta_weight
from .adapter_range import compute_adapter
from .bases import EXPERTS_NO_MIXED, QDORA_REFUSAL, ExpertStack, base_kind, base_refusal, conv1d_class, is_conv1d
from .convert_bnb import base_compute_dtype
from .call_context import call_value
from .validation import (BASE_ADAPTER_NAME, check_adapter_args, check_adapter_name, check_flag,
                         check_init_lora_weights, check_scaling, lora_scaling)
from .variants import LORA, enable_dora, is_dora, refuse_in_mixed_batch, variant_of

InitSpec = Union[bool, str]
DEFAULT_ADAPTER = "default"  # the adapter a layer is built with; its weights are the top-level lora_A, lora_B
BASE_ADAPTER = BASE_ADAPTER_NAME  # in forward's adapter_names: no adapter for that sample (peft's name)


@dataclass
class AdapterSettings:
    """One adapter's hyper-parameters (peft's meanings): rank, alpha, dropout probability, rsLoRA, and the
    scale s = lora_alpha / r (or / sqrt(r) with rsLoRA)."""
    r: int
    lora_alpha: float
    lora_dropout: float
    use_rslora: bool
    scaling: float


class _AdapterWeights(nn.Module):
    """The weights of an adapter other than "default": lora_A (r x in), lora_B (out x r)."""

    def __init__(self, lora_A: nn.Parameter, lora_B: nn.Parameter):
        super().__init__()
        self.lora_A, self.lora_B = lora_A, lora_B

    def extra_repr(self) -> str:
        return f"lora_A={tuple(self.lora_A.shape)}, lora_B={tuple(self.lora_B.shape)}"


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
        use_dora: DoRA (peft's use_dora) for the "default" adapter: a trained magnitude
            `lora_magnitude_vector` (out_features, initialised to ||W + s B A|| per row, as peft) and
            y = (m / ||W + s B A||) (x W^T + s B A x) + b, the norm detached (fused_lora.ops.dora).

    Attributes: `weight`, `bias` (frozen base), `lora_A` (r x in), `lora_B` (out x r), `scaling`,
    `r`, `lora_alpha`, `lora_dropout`, `merged`, `fan_in_fan_out` (True when the base is a
    transformers `Conv1D`, whose `weight` is stored in x out, as in peft).

    Several adapters (peft's layer API): the layer is built with one adapter named "default";
    `add_adapter` adds more (each with its own r, lora_alpha, lora_dropout, use_rslora),
    `set_adapter` chooses the active one, `delete_adapter` removes one, `active_adapter` and
    `available_adapters` name them. `lora_A`, `lora_B`, `r`, `lora_alpha`, `lora_dropout`,
    `use_rslora` and `scaling` are the active adapter's. `forward(x, adapter_names=[...])` takes one
    adapter name per sample (x's first dimension; "__base__" = no adapter), in eval and in training:
    each adapter's gradients then come from its own samples only.

    Storage (state_dict keys): the adapter named "default" at `lora_A` / `lora_B` (so a one-adapter
    layer has exactly the keys it always had), every other adapter at `lora_adapters.<name>.lora_A` /
    `.lora_B`. Keys depend on the names only, never on which adapter is active, so a state_dict saved
    with one active adapter loads correctly with another.

    Attributes and parameter names therefore differ once another adapter is active: after
    `set_adapter("task_b")`, `layer.lora_A` (the attribute: the active adapter's view) is task_b's,
    the parameter named `lora_A` (storage) is still "default"'s, and task_b's is named
    `lora_adapters.task_b.lora_A`. Only the active adapter is trainable, so an optimizer over the
    parameters with `requires_grad` trains what the attributes show; `adapter_weights(name)` gives any
    adapter's tensors by its name (peft's `lora_A[name]`); a name filter on "lora_A" finds every adapter's.

    DoRA (`use_dora=True`, the "default" adapter only): merge / unmerge / to_linear follow peft's DoRA
    (W <- (m / n)(W + s B A)); the DoRA adapter cannot be merged together with others, nor used in an
    `adapter_names` mixed batch (ValueError); `use_dora` says whether the active adapter is DoRA.

    Inputs have any leading shape (..., in_features) and dtype float32, float16 or bfloat16; under
    autocast everything is computed in the autocast dtype. Adapter weights of another dtype than the
    input are cast for the computation and receive gradients in their own dtype.
    """

    def __init__(
        self, in_features: int, out_features: int, r: int = 8, lora_alpha: float = 8,
        lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
        init_lora_weights: InitSpec = True, backend: str = "auto", device=None, dtype=None,
        adapter_dtype: Optional[torch.dtype] = None, use_dora: bool = False,
    ):
        super().__init__()
        check_adapter_args(r, lora_dropout, init_lora_weights, backend, lora_alpha, use_rslora)
        check_scaling(r, lora_alpha, use_rslora, dtype or torch.get_default_dtype())
        check_flag("use_dora", use_dora)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_base(base)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, adapter_dtype)
        if use_dora:
            enable_dora(self)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
        use_rslora: bool = False, init_lora_weights: InitSpec = True, backend: str = "auto",
        adapter_dtype: Optional[torch.dtype] = None, use_dora: bool = False,
    ) -> "FusedLoRALinear":
        """Wrap an existing `nn.Linear` (or a transformers `Conv1D`, as peft does: its in x out weight is
        read through a transposed view, `fan_in_fan_out`): weight and bias are shared (same storage)
        and frozen. A quantized base (bitsandbytes' Linear4bit NF4 / Linear8bitLt, or fused_lora's
        QuantizedLinear) is held as a frozen `QuantizedWeight` sharing its packed tensors (see
        `fused_lora.modules.bases` for what changes: merge refused, to_linear 16-bit). An `ExpertStack` (one
        3-D parameter of a transformers experts module) gives a layer over the expert stack: its adapter is
        lora_A (E, r, in), lora_B (E, out, r), and its forward takes `group_sizes` (x's rows sorted by expert)."""
        if not (isinstance(linear, (nn.Linear, ExpertStack)) or is_conv1d(linear) or base_kind(linear).quantized):
            raise TypeError(f"from_linear expects an nn.Linear, a transformers Conv1D or an ExpertStack, got "
                            f"{type(linear).__name__}")
        refusal = base_refusal(linear)
        if refusal:
            raise ValueError(f"FusedLoRALinear.from_linear: cannot adapt this {type(linear).__name__}: {refusal}")
        # before the linear is frozen
        check_adapter_args(r, lora_dropout, init_lora_weights, backend, lora_alpha, use_rslora)
        check_scaling(r, lora_alpha, use_rslora, base_compute_dtype(linear))
        check_flag("use_dora", use_dora)
        if use_dora and base_kind(linear).quantized:
            raise ValueError(f"FusedLoRALinear.from_linear: use_dora=True over a quantized base "
                             f"({type(linear).__name__}) is not supported: {QDORA_REFUSAL}")
        if use_dora and base_kind(linear).grouped:
            raise ValueError("FusedLoRALinear.from_linear: use_dora=True over an expert stack is not supported (DoRA on "
                             "expert weights is not implemented; peft's ParamWrapper refuses it too)")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach_base(linear)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, adapter_dtype)
        if use_dora:
            enable_dora(self)
        return self

    def _attach_base(self, linear: nn.Module) -> None:
        self.base_kind = base_kind(linear)  # the base axis, chosen once (modules.bases)
        linear = self.base_kind.attach(linear)
        self.fan_in_fan_out = self.base_kind.stored_in_out(linear)  # in x out storage (Conv1D, a transposed stack)
        shape = self.base_weight(linear.weight).shape  # (out, in), or (experts, out, in)
        self.num_experts = shape[0] if len(shape) == 3 else None
        self.out_features, self.in_features = shape[-2:]
        self.base_kind.hold(self, linear)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def _init_adapter(self, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, backend, adapter_dtype):
        self.backend = backend
        self.merged_adapters: list[str] = []  # peft's name: the adapters folded into the weight, in order
        self._disabled = False
        self._adapter_settings: dict[str, AdapterSettings] = {}
        self._active_adapter = DEFAULT_ADAPTER
        self._create_adapter(DEFAULT_ADAPTER, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                             adapter_dtype or self.weight.dtype, self.weight.device)

    def _create_adapter(self, name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, dtype, device):
        lead = self.base_kind.adapter_lead(self)  # (experts,) over an expert stack
        lora_A = nn.Parameter(torch.empty(*lead, r, self.in_features, device=device, dtype=dtype))
        lora_B = nn.Parameter(torch.empty(*lead, self.out_features, r, device=device, dtype=dtype))
        self._reset(lora_A, lora_B, r, init_lora_weights)
        self._adapter_settings[name] = AdapterSettings(r, lora_alpha, float(lora_dropout), use_rslora,
                                                       lora_scaling(r, lora_alpha, use_rslora))
        if name == DEFAULT_ADAPTER:  # the top-level slots (written directly: the properties shadow the names)
            self._parameters["lora_A"], self._parameters["lora_B"] = lora_A, lora_B
        else:
            if "lora_adapters" not in self._modules:
                self.lora_adapters = nn.ModuleDict()
            self.lora_adapters[name] = _AdapterWeights(lora_A, lora_B)

    def adapter_weights(self, adapter_name: str) -> tuple[nn.Parameter, nn.Parameter]:
        """(lora_A, lora_B) of the adapter called `adapter_name` (ValueError if there is none)."""
        self.require_adapter(adapter_name)
        if adapter_name == DEFAULT_ADAPTER:
            return self._parameters["lora_A"], self._parameters["lora_B"]
        held = self._modules["lora_adapters"][adapter_name]
        return held.lora_A, held.lora_B

    def adapter_parameters(self, adapter_name: str) -> tuple[nn.Parameter, ...]:
        """Every trainable tensor of `adapter_name`: (lora_A, lora_B), and DoRA's lora_magnitude_vector."""
        return self.adapter_weights(adapter_name) + variant_of(self, adapter_name).parameters(self, adapter_name)

    @property
    def use_dora(self) -> bool:
        """Whether the active adapter is a DoRA adapter (peft's use_dora; only "default" can be)."""
        return is_dora(self, self._active_adapter)

    def adapter_settings(self, adapter_name: str) -> AdapterSettings:
        """The settings (r, lora_alpha, lora_dropout, use_rslora, scaling) of `adapter_name`."""
        self.require_adapter(adapter_name)
        return self._adapter_settings[adapter_name]

    @staticmethod
    @torch.no_grad()
    def _reset(lora_A: Tensor, lora_B: Tensor, r: int, init_lora_weights: InitSpec) -> None:
        # Seen as 2-D (experts x r rows of A, as peft's lora_A of an expert stack), so the bounds are a Linear's.
        lora_A, lora_B = lora_A.flatten(0, -2), lora_B.flatten(0, -2)
        if init_lora_weights == "gaussian":
            nn.init.normal_(lora_A, std=1.0 / r)
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))
        if init_lora_weights is False:
            nn.init.kaiming_uniform_(lora_B, a=math.sqrt(5))
        else:
            nn.init.zeros_(lora_B)

    @torch.no_grad()
    def reset_lora_parameters(self, init_lora_weights: InitSpec = True) -> None:
        """Re-initialise the active adapter's A and B as peft does (see the class docstring)."""
        check_init_lora_weights(init_lora_weights, for_layer=True)  # an unknown init is an error, not kaiming
        self._reset(self.lora_A, self.lora_B, self.r, init_lora_weights)

    # ---------------------------------------------------------------- the active adapter's view

    @property
    def lora_A(self) -> nn.Parameter:
        """The active adapter's A (r x in_features)."""
        return self.adapter_weights(self._active_adapter)[0]

    @property
    def lora_B(self) -> nn.Parameter:
        """The active adapter's B (out_features x r)."""
        return self.adapter_weights(self._active_adapter)[1]

    def __setattr__(self, name, value):
        # Assigning lora_A / lora_B replaces the active adapter's Parameter (nn.Module would otherwise
        # bypass the properties above and always write the "default" slot).
        if name in ("lora_A", "lora_B") and "_adapter_settings" in self.__dict__:
            if not isinstance(value, nn.Parameter):
                raise TypeError(f"cannot assign {type(value).__name__} as {name} (an nn.Parameter is required)")
            if self._active_adapter == DEFAULT_ADAPTER:
                self._parameters[name] = value
            else:
                setattr(self._modules["lora_adapters"][self._active_adapter], name, value)
            return
        super().__setattr__(name, value)

    def _active_settings(self) -> AdapterSettings:
        return self._adapter_settings[self._active_adapter]

    r = property(lambda self: self._active_settings().r,
                 lambda self, v: setattr(self._active_settings(), "r", v), doc="The active adapter's rank.")
    lora_alpha = property(lambda self: self._active_settings().lora_alpha,
                          lambda self, v: setattr(self._active_settings(), "lora_alpha", v),
                          doc="The active adapter's lora_alpha.")
    lora_dropout = property(lambda self: self._active_settings().lora_dropout,
                            lambda self, v: setattr(self._active_settings(), "lora_dropout", float(v)),
                            doc="The active adapter's dropout probability (training mode only).")
    use_rslora = property(lambda self: self._active_settings().use_rslora,
                          lambda self, v: setattr(self._active_settings(), "use_rslora", v),
                          doc="Whether the active adapter's scale is lora_alpha / sqrt(r).")
    scaling = property(lambda self: self._active_settings().scaling,
                       lambda self, v: setattr(self._active_settings(), "scaling", v),
                       doc="The active adapter's scale s.")

    @property
    def merged(self) -> bool:
        """Whether some adapter is folded into the base weight (see `merged_adapters`)."""
        return bool(self.merged_adapters)

    @property
    def active_adapter(self) -> str:
        """The name of the adapter forward uses (without adapter_names)."""
        return self._active_adapter

    @property
    def active_adapters(self) -> list[str]:
        """[active_adapter] (peft's list form; a layer here has one active adapter)."""
        return [self._active_adapter]

    @property
    def available_adapters(self) -> tuple[str, ...]:
        """The names of the adapters this layer holds, in the order they were added."""
        return tuple(self._adapter_settings)

    # ---------------------------------------------------------------- several adapters

    def require_adapter(self, adapter_name) -> None:
        """ValueError naming this layer's adapters unless it holds one called `adapter_name`."""
        if not isinstance(adapter_name, str) or adapter_name not in self._adapter_settings:
            raise ValueError(f"FusedLoRALinear: no adapter named {adapter_name!r}; "
                             f"this layer has {', '.join(map(repr, self._adapter_settings)) or 'none'}")

    def check_new_adapter(self, adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights) -> None:
        """Every check of add_adapter's arguments, before anything changes (one place to point elsewhere)."""
        check_adapter_name(adapter_name, "FusedLoRALinear.add_adapter")
        if adapter_name in self._adapter_settings:
            raise ValueError(f"FusedLoRALinear.add_adapter: an adapter named {adapter_name!r} already exists "
                             f"(delete_adapter it first)")
        check_adapter_args(r, lora_dropout, init_lora_weights, self.backend, lora_alpha, use_rslora)
        check_scaling(r, lora_alpha, use_rslora, self.weight.dtype)

    def add_adapter(self, adapter_name: str, r: int = 8, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, init_lora_weights: InitSpec = True) -> None:
        """Add an adapter called `adapter_name` with its own settings (as the constructor's).

        Its weights take the dtype and device of the active adapter's. As in peft, it does not become
        active, and only the active adapter is trainable: the new one is frozen (`requires_grad`
        False) until `set_adapter` chooses it or `set_requires_grad` unfreezes it (e.g. to train
        several adapters in one mixed batch). Bad arguments raise ValueError; nothing changes then.
        """
        self.check_new_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights)
        like = self.lora_A
        self._create_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights,
                             like.dtype, like.device)
        for t in self.adapter_weights(adapter_name):
            t.requires_grad_(False)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter. The active adapter and merged adapters cannot be deleted (ValueError):
        `set_adapter` another / `unmerge` first."""
        self.require_adapter(adapter_name)
        if adapter_name == self._active_adapter:
            raise ValueError(f"FusedLoRALinear.delete_adapter: {adapter_name!r} is the active adapter; "
                             f"set_adapter(...) another one first")
        if adapter_name in self.merged_adapters:
            raise ValueError(f"FusedLoRALinear.delete_adapter: {adapter_name!r} is merged into the weight; "
                             f"unmerge() first")
        del self._adapter_settings[adapter_name]
        if adapter_name == DEFAULT_ADAPTER:
            del self._parameters["lora_A"], self._parameters["lora_B"]
            variant_of(self, adapter_name).delete(self, adapter_name)  # e.g. DoRA's magnitude, of "default"
        else:
            del self.lora_adapters[adapter_name]
            if not len(self.lora_adapters):
                del self._modules["lora_adapters"]  # back to a one-adapter layer's module tree

    def set_adapter(self, adapter_name: Union[str, Sequence[str]], inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter: trainable (unless `inference_mode`), all others frozen,
        as in peft. A one-name list is accepted (peft's form); several active adapters are not. If
        adapters are merged, they are first unmerged, with a warning (peft's rule)."""
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(f"FusedLoRALinear.set_adapter: one active adapter per layer, got {adapter_name!r}")
            adapter_name = adapter_name[0]
        self.require_adapter(adapter_name)
        if self.merged:
            warnings.warn("FusedLoRALinear.set_adapter: adapters are merged; unmerging them first", stacklevel=2)
            self.unmerge()
        self._active_adapter = adapter_name
        for name in self._adapter_settings:
            for t in self.adapter_parameters(name):
                t.requires_grad_(name == adapter_name and not inference_mode)

    def set_requires_grad(self, adapter_names: Union[str, Sequence[str]], requires_grad: bool = True) -> None:
        """Enable (or disable) gradients of the named adapters' weights (peft's layer method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self.require_adapter(name)
        for name in names:
            for t in self.adapter_parameters(name):
                t.requires_grad_(requires_grad)

    @property
    def quantized(self) -> bool:
        """Whether the frozen base weight is quantized (a `fused_lora.modules.quantized.QuantizedWeight`)."""
        return self.base_kind.quantized

    def base_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """The base weight as out x in (a transposed view of a Conv1D's in x out weight: the op takes strides;
        over an expert stack, experts x out x in)."""
        weight = self.weight if weight is None else weight
        return weight.transpose(-2, -1) if self.fan_in_fan_out else weight

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if self.base_kind.load_refused(self, state_dict, prefix, local_metadata, strict):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    # ---------------------------------------------------------------- forward

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"FusedLoRALinear expects a tensor, got {type(x).__name__}")
        if x.dim() == 0:
            raise ValueError(f"FusedLoRALinear: input is a 0-dim tensor but in_features is {self.in_features}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"FusedLoRALinear: input's last dimension is {x.shape[-1]} "
                             f"but in_features is {self.in_features} (input shape {tuple(x.shape)})")
        if not x.is_floating_point():
            raise TypeError(f"FusedLoRALinear: input dtype {x.dtype} is not a floating-point type")
        if x.device != self.weight.device or x.device != self.lora_A.device:
            raise ValueError(f"FusedLoRALinear: input is on {x.device} but the base weight is on "
                             f"{self.weight.device} and the adapter on {self.lora_A.device}")

    def _row_adapters(self, x: Tensor, adapter_names) -> tuple[list[str], Tensor]:
        """Checks forward's adapter_names (one per sample: x's first dimension); returns the adapters used
        (in the layer's order) and the per-row index into that list (-1: "__base__") on x's device."""
        if self.merged:
            raise ValueError("FusedLoRALinear: cannot pass adapter_names while adapters are merged "
                             f"({', '.join(self.merged_adapters)}); unmerge() first")
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) \
                or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("FusedLoRALinear: adapter_names must be a list of adapter names (str), one per sample")
        if x.dim() < 2 or len(adapter_names) != x.shape[0]:
            raise ValueError(f"FusedLoRALinear: {len(adapter_names)} adapter_names for an input of shape "
                             f"{tuple(x.shape)}: expected one per sample ({x.shape[0] if x.dim() >= 2 else 'none'})")
        given = set(adapter_names)
        unknown = sorted(given - set(self._adapter_settings) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"FusedLoRALinear: unknown adapter name(s) {', '.join(map(repr, unknown))} in "
                             f"adapter_names; this layer has {', '.join(map(repr, self._adapter_settings))} "
                             f"(and {BASE_ADAPTER!r} for none)")
        used = [name for name in self._adapter_settings if name in given]
        index = {name: i for i, name in enumerate(used)}
        index[BASE_ADAPTER] = -1
        per_sample = torch.tensor([index[n] for n in adapter_names], dtype=torch.int64)
        return used, per_sample.repeat_interleave(math.prod(x.shape[1:-1])).to(x.device)

    def forward(self, x: Tensor, adapter_names: Optional[Sequence[str]] = None,
                group_sizes: Optional[Tensor] = None) -> Tensor:
        """y = x W^T + b + s B A dropout(x) with the active adapter; with `adapter_names` (one name per
        sample, i.e. per index of x's first dimension; "__base__" for none) each sample uses its own
        adapter, in eval and training mode (each adapter's gradients from its own samples only).
        Within a LoraModel call with adapter_names, the model's names apply (`call_value`; a call of the
        same model from another thread has its own).

        Over an expert stack (`ExpertStack`): x (M, in) holds its rows sorted by expert, `group_sizes[e]` of
        them for expert e (int64, shape (experts,), on x's device, summing to M), and y_e = x_e W_e^T + b_e +
        s B_e A_e dropout(x_e) (`fused_lora.ops.grouped`); x is cast to the stack's dtype (as transformers'
        grouped_mm does); adapter_names is refused."""
        if adapter_names is None:
            adapter_names = self._model_call_names()
        self._check_input(x)
        if adapter_names is not None:
            if self.base_kind.grouped:
                raise ValueError(f"FusedLoRALinear over an expert stack: {EXPERTS_NO_MIXED}")
            used, row_adapter = self._row_adapters(x, adapter_names)
        x, weight, bias = self.base_kind.inputs(self, x, group_sizes)
        if self.merged or self._disabled:
            return self.base_kind.plain(x, weight, bias)
        if adapter_names is not None:
            refuse_in_mixed_batch(self, used)
            one = self._one_adapter_of(used, adapter_names, x.dtype)
            if one is not None:  # every sample names one adapter: the single-adapter op, same result
                return self.base_kind.lora(x, weight, bias, *one, self.backend, used[0])
            adapters, seed = self._mixed_adapters(used, x.dtype)
            return self.base_kind.mixed(x, weight, bias, adapters, row_adapter, seed, self.backend)
        return variant_of(self, self._active_adapter).forward(self, x, weight, bias)

    def _model_call_names(self) -> Optional[list[str]]:
        """The adapter_names of the LoraModel call running in this thread (None outside one). A training
        call with names leaves a mark (per thread: another thread's call does not clear it): recomputing
        this layer in backward (activation checkpointing) runs after that call, without its names, and
        would silently give other adapters' gradients: it raises instead."""
        names = call_value(self)
        if torch.compiler.is_compiling():  # a compiled graph holds the names it was traced with
            return names
        marks = self.__dict__.get("_names_in_training")  # idents of threads
        if not isinstance(marks, set):
            marks = self.__dict__["_names_in_training"] = set()
        if torch._C._current_graph_task_id() == -1:  # a forward, not a recomputation inside backward
            if names is not None and self.training:
                marks.add(threading.get_ident())
            else:
                marks.discard(threading.get_ident())
        elif names is None and marks:
            # backward may run on another thread than the forward (autograd's device threads): any live
            # thread whose last forward of this layer was a mixed training call counts
            if marks & {t.ident for t in threading.enumerate()}:
                raise RuntimeError("FusedLoRALinear: activation (gradient) checkpointing recomputes this layer in "
                                   "backward without the adapter_names of the LoraModel call, so its gradients "
                                   "would be another adapter's: train mixed batches without gradient "
                                   "checkpointing, or pass adapter_names to the layers themselves inside the "
                                   "checkpointed function")
            marks.clear()  # marks of threads that have ended
        return names

    def _mixed_adapters(self, used: list[str], dtype: torch.dtype) -> tuple[list, object]:
        """The mixed-batch op's adapters ((A, B, scaling, dropout_p) in the compute dtype, dropout in
        training only; values that dtype cannot hold refused: `modules.adapter_range`) for the adapters
        `used`, and the call's seed."""
        adapters = []
        for name in used:
            lora_A, lora_B = self.adapter_weights(name)
            settings = self._adapter_settings[name]
            adapters.append((*compute_adapter(lora_A, lora_B, settings.scaling, dtype, name), settings.scaling,
                             settings.lora_dropout if self.training else 0.0))
        return adapters, seed_for(max([0.0] + [a[3] for a in adapters]))

    def _one_adapter_of(self, used: list[str], adapter_names: Sequence[str], dtype: torch.dtype) -> Optional[tuple]:
        """For a mixed batch whose samples all name one adapter: (A, B, scaling, dropout_p, seed) for the
        single-adapter op, which then computes exactly what the mixed op would (its seed is the mixed op's
        seed for adapter 0: the same masks) without the per-row machinery. None otherwise."""
        if len(used) != 1 or BASE_ADAPTER in adapter_names:
            return None
        (adapter,), seed = self._mixed_adapters(used, dtype)
        return (*adapter, adapter_seed(seed, 0))

    # ---------------------------------------------------------------- merging

    def delta_weight(self, adapter_name: Optional[str] = None) -> Tensor:
        """s * B @ A of `adapter_name` (default: the active adapter) in float32 (float64 if the weight or
        adapter is float64): what merging it adds to the base weight, as out x in (transposed for a
        Conv1D base, whose weight is in x out)."""
        name = self._active_adapter if adapter_name is None else adapter_name
        lora_A, lora_B = self.adapter_weights(name)
        acc = torch.promote_types(self.weight.dtype, lora_A.dtype)
        if acc != torch.float64:
            acc = torch.float32
        return lora_delta_weight(lora_A.detach().to(acc), lora_B.detach().to(acc),
                                 self._adapter_settings[name].scaling)

    def weight_with_delta(self, sign: int, adapter_names: Optional[Sequence[str]] = None) -> Tensor:
        """W + sign * sum of s B @ A over the adapters (default: the active one), computed in
        delta_weight's precision, rounded once to W's dtype."""
        names = [self._active_adapter] if adapter_names is None else adapter_names
        delta = self.delta_weight(names[0])
        for name in names[1:]:
            delta = delta + self.delta_weight(name)
        delta = self.base_weight(delta)  # in the weight's own layout
        return torch.add(self.weight.detach().to(delta.dtype), delta, alpha=sign).to(self.weight.dtype)

    def _merge_variant(self, names: Sequence[str], what: str):
        """The variant that merges `names` (on top of what is merged): plain LoRA sums the deltas; a variant
        that merges alone (DoRA: W is rescaled, so deltas no longer add) takes no other adapter with it
        (ValueError)."""
        merging = list(names) + [n for n in self.merged_adapters if n not in names]
        alone = [n for n in merging if variant_of(self, n).merges_alone]
        if not alone:
            return LORA
        if len(merging) > 1:
            raise ValueError(f"{what}: the DoRA adapter is merged alone; merging it with other adapters "
                             f"({', '.join(merging)}) is not supported")
        return variant_of(self, alone[0])

    def merged_weight(self, names: Sequence[str], what: str) -> Tensor:
        """The weight with the adapters `names` merged by the variant that merges them, in W's dtype and layout
        (a new tensor; the layer is not changed)."""
        return self._merge_variant(names, what).merged_weight(self, names)[0]

    @staticmethod
    def refuse_non_finite(w: Tensor, message: str) -> None:
        """ValueError(message) if `w` holds NaN or inf."""
        # Checked after rounding to the weight's dtype: a float32 sum can be finite and still
        # overflow float16 (max 65504) when written.
        if not w.is_meta and not bool(torch.isfinite(w).all()):
            raise ValueError(message)

    @torch.no_grad()
    def check_merge(self, what: str = "FusedLoRALinear.merge", adapter_names: Optional[Sequence[str]] = None) -> None:
        """Raise ValueError (naming `what`) if merging would write NaN or inf into the weight, in its own
        dtype; changes nothing either way (what safe_merge checks, for callers that check many layers first)."""
        self.base_kind.refuse_merge(what)
        names = [self._active_adapter] if adapter_names is None else list(adapter_names)
        self.refuse_non_finite(self.merged_weight(names, what),
                                f"{what}: the merged weight has NaN or inf in {self.weight.dtype}; nothing was merged")

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[Sequence[str]] = None) -> None:
        """Fold s * B @ A into the base weight (computed in float32, rounded once).

        `adapter_names` (peft's argument): the adapters to merge; default the active one. With
        `safe_merge` (peft's option), the merged weight is checked to be finite in the
        weight's own dtype before anything is written; a NaN or inf (e.g. a delta that overflows
        float16) raises ValueError and leaves the weight and `merged` untouched.
        Merging adapters already merged warns and does nothing for them.
        Over a quantized base: ValueError (see `to_linear`), nothing changed.
        """
        self.base_kind.refuse_merge("FusedLoRALinear.merge")
        names = [self._active_adapter] if adapter_names is None else list(adapter_names)
        for name in names:
            self.require_adapter(name)
        todo = [n for i, n in enumerate(names) if n not in self.merged_adapters and n not in names[:i]]
        for name in dict.fromkeys(n for i, n in enumerate(names) if n in names[:i]):
            warnings.warn(f"FusedLoRALinear.merge: {name!r} is listed twice; merged once", stacklevel=2)
        done = [n for n in dict.fromkeys(names) if n in self.merged_adapters]
        if done:
            warnings.warn("FusedLoRALinear.merge: already merged; nothing done" if not todo else
                          f"FusedLoRALinear.merge: {', '.join(map(repr, done))} already merged", stacklevel=2)
        if not todo:
            return
        variant = self._merge_variant(todo, "FusedLoRALinear.merge")
        merged, kept = variant.merged_weight(self, todo)  # DoRA: c (W + s B A), and what unmerge needs (peft's)
        if safe_merge:
            self.refuse_non_finite(merged, f"FusedLoRALinear.merge: the merged weight has NaN or inf in "
                                            f"{self.weight.dtype}; weight left unchanged")
        self.weight.copy_(merged)
        self._unmerge_with = (variant, kept)
        self.merged_adapters.extend(todo)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract s * B @ A of every merged adapter from the base weight again (all at once, rounded
        once). Unmerging an unmerged layer warns and does nothing.

        In float32 this restores the weight to rounding error; in float16/bfloat16 the two
        roundings may leave the weight a few ulps from where it was (as with any merge/unmerge).
        If the result has NaN or inf (the merge, made without `safe_merge`, overflowed the
        weight's dtype), the base weight cannot be restored: ValueError, layer left as it is.
        """
        if not self.merged:
            warnings.warn("FusedLoRALinear.unmerge: not merged; nothing done", stacklevel=2)
            return
        variant, kept = getattr(self, "_unmerge_with", (LORA, None))
        unmerged = variant.unmerged_weight(self, kept)
        self.refuse_non_finite(unmerged, f"FusedLoRALinear.unmerge: the unmerged weight would have NaN or inf "
                                          f"(the merge overflowed {self.weight.dtype}?); the base weight cannot be "
                                          f"restored, layer left merged")
        self.weight.copy_(unmerged)
        self.merged_adapters = []
        self._unmerge_with = (LORA, None)

    @torch.no_grad()
    def to_linear(self, safe_merge: bool = False) -> nn.Module:
        """A plain `nn.Linear` (a `Conv1D` for a Conv1D base) holding W + s * B @ A (a new tensor; this
        layer is not changed).

        With `safe_merge`, a merged weight with NaN or inf in the weight's dtype raises ValueError.
        Over a quantized base: an nn.Linear in the compute dtype holding dequantize(W) + s * B @ A.
        """
        return self.base_kind.to_linear(self, safe_merge)

    def plain_base(self, device=None, dtype=None) -> nn.Module:
        """A new module of the base's kind and shape (nn.Linear, or Conv1D when fan_in_fan_out)."""
        if self.fan_in_fan_out:
            with torch.device(device or "meta"):  # Conv1D takes no device/dtype arguments
                out = conv1d_class()(self.out_features, self.in_features)
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
        runs = dispatch.describe(self.weight.device, self.weight.dtype, self.r, self.backend)
        return ((f"experts={self.num_experts}, " if self.num_experts is not None else "") +
                f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {'fan_in_fan_out=True, ' if self.fan_in_fan_out else ''}"
                f"r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"{'use_dora=True, ' if self.use_dora else ''}merged={self.merged}, "
                f"backend={runs}" + (f", adapters={list(self._adapter_settings)}, active_adapter="
                                     f"{self._active_adapter!r}" if len(self._adapter_settings) > 1 else ""))
