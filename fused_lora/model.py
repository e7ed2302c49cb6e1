"""Adapting whole models: get_lora_model, LoraModel (peft's vocabulary) and modules_to_save.

The adapted layers are nn.Linear and transformers' Conv1D (GPT-2), as in peft. A LoraModel holds
one adapter; peft's multi-adapter methods raise NotImplementedError naming the feature."""
from __future__ import annotations

import contextlib
import copy
import inspect
import types
import warnings
from typing import Iterator, Optional

import torch
from torch import nn

from .config import LoraConfig
from .layer import FusedLoRALinear
from .targets import find_modules_to_save, find_targets, is_adaptable
from .validation import check_adapter_args

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class ModulesToSave(nn.Module):
    """A module kept as it was (`original`) beside a trainable copy (`trainable`) that runs instead."""

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original = original
        self.trainable = copy.deepcopy(original)
        self.original.requires_grad_(False)
        self.trainable.requires_grad_(True)
        self.use_original = False

    def forward(self, *args, **kwargs):
        return (self.original if self.use_original else self.trainable)(*args, **kwargs)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class _Undo:
    """What adapting a model changes (submodules, requires_grad flags, train/eval), to put back."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.training = [(m, m.training) for m in model.modules()]
        self.replaced: list[tuple[str, nn.Module]] = []

    def set_submodule(self, name: str, module: nn.Module) -> None:
        self.replaced.append((name, self.model.get_submodule(name)))
        _set_submodule(self.model, name, module)

    def restore(self) -> None:
        for name, original in reversed(self.replaced):
            _set_submodule(self.model, name, original)
        self.replaced.clear()
        for p, flag in self.flags:
            p.requires_grad_(flag)
        for m, training in self.training:
            m.training = training


def _refuse_adapted(model: nn.Module) -> None:
    """A model that already holds LoRA layers (ours or peft's) is not adapted again: nesting a second
    adapter would save files that load as neither."""
    for name, m in model.named_modules():
        if isinstance(m, (LoraModel, FusedLoRALinear, ModulesToSave)) or type(m).__module__.startswith("peft."):
            where = f"module {name!r}" if name else "the model itself"
            raise ValueError(f"the model already holds LoRA adapters ({where} is a {type(m).__name__}): adapt the "
                             "base model once (a peft model: fused_lora.patch_peft(model) runs it fused); "
                             "several adapters per model are not supported by LoraModel yet")


def _several_adapters(what: str) -> NotImplementedError:
    return NotImplementedError(f"{what}: several adapters per model are not supported yet by fused_lora (a "
                               "LoraModel holds one adapter); use one LoraModel per adapter, or peft with "
                               "fused_lora.patch_peft(model)")


class LoraModel(nn.Module):
    """A model whose targeted nn.Linear (and transformers Conv1D) layers are FusedLoRALinear. Build it
    with `get_lora_model`.

    Forward is the wrapped model's forward, with its signature (so transformers' Trainer sees the
    model's argument names). Only the adapters (and modules_to_save copies, and biases when
    config.bias says so) are trainable. Unknown attributes are looked up on the model.

    peft's vocabulary: `peft_config` maps the adapter's name ("default") to its LoraConfig,
    `active_adapter` / `active_adapters` name it, `base_model.model` and `get_base_model()` are the
    wrapped model. A LoraModel holds one adapter: add_adapter, load_adapter, delete_adapter, set_adapter
    (to another name) and forward(adapter_names=...) raise NotImplementedError.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, autocast_adapter_dtype: bool = True,
                 targets: Optional[list[str]] = None, adapter_name: str = "default"):
        """`targets`: the module names to adapt when already known (loading takes them from the
        weights file); by default `config.target_modules` is matched against the model.
        `adapter_name`: the key of `peft_config` (peft's "default")."""
        super().__init__()
        if not isinstance(adapter_name, str) or not adapter_name:
            raise TypeError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
        # Every check that can fail runs before the model is touched: nothing is half-applied.
        if not isinstance(config, LoraConfig):
            raise TypeError(f"expected a fused_lora.LoraConfig, got {type(config).__module__}.{type(config).__name__}"
                            " (same field names as peft's: fused_lora.LoraConfig(r=..., target_modules=...);"
                            " a peft model itself is run through the fused op by fused_lora.patch_peft(model))")
        _refuse_adapted(model)
        config.validate()
        check_adapter_args(config.r, config.lora_dropout, config.init_lora_weights, config.backend,
                           config.lora_alpha, config.use_rslora)
        if targets is None:
            targets = find_targets(model, config)
        to_save = find_modules_to_save(model, config)
        clash = [n for n in targets if any(n == s or n.startswith(s + ".") for s in to_save)]
        if clash:
            raise ValueError(f"modules {clash} are both LoRA targets and (inside) modules_to_save")
        self.model = model
        self.active_adapter = adapter_name
        self.peft_config = {adapter_name: config}  # keyed by adapter name, as peft's is
        self._removed_by: Optional[str] = None  # what removed the adapters, once they are gone
        self._undo = _Undo(model)
        try:
            self._inject(targets, to_save, autocast_adapter_dtype)
        except BaseException:
            self._undo.restore()
            raise
        self._expose_forward_signature()

    def _inject(self, targets: list[str], to_save: list[str], autocast_adapter_dtype: bool) -> None:
        model, config = self.model, self.active_peft_config
        model.requires_grad_(False)
        fan_in_fan_out = config.fan_in_fan_out
        for name in targets:
            base = model.get_submodule(name)
            dtype = torch.float32 if autocast_adapter_dtype and base.weight.dtype in _LOW_PRECISION else None
            layer = FusedLoRALinear.from_linear(
                base, r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                use_rslora=config.use_rslora, init_lora_weights=config.init_lora_weights,
                backend=config.backend, adapter_dtype=dtype)
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

    def _expose_forward_signature(self) -> None:
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
        self._expose_forward_signature()

    @property
    def active_peft_config(self) -> LoraConfig:
        """The LoraConfig of the adapter (peft's name)."""
        return self.peft_config[self.active_adapter]

    @property
    def active_adapters(self) -> list[str]:
        """[the adapter's name] (peft's property; a LoraModel holds one adapter)."""
        return [self.active_adapter]

    @property
    def base_model(self) -> "LoraModel":
        """peft's meaning: the object holding the adapted model as `.model` (so `base_model.model.<name>`
        is a module's name in adapter files). The adapted model itself: `get_base_model()`."""
        return self

    def get_base_model(self) -> nn.Module:
        """The wrapped (adapted) model, as peft's `PeftModel.get_base_model()`."""
        return self.model

    # ---------------------------------------------------------------- several adapters: not yet

    def set_adapter(self, adapter_name) -> None:
        """Only the adapter this LoraModel holds can be active: setting it again does nothing."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if names != [self.active_adapter]:
            raise _several_adapters(f"set_adapter({adapter_name!r})")

    def add_adapter(self, adapter_name, peft_config=None, *args, **kwargs):
        """Not supported yet (NotImplementedError): a LoraModel holds one adapter."""
        raise _several_adapters(f"add_adapter({adapter_name!r})")

    def load_adapter(self, model_id, adapter_name=None, *args, **kwargs):
        """Not supported yet (NotImplementedError): a LoraModel holds one adapter; load another one with
        LoraModel.from_pretrained on a fresh base model."""
        raise _several_adapters(f"load_adapter({model_id!r}, {adapter_name!r})")

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

    def delete_adapter(self, adapter_name, *args, **kwargs):
        """Not supported yet (NotImplementedError): a LoraModel holds one adapter; `unload()` removes it."""
        raise _several_adapters(f"delete_adapter({adapter_name!r})")

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
        """The wrapped model's forward (each instance carries that model's signature)."""
        if kwargs.get("adapter_names") is not None:
            raise NotImplementedError("forward(adapter_names=...): mixed-adapter batches are not supported yet by "
                                      "fused_lora (a LoraModel holds one adapter)")
        kwargs.pop("adapter_names", None)
        return self.model(*args, **kwargs)

    # ---------------------------------------------------------------- inspection

    def lora_layers(self) -> Iterator[tuple[str, FusedLoRALinear]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, FusedLoRALinear))

    def saved_modules(self) -> Iterator[tuple[str, ModulesToSave]]:
        return ((n, m) for n, m in self.model.named_modules() if isinstance(m, ModulesToSave))

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) parameter counts, as peft counts them (modules_to_save count twice)."""
        trainable = total = 0
        for p in self.model.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
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

    def _replace_all(self, merge: bool, safe_merge: bool = False) -> nn.Module:
        layers = list(self.lora_layers())
        if merge:
            self._merge_all(layers, safe_merge)
        for name, layer in layers:
            if not merge and layer.merged:
                layer.unmerge()
            new = layer._plain_base()  # an nn.Linear or Conv1D on meta, then the very same tensors, no copy
            new.weight, new.bias = layer.weight, layer.bias
            _set_submodule(self.model, name, new)
        for name, m in list(self.saved_modules()):
            _set_submodule(self.model, name, m.trainable)  # peft keeps the trained copy, merged or not
        self._removed_by = "merge_and_unload() removed them" if merge else "unload() removed them"
        return self.model

    @staticmethod
    def _merge_all(layers, safe_merge: bool) -> None:
        """Merge every layer in place. With safe_merge every merged weight is checked before any is
        written, so a refusal leaves every weight exactly as it was; should a merge fail otherwise,
        the layers merged here are unmerged (to rounding) and the error re-raised."""
        if safe_merge:
            for name, layer in layers:
                if not layer.merged:
                    layer.check_merge(f"merge_and_unload(safe_merge=True): layer {name!r}")
        done = []
        try:
            for _, layer in layers:
                if not layer.merged:
                    layer.merge(safe_merge=safe_merge)
                    done.append(layer)
        except BaseException:
            for layer in reversed(done):
                layer.unmerge()
            raise

    def merge_and_unload(self, progressbar: bool = False, safe_merge: bool = False,
                         adapter_names: Optional[list[str]] = None) -> nn.Module:
        """The model with plain nn.Linear layers holding W + s B A (and the trained modules_to_save).

        peft's signature. Each layer is merged in place (`FusedLoRALinear.merge(safe_merge)`): with
        safe_merge a non-finite merged weight raises ValueError and no layer is replaced.
        `progressbar` is accepted and unused; a LoraModel holds one adapter (`active_adapter`).
        """
        if adapter_names is not None and list(adapter_names) != [self.active_adapter]:
            raise _several_adapters(f"merge_and_unload(adapter_names={adapter_names!r})")
        return self._replace_all(merge=True, safe_merge=safe_merge)

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

        The pair is replaced as a whole: a crash at any moment leaves the old adapter or the new one
        (see fused_lora/adapters.py). `base_model_name_or_path` is taken from the model's config when
        the LoraConfig has none, so peft's AutoPeftModel finds the base. With is_main_process=False
        nothing is written (as in peft). Refused: safe_serialization=False (only safetensors are
        written), another adapter in selected_adapters, save_embedding_layers=True,
        path_initial_model_for_weight_conversion (PiSSA/OLoRA conversion), a state_dict. After
        merge_and_unload() or unload() there is no adapter to save: RuntimeError.
        """
        from .adapters import save_adapter
        if safe_serialization is not True:
            raise ValueError("save_pretrained(safe_serialization=False): fused_lora writes safetensors only "
                             "(a pickled adapter_model.bin is not written, nor read)")
        if selected_adapters is not None and list(selected_adapters) != [self.active_adapter]:
            raise _several_adapters(f"save_pretrained(selected_adapters={selected_adapters!r})")
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
        if not is_main_process:
            return
        save_adapter(self, save_directory)

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
        from .adapters import load_adapter
        if config is not None:
            raise NotImplementedError("from_pretrained(config=...): fused_lora loads the adapter with the "
                                      "adapter_config.json saved beside it; pass config=None")
        return load_adapter(cls, model, directory, is_trainable=is_trainable, backend=backend,
                            adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)


def get_lora_model(model: nn.Module, config: LoraConfig, autocast_adapter_dtype: bool = True) -> LoraModel:
    """Adapt `model` in place as `config` says and wrap it in a LoraModel.

    Targeted nn.Linear layers become FusedLoRALinear sharing their weights (no copy); everything
    else is frozen. With autocast_adapter_dtype (peft's default), adapters of float16/bfloat16
    layers are kept in float32.
    """
    return LoraModel(model, config, autocast_adapter_dtype=autocast_adapter_dtype)
