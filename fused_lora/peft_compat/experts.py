"""peft's `target_parameters` on expert weights: which 3-D stacks a LoraConfig names, and the layout of their
adapters in peft's files.

Matching (peft's rule, `BaseTuner._inject_parameters`): a parameter `<module>.<name>` is targeted when an entry
equals it or is a dotted suffix of it ("mlp.experts.gate_up_proj" matches "model.layers.0.mlp.experts.gate_up_proj").
fused_lora adapts the two projections of a transformers experts module (`modules.experts`); any other parameter
a list names, an entry that matches nothing, and a stack of the wrong shape are errors naming them.

peft's file layout (`lora.ParamWrapper`): each targeted parameter is wrapped by one ParamWrapper, the wrappers
of one module nested in the order of the module's parameters (the first targeted one innermost), so the keys of
parameter i of the k targeted on module `m` are `m` + ".base_layer" x (k - 1 - i) + ".lora_A.weight" / ".lora_B.weight".
For E experts and rank r, lora_A is (r E, in) with expert e's A in rows e r .. e r + r - 1, and lora_B is
(out, r E) with column j E + e holding column j of expert e's B (peft reshapes it to (out, r, E)); ours are
lora_A (E, r, in) and lora_B (E, out, r).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..modules.experts import is_experts_module, projections, stack_problem
from .targets import dotted_suffixes

BASE_LAYER = ".base_layer"


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def expert_stack_names(model: nn.Module) -> list[str]:
    """Every expert projection of the model's experts modules, by full name (for error messages)."""
    return [f"{n}.{p}" for n, m in model.named_modules() if is_experts_module(m) for p in projections(m)
            if isinstance(getattr(m, p, None), Tensor)]


def _listing(model: nn.Module) -> str:
    names = expert_stack_names(model)
    return ("the model's expert stacks are: " + _few(names, 6)) if names else \
        "the model has no transformers experts module (an @use_experts_implementation class) to adapt"


def expert_targets(model: nn.Module, target_parameters: Optional[list]) -> dict[str, list[str]]:
    """{experts module name: [its targeted parameter names, in the module's parameter order]} for
    `target_parameters` (peft's matching); {} for none. ValueError naming an entry that matches no parameter,
    a parameter that is not an expert projection, or a stack whose shape does not fit its module."""
    if not target_parameters:
        return {}
    entries = set(target_parameters)
    found: dict[str, list[str]] = {}
    matched: set = set()
    refused: dict[str, list[str]] = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            key = f"{module_name}.{name}" if module_name else name
            hits = [s for s in dotted_suffixes(key) if s in entries]
            if not hits:
                continue
            matched.update(hits)
            if not module_name:
                reason = "a parameter of the top-level module (peft refuses it too)"
            elif not is_experts_module(module):
                reason = (f"a parameter of {type(module).__name__}, not of a transformers experts module; fused_lora "
                          "adapts expert stacks (an nn.Linear's weight is adapted with target_modules)")
            else:
                reason = stack_problem(module, name)
            if reason:
                refused.setdefault(reason, []).append(key)
            else:
                found.setdefault(module_name, []).append(name)
    unmatched = [e for e in target_parameters if e not in matched]
    if unmatched:
        raise ValueError(f"target_parameters entries {unmatched} match no parameter; {_listing(model)}")
    if refused:
        raise ValueError("target_parameters: cannot adapt " + "; ".join(f"{_few(keys)} ({reason})"
                                                                       for reason, keys in refused.items()))
    return found


def file_prefixes(targets: dict[str, list[str]]) -> dict[tuple[str, str], str]:
    """(experts module, parameter) -> the module path of its lora_A / lora_B in peft's files."""
    out = {}
    for module_name, names in targets.items():
        for i, name in enumerate(names):
            out[(module_name, name)] = module_name + BASE_LAYER * (len(names) - 1 - i)
    return out


def stack_features(model: nn.Module, module_name: str, name: str) -> tuple[int, int, int]:
    """(experts, in, out) of a (checked) expert stack."""
    module = model.get_submodule(module_name)
    w = getattr(module, name)
    E, a, b = w.shape
    return (E, a, b) if module.is_transposed else (E, b, a)


def file_shapes(model: nn.Module, module_name: str, name: str, r: int) -> tuple[torch.Size, torch.Size]:
    """peft's lora_A (r E, in) and lora_B (out, r E) shapes for an expert stack."""
    E, K, N = stack_features(model, module_name, name)
    return torch.Size((r * E, K)), torch.Size((N, r * E))


def to_peft_A(lora_A: Tensor) -> Tensor:
    """Our (E, r, in) as peft's (r E, in)."""
    return lora_A.reshape(-1, lora_A.shape[-1])


def to_peft_B(lora_B: Tensor) -> Tensor:
    """Our (E, out, r) as peft's (out, r E): column j E + e is expert e's column j."""
    E, N, r = lora_B.shape
    return lora_B.permute(1, 2, 0).reshape(N, r * E)


def from_peft_A(lora_A: Tensor, experts: int) -> Tensor:
    """peft's (r E, in) as our (E, r, in) (a view)."""
    return lora_A.view(experts, -1, lora_A.shape[-1])


def from_peft_B(lora_B: Tensor, experts: int) -> Tensor:
    """peft's (out, r E) as our (E, out, r) (a strided view)."""
    return lora_B.view(lora_B.shape[0], -1, experts).permute(2, 0, 1)
