"""Run an existing peft model's LoRA layers through fused_lora's op, in place.

    model = fused_lora.patch_peft(peft_model)     # same model, same parameters, fused forward
    fused_lora.unpatch_peft(model)                # peft's forward again

patch_peft gives each peft `lora.Linear` it can run an instance attribute `forward` (a
`PatchedForward`) that computes base + LoRA with `fused_lora.ops.lora.lora_linear` from peft's own
tensors: the base layer's weight and bias, `lora_A[name].weight`, `lora_B[name].weight`,
`scaling[name]` and the probability of `lora_dropout[name]`. Nothing else of peft changes: no
class is modified, no parameter or buffer is added or replaced, so saving, loading, merging,
adapter switching and trainers see the peft model they know.

A DoRA adapter runs `fused_lora.modules.variants.dora_forward` on peft's `lora_magnitude_vector[name].weight`
(the norm by the low-rank identity, never W + s B A; the base weight must be frozen, as in training).

peft's state can change after patching (another adapter activated, a LoRA variant added, a
merge, `disable_adapter()`, `adapter_names=` passed, a hook registered on the base layer). The
patched forward checks that state on every call (a few attribute and dict look-ups) and, unless
the call is one fused_lora computes as peft would, hands it to peft's own forward. So a patched
layer computes peft's function or defers to peft; it never computes something else. Against
unpatched peft under the same seed, "peft's function" means:

- eval mode, and training without dropout (p = 0, or the dropout module in eval): peft's outputs
  and gradients, to rounding;
- DoRA with dropout in training: also to rounding, masks included: the dropped input comes from
  torch's dropout, drawn from the random stream, and in the order, that peft's `nn.Dropout` uses;
- plain LoRA with dropout in training: equal in distribution, not in value. fused_lora's op draws
  its own masks (regenerated in backward, never stored; `fused_lora.core.dropout`): each element of the
  LoRA branch's input is kept independently with probability 1 - p (to within 2^-17 on the
  PyTorch path, which rounds p to a multiple of 2^-16, and 2^-25 in the Triton kernels) and scaled
  by exactly peft's 1 / (1 - p), as peft's `nn.Dropout` does, but the masks are not the ones peft
  draws under the same `torch.manual_seed`, so losses and gradients differ from an unpatched run as
  another seed would make them differ. The masks' seeds come from torch's CPU generator, so a
  patched run is reproducible from `torch.manual_seed`. tests/peft_compat/test_patch_peft_dropout.py checks
  the distribution over many draws against peft's.

Expert stacks (peft's `target_parameters`, `lora.ParamWrapper`): peft nests one ParamWrapper per adapted
parameter around a transformers experts module and, on every forward, folds W + s B A into each wrapped stack
(a temporary the size of the stack) before running the experts module. patch_peft gives the outermost wrapper a
`PatchedExpertsForward` that computes the whole experts module through `fused_lora.ops.grouped` instead
(`fused_lora.modules.experts.grouped_experts`: transformers' routing and weights, the class's activation and
flags), each wrapped stack with its active adapter's lora_A / lora_B seen in the op's layout (views of peft's
tensors, so their gradients reach them), never forming W + s B A. It defers to peft's forward when any wrapper is
disabled, merged or has no single active adapter of its own, for LoRA variants, lora_bias, hooks, expert
parallelism, an experts implementation whose function it does not compute (other than eager, grouped_mm,
batched_mm, fused_lora), and inputs of another dtype or device than the stacks. (peft refuses dropout there.)

Arithmetic differences from peft: the same math in another order (fp32 results agree to
rounding). Adapter weights whose dtype differs from the input (peft keeps fp32 adapters on a
bf16 model by default) are cast to the input's dtype for the computation, as `FusedLoRALinear`
does, where peft computes the LoRA branch in the adapter's dtype; their gradients come back in
their own dtype. An adapter whose values the input's dtype cannot hold (`fused_lora.modules.adapter_range`:
|B| = 1e5 in fp32 on an fp16 model) has its call handed to peft, where the check reads the values (on
the CPU always; on a GPU once per version of the tensors, not in training forwards).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _torch_module

from .. import dispatch
from ..modules.adapter_range import AdapterRangeError
from ..core.dropout import no_seed
from ..core.op_kinds import GROUPED_FWD
from ..modules import experts as experts_impl
from ..modules.autocast import autocast_inputs
from ..modules.bases import conv1d_class
from ..modules.layer import FusedLoRALinear
from ..modules.variants import dora_forward, lora_forward
from ..ops.grouped import lora_linear_grouped
from .experts import from_peft_A, from_peft_B

REPORT_ATTR = "fused_lora_report"
# Keyword arguments peft's forward pops before calling the base layer; given as None they mean nothing.
_PEFT_KWARGS = frozenset({"adapter_names", "alora_offsets"})


@dataclass
class PatchReport:
    """What `patch_peft` did: the LoRA layers it patched and those it left to peft, with why."""

    patched: list[str] = field(default_factory=list)
    kept: dict[str, str] = field(default_factory=dict)  # module name -> reason it kept peft's forward
    backend: str = "auto"

    def __str__(self) -> str:
        total = len(self.patched) + len(self.kept)
        if total == 0:
            return "fused_lora: 0 LoRA layers: nothing to patch"
        line = f"fused_lora: {len(self.patched)} of {total} LoRA layers patched"
        if not self.kept:
            return line
        by_reason: dict[str, list[str]] = {}
        for name, reason in self.kept.items():
            by_reason.setdefault(reason, []).append(name)
        parts = []
        for reason, names in by_reason.items():
            shown = ", ".join(names[:2]) + (f" and {len(names) - 2} more" if len(names) > 2 else "")
            parts.append(f"{shown} ({reason})")
        return line + f"; {len(self.kept)} kept peft's forward: " + "; ".join(parts)


_classes: dict = {}  # peft's LoraLayer and lora.Linear, transformers' Conv1D (or None): imported once


def _peft_classes() -> dict:
    # A plain dict rather than functools.lru_cache: torch.compile traces this without a warning.
    if not _classes:
        try:
            from peft.tuners import lora
        except ImportError as e:  # pragma: no cover - peft is installed wherever a peft model exists
            raise ImportError("fused_lora.patch_peft needs peft (pip install peft)") from e
        _classes.update(LoraLayer=lora.LoraLayer, Linear=lora.Linear, Conv1D=conv1d_class(),
                        ParamWrapper=getattr(lora, "ParamWrapper", None))
    return _classes


def _unhooked(m: nn.Module, own_forward: bool = False) -> bool:
    """No hooks and no instance forward (or, with `own_forward`, ours): calling m.forward directly is what m(x)
    would do."""
    return not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or ("forward" in m.__dict__ and not own_forward))


def _global_hooks() -> bool:
    return bool(_torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks
                or _torch_module._global_backward_hooks or _torch_module._global_backward_pre_hooks)


def _base_kind(base: nn.Module) -> Optional[str]:
    """"linear" or "conv1d" where fused_lora computes exactly what `base(x)` does, else None."""
    if isinstance(base, nn.Linear) and type(base).forward is nn.Linear.forward:
        kind = "linear"
    else:
        conv1d = _peft_classes()["Conv1D"]
        if conv1d is None or type(base) is not conv1d:
            return None
        kind = "conv1d"
    # A quantized or otherwise wrapped weight (bitsandbytes, torchao, DTensor) is not a plain tensor.
    if type(base.weight) not in (nn.Parameter, Tensor) or not base.weight.is_floating_point():
        return None
    if base.bias is not None and type(base.bias) not in (nn.Parameter, Tensor):
        return None
    return kind


def _layer_reason(layer: nn.Module) -> Optional[str]:
    """Why fused_lora cannot compute this layer as peft does (None when it can), from its
    structure and its active adapter; checked on every call."""
    return _fixed_reason(layer) or _selection_reason(layer) or _adapter_reason(layer, layer.active_adapters[0])


def _patch_reason(layer: nn.Module) -> Optional[str]:
    """Why patch_peft keeps peft's forward on this layer. Which adapters are active is a passing
    state (set_adapter changes it; every call checks it): a layer with no single active adapter of
    its own now is patched all the same, and defers to peft until it has one."""
    return _fixed_reason(layer) or (None if _selection_reason(layer) else
                                    _adapter_reason(layer, layer.active_adapters[0]))


def _fixed_reason(layer: nn.Module) -> Optional[str]:
    linear = _peft_classes()["Linear"]
    if type(layer).forward is not linear.forward or not isinstance(layer, linear):
        return f"peft {type(layer).__name__} layer, not lora.Linear"
    base = layer.base_layer
    if _base_kind(base) is None:
        return f"base layer is {type(base).__name__}, not nn.Linear or Conv1D"
    if not _unhooked(base):
        return "hooks on the base layer"
    return None


def _selection_reason(layer: nn.Module) -> Optional[str]:
    active = layer.active_adapters
    if len(active) != 1:
        return f"{len(active)} active adapters"
    if active[0] not in layer.lora_A:
        return f"active adapter {active[0]!r} not on this layer"
    return None


def _dora_reason(layer: nn.Module, name: str) -> Optional[str]:
    """Why fused_lora cannot run this DoRA adapter as peft does (None when it can)."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant
    variant, held = layer.lora_variant.get(name), layer.lora_magnitude_vector[name] \
        if name in layer.lora_magnitude_vector else None
    if type(variant) is not DoraLinearVariant or type(held) is not DoraLinearLayer or not _unhooked(held):
        return "DoRA layer of another kind, or hooked"
    if getattr(held, "fan_in_fan_out", False) != (_base_kind(layer.base_layer) == "conv1d"):
        return "DoRA fan_in_fan_out differs from the base layer's kind"
    magnitude = getattr(held, "weight", None)
    if not isinstance(magnitude, Tensor) or magnitude.dim() != 1 or not magnitude.is_floating_point():
        return "DoRA magnitude is not a 1-D float tensor"
    if layer.base_layer.weight.requires_grad:  # a trained bias is fine: it is outside the norm
        return "DoRA with a trainable base weight"
    return None


def _adapter_reason(layer: nn.Module, name: str) -> Optional[str]:
    if layer.use_dora.get(name, False):
        reason = _dora_reason(layer, name)
        if reason is not None:
            return reason
    elif name in layer.lora_variant:
        return f"LoRA variant {type(layer.lora_variant[name]).__name__}"
    lora_A, lora_B, dropout = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if layer.lora_bias.get(name, False) or getattr(lora_B, "bias", None) is not None:
        return "lora_bias"
    if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
        return "lora_A/lora_B are not nn.Linear"
    if type(dropout) not in (nn.Dropout, nn.Identity):
        return f"dropout module {type(dropout).__name__}"
    if not (_unhooked(lora_A) and _unhooked(lora_B) and _unhooked(dropout)):
        return "hooks on lora_A, lora_B or lora_dropout"
    return None


def _call_reason(layer: nn.Module, x, args, kwargs) -> Optional[str]:
    """Why this particular call goes to peft (None when fused_lora computes it)."""
    if args or (kwargs and not (kwargs.keys() <= _PEFT_KWARGS and all(v is None for v in kwargs.values()))):
        return "extra forward arguments"  # adapter_names (mixed batches), alora_offsets, base-layer arguments
    if layer.disable_adapters:
        return "adapters disabled"
    if layer.merged:
        return "adapter merged"
    if _global_hooks():
        return "global module hooks"
    reason = _layer_reason(layer)
    if reason is not None:
        return reason
    name = layer.active_adapters[0]
    weight, lora_A = layer.base_layer.weight, layer.lora_A[name].weight
    dropout = layer.lora_dropout[name]
    if type(dropout) is nn.Dropout and dropout.training and not 0.0 <= dropout.p < 1.0:
        return "dropout probability outside [0, 1)"
    # Anything unusual about the input: peft computes it, or raises its own error.
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() == 0 or x.numel() == 0:
        return "input"
    if x.shape[-1] != layer.in_features or x.device != weight.device or lora_A.device != x.device \
            or layer.lora_B[name].weight.device != x.device:
        return "input shape or device"
    if layer.use_dora.get(name, False) and layer.lora_magnitude_vector[name].weight.device != x.device:
        return "input shape or device"
    if not torch.is_autocast_enabled(x.device.type):
        if x.dtype != weight.dtype:
            return "input dtype differs from the base weight's"
        if x.dtype != lora_A.dtype and not getattr(layer, "cast_input_dtype_enabled", True):
            return "input dtype casting disabled"
    return None


def _fused_forward(layer: nn.Module, x: Tensor, backend: str) -> Tensor:
    """peft's vanilla-LoRA (or DoRA) forward of `layer`'s one active adapter, through fused_lora's op."""
    name = layer.active_adapters[0]
    base = layer.base_layer
    weight, bias = base.weight, base.bias
    if _base_kind(base) == "conv1d":
        weight = weight.t()  # Conv1D stores in x out; the op takes the strided N x K view
    x, weight, bias = autocast_inputs(x, weight, bias)
    dropout = layer.lora_dropout[name]
    # peft applies its dropout module, whose own training flag decides (as here).
    p = float(dropout.p) if type(dropout) is nn.Dropout and dropout.training else 0.0
    if layer.use_dora.get(name, False):
        # peft's DoRA: its dropout formula applies whenever the dropout module is an active nn.Dropout
        return dora_forward(x, weight, bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                            layer.lora_magnitude_vector[name].weight, float(layer.scaling[name]),
                            p if layer.training else 0.0, backend, name)
    return lora_forward(x, weight, bias, layer.lora_A[name].weight, layer.lora_B[name].weight,
                        float(layer.scaling[name]), p, backend=backend, name=name)


class PatchedForward:
    """The `forward` patch_peft sets on one peft `lora.Linear` instance: fused_lora's op when the
    call is one it computes as peft does, peft's own (class) forward otherwise."""

    def __init__(self, layer: nn.Module, backend: str):
        self.layer = layer
        self.backend = backend

    def __call__(self, x, *args, **kwargs):
        layer = self.layer
        if _call_reason(layer, x, args, kwargs) is not None:  # peft's forward, exactly as unpatched
            return type(layer).forward(layer, x, *args, **kwargs)
        try:
            return _fused_forward(layer, x, self.backend)
        except AdapterRangeError:
            # values the compute dtype cannot hold (fused_lora.modules.adapter_range), refused before anything
            # ran or was drawn: peft computes the branch in the adapter's own dtype, so the call is peft's
            return type(layer).forward(layer, x, *args, **kwargs)

    def __repr__(self) -> str:
        return f"PatchedForward(backend={self.backend!r})"


# ---------------------------------------------------------------- expert stacks: peft's ParamWrapper

_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_param_wrapper(layer: nn.Module) -> bool:
    wrapper = _peft_classes()["ParamWrapper"]
    return wrapper is not None and isinstance(layer, wrapper)


def _wrapper_chain(outer: nn.Module) -> list[nn.Module]:
    """The ParamWrappers nested from `outer` inwards (peft wraps one parameter of a module per wrapper)."""
    chain = [outer]
    while _is_param_wrapper(chain[-1].base_layer):
        chain.append(chain[-1].base_layer)
    return chain


def _chain_fixed_reason(chain: list[nn.Module]) -> Optional[str]:
    """Why fused_lora cannot compute a ParamWrapper chain's module as peft does, from its structure."""
    wrapper = _peft_classes()["ParamWrapper"]
    experts = chain[-1].base_layer
    if not experts_impl.is_experts_module(experts):
        return f"ParamWrapper over {type(experts).__name__}, not a transformers experts module"
    outer_hooked = not _unhooked(chain[0]) and not (_is_patched(chain[0]) and _unhooked(chain[0], own_forward=True))
    if outer_hooked or not _unhooked(experts) or any(not _unhooked(w) for w in chain[1:]):
        return "hooks on the experts module or its ParamWrappers"
    names = [w.parameter_name for w in chain]
    if len(set(names)) != len(names):
        return "two ParamWrappers on one parameter"
    for w in chain:
        if type(w).forward is not wrapper.forward:
            return f"peft {type(w).__name__} layer with its own forward"
        problem = experts_impl.stack_problem(experts, w.parameter_name)
        if problem:
            return problem
    return None


def _chain_adapter_reason(chain: list[nn.Module]) -> Optional[str]:
    """Why peft's active adapter of each wrapper is not one fused_lora computes (None when it is)."""
    for w in chain:
        active = w.active_adapters
        if len(active) != 1:
            return f"{len(active)} active adapters"
        name = active[0]
        if name not in w.lora_A:
            return f"active adapter {name!r} not on {w.parameter_name}"
        if name in w.lora_variant or w.use_dora.get(name, False):
            return "a LoRA variant"
        lora_A, lora_B, dropout = w.lora_A[name], w.lora_B[name], w.lora_dropout[name]
        if w.lora_bias.get(name, False) or getattr(lora_B, "bias", None) is not None:
            return "lora_bias"
        if type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear or type(dropout) is not nn.Identity:
            return "lora_A/lora_B are not nn.Linear, or dropout"
        if not (_unhooked(lora_A) and _unhooked(lora_B)):
            return "hooks on lora_A or lora_B"
        E = w.num_experts
        if lora_A.weight.shape[0] % E or lora_B.weight.shape[1] != lora_A.weight.shape[0]:
            return "lora_A / lora_B shapes are not peft's (r x experts, in) / (out, r x experts)"
    return None


def _chain_call_reason(chain: list[nn.Module], args, kwargs) -> Optional[str]:
    """Why this call of the chain's outermost wrapper goes to peft (None when fused_lora computes it)."""
    if len(args) != 3 or (kwargs and not (kwargs.keys() <= _PEFT_KWARGS and all(v is None for v in kwargs.values()))):
        return "arguments other than (hidden_states, top_k_index, top_k_weights)"
    if any(w.disable_adapters for w in chain):
        return "adapters disabled"
    if any(w.merged for w in chain):
        return "adapter merged"
    if _global_hooks():
        return "global module hooks"
    reason = _chain_fixed_reason(chain) or _chain_adapter_reason(chain)
    if reason is not None:
        return reason
    experts = chain[-1].base_layer
    implementation = experts.config._experts_implementation
    if implementation not in experts_impl.SAME_FUNCTION:
        return f"experts implementation {implementation!r}"
    if getattr(experts, "_is_expert_parallel", False):
        return "expert parallelism"
    x, index, weights = args
    stacks = [getattr(experts, n) for n in experts_impl.projections(experts)]
    if not isinstance(x, Tensor) or not isinstance(index, Tensor) or not isinstance(weights, Tensor) \
            or x.dim() != 2 or index.dim() != 2 or index.shape != weights.shape or index.shape[0] != x.shape[0] \
            or x.numel() == 0 or index.dtype not in (torch.int32, torch.int64):
        return "input"
    if any(t.dtype not in _WEIGHT_DTYPES or t.dtype != x.dtype or t.device != x.device for t in stacks):
        return "input dtype or device differs from the expert stacks'"
    if any(w.lora_A[w.active_adapters[0]].weight.device != x.device for w in chain):
        return "input shape or device"
    return None


def _fused_experts_forward(chain: list[nn.Module], x: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                           backend: str) -> Tensor:
    """What peft's chain computes (the experts with W + s B A folded into each wrapped stack), through the grouped
    op: each wrapped projection with its active adapter's factors seen in our layout (views of peft's tensors,
    so their gradients reach them), the others alone."""
    experts = chain[-1].base_layer
    adapters = {w.parameter_name: w for w in chain}

    def project(name: str, rows: Tensor, group_sizes: Tensor) -> Tensor:
        stack = experts_impl.stack_of(experts, name)
        w = adapters.get(name)
        if w is None:
            return lora_linear_grouped(rows, group_sizes, stack.weight, stack.bias, None, None, 0.0,
                                       transposed=stack.transposed)
        adapter = w.active_adapters[0]
        A = from_peft_A(w.lora_A[adapter].weight, w.num_experts).to(rows.dtype)
        B = from_peft_B(w.lora_B[adapter].weight, w.num_experts).to(rows.dtype)
        return lora_linear_grouped(rows, group_sizes, stack.weight, stack.bias, A, B, float(w.scaling[adapter]), 0.0,
                                   no_seed(), backend, stack.transposed)

    return experts_impl.grouped_experts(experts, x, top_k_index, top_k_weights, project)


class PatchedExpertsForward:
    """The `forward` patch_peft sets on the outermost peft `ParamWrapper` of an experts module: the whole experts
    module (every wrapped stack's LoRA) through the grouped op when peft's state is one fused_lora computes, peft's
    own forward otherwise."""

    def __init__(self, layer: nn.Module, backend: str):
        self.layer = layer
        self.backend = backend

    def __call__(self, *args, **kwargs):
        layer = self.layer
        chain = _wrapper_chain(layer)
        if _chain_call_reason(chain, args, kwargs) is not None:  # peft's forward, exactly as unpatched
            return type(layer).forward(layer, *args, **kwargs)
        return _fused_experts_forward(chain, *args, self.backend)

    def __repr__(self) -> str:
        return f"PatchedExpertsForward(backend={self.backend!r})"


def _patch_chains(layers: list[tuple[str, nn.Module]], backend: str, report: "PatchReport") -> None:
    """Patch each outermost ParamWrapper (its chain computed as one); every wrapper is reported."""
    for name, layer in layers:
        if not _is_param_wrapper(layer):
            continue
        if any(_is_param_wrapper(m) and m.base_layer is layer for _, m in layers):
            continue  # an inner wrapper: its outermost one computes it
        chain = _wrapper_chain(layer)
        inner = [f"{name}{'.base_layer' * i}" for i in range(len(chain))]
        reason = _chain_fixed_reason(chain) or _chain_adapter_reason(chain)
        if reason is None and "forward" in layer.__dict__ and not _is_patched(layer):
            reason = "forward already replaced on the instance (e.g. by accelerate)"
        if reason is not None:
            _unpatch_layer(layer)
            report.kept.update((n, reason) for n in inner)
            continue
        layer.forward = PatchedExpertsForward(layer, backend)
        report.patched.extend(inner)


def _lora_layers(model: nn.Module, caller: str) -> list[tuple[str, nn.Module]]:
    """The model's peft LoRA layers (possibly none); TypeError when `model` is not a model at all."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a peft model (an nn.Module), got {type(model).__name__}")
    lora_layer = _peft_classes()["LoraLayer"]
    return [(n, m) for n, m in model.named_modules() if isinstance(m, lora_layer)]


def _nothing_to_patch(model: nn.Module) -> str:
    """The warning for a model without peft LoRA layers, saying what it holds instead."""
    hint = ("it holds fused_lora's own FusedLoRALinear layers, which need no patching"
            if any(isinstance(m, FusedLoRALinear) for m in model.modules()) else
            "e.g. a peft model of another method (prefix tuning, IA3, VB-LoRA), which peft runs as before")
    return f"patch_peft: {type(model).__name__} has no peft LoRA layers ({hint}); returned unchanged"


def _is_patched(layer: nn.Module) -> bool:
    return isinstance(layer.__dict__.get("forward"), (PatchedForward, PatchedExpertsForward))


def _unpatch_layer(layer: nn.Module) -> None:
    if _is_patched(layer):
        del layer.__dict__["forward"]


def patch_peft(model: nn.Module, backend: str = "auto", verbose: bool = True) -> nn.Module:
    """Make a peft model's LoRA layers compute through fused_lora's fused op, in place.

    Takes a peft `PeftModel` (or any model peft has injected LoRA layers into). Each peft
    `lora.Linear` over an `nn.Linear` or transformers' `Conv1D`, with one active adapter that is
    vanilla LoRA or DoRA (no other peft LoRA variant, no `lora_bias`; dropout an `nn.Dropout` or
    none), gets a forward that runs `fused_lora.ops.lora.lora_linear` (DoRA: `fused_lora.modules.variants.dora_forward`,
    with peft's `lora_magnitude_vector` and peft's dropout formula) on peft's own parameters,
    scaling and dropout probability. Every call first checks peft's state (active adapters,
    merged, disabled, variants, `adapter_names` and other extra arguments, hooks, input dtype and
    device) and hands the call to peft's forward whenever fused_lora would not compute peft's
    function (to rounding; with plain LoRA's dropout in training, in distribution: its own masks,
    see the module doc). Saving, loading, merging, `set_adapter`, `disable_adapter` and trainers are
    left entirely to peft.

    Expert stacks (peft's `ParamWrapper`, `target_parameters`): the outermost wrapper of an experts module runs
    the whole module through the grouped op (`fused_lora.ops.grouped`) with every wrapped stack's active
    adapter, never folding W + s B A into the stacks; each wrapper is listed in the report.

    Layers it cannot take keep peft's forward and are listed with the reason in the returned
    model's `fused_lora_report` (a `PatchReport`), whose one-line summary is printed unless
    `verbose=False`. Patching again re-checks every layer (idempotent; `backend` is updated).

    Args:
        model: the peft model; modified in place and returned.
        backend: "auto", "torch" or "triton", as for `FusedLoRALinear` (FUSED_LORA_BACKEND
            overrides "auto").
        verbose: print the summary line.

    A model without peft LoRA layers (a peft model of another method: prefix tuning, IA3, VB-LoRA;
    or fused_lora's own LoraModel) is returned unchanged, with a warning and the report
    `fused_lora: 0 LoRA layers: nothing to patch`.

    Raises TypeError when `model` is not an nn.Module, ValueError for an unknown backend, and
    BackendUnavailable when a backend asked for by name cannot run the model's weights (their
    device and dtype), before anything is changed.
    """
    dispatch.requested_backend(backend)  # an unknown name fails before anything is changed
    layers = _lora_layers(model, "patch_peft")
    if not layers:  # a script patching whatever peft model it is given must not break on other methods
        warnings.warn(_nothing_to_patch(model), stacklevel=2)
    for name, layer in layers:  # a forced backend that cannot run here fails now, not at every forward
        if _is_param_wrapper(layer):
            if _chain_fixed_reason(_wrapper_chain(layer)) is None:
                weight = getattr(_wrapper_chain(layer)[-1].base_layer, layer.parameter_name)
                for lora_A in layer.lora_A.values():
                    dispatch.choose_backend(weight.device, weight.dtype, lora_A.weight.shape[0] // layer.num_experts,
                                            backend, GROUPED_FWD)  # the grouped kernels' limits, not a Linear's
            continue
        if _patch_reason(layer) is None:  # every adapter the layer holds: set_adapter may choose any
            weight = layer.base_layer.weight
            for lora_A in layer.lora_A.values():
                dispatch.choose_backend(weight.device, weight.dtype, lora_A.weight.shape[0], backend)
    report = PatchReport(backend=backend)
    _patch_chains(layers, backend, report)
    for name, layer in layers:
        if _is_param_wrapper(layer):
            continue
        reason = _patch_reason(layer)
        if reason is None and "forward" in layer.__dict__ and not _is_patched(layer):
            reason = "forward already replaced on the instance (e.g. by accelerate)"
        if reason is not None:
            _unpatch_layer(layer)
            report.kept[name] = reason
            continue
        layer.forward = PatchedForward(layer, backend)
        report.patched.append(name)
    setattr(model, REPORT_ATTR, report)
    if verbose:
        print(report)
    return model


def unpatch_peft(model: nn.Module) -> nn.Module:
    """Undo `patch_peft`: every patched LoRA layer gets peft's own forward back (the instance
    attribute is removed). A model never patched, or without peft LoRA layers, is returned
    unchanged. Returns the model (TypeError when it is not an nn.Module)."""
    for _, layer in _lora_layers(model, "unpatch_peft"):
        _unpatch_layer(layer)
    model.__dict__.pop(REPORT_ATTR, None)
    return model
