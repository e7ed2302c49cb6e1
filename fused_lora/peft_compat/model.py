"""Adapting whole models: get_lora_model, LoraModel (peft's vocabulary) and modules_to_save.

The adapted layers are nn.Linear and transformers' Conv1D (GPT-2), as in peft. A LoraModel holds
one or several adapters (peft's add_adapter / load_adapter / set_adapter / delete_adapter, and
forward(adapter_names=[one per sample]) in eval and training) on the same target modules."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import inspect
import math
import os
import types
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from ..modules.adapter_range import range_problem
from ..modules import experts as experts_impl
from ..modules.bases import EXPERTS_NO_MIXED, ExpertStack
from ..modules.call_context import call_value, call_values
from ..modules.convert_bnb import base_compute_dtype, is_quantized_base
from ..modules.layer import BASE_ADAPTER, DEFAULT_ADAPTER, FusedLoRALinear
from ..modules.quantized import parameters_outside_quantized, quantized_parameter_count
from ..modules.validation import check_adapter_args, check_adapter_name
from . import weighted
from .adapters import load_adapter, load_extra_adapter, plan_save, write_adapter
from .config import LoraConfig
from .experts import expert_targets
from .targets import (check_dora_targets, find_modules_to_save, find_targets, is_adaptable, named_targets,
                      refuse_peft_moe_renames, target_spec)

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# transformers' names of a model's main input, whose first dimension is the batch
_MAIN_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features", "decoder_input_ids")


class ModulesToSave(nn.Module):
    """A module kept as it was (`original`) beside a trainable copy (`trainable`) that runs instead."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.trainable = copy.deepcopy(original)
        self.original.requires_grad_(False)
        self.trainable.requires_grad_(True)
        self.use_original = False  # disable_adapter(): the base model's module
        self.owner_active = True  # False while an adapter other than the copy's owner (the first) is active

    @property
    def sample_uses_trainable(self) -> Optional[list[bool]]:
        """Per sample, whether it runs the trainable copy, during an adapter_names call of the LoraModel
        in this thread (each thread's call has its own); None outside one."""
        return call_value(self)

    def forward(self, *args, **kwargs):
        mask = self.sample_uses_trainable
        if mask is None:  # one adapter for the whole batch: the copy serves its owner only (peft's rule)
            return (self.original if self.use_original or not self.owner_active else self.trainable)(*args, **kwargs)
        if self.use_original or all(mask) or not any(mask):
            return (self.original if self.use_original or not any(mask) else self.trainable)(*args, **kwargs)
        # A mixed batch (peft's rule): samples of the adapter owning this copy use it, others the original.
        new, old = self.trainable(*args, **kwargs), self.original(*args, **kwargs)
        if not isinstance(new, torch.Tensor) or new.dim() == 0 or new.shape[0] != len(mask):
            raise ValueError(f"adapter_names: {type(self.original).__name__} in modules_to_save does not return a "
                             f"tensor with one row per sample ({len(mask)}), so it cannot serve a mixed batch")
        keep = torch.tensor(mask, device=new.device).view(-1, *([1] * (new.dim() - 1)))
        return torch.where(keep, new, old)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class _Undo:
    """What adapting a model changes (submodules, adapters attached to experts modules, requires_grad flags,
    train/eval), to put back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        self.replaced: list[tuple[str, nn.Module]] = []
        self.attached: list = []  # modules.experts.Attachment, in the order made

    def set_submodule(self, name: str, module: nn.Module) -> None:
        self.replaced.append((name, self.model.get_submodule(name)))
        _set_submodule(self.model, name, module)

    def attach(self, module: nn.Module, layers: dict) -> None:
        self.attached.append(experts_impl.attach(module, layers))

    def detach_experts(self) -> None:
        """Take the expert adapters off (in reverse: the modules share their model's config) and put the
        experts implementation back."""
        for attachment in reversed(self.attached):
            experts_impl.detach(attachment)
        self.attached.clear()

    def restore(self) -> None:
        self.detach_experts()
        for name, original in reversed(self.replaced):
            _set_submodule(self.model, name, original)
        self.replaced.clear()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, training in self.training:
            m.training = training


def refuse_adapted(model: nn.Module) -> None:
    """A model that already holds LoRA layers (ours or peft's) is not adapted again: nesting a second
    adapter would save files that load as neither."""
    for name, m in model.named_modules():
        if isinstance(m, (LoraModel, FusedLoRALinear, ModulesToSave)) or type(m).__module__.startswith("peft."):
            where = f"module {name!r}" if name else "the model itself"
            raise ValueError(f"the model already holds LoRA adapters ({where} is a {type(m).__name__}): adapt the "
                             "base model once (a peft model: fused_lora.patch_peft(model) runs it fused); "
                             "more adapters go on the same LoraModel with add_adapter or load_adapter")



def _check_expert_config(config: LoraConfig) -> None:
    """What fused_lora does not compute on expert stacks (peft's ParamWrapper refuses DoRA and lora_bias too; its
    refusal of dropout is lifted here: fused_lora's extension)."""
    if config.use_dora:
        raise ValueError("target_parameters with use_dora=True: DoRA on expert weights is not implemented (peft's "
                         "ParamWrapper refuses it too)")
    if config.bias != "none":
        raise ValueError(f"target_parameters with bias={config.bias!r}: training biases beside expert stacks is not "
                         "implemented; use bias='none'")
    if config.lora_dropout > 0:  # said now, not first when the trained adapter is saved
        warnings.warn(f"lora_dropout={config.lora_dropout} on expert stacks (target_parameters) trains (fused_lora's "
                      f"extension), but peft refuses such a config, so save_pretrained refuses to write this adapter "
                      f"in peft's format; its error says how to save the trained weights for peft", stacklevel=4)


def _slot_of(adapter_name: str, first: str) -> str:
    """The layers' name for a model's adapter: the first adapter lives in the layers' "default" slot
    (so a one-adapter model keeps its keys), every other under its own name."""
    return DEFAULT_ADAPTER if adapter_name == first else adapter_name


def _as_lora_config(config, what: str) -> LoraConfig:
    """A fused_lora LoraConfig (a copy), from ours or from peft's (read as its adapter_config.json would be)."""
    if isinstance(config, LoraConfig):
        return copy.deepcopy(config)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        raise TypeError(f"{what}: expected a LoraConfig (fused_lora's or peft's), got {type(config).__name__}")
    d = to_dict()
    if isinstance(d.get("target_modules"), (set, frozenset)):
        d["target_modules"] = sorted(d["target_modules"])
    return LoraConfig.from_peft_dict(d)


class LoraModel(nn.Module):
    """A model whose targeted nn.Linear (and transformers Conv1D) layers are FusedLoRALinear. Build it
    with `get_lora_model`.

    Forward is the wrapped model's forward, with its signature (so transformers' Trainer sees the
    model's argument names). Only the adapters (and modules_to_save copies, and biases when
    config.bias says so) are trainable. Unknown attributes are looked up on the model.

    peft's vocabulary: `peft_config` maps the adapter's name ("default") to its LoraConfig,
    `active_adapter` / `active_adapters` name it, `base_model.model` and `get_base_model()` are the
    wrapped model.

    Several adapters (peft's API): `add_adapter(name, config)`, `load_adapter(directory, name)`,
    `set_adapter(name)`, `delete_adapter(name)`; every adapter targets the same modules as the first
    (each with its own r, lora_alpha, lora_dropout, use_rslora); modules_to_save and trained biases
    belong to the first adapter only. `forward(..., adapter_names=[one name per sample])` ("__base__"
    for none) mixes adapters in one batch, in eval and in training (each adapter's gradients from
    its own samples only).
    """

    def __init__(self, model: nn.Module, config: LoraConfig, autocast_adapter_dtype: bool = True,
                 targets: Optional[list[str]] = None, adapter_name: str = "default"):
        """`config`: a fused_lora or peft LoraConfig (as get_lora_model). `targets`: the module names to
        adapt when already known (loading takes them from the weights file); by default
        `config.target_modules` (or peft's default for the model type) is matched against the model.
        `adapter_name`: the key of `peft_config` (peft's "default")."""
        super().__init__()
        check_adapter_name(adapter_name, "LoraModel")
        # Every check that can fail runs before the model is touched: nothing is half-applied.
        if not isinstance(config, LoraConfig):  # peft's LoraConfig, read as its adapter_config.json would be
            config = _as_lora_config(config, "LoraModel")
        refuse_adapted(model)
        config.validate()
        check_adapter_args(config.r, config.lora_dropout, config.init_lora_weights, config.backend,
                           config.lora_alpha, config.use_rslora)
        target_modules = config.target_modules
        stacks = expert_targets(model, config.target_parameters)  # a list of names, matched as peft does
        if targets is None:
            targets = find_targets(model, config)
            target_modules = target_spec(model, config)  # peft's default for the model type when None
        if config.use_dora:
            check_dora_targets(model, targets)
        if stacks:
            _check_expert_config(config)
        to_save = find_modules_to_save(model, config)
        clash = [n for n in [*targets, *stacks] if any(n == s or n.startswith(s + ".") for s in to_save)]
        if clash:
            raise ValueError(f"modules {clash} are both LoRA targets and (inside) modules_to_save")
        frozen = [f"{n}.{sub}".rstrip(".") for n in to_save
                  for sub, m in model.get_submodule(n).named_modules() if is_quantized_base(m)]
        if frozen:
            raise ValueError(f"modules_to_save: {frozen} are quantized layers, whose packed weights cannot be "
                             "trained (a trainable copy would silently train nothing); leave them out, or keep "
                             "them unquantized (quantize_model(..., exclude_modules=...))")
        self.model = model
        self.active_adapter = adapter_name
        self.first_adapter = adapter_name  # held in the layers' "default" slot
        self.peft_config = {adapter_name: config}  # keyed by adapter name, as peft's is
        self._removed_by: Optional[str] = None  # what removed the adapters, once they are gone
        self._undo = _Undo(model)
        try:
            self._inject(targets, to_save, autocast_adapter_dtype, stacks)
        except BaseException:
            self._undo.restore()
            raise
        config.target_modules = target_modules  # as peft records the default it took
        self.expose_forward_signature()

    def _inject(self, targets: list[str], to_save: list[str], autocast_adapter_dtype: bool,
                stacks: dict[str, list[str]]) -> None:
        model, config = self.model, self.active_peft_config
        model.requires_grad_(False)
        fan_in_fan_out = config.fan_in_fan_out

        def adapted(base):
            base_dtype = base.weight.dtype if isinstance(base, ExpertStack) else base_compute_dtype(base)
            dtype = torch.float32 if autocast_adapter_dtype and base_dtype in _LOW_PRECISION else None
            return FusedLoRALinear.from_linear(
                base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                backend=config.backend, adapter_dtype=dtype, use_dora=config.use_dora)

        for module_name, names in stacks.items():  # an experts module keeps its place; its adapters sit beside it
            module = model.get_submodule(module_name)
            self._undo.attach(module, {n: adapted(experts_impl.stack_of(module, n)) for n in names})
        for name in targets:
            base = model.get_submodule(name)
            layer = adapted(base)
            if layer.fan_in_fan_out != fan_in_fan_out:  # peft's rule: the base layer's kind decides, with a warning
                warnings.warn(f"fan_in_fan_out is set to {fan_in_fan_out} but the target module {name!r} is "
                              f"`{type(base).__name__}`. Setting fan_in_fan_out to {layer.fan_in_fan_out}.",
                              stacklevel=4)
                fan_in_fan_out = layer.fan_in_fan_out
            if config.bias == "lora_only" and layer.bias is not None:
                layer.bias.requires_grad_(True)
            self._undo.set_submodule(name, layer)
        if config.bias == "all":
            for n, p in model.named_parameters():
                if n.endswith("bias"):
                    p.requires_grad_(True)
        for name in to_save:
            self._undo.set_submodule(name, ModulesToSave(model.get_submodule(name)))
        if config.inference_mode:  # peft's meaning: the adapter is built frozen
            model.requires_grad_(False)
        config.fan_in_fan_out = fan_in_fan_out  # as peft records it, so the saved config says what ran

    def expose_forward_signature(self) -> None:
        """Give this instance a forward whose signature is the wrapped model's: transformers' Trainer
        keeps only the batch columns the forward names (and finds labels by name)."""
        try:
            sig = inspect.signature(self.model.forward)
            self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
            sig = sig.replace(parameters=[self_param, *sig.parameters.values()])
        except (TypeError, ValueError):  # no signature, or a parameter named "self": keep *args, **kwargs
            return
        fn = LoraModel.forward
        own = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
        own.__signature__ = sig
        own.__doc__ = getattr(self.model.forward, "__doc__", None)
        own.__qualname__ = fn.__qualname__
        # A bound method in the instance's __dict__: deepcopy rebinds it to the copy.
        self.__dict__["forward"] = types.MethodType(own, self)

    def __getstate__(self):  # pickling, deepcopy: the per-instance forward is rebuilt on the copy
        state = dict(super().__getstate__())
        state.pop("forward", None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self.expose_forward_signature()

    # A model that already holds LoRA layers is not adapted again (used by the adapter loader too)
    refuse_adapted = staticmethod(refuse_adapted)

    @property
    def active_peft_config(self) -> LoraConfig:
        """The LoraConfig of the adapter (peft's name)."""
        return self.peft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        """[the active adapter's name] (peft's property)."""
        return [self.active_adapter]

    @property
    def base_model(self) -> "LoraModel":
        """peft's meaning: the object holding the adapted model as `.model` (so `base_model.model.<name>`
        is a module's name in adapter files). The adapted model itself: `get_base_model()`."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped (adapted) model, as peft's `PeftModel.get_base_model()`."""
        return self.model

    # ---------------------------------------------------------------- several adapters

    def slot(self, adapter_name: str) -> str:
        """The layers' name for this model's adapter (`first_adapter` lives in their "default" slot)."""
        return _slot_of(adapter_name, self.first_adapter)

    def _require_adapter(self, adapter_name, what: str) -> None:
        if not isinstance(adapter_name, str) or adapter_name not in self.peft_config:
            raise ValueError(f"{what}: no adapter named {adapter_name!r}; this model has "
                             f"{', '.join(map(repr, self.peft_config))}")

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        """Make `adapter_name` the active adapter (peft's PeftModel.set_adapter: one name; a one-name
        list is accepted). It becomes trainable unless `inference_mode` (as in peft, also when it was
        loaded frozen), the others are frozen. An unknown name raises ValueError, nothing changed."""
        if isinstance(adapter_name, (list, tuple)):
            if len(adapter_name) != 1:
                raise ValueError(f"set_adapter: one active adapter at a time (peft's PeftModel), got {adapter_name!r}")
            adapter_name = adapter_name[0]
        self._require_adapter(adapter_name, "set_adapter")
        self._require_layers("set_adapter")
        for _, layer in self.lora_layers():
            layer.set_adapter(self.slot(adapter_name), inference_mode=inference_mode)
        owner = adapter_name == self.first_adapter
        for _, m in self.saved_modules():  # the copies belong to the first adapter: another runs the original
            m.owner_active = owner
            m.trainable.requires_grad_(owner and not inference_mode)
        self.active_adapter = adapter_name

    def _check_new_name(self, adapter_name, what: str) -> None:
        check_adapter_name(adapter_name, what)
        if adapter_name in self.peft_config:
            raise ValueError(f"{what}: an adapter named {adapter_name!r} already exists (delete_adapter it first)")
        if adapter_name == DEFAULT_ADAPTER and self.first_adapter != DEFAULT_ADAPTER:
            raise ValueError(f"{what}: {DEFAULT_ADAPTER!r} names the first adapter's slot, held by "
                             f"{self.first_adapter!r} here; choose another name")

    def check_new_config(self, config: LoraConfig, what: str, targets: Optional[list] = None) -> None:
        """An added adapter must target exactly the first adapter's modules and carry no modules_to_save
        or trained biases (fused_lora's limits; peft allows other targets). `targets`: the module names an
        adapter file's keys adapt, when it comes from one; the config's target_modules is then not matched
        against module names (a downloaded regex must not be able to stall loading)."""
        config.validate()
        check_adapter_args(config.r, config.lora_dropout, config.init_lora_weights, config.backend,
                           config.lora_alpha, config.use_rslora)
        if config.use_dora:
            raise ValueError(f"{what}: use_dora=True: in fused_lora only the first adapter of a model can be a DoRA "
                             "adapter (a further one is refused)")
        ours = sorted(n for n, _ in self.linear_layers())
        if targets is None:
            refuse_peft_moe_renames(self.model, config)
            inside = tuple(f"{n}.{experts_impl.ADAPTERS_ATTR}." for n in self.expert_modules())
            targets = [n for n in named_targets(self.model, config, adaptable=lambda m: (
                isinstance(m, FusedLoRALinear) and not m.base_kind.grouped) or is_adaptable(m))
                if not n.startswith(inside)]
        theirs = sorted(targets)
        if theirs != ours:
            raise ValueError(f"{what}: fused_lora adds adapters only on the modules the first adapter targets "
                             f"({len(ours)} modules, e.g. {ours[:3]}); the new adapter adapts "
                             f"{len(theirs)} modules (e.g. {theirs[:3]})")
        ours_stacks = sorted((m, p) for m, p, _ in self.expert_layers())
        theirs_stacks = sorted((m, p) for m, names in expert_targets(self.model, config.target_parameters).items()
                               for p in names)
        if theirs_stacks != ours_stacks:  # peft's rule for target_parameters too
            raise ValueError(f"{what}: every adapter targets the same parameters (peft's rule for target_parameters): "
                             f"the first adapts {len(ours_stacks)} expert stacks (e.g. "
                             f"{['.'.join(t) for t in ours_stacks[:2]]}), the new one {len(theirs_stacks)} (e.g. "
                             f"{['.'.join(t) for t in theirs_stacks[:2]]})")
        if config.modules_to_save:
            raise ValueError(f"{what}: modules_to_save belong to the first adapter only in fused_lora; "
                             f"got {config.modules_to_save!r}")
        if config.bias != "none":
            raise ValueError(f"{what}: bias={config.bias!r}: trained biases belong to the first adapter only "
                             "in fused_lora; use bias='none'")

    def _require_layers(self, what: str) -> None:
        if self._removed_by is not None:
            raise RuntimeError(f"{what}: this LoraModel has no LoRA layers any more ({self._removed_by})")

    def add_adapter(self, adapter_name: str, peft_config, low_cpu_mem_usage: bool = False,
                    autocast_adapter_dtype: bool = True) -> None:
        """Add a new (untrained) adapter `adapter_name` built as `peft_config` says (peft's meaning): it
        is not made active and is frozen until `set_adapter` chooses it (or `set_requires_grad`).

        `peft_config` is a fused_lora or peft LoraConfig (copied); it must target the same modules as
        the first adapter. The new weights take the dtype and device of the active adapter's;
        `low_cpu_mem_usage` and `autocast_adapter_dtype` are accepted for peft's signature and change
        nothing. Any error (ValueError) leaves the model unchanged."""
        what = f"add_adapter({adapter_name!r})"
        self.add_checked_adapter(adapter_name, _as_lora_config(peft_config, what), what)

    def add_checked_adapter(self, adapter_name: str, config: LoraConfig, what: str,
                            targets: Optional[list] = None) -> None:
        """Add an adapter from a fused_lora LoraConfig after every check (`what` names the caller in errors;
        the adapter loader adds file adapters this way)."""
        self._require_layers(what)
        self._check_new_name(adapter_name, what)
        self.check_new_config(config, what, targets)
        layers = [layer for _, layer in self.lora_layers()]
        for layer in layers:  # every check first: nothing is half-applied
            layer.check_new_adapter(adapter_name, config.r, config.lora_alpha, config.lora_dropout,
                                     config.use_rslora, config.init_lora_weights)
        try:
            for layer in layers:
                layer.add_adapter(adapter_name, r=config.r, lora_alpha=config.lora_alpha,
                                  lora_dropout=config.lora_dropout, use_rslora=config.use_rslora,
                                  init_lora_weights=config.init_lora_weights)
        except BaseException:
            for layer in layers:
                if adapter_name in layer.available_adapters:
                    layer.delete_adapter(adapter_name)
            raise
        config.fan_in_fan_out = self.active_peft_config.fan_in_fan_out  # the layers' kinds decide
        if targets is None:  # as peft records the default it took when there was no target_modules
            config.target_modules = target_spec(self.model, config)
        self.peft_config[adapter_name] = config

    @torch.no_grad()
    def add_weighted_adapter(self, adapters: list[str], weights: list[float], adapter_name: str,
                             combination_type: str = "svd", svd_rank: Optional[int] = None,
                             svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
                             svd_driver: Optional[str] = None, density: Optional[float] = None,
                             majority_sign_method: str = "total") -> None:
        """Add `adapter_name`, a weighted combination of `adapters` (peft's method and math, see
        fused_lora/weighted.py): combination_type "linear" (equal ranks; sqrt of |weight * scale| on
        each factor), "cat" (rank = the sum of ranks, exact) or "svd" (rank `svd_rank`, default the
        largest rank; `svd_clamp` a quantile). With one adapter, "linear" is used (peft's rule). The new
        adapter has its first source's config with r = lora_alpha = the new rank, and is frozen and
        not active, as in peft.

        Differences from peft: an existing `adapter_name` raises ValueError (peft returns silently);
        the TIES / DARE / magnitude-prune types raise NotImplementedError; modules_to_save are not
        copied to the new adapter. Errors leave the model unchanged."""
        what = f"add_weighted_adapter({adapter_name!r})"
        self._require_layers(what)
        if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
            raise TypeError(f"{what}: adapters must be a non-empty list of adapter names")
        for name in adapters:
            self._require_adapter(name, what)
        if any(self.peft_config[n].use_dora for n in adapters):
            raise NotImplementedError(f"{what}: combining DoRA adapters (use_dora=True) is not supported")
        if isinstance(weights, (str, bytes)) or len(weights) != len(adapters):
            raise ValueError(f"{what}: {len(adapters)} adapters need {len(adapters)} weights, got {weights!r}")
        try:
            weights = [float(w) for w in weights]
        except OverflowError:
            raise ValueError(f"{what}: weights must be finite, got an integer beyond any float") from None
        if not all(map(math.isfinite, weights)):
            raise ValueError(f"{what}: weights must be finite, got {weights}")
        self._check_new_name(adapter_name, what)
        if any(True for _ in self.expert_layers()):
            raise ValueError(f"{what}: combining adapters on expert stacks (target_parameters) is not supported (peft's "
                             "add_weighted_adapter refuses target_parameters too)")
        if combination_type not in weighted.COMBINATION_TYPES + weighted.PEFT_ONLY_TYPES:  # as peft words it
            raise ValueError(f"{what}: Invalid combination_type: {combination_type!r} (one of "
                             f"{', '.join(weighted.COMBINATION_TYPES)})")
        if combination_type not in weighted.COMBINATION_TYPES:
            raise NotImplementedError(f"{what}: combination_type={combination_type!r} is not supported by fused_lora "
                                      f"(one of {', '.join(weighted.COMBINATION_TYPES)}); use peft for the others")
        if len(adapters) == 1:
            combination_type = "linear"
        ranks = [self.peft_config[n].r for n in adapters]
        rank = weighted.new_rank(combination_type, ranks, svd_rank)
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank < 1):
            raise ValueError(f"{what}: svd_rank must be a positive int, got {svd_rank!r}")
        layers = list(self.lora_layers())
        if combination_type == "svd":
            small = [n for n, layer in layers if rank > min(layer.in_features, layer.out_features)]
            if small:
                raise ValueError(f"{what}: rank {rank} exceeds min(in_features, out_features) of {small[0]!r}")
        if svd_clamp is not None and not 0.0 <= float(svd_clamp) <= 1.0:
            raise ValueError(f"{what}: svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
        source = self.peft_config[adapters[0]]
        config = dataclasses.replace(source, r=rank, lora_alpha=rank, bias="none", inference_mode=False,
                                     init_lora_weights=True)
        config.modules_to_save = None  # after construction: a task_type's heads would be put back by it
        # every layer's result first (an SVD can fail): nothing is added unless all succeed
        slots = [self.slot(n) for n in adapters]
        results = []
        for _, layer in layers:
            loras = [(*layer.adapter_weights(s), layer.adapter_settings(s).scaling) for s in slots]
            results.append(weighted.combine(combination_type, loras, weights, rank, svd_clamp, svd_full_matrices,
                                            svd_driver))
        self.add_checked_adapter(adapter_name, config, what)
        self.peft_config[adapter_name].init_lora_weights = source.init_lora_weights
        slot = self.slot(adapter_name)
        try:  # every layer's result checked in the new adapter's dtype, and against the compute dtype, first
            staged = [self._combined(what, name, layer, slot, A, B) for (name, layer), (A, B) in zip(layers, results)]
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
        for lora_A, lora_B, A, B in staged:
            lora_A.copy_(A)
            lora_B.copy_(B)

    @staticmethod
    def _combined(what: str, name: str, layer, slot: str, A, B) -> tuple:
        """(the new adapter's lora_A, lora_B, and the combination's A, B in their dtype) of one layer; ValueError
        naming the layer where the combination does not fit the adapter's dtype (finite weights can take it
        beyond float16's range) or the dtype the layer computes in (`modules.adapter_range`), as the loader
        refuses a file's values."""
        lora_A, lora_B = layer.adapter_weights(slot)
        A, B = A.to(lora_A.dtype), B.to(lora_B.dtype)
        for label, t in (("lora_A", A), ("lora_B", B)):
            if not bool(torch.isfinite(t).all()):
                raise ValueError(f"{what}: layer {name!r}: the combined {label} has NaN or inf in {t.dtype} (the "
                                 f"weights take it beyond that dtype's range); nothing was added")
        problem = range_problem(A, B, layer.adapter_settings(slot).scaling, layer.weight.dtype)
        if problem is not None:
            raise ValueError(f"{what}: layer {name!r}: the combined adapter's {problem}, the dtype the layer computes "
                             f"its LoRA branch in; nothing was added")
        return lora_A, lora_B, A, B

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        """Enable (or disable) gradients of the named adapters' weights (peft's PeftModel method)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for name in names:
            self._require_adapter(name, "set_requires_grad")
        for _, layer in self.lora_layers():
            layer.set_requires_grad([self.slot(n) for n in names], requires_grad)

    def load_adapter(self, model_id, adapter_name: str, is_trainable: bool = False, torch_device=None,
                     autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False, **kwargs) -> None:
        """Load the adapter saved in directory `model_id` (by fused_lora or peft) as `adapter_name`
        (peft's PeftModel.load_adapter): not made active; trainable only with `is_trainable`. It must
        target this model's adapted modules; every key and shape is checked first (AdapterError) and
        on any error the model is unchanged. Without `is_trainable` the model is put in eval mode, as
        peft's load_adapter does (its dropout off)."""
        if kwargs:
            raise TypeError(f"load_adapter: unsupported arguments {sorted(kwargs)}")
        what = f"load_adapter({str(model_id)!r}, {adapter_name!r})"
        self._require_layers(what)
        self._check_new_name(adapter_name, what)
        load_extra_adapter(self, model_id, adapter_name, is_trainable)
        if not is_trainable:
            self.eval()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter `adapter_name` from every layer and from peft_config. The active adapter
        and the first adapter (whose slot holds modules_to_save and the saved top-level weights)
        cannot be deleted: ValueError, nothing changed; `set_adapter` another first."""
        self._require_adapter(adapter_name, "delete_adapter")
        self._require_layers("delete_adapter")
        if adapter_name == self.active_adapter:
            raise ValueError(f"delete_adapter: {adapter_name!r} is the active adapter; set_adapter(...) another "
                             "one first")
        if adapter_name == self.first_adapter:
            raise ValueError(f"delete_adapter: {adapter_name!r} is the model's first adapter (it holds the "
                             "modules_to_save and the top-level weights); fused_lora cannot delete it")
        layers = [layer for _, layer in self.lora_layers()]
        merged = [layer for layer in layers if adapter_name in layer.merged_adapters]
        if merged:
            raise ValueError(f"delete_adapter: {adapter_name!r} is merged into the weights; unmerge first")
        for layer in layers:
            layer.delete_adapter(adapter_name)
        del self.peft_config[adapter_name]

    # transformers' own adapter methods (PeftAdapterMixin) would answer "The version of PEFT you are
    # using is not compatible": say what to use instead.
    def enable_adapters(self):
        """Not supported (NotImplementedError): the adapter is on unless inside `disable_adapter()`."""
        raise NotImplementedError("enable_adapters(): transformers' adapter API does not apply to a LoraModel; its "
                                  "adapter is on, except within `with lora_model.disable_adapter():`")

    def disable_adapters(self):
        """Not supported (NotImplementedError): use `with lora_model.disable_adapter():`."""
        raise NotImplementedError("disable_adapters(): transformers' adapter API does not apply to a LoraModel; "
                                  "use `with lora_model.disable_adapter():` (peft's name)")

    def get_adapter_state_dict(self, *args, **kwargs):
        """Not supported (NotImplementedError): `save_pretrained` writes the adapter's tensors."""
        raise NotImplementedError("get_adapter_state_dict(): transformers' adapter API does not apply to a "
                                  "LoraModel; save_pretrained(directory) writes the adapter's tensors")

    def restore_base(self) -> None:
        """Put the model back exactly as it was before adaptation (modules, requires_grad, train mode);
        used when loading fails after injection."""
        self._undo.restore()
        self._removed_by = "a failed load undid them"

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("model"), name)

    def forward(self, *args, **kwargs):
        """The wrapped model's forward (each instance carries that model's signature).

        `adapter_names` (peft's argument): one adapter name per sample ("__base__" for none); each
        sample then runs with its own adapter, in eval and in training mode."""
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return self.model(*args, **kwargs)
        with self._adapter_names_call(adapter_names, args, kwargs):
            return self.model(*args, **kwargs)

    def generate(self, *args, **kwargs):
        """The wrapped model's generate; `adapter_names` (one per sample) as in forward (peft's meaning)."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise AttributeError(f"{type(self.model).__name__} has no generate()")
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            return generate(*args, **kwargs)
        with self._adapter_names_call(adapter_names, args, kwargs):
            return generate(*args, **kwargs)

    @staticmethod
    def _batch_size(args, kwargs) -> Optional[int]:
        """The batch size of the call: the first dimension of its main input (a transformers model's
        input_ids, inputs_embeds, ...), else of its first tensor argument (a keyword such as
        position_ids, of batch 1, may come first)."""
        main = [kwargs[k] for k in _MAIN_INPUTS if k in kwargs]
        for v in (*args, *main, *kwargs.values()):
            if isinstance(v, torch.Tensor) and v.dim() >= 1:
                return v.shape[0]
        return None

    @contextlib.contextmanager
    def _adapter_names_call(self, adapter_names, args, kwargs):
        """Within the block, in this thread, every LoRA layer receives `adapter_names` (mapped to its slots)
        and every modules_to_save copy its per-sample mask. Names and length are checked here, before
        anything runs."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, (list, tuple)) \
                or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError("adapter_names must be a list of adapter names (str), one per sample")
        self._require_layers("forward(adapter_names=...)")
        if any(True for _ in self.expert_layers()):
            raise ValueError(f"forward(adapter_names=...): {EXPERTS_NO_MIXED}")
        unknown = sorted(set(adapter_names) - set(self.peft_config) - {BASE_ADAPTER})
        if unknown:
            raise ValueError(f"adapter_names: unknown adapter name(s) {', '.join(map(repr, unknown))}; this model "
                             f"has {', '.join(map(repr, self.peft_config))} (and {BASE_ADAPTER!r} for none)")
        batch = self._batch_size(args, kwargs)
        if batch is not None and len(adapter_names) != batch:
            raise ValueError(f"adapter_names has {len(adapter_names)} names for a batch of {batch} samples: "
                             "expected one per sample")
        num_beams = kwargs.get("num_beams")
        if isinstance(num_beams, int) and num_beams > 1:
            if getattr(getattr(self.model, "config", None), "is_encoder_decoder", False):
                raise NotImplementedError("generate(adapter_names=..., num_beams > 1) on an encoder-decoder model "
                                          "is not supported by fused_lora")
            # peft's rule: beam search repeats each input num_beams times
            adapter_names = [n for n in adapter_names for _ in range(num_beams)]
        slots = [n if n == BASE_ADAPTER else self.slot(n) for n in adapter_names]

        # The names reach the layers through a per-thread record for the call (fused_lora.modules.layer.call_values),
        # not forward pre-hooks (peft's way: dynamo cannot trace registering hooks, so torch.compile(fullgraph=
        # True) could not take adapter_names) nor attributes of the layers (shared by every thread).
        values = {layer: slots for _, layer in self.lora_layers()}
        mask = [n == self.first_adapter for n in adapter_names]  # modules_to_save belong to the first adapter
        values.update((m, mask) for _, m in self.saved_modules())
        with call_values(values):
            yield

    # ---------------------------------------------------------------- inspection

    def lora_layers(self) -> Iterator[tuple[str, FusedLoRALinear]]:
        """Every adapted layer, by module name: over nn.Linear / Conv1D bases and over expert stacks (these are
        `<experts module>.lora_experts.<parameter>`)."""
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, FusedLoRALinear))

    def linear_layers(self) -> Iterator[tuple[str, FusedLoRALinear]]:
        """The adapted layers that replaced a module (nn.Linear, Conv1D, a quantized Linear)."""
        return ((n, m) for n, m in self.lora_layers() if not m.base_kind.grouped)

    def expert_modules(self) -> list[str]:
        """The names of the experts modules holding adapters, in the model's order."""
        return [n for n, m in self.model.named_modules() if experts_impl.adapters_of(m) is not None]

    def expert_layers(self) -> Iterator[tuple[str, str, FusedLoRALinear]]:
        """(experts module name, parameter name, its layer) for every adapted expert stack, in the model's order and
        each module's parameter order."""
        for name in self.expert_modules():
            for param, layer in experts_impl.adapters_of(self.model.get_submodule(name)).items():
                yield name, param, layer

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSave))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as peft counts them (modules_to_save count twice)."""
        trainable = total = 0
        for p in parameters_outside_quantized(self.model):
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        # frozen quantized weights (packed buffers, or Parameters held for FSDP2): N x K each, as peft counts them
        total += quantized_parameter_count(self.model)
        return trainable, total

    def print_trainable_parameters(self) -> None:
        """Prints peft's line: 'trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808'."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # ---------------------------------------------------------------- adapter on / off / away

    @contextlib.contextmanager
    def disable_adapter(self):
        """Within the block the model computes as its base: adapters off, original modules_to_save."""
        with contextlib.ExitStack() as stack:
            for _, layer in self.lora_layers():
                stack.enter_context(layer.disable_adapter())
            saved = list(self.saved_modules())
            for _, m in saved:
                m.use_original = True
            try:
                yield self
            finally:
                for _, m in saved:
                    m.use_original = False

    def _replace_all(self, merge: bool, safe_merge: bool = False, adapter_names=None) -> nn.Module:
        layers = list(self.lora_layers())
        # Bases that cannot merge in place (quantized): their 16-bit merged layers (merge) or their own layers
        # (unload) are built before anything changes; the others merge in place as before.
        rebuilt = {name: (layer.base_kind.to_linear(layer, safe_merge, adapter_names) if merge
                          else layer.base_kind.unloaded(layer))
                   for name, layer in layers if not layer.base_kind.merges_in_place}
        layers = [(name, layer) for name, layer in layers if layer.base_kind.merges_in_place]
        if merge:
            self._merge_all(layers, safe_merge, adapter_names)
        else:  # every unmerge (which can refuse) before any layer is swapped: no half-unloaded model
            for _, layer in layers:
                if layer.merged:
                    layer.unmerge()
        for name, layer in layers:
            if not layer.base_kind.grouped:  # expert stacks stay in their module: their adapters are taken off below
                _set_submodule(self.model, name, layer.base_kind.unloaded(layer))  # the very same tensors, no copy
        self._undo.detach_experts()  # and the experts implementation the model had
        for name, new in rebuilt.items():
            _set_submodule(self.model, name, new)
        for name, m in list(self.saved_modules()):
            # peft keeps the trained copy, merged or not, when its adapter (the first) is active; with another
            # active adapter the model ran the original module, and keeps that (peft's rule)
            _set_submodule(self.model, name, m.trainable if m.owner_active else m.original)
        self._removed_by = "merge_and_unload() removed them" if merge else "unload() removed them"
        return self.model

    @staticmethod
    def _merge_all(layers, safe_merge: bool, adapter_names=None) -> None:
        """Merge every layer in place. With safe_merge every merged weight is checked before any is
        written, so a refusal leaves every weight exactly as it was; should a merge fail otherwise,
        the layers merged here are unmerged (to rounding) and the error re-raised."""
        if safe_merge:
            for name, layer in layers:
                if not layer.merged:
                    layer.check_merge(f"merge_and_unload(safe_merge=True): layer {name!r}", adapter_names)
        done = []
        try:
            for _, layer in layers:
                if not layer.merged:
                    layer.merge(safe_merge=safe_merge, adapter_names=adapter_names)
                    done.append(layer)
        except BaseException:
            for layer in reversed(done):
                layer.unmerge()
            raise

    def _adapter_slots(self, adapter_names, what: str) -> Optional[list[str]]:
        """The layers' slots of `adapter_names` (None: the active adapter), each name checked first."""
        if adapter_names is None:
            return None
        if isinstance(adapter_names, str):
            raise TypeError(f"{what}: adapter_names is a list of adapter names")
        for name in adapter_names:
            self._require_adapter(name, what)
        return [self.slot(n) for n in adapter_names]

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        """peft's merge_adapter: fold the active adapter (or `adapter_names`, their deltas summed) into every
        adapted layer's base weight in place; the layers stay LoRA layers, `unmerge_adapter()` takes the delta out
        again. With `safe_merge` every merged weight is checked to be finite before any is written. An unknown
        name, or a quantized base (which cannot merge in place: `merge_and_unload` builds 16-bit layers), raises
        ValueError with nothing changed. Adapters already merged into a layer warn and are skipped there."""
        what = "merge_adapter(safe_merge=True)" if safe_merge else "merge_adapter"
        slots = self._adapter_slots(adapter_names, "merge_adapter")
        layers = list(self.lora_layers())
        for name, layer in layers:
            layer.base_kind.refuse_merge(f"merge_adapter: layer {name!r}")
        if safe_merge:
            for name, layer in layers:
                layer.check_merge(f"{what}: layer {name!r}", slots)
        for _, layer in layers:
            layer.merge(safe_merge=safe_merge, adapter_names=slots)

    def unmerge_adapter(self) -> None:
        """peft's unmerge_adapter: take every merged adapter out of every adapted layer's base weight again
        (layers not merged are left as they are)."""
        for _, layer in self.lora_layers():
            if layer.merged:
                layer.unmerge()

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The model with plain nn.Linear layers holding W + s B A (and the trained modules_to_save).

        peft's signature. Each layer is merged in place (`FusedLoRALinear.merge(safe_merge)`): with
        safe_merge a non-finite merged weight raises ValueError and no layer is replaced.
        `progressbar` is accepted and unused. `adapter_names` (peft's meaning): the adapters merged,
        their deltas summed; default the active adapter. An unknown name: ValueError, nothing changed.
        """
        slots = self._adapter_slots(adapter_names, "merge_and_unload")
        return self._replace_all(merge=True, safe_merge=safe_merge, adapter_names=slots)

    def unload(self) -> nn.Module:
        """The model with its original nn.Linear layers back, adapters dropped, nothing merged; the
        modules_to_save keep their trained copies (as peft's unload does)."""
        return self._replace_all(merge=False)

    # ---------------------------------------------------------------- files

    def save_pretrained(self, save_directory: str, safe_serialization: bool = True,
                        selected_adapters: Optional[list[str]] = None, save_embedding_layers="auto",
                        is_main_process: bool = True, path_initial_model_for_weight_conversion: Optional[str] = None,
                        state_dict: Optional[dict] = None) -> None:
        """Write adapter_model.safetensors and adapter_config.json in peft's format (peft's signature).

        Several adapters in peft's layout: the adapter named "default" in `save_directory`, every other
        in `save_directory/<name>`; `selected_adapters` (default all) says which. Every one is checked
        before any is written: a refused save (ValueError) leaves every file as it was.

        The pair is replaced as a whole: a crash at any moment leaves the old adapter or the new one
        (see fused_lora/adapters.py). `base_model_name_or_path` is taken from the model's config when
        the LoraConfig has none, so peft's AutoPeftModel finds the base. With is_main_process=False
        nothing is written (as in peft). Refused: safe_serialization=False (only safetensors are
        written), an unknown adapter in selected_adapters, save_embedding_layers=True,
        path_initial_model_for_weight_conversion (PiSSA/OLoRA conversion), a state_dict. After
        merge_and_unload() or unload() there is no adapter to save: RuntimeError.
        """
        if safe_serialization is not True:
            raise ValueError("save_pretrained(safe_serialization=False): fused_lora writes safetensors only "
                             "(a pickled adapter_model.bin is not written, nor read)")
        names = list(self.peft_config) if selected_adapters is None else list(selected_adapters)
        for name in names:
            self._require_adapter(name, "save_pretrained(selected_adapters=...)")
        if save_embedding_layers not in ("auto", False):
            raise NotImplementedError("save_pretrained(save_embedding_layers=True): fused_lora adapts no embedding "
                                      "layers and does not save them; put them in modules_to_save")
        if path_initial_model_for_weight_conversion is not None:
            raise NotImplementedError("save_pretrained(path_initial_model_for_weight_conversion=...): the PiSSA/OLoRA "
                                      "conversion is not implemented (fused_lora does not make such adapters)")
        if state_dict is not None:
            raise NotImplementedError("save_pretrained(state_dict=...): fused_lora saves the adapter's own tensors; "
                                      "pass no state_dict")
        if self._removed_by is not None:
            raise RuntimeError(f"save_pretrained: this LoraModel has no LoRA layers any more ({self._removed_by}); "
                               "save the adapter before merging or unloading")
        # peft's layout: "default" at the top, any other in a sub-directory named after it. Every adapter
        # is checked before any is written: a refusal leaves every file as it was.
        if not is_main_process:
            return
        plans = [plan_save(self, save_directory if name == DEFAULT_ADAPTER else os.path.join(save_directory, name),
                           adapter_name=name) for name in names]
        for plan in plans:
            write_adapter(plan)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str, adapter_name: str = "default",
                        is_trainable: bool = False, config: Optional[LoraConfig] = None,
                        autocast_adapter_dtype: bool = True, low_cpu_mem_usage: bool = False,
                        backend: str = "auto") -> "LoraModel":
        """Adapt `model` with the adapter saved in `directory` (by fused_lora or peft); peft's signature.

        The adapted modules are the ones the weights file names; every key, shape and dtype, and
        every config field (docs/ADAPTERS.md), is checked before the model is touched, and on any
        error (AdapterError for a bad adapter) the model is left exactly as it was.
        With is_trainable=False the adapter is frozen and the model in eval mode (the config's
        inference_mode says which). `config` (a config other than the file's) is not supported;
        `low_cpu_mem_usage` is accepted and changes nothing (the adapter is small).
        """
        if config is not None:
            raise NotImplementedError("from_pretrained(config=...): fused_lora loads the adapter with the "
                                      "adapter_config.json saved beside it; pass config=None")
        return load_adapter(cls, model, directory, is_trainable=is_trainable, backend=backend,
                            adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def get_lora_model(model: nn.Module, config: LoraConfig, autocast_adapter_dtype: bool = True) -> LoraModel:
    """Adapt `model` in place as `config` says and wrap it in a LoraModel.

    `config`: a fused_lora LoraConfig, or peft's (read by the rules its adapter_config.json would be
    read by: a field fused_lora does not implement is refused when set, naming it), as `add_adapter`
    takes either. Without target_modules, peft's default for the model type is adapted and recorded.

    Targeted nn.Linear layers become FusedLoRALinear sharing their weights (no copy); everything
    else is frozen. With autocast_adapter_dtype (peft's default), adapters of float16/bfloat16
    layers are kept in float32.
    """
    return LoraModel(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
