"""LoRA on a transformers experts module: the "fused_lora" experts implementation.

Since transformers 5, a mixture-of-experts layer keeps its experts as 3-D parameters of one module whose class is
decorated with `@use_experts_implementation` (Qwen2/3-MoE, Mixtral, OLMoE, GPT-OSS, DeepSeek-V3, ...): its forward
is looked up by name (`config._experts_implementation`) in transformers' `ExpertsInterface` ("eager",
"grouped_mm", "batched_mm", ...). `register_experts_implementation()` adds one more, "fused_lora"
(`experts_forward`): the routed rows sorted by expert, gate/up (or up) through `lora_linear_grouped`, the class's
activation (`_apply_gate` with a gate, `act_fn` without), down through `lora_linear_grouped`, the class's
post-expert norm where it has one, then transformers' routing weights applied and the top-k rows of each token
summed exactly as its "grouped_mm" does. The class's flags are honoured: `is_transposed` (stacks stored
(experts, in, out), read through their strides), `has_bias` (`<name>_bias`, (experts, out)), `has_gate`
(`gate_up_proj` or `up_proj`), `is_concatenated` (gate and up side by side or interleaved: the class's own
`_apply_gate` splits them; the projection's output is computed whole).

The adapters: an experts module adapted by fused_lora holds, beside its frozen 3-D parameters, an `ExpertAdapters`
module (`lora_experts`) with one `FusedLoRALinear` per adapted projection, keyed by the parameter's name; each
layer's base is that parameter (`bases.ExpertStack`, the EXPERTS base kind): lora_A (E, r, in), lora_B (E, out,
r), dropout, several adapters, merge. The "fused_lora" implementation reaches them from the experts module:
adapted projections run their layer (LoRA, or the base alone when merged or disabled), the others the grouped op
without LoRA. Without adapters it computes what "eager" and "grouped_mm" compute (to rounding).

`attach` puts the adapters on a module and switches its config's experts implementation to "fused_lora" (and a
forward pre-hook refuses, by name, a forward under another implementation, which would silently ignore them);
`detach` takes them off and puts the implementation back. Expert parallelism (`_is_expert_parallel`) is refused.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ..core import gathered
from ..ops.grouped import lora_linear_grouped
from .bases import ExpertStack
from .layer import FusedLoRALinear

EXPERTS_IMPLEMENTATION = "fused_lora"  # the name in transformers' ExpertsInterface
ADAPTERS_ATTR = "lora_experts"  # the ExpertAdapters module on an adapted experts module
# transformers' experts implementations whose function "fused_lora" computes (others: e.g. hub kernels, fp8)
SAME_FUNCTION = ("eager", "grouped_mm", "batched_mm", EXPERTS_IMPLEMENTATION)
_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def is_experts_module(module: nn.Module) -> bool:
    """Whether `module` is an instance of a transformers `@use_experts_implementation` class (its flags, its
    config's experts implementation and its number of experts are there)."""
    return (all(isinstance(getattr(module, f, None), bool) for f in _FLAGS)
            and isinstance(getattr(module, "num_experts", None), int)
            and hasattr(getattr(module, "config", None), "_experts_implementation"))


def projections(module: nn.Module) -> tuple[str, str]:
    """The names of the experts module's two 3-D stacks: (gate_up_proj or up_proj, down_proj)."""
    return ("gate_up_proj" if module.has_gate else "up_proj"), "down_proj"


def stack_of(module: nn.Module, name: str) -> ExpertStack:
    """The expert stack `name` of an experts module, with its bias when the class has biases."""
    bias = getattr(module, f"{name}_bias", None) if module.has_bias else None
    return ExpertStack(getattr(module, name), bias, module.is_transposed)


def _in_out(module: nn.Module, name: str) -> Optional[tuple[int, int]]:
    w = getattr(module, name, None)
    if not isinstance(w, Tensor) or w.dim() != 3:
        return None
    return (w.shape[1], w.shape[2]) if module.is_transposed else (w.shape[2], w.shape[1])


def stack_problem(module: nn.Module, name: str) -> Optional[str]:
    """Why fused_lora cannot adapt parameter `name` of experts module `module` (None when it can): it must be one
    of the class's two projections, a floating 3-D stack with one matrix per expert (`num_experts`), its bias
    (E, out), and the two stacks must chain (gate/up's in = down's out; gate/up's out = 2 x down's in with a
    gate, = down's in without)."""
    up, down = projections(module)
    if name not in (up, down):
        return (f"{name!r} is not one of this {type(module).__name__}'s expert projections ({up!r}, {down!r}); "
                f"fused_lora adapts those")
    w = getattr(module, name, None)
    if not isinstance(w, Tensor) or w.dim() != 3:
        return f"{name} must be a 3-D stack (experts, out, in) or (experts, in, out), got " \
               f"{('shape ' + str(tuple(w.shape))) if isinstance(w, Tensor) else type(w).__name__}"
    if w.shape[0] != module.num_experts:
        return (f"{name} has shape {tuple(w.shape)}: {w.shape[0]} experts, but the module has num_experts = "
                f"{module.num_experts}")
    refusal = stack_of(module, name).refusal()
    if refusal:
        return f"{name}: {refusal}"
    sizes = {n: _in_out(module, n) for n in (up, down)}
    if None in sizes.values():
        missing = next(n for n, v in sizes.items() if v is None)
        return f"{missing} is not a 3-D expert stack, so {name}'s shape cannot be checked against it"
    (up_in, up_out), (down_in, down_out) = sizes[up], sizes[down]
    layout = "(experts, in, out)" if module.is_transposed else "(experts, out, in)"
    want_up_out = 2 * down_in if module.has_gate else down_in
    if up_in != down_out or up_out != want_up_out:
        return (f"the stacks do not chain: {up} {tuple(getattr(module, up).shape)} and {down} "
                f"{tuple(getattr(module, down).shape)} in the layout {layout}: {up} must map {down_out} features to "
                f"{want_up_out}{' (gate and up)' if module.has_gate else ''} and {down} {down_in} back to {down_out}")
    return None


class ExpertAdapters(nn.ModuleDict):
    """The LoRA layers of an experts module's adapted projections, by parameter name (a `FusedLoRALinear` over
    each `ExpertStack`), held beside the frozen 3-D parameters as the module's `lora_experts`."""


def adapters_of(module: nn.Module) -> Optional[ExpertAdapters]:
    """The ExpertAdapters of an experts module, or None."""
    held = module._modules.get(ADAPTERS_ATTR)
    return held if isinstance(held, ExpertAdapters) else None


def _base_projection(module: nn.Module, name: str) -> Callable[[Tensor, Tensor], Tensor]:
    def run(x: Tensor, group_sizes: Tensor) -> Tensor:
        stack = stack_of(module, name)
        return lora_linear_grouped(x.to(stack.weight.dtype), group_sizes, stack.weight, stack.bias, None, None, 0.0,
                                   transposed=stack.transposed)
    return run


def grouped_experts(module: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                    project: Callable[[str, Tensor, Tensor], Tensor]) -> Tensor:
    """The experts module's function with each projection computed by `project(name, x, group_sizes)` (x's rows
    sorted by expert): routing, activation and the weighted sum of the top-k rows as transformers' "grouped_mm"
    computes them. hidden_states (tokens, hidden), top_k_index and top_k_weights (tokens, top_k)."""
    if getattr(module, "_is_expert_parallel", False):
        raise NotImplementedError(f"{type(module).__name__}: expert parallelism (its sentinel expert ids) is not "
                                  f"supported by the {EXPERTS_IMPLEMENTATION!r} experts implementation")
    if hidden_states.dim() != 2 or top_k_index.dim() != 2 or top_k_index.shape != top_k_weights.shape \
            or top_k_index.shape[0] != hidden_states.shape[0]:
        raise ValueError(f"{type(module).__name__}: expected hidden_states (tokens, hidden) and top_k_index, "
                         f"top_k_weights (tokens, top_k); got {tuple(hidden_states.shape)}, "
                         f"{tuple(top_k_index.shape)}, {tuple(top_k_weights.shape)}")
    if top_k_index.dtype.is_floating_point or top_k_index.dtype.is_complex or top_k_index.dtype == torch.bool:
        raise TypeError(f"{type(module).__name__}: top_k_index must hold integers (expert ids), got "
                        f"{top_k_index.dtype}")
    num_tokens, hidden = hidden_states.shape
    top_k = top_k_index.shape[-1]
    expert_ids = top_k_index.reshape(-1).to(torch.int64)
    sorted_ids, perm = torch.sort(expert_ids, stable=True)  # rows grouped by expert, a token's order kept
    if sorted_ids.numel() and not torch.compiler.is_compiling():  # the ends of the sorted ids: one small host read
        low, high = sorted_ids[[0, -1]].tolist()              # (the grouped op reads the group sizes anyway)
        if low < 0 or high >= module.num_experts:
            raise ValueError(f"{type(module).__name__}: top_k_index holds expert id {low if low < 0 else high}; "
                             f"this {type(module).__name__} has {module.num_experts} experts (0 to "
                             f"{module.num_experts - 1})")
    source_rows = perm // top_k
    x = hidden_states[source_rows]
    # the adapted gate/up keeps (hidden_states, source_rows) for backward, not this top-k times larger copy
    gathered.remember(x, hidden_states, source_rows)
    # rows per expert, a static shape (torch.compile; there an id outside [0, experts) raises here)
    group_sizes = torch.zeros(module.num_experts, dtype=torch.int64, device=x.device).index_add_(
        0, sorted_ids, torch.ones_like(sorted_ids))
    up, down = projections(module)
    h = project(up, x, group_sizes)
    h = module._apply_gate(h) if module.has_gate else module.act_fn(h)
    y = project(down, h, group_sizes)
    if getattr(module, "has_post_expert_norm", False):
        y = module.post_expert_norm(y)
    y = y * top_k_weights.reshape(-1)[perm].unsqueeze(-1)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.shape[0], device=perm.device)
    return y[inverse].view(num_tokens, top_k, hidden).sum(dim=1).to(hidden_states.dtype)


def experts_forward(self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
    """The "fused_lora" experts implementation (transformers calls it as the experts module's forward): each
    projection with an adapter (`lora_experts[name]`) through its FusedLoRALinear (LoRA, or the base alone when
    merged or disabled), the others through the grouped op without LoRA."""
    adapters = adapters_of(self)

    def project(name: str, x: Tensor, group_sizes: Tensor) -> Tensor:
        if adapters is not None and name in adapters:
            return adapters[name](x, group_sizes=group_sizes)
        return _base_projection(self, name)(x, group_sizes)

    return grouped_experts(self, hidden_states, top_k_index, top_k_weights, project)


def register_experts_implementation() -> str:
    """Register `experts_forward` as "fused_lora" in transformers' ExpertsInterface (idempotent) and return the
    name: then `model.set_experts_implementation("fused_lora")`, or `from_pretrained(...,
    experts_implementation="fused_lora")`, computes any `@use_experts_implementation` class through the grouped
    op. get_lora_model and patch_peft register it themselves."""
    from transformers.integrations.moe import ExpertsInterface
    ExpertsInterface.register(EXPERTS_IMPLEMENTATION, experts_forward)
    return EXPERTS_IMPLEMENTATION


def _require_fused_lora(module: nn.Module, args) -> None:
    """Forward pre-hook of an adapted experts module: its adapters run only under "fused_lora"."""
    current = module.config._experts_implementation
    if current != EXPERTS_IMPLEMENTATION:
        raise RuntimeError(f"{type(module).__name__} holds fused_lora adapters (lora_experts), which only the "
                           f"{EXPERTS_IMPLEMENTATION!r} experts implementation computes, but its config now says "
                           f"{current!r} (the adapters would be ignored): set it back with "
                           f"model.set_experts_implementation({EXPERTS_IMPLEMENTATION!r}), or unload the adapters")


class Attachment:
    """What `attach` changed on one experts module, to undo it (`detach`)."""

    def __init__(self, module: nn.Module, previous_implementation, hook):
        self.module, self.previous_implementation, self.hook = module, previous_implementation, hook


def attach(module: nn.Module, layers: dict[str, FusedLoRALinear]) -> Attachment:
    """Give an experts module its adapters (`layers`: parameter name -> FusedLoRALinear over that stack, in the
    module's parameter order) and switch its config to the "fused_lora" implementation."""
    register_experts_implementation()
    module.add_module(ADAPTERS_ATTR, ExpertAdapters(layers))
    config = module.config
    previous = config._experts_implementation
    # the internal field: the property's setter would also overwrite sub-configs this module does not read
    config._experts_implementation_internal = EXPERTS_IMPLEMENTATION
    return Attachment(module, previous, module.register_forward_pre_hook(_require_fused_lora))


def detach(attachment: Attachment) -> None:
    """Take the adapters off (the stacks stay, merged or not) and put back the experts implementation the config
    had before `attach`. Modules of one model share a config: detach them in the reverse order of attaching."""
    module = attachment.module
    module._modules.pop(ADAPTERS_ATTR, None)
    attachment.hook.remove()
    module.config._experts_implementation_internal = attachment.previous_implementation
