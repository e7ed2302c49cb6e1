"""Adapters on disk in peft's format: adapter_model.safetensors + adapter_config.json.

Keys carry peft's prefix and names, so peft loads our adapters and we load peft's:
    base_model.model.<layer>.lora_A.weight / .lora_B.weight     the adapter of a targeted Linear
    base_model.model.<module>.<tensor>                          a modules_to_save copy
    base_model.model.<layer>.base_layer.bias, <module>.bias      biases, when config.bias is not "none"
Only safetensors are read (never pickle). Loading validates every key and shape against the model
before changing anything. Each file is written to a temporary name and renamed into place, so a
crash leaves the previous file or the new one, never half of one; the weights are written before
the config, which names what the weights must hold.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoraConfig
from .targets import find_modules_to_save, find_targets

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
# peft's bias="all" also writes these duplicates of a modules_to_save module's tensors: accepted, unused.
_PEFT_REDUNDANT = (".modules_to_save.", ".original_module.")


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded onto this model; the model is left unchanged."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_write(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would make adapters unreadable to others
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _other_biases(model: nn.Module, owners) -> list[tuple[str, torch.Tensor]]:
    """The biases bias="all" saves besides those of `owners` (adapted layers, modules_to_save)."""
    return [(n, p) for n, p in model.named_parameters()
            if n.endswith("bias") and not any(n.startswith(o + ".") for o in owners)]


def adapter_state(lora_model) -> dict[str, torch.Tensor]:
    """The tensors an adapter file holds, by peft key."""
    cfg = lora_model.peft_config
    out = {}
    owners = []
    for name, layer in lora_model.lora_layers():
        owners.append(name)
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B
        if cfg.bias != "none" and layer.bias is not None:
            out[f"{PREFIX}{name}.base_layer.bias"] = layer.bias
    for name, module in lora_model.saved_modules():
        owners.append(name)
        for key, t in module.trainable.state_dict().items():
            out[f"{PREFIX}{name}.{key}"] = t
    if cfg.bias == "all":
        out.update((f"{PREFIX}{n}", p) for n, p in _other_biases(lora_model.model, owners))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def save_adapter(lora_model, directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    tensors = adapter_state(lora_model)
    _atomic_write(os.path.join(directory, WEIGHTS_NAME), lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    text = json.dumps(lora_model.peft_config.to_peft_dict(), indent=2, sort_keys=True)
    _atomic_write(os.path.join(directory, CONFIG_NAME), lambda p: open(p, "w").write(text))


def read_adapter(directory: str) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory (keys without peft's prefix)."""
    cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(cfg_path):
        raise AdapterError(f"{cfg_path} not found: not an adapter directory")
    if not os.path.isfile(weights_path):
        pickled = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(directory, n))]
        if pickled:
            raise AdapterError(f"{directory} holds {pickled[0]} (a pickle): only {WEIGHTS_NAME} is read, since "
                               "unpickling can run arbitrary code; convert it with safetensors first")
        raise AdapterError(f"{weights_path} not found")
    try:
        with open(cfg_path) as f:
            config = LoraConfig.from_peft_dict(json.load(f))
    except (json.JSONDecodeError, TypeError, ValueError) as err:
        raise AdapterError(f"{cfg_path}: {err}") from err
    try:
        raw = load_file(weights_path)
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise AdapterError(f"{weights_path} is not a readable safetensors file: {err}") from err
    bad = [k for k in raw if not k.startswith(PREFIX)]
    if bad:
        raise AdapterError(f"{weights_path}: key {bad[0]!r} lacks the {PREFIX!r} prefix of peft adapters")
    return config, {k[len(PREFIX):]: v for k, v in raw.items()}


def expected_shapes(model: nn.Module, config: LoraConfig) -> tuple[dict[str, torch.Size], list[str]]:
    """Key -> shape an adapter for (unadapted) `model` under `config` must hold, and the
    modules_to_save names (whose peft duplicates are tolerated)."""
    targets = find_targets(model, config)
    to_save = find_modules_to_save(model, config)
    shapes = {}
    for name in targets:
        lin = model.get_submodule(name)
        shapes[f"{name}.lora_A.weight"] = torch.Size((config.r, lin.in_features))
        shapes[f"{name}.lora_B.weight"] = torch.Size((lin.out_features, config.r))
        if config.bias != "none" and lin.bias is not None:
            shapes[f"{name}.base_layer.bias"] = lin.bias.shape
    for name in to_save:
        for key, t in model.get_submodule(name).state_dict().items():
            shapes[f"{name}.{key}"] = t.shape
    if config.bias == "all":
        shapes.update((n, p.shape) for n, p in _other_biases(model, targets + to_save))
    return shapes, to_save


def validate(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], where: str) -> None:
    try:
        shapes, to_save = expected_shapes(model, config)
    except ValueError as err:
        raise AdapterError(f"{where}: the adapter's config does not fit this model: {err}") from err
    redundant = {k for k in tensors if any(k.startswith(s + r) for s in to_save for r in _PEFT_REDUNDANT)}
    unexpected = sorted(set(tensors) - set(shapes) - redundant)
    if unexpected:
        raise AdapterError(f"{where}: key {PREFIX + unexpected[0]!r} names no tensor of this model's adapter "
                           f"({len(unexpected)} such keys)")
    missing = sorted(set(shapes) - set(tensors))
    if missing:
        raise AdapterError(f"{where}: key {PREFIX + missing[0]!r} is missing ({len(missing)} missing keys)")
    for key, shape in shapes.items():
        if tensors[key].shape != shape:
            raise AdapterError(f"{where}: key {PREFIX + key!r} has shape {tuple(tensors[key].shape)}, "
                               f"the model needs {tuple(shape)}")
        if not tensors[key].is_floating_point():
            raise AdapterError(f"{where}: key {PREFIX + key!r} has dtype {tensors[key].dtype}, not floating point")


@torch.no_grad()
def load_adapter(cls, model: nn.Module, directory: str, is_trainable: bool = False, backend: str = "auto"):
    config, tensors = read_adapter(directory)
    config.backend = backend
    validate(model, config, tensors, directory)
    # The file's weights replace the initial ones, so peft-only initialisations ("pissa", ...) need
    # not be supported to load an adapter; the config keeps the file's value.
    lora_model = cls(model, dataclasses.replace(config, init_lora_weights=True))
    lora_model.peft_config = config
    for key, t in tensors.items():
        if any(r in key for r in _PEFT_REDUNDANT):
            continue
        dest = _destination(lora_model, key)
        dest.copy_(t.to(dest.dtype))
    if not is_trainable:
        lora_model.requires_grad_(False)
        lora_model.eval()
    return lora_model


def _destination(lora_model, key: str) -> torch.Tensor:
    """The tensor of the adapted model a (validated) adapter key is loaded into."""
    model = lora_model.model
    owner = key.rpartition(".")[0]
    if owner.endswith(".lora_A") or owner.endswith(".lora_B"):
        layer, _, attr = owner.rpartition(".")
        return getattr(model.get_submodule(layer), attr)
    if owner.endswith(".base_layer"):
        return model.get_submodule(owner[: -len(".base_layer")]).bias
    for name, module in lora_model.saved_modules():
        if key.startswith(name + "."):
            return module.trainable.state_dict(keep_vars=True)[key[len(name) + 1:]]
    return model.get_parameter(key)  # a bias saved under bias="all"
