"""Adapters on disk in peft's format: adapter_model.safetensors + adapter_config.json.

Keys carry peft's prefix and names, so peft loads our adapters and we load peft's:
    base_model.model.<layer>.lora_A.weight / .lora_B.weight     the adapter of a targeted Linear
    base_model.model.<layer>.lora_magnitude_vector              DoRA's magnitude (use_dora=True)
    base_model.model.<module>.<tensor>                          a modules_to_save copy (buffers too)
    base_model.model.<layer>.base_layer.bias, <module>.bias      biases, when config.bias is not "none"
Only safetensors are read (never pickle). Loading validates every key, shape and dtype against the
model before changing anything, and every value again once cast to the dtype the model holds it in
(NaN, inf, and finite values the cast makes inf are refused; float8 is cast like any float, packed
float4 refused), and each layer's A, B and scale against the dtype its LoRA branch is computed in,
the base weight's (`fused_lora.modules.adapter_range`: fp32 adapters on an fp16 model are cast to fp16
on every call, so values beyond fp16 are refused); the adapted modules are the ones the weights file
names (the config's regex, if any, is never run on module names).

Saving replaces the pair as a whole. Both files are written and synced in a staging directory
beside the adapter directory (".<name>.fused_lora-staging-<pid>-*"; inside it where that name is too
long or the parent is another filesystem or read-only), then renamed in: weights first, config
second. The weights' header records the config they were saved with
(FUSED_CONFIG_KEY), so a crash between the two renames is recognised: the loader then reads the
new config from the staging directory (which the next save moves into place before removing stale
staging directories), and a config from another save is refused. Concurrent saves into one
directory (threads or processes) stage apart and take turns to rename (_exclusive), so pairs never
mix. Adapters peft wrote carry no record and load as they are.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import tempfile
import threading
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..core.op_inputs import rounding_bound
from ..modules.adapter_range import range_problem
from ..modules.variants import MAGNITUDE, is_dora
from .config import LoraConfig
from ..core.files import name_max, read_regular_file
from .experts import (expert_targets, file_prefixes, file_shapes, from_peft_A, from_peft_B, to_peft_A,
                      to_peft_B)
from .targets import base_features, check_loaded_targets, find_modules_to_save
from ..modules.validation import check_backend

try:
    import fcntl
except ImportError:  # Windows: saves are serialised within a process only
    fcntl = None

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PREFIX = "base_model.model."
# peft's bias="all" also writes these duplicates of a modules_to_save module's tensors: accepted, unused.
_PEFT_REDUNDANT = (".modules_to_save.", ".original_module.")
# Safetensors header key holding the canonical JSON of the config saved with the weights.
FUSED_CONFIG_KEY = "fused_lora.adapter_config"
# Config fields left out of that record: provenance that users edit by hand and that does not
# change the loaded model.
_UNRECORDED = ("base_model_name_or_path", "revision", "task_type", "inference_mode", "peft_version",
               "auto_mapping")
# Fields whose difference from the record makes a pair silently wrong (the keys and shapes catch
# the rest): a config that differs in one of them is from another save, and is refused.
_SCALING = ("r", "lora_alpha", "use_rslora", "lora_dropout")
MAX_CONFIG_BYTES = 16 << 20  # real configs are kilobytes; this bounds what a hostile one costs
# Staging directories of the saves running in this process. Their names hold this process's pid, which
# cannot tell a save still running in another thread from one that failed here: each save's directory
# (its own token, the random part of its name) is listed while it runs, and only unlisted ones are stale.
_LIVE_STAGING: set[str] = set()
# Held (with a flock on the adapter directory, across processes) while a save judges and completes
# others' leftovers, creates its staging directory, or renames its pair into place; also guards _LIVE_STAGING.
_SAVE_LOCK = threading.Lock()
_HELD_FDS: list[int] = []  # descriptors of the directories flock'ed now (by this process's saves)


class AdapterError(ValueError):
    """An adapter directory that cannot be loaded onto this model; the model is left unchanged."""


# Floating-point dtypes an adapter file may hold; each is cast on load to the dtype the model holds the
# tensor in, as peft's load_state_dict casts (float8 included: every float8 value has an exact float32,
# bfloat16 and, but for float8_e8m0fnu's extremes, float16 form). Other floating types (packed float4)
# have no cast and are refused by name.
_LOADABLE_FLOATS = frozenset(d for d in (
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    *(getattr(torch, n, None) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                                        "float8_e8m0fnu"))) if d is not None)


def _widened(t: torch.Tensor) -> torch.Tensor:
    """8-bit floats as float32 (exact), since isnan/isinf/isfinite have no kernel for most of them."""
    return t.to(torch.float32) if t.dtype.itemsize == 1 else t


def _non_finite(t: torch.Tensor) -> tuple[int, int]:
    """(how many NaN, how many +-inf) a floating-point tensor holds."""
    t = _widened(t)
    return int(torch.isnan(t).sum()), int(torch.isinf(t).sum())


def _check_file_tensor(where: str, key: str, t: torch.Tensor, dtype: Optional[torch.dtype] = None) -> None:
    """A tensor read from an adapter file (`key`: its key in the file) against the model's: `dtype`
    None means any floating type fused_lora loads (cast on load), otherwise exactly `dtype` (an int64
    buffer stays int64). A floating tensor holding NaN or inf is refused."""
    if dtype is not None:
        if t.dtype != dtype:
            raise AdapterError(f"{where}: key {key!r} has dtype {t.dtype}, the model's tensor is {dtype}")
    elif not t.is_floating_point():
        raise AdapterError(f"{where}: key {key!r} has dtype {t.dtype}, not floating point")
    elif t.dtype not in _LOADABLE_FLOATS:
        raise AdapterError(f"{where}: key {key!r} has dtype {t.dtype}, which fused_lora does not load (torch has no "
                           "cast from it to the model's dtype); save the adapter in float32, float16 or bfloat16")
    if t.is_floating_point():
        nan, inf = _non_finite(t)
        if nan or inf:
            raise AdapterError(f"{where}: key {key!r} holds NaN or inf ({nan} NaN, {inf} inf of {t.numel()} values): "
                               "a broken adapter (every output it touches would be NaN or inf)")


def _cast_file_tensor(where: str, key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` (checked by _check_file_tensor) in `dtype`, the dtype the model holds it in. A value finite in
    the file but beyond `dtype`'s range (float64 1e300 into float32, float32 1e6 into float16) would
    load as inf, or, for float8 types whose casts saturate, as their largest value: refused naming the
    key and the dtype. The cast values are checked as well."""
    out = t.to(dtype)
    if not out.is_floating_point():
        return out
    beyond = t.to(torch.float64).abs() >= rounding_bound(dtype)
    if bool(beyond.any()) or any(_non_finite(out)):
        worst = t.to(torch.float64)[beyond | ~torch.isfinite(_widened(out))].abs().max().item()
        raise AdapterError(f"{where}: key {key!r} holds {worst:g}, beyond the range of {dtype} (largest finite "
                           f"{torch.finfo(dtype).max:g}), the dtype this model holds it in: it would load as inf "
                           f"(or, where the cast saturates, as the largest value). Save the adapter within "
                           f"{dtype}'s range, or load it into a model of a wider dtype")
    return out


def _check_compute_range(where: str, lora_model, staged, slot: str = "default") -> None:
    """The adapter's A and B about to be copied (`staged`: (peft key without the prefix, destination, value in
    the layer's own layout)) against the dtype each layer computes its LoRA branch in, the base weight's
    (`modules.adapter_range`: the fused ops cast the adapter to it on every call): A, B, s and s B must fit it.
    Layers are found by their destination tensors, so expert stacks (peft's keys, another layout) are checked
    as Linear layers are. AdapterError naming the keys otherwise."""
    by_dest = {id(dest): (key, value) for key, dest, value in staged}
    for _, layer in lora_model.lora_layers():
        dest_A, dest_B = layer.adapter_weights(slot)
        if id(dest_A) not in by_dest or id(dest_B) not in by_dest:
            continue
        (key_A, lora_A), (key_B, lora_B) = by_dest[id(dest_A)], by_dest[id(dest_B)]
        problem = range_problem(lora_A, lora_B, layer.adapter_settings(slot).scaling, layer.weight.dtype)
        if problem is not None:
            raise AdapterError(f"{where}: keys {PREFIX + key_A!r} / {PREFIX + key_B!r}: {problem}, the dtype this "
                               f"model computes the adapter's LoRA branch in (its base weight's; the fused ops cast "
                               f"the adapter to it on every call, where peft computes in the adapter's dtype). Load "
                               f"it into a model of a wider dtype, or keep the adapter within that range")


# ---------------------------------------------------------------- what an adapter holds

def _other_biases(model: nn.Module, owners) -> list[tuple[str, torch.Tensor]]:
    """The biases bias="all" saves besides those of `owners` (adapted layers, modules_to_save)."""
    return [(n, p) for n, p in model.named_parameters()
            if n.endswith("bias") and not any(n.startswith(o + ".") for o in owners)]


def adapter_state(lora_model, adapter_name: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors the file of adapter `adapter_name` (default: the first) holds, by peft key."""
    adapter_name = lora_model.first_adapter if adapter_name is None else adapter_name
    cfg = lora_model.peft_config[adapter_name]
    slot = lora_model.slot(adapter_name)
    out = {}
    owners = []
    stacks = dict(_expert_layers(lora_model))
    for target, prefix in _expert_prefixes(lora_model).items():  # peft's ParamWrapper layout
        lora_A, lora_B = stacks[target].adapter_weights(slot)
        out[f"{PREFIX}{prefix}.lora_A.weight"] = to_peft_A(lora_A)
        out[f"{PREFIX}{prefix}.lora_B.weight"] = to_peft_B(lora_B)
    for name, layer in lora_model.linear_layers():
        owners.append(name)
        # The adapter the config describes, whichever a layer has active.
        out[f"{PREFIX}{name}.lora_A.weight"], out[f"{PREFIX}{name}.lora_B.weight"] = layer.adapter_weights(slot)
        if is_dora(layer, slot):
            out[f"{PREFIX}{name}.{MAGNITUDE}"] = layer.adapter_parameters(slot)[2]
        if cfg.bias != "none" and layer.bias is not None:
            out[f"{PREFIX}{name}.base_layer.bias"] = layer.bias
    if slot != "default":  # modules_to_save and biases belong to the first adapter
        return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}
    for name, module in lora_model.saved_modules():
        owners.append(name)
        for key, t in module.trainable.state_dict().items():
            out[f"{PREFIX}{name}.{key}"] = t
    if cfg.bias == "all":
        out.update((f"{PREFIX}{n}", p) for n, p in _other_biases(lora_model.model, owners))
    return {k: v.detach().to("cpu").contiguous() for k, v in out.items()}


def _expert_layers(lora_model) -> list[tuple[tuple[str, str], object]]:
    """((experts module, parameter), layer) of every adapted expert stack."""
    return [((m, p), layer) for m, p, layer in lora_model.expert_layers()]


def _expert_prefixes(lora_model) -> dict[tuple[str, str], str]:
    """(experts module, parameter) -> its module path in peft's files (`experts.file_prefixes`)."""
    targets: dict[str, list[str]] = {}
    for (module, param), _ in _expert_layers(lora_model):
        targets.setdefault(module, []).append(param)  # the module's parameter order: how they were attached
    return file_prefixes(targets)


def _expert_file_keys(lora_model) -> dict[str, tuple[object, int]]:
    """File key (without PREFIX) of each expert stack's lora_A / lora_B -> (its layer, 0 for A or 1 for B)."""
    layers = dict(_expert_layers(lora_model))
    out = {}
    for target, prefix in _expert_prefixes(lora_model).items():
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = (layers[target], 0), (layers[target], 1)
    return out


def _from_file_layout(entry, t: torch.Tensor) -> torch.Tensor:
    """An expert stack's lora_A (r E, in) / lora_B (out, r E) from peft's file as the layer's (E, r, in) /
    (E, out, r)."""
    layer, which = entry
    return (from_peft_A if which == 0 else from_peft_B)(t, layer.num_experts)


# ---------------------------------------------------------------- saving

def _record(config: dict) -> str:
    """Canonical JSON of a config, without provenance fields: what the weights' header records."""
    return json.dumps({k: v for k, v in config.items() if k not in _UNRECORDED}, sort_keys=True,
                      separators=(",", ":"))


def _staging_places(directory: str) -> list[tuple[str, str]]:
    """(folder, name prefix) where staging directories of `directory` live: beside it, or, where
    that is another filesystem or not writable (a mount point), hidden inside it."""
    return [(os.path.dirname(directory), f".{os.path.basename(directory)}.fused_lora-staging-"),
            (directory, ".fused_lora-staging-")]


def _stage_beside(directory: str) -> bool:
    """Whether staging beside `directory` works: same filesystem (renames are atomic only within
    one) and a writable parent."""
    parent = os.path.dirname(directory)
    # mkdtemp's name: the prefix, "<pid>-" and 8 random characters; too long beside a long name
    name = f"{_staging_places(directory)[0][1]}{os.getpid()}-12345678"
    try:
        return os.stat(parent).st_dev == os.stat(directory).st_dev and os.access(parent, os.W_OK) \
            and len(os.fsencode(name)) <= name_max(parent)
    except OSError:
        return False


def _staging_dirs(directory: str) -> list[tuple[str, str]]:
    """(path, pid) of every staging directory of `directory`."""
    found = []
    for folder, prefix in _staging_places(directory):
        try:
            names = os.listdir(folder)
        except OSError:
            continue
        found += [(os.path.join(folder, n), n[len(prefix):].split("-", 1)[0])
                  for n in sorted(names) if n.startswith(prefix)]
    return found


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        return True  # os.kill(pid, 0) would terminate the process there: keep the directory
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _fsync_dir(path: str) -> None:
    if os.name == "nt":
        return  # directories cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _is_stale(path: str, pid: str) -> bool:
    """Whether the staging directory `path` (named with `pid`) belongs to a save no longer running:
    killed, or failed in a process still alive. Call with _SAVE_LOCK held."""
    if not pid.isdigit():
        return True
    if int(pid) == os.getpid():
        return path not in _LIVE_STAGING  # a save of another thread still running, or one that failed here
    return not _pid_alive(int(pid))


def _finish_interrupted_save(directory: str) -> None:
    """If a save died between its two renames, move its config into place (its weights already are).
    A save still running (another thread's, another process's) moves its own config."""
    weights = os.path.join(directory, WEIGHTS_NAME)
    record = _weights_record(weights)
    if record is None or _config_record(os.path.join(directory, CONFIG_NAME)) == record:
        return
    stale = [path for path, pid in _staging_dirs(directory) if _is_stale(path, pid)]
    staged = _staged_config(stale, record)
    if staged is not None:
        try:
            os.replace(staged[0], os.path.join(directory, CONFIG_NAME))
        except FileNotFoundError:  # a concurrent save finished it first
            return
        _fsync_dir(directory)


def _remove_stale_staging(directory: str) -> None:
    """Remove staging directories of saves that are no longer running (killed, or failed)."""
    for path, pid in _staging_dirs(directory):
        if _is_stale(path, pid):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def _exclusive(directory: str):
    """One save at a time moves files into `directory` or judges others' leftovers there, so the two
    renames of concurrent saves never interleave (weights of one save, config of another). Threads of
    this process: _SAVE_LOCK; other processes: flock on the directory, released by the kernel if the
    holder dies. Where flock is missing (Windows) or refused (some network filesystems), saves from
    several processes into one directory are not serialised."""
    with _SAVE_LOCK:
        fd = None
        if fcntl is not None:
            try:
                fd = os.open(directory, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                _HELD_FDS.append(fd)
            except OSError:
                if fd is not None:
                    os.close(fd)
                fd = None
        try:
            yield
        finally:
            if fd is not None:
                _HELD_FDS.remove(fd)
                os.close(fd)  # releases the flock


def _after_fork_in_child() -> None:
    """A child forked while a thread of its parent was saving: a fresh lock (the inherited one may be
    held by a thread the child does not have), no live saves of its own, and the inherited flock
    descriptors closed (open, they would hold the parent's lock for as long as the child lives)."""
    global _SAVE_LOCK
    _SAVE_LOCK = threading.Lock()
    _LIVE_STAGING.clear()
    for fd in _HELD_FDS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _name_or_path(model: nn.Module) -> Optional[str]:
    """The model's hub name or local path, from its transformers config (None when it has none)."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _check_config_matches_layers(lora_model, adapter_name: str) -> None:
    """The config written must describe what the layers compute: an edited peft_config (a mutable
    dataclass) whose r, alpha, rsLoRA or dropout no longer match the layers would save a file that
    loads as another model."""
    config, slot = lora_model.peft_config[adapter_name], lora_model.slot(adapter_name)
    for name, layer in lora_model.lora_layers():
        settings = layer.adapter_settings(slot)
        for key in _SCALING:
            if getattr(settings, key) != getattr(config, key):
                raise ValueError(f"save_pretrained: peft_config[{adapter_name!r}].{key} is "
                                 f"{getattr(config, key)!r} but layer {name!r} computes with "
                                 f"{getattr(settings, key)!r}; the file would not load as this model (the "
                                 "config describes the adapter: build the model with the settings you want)")


@dataclasses.dataclass
class SavePlan:
    """One adapter's pair of files, checked and ready to be written (`plan_save`, `write_adapter`)."""
    directory: str
    tensors: dict[str, torch.Tensor]
    config: dict


def _check_directory(directory: str) -> None:
    """`directory` can hold an adapter: it is not a file, and every component still to be created
    has a length the filesystem takes (an adapter's name is a sub-directory's)."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ValueError(f"save_pretrained: {directory!r} exists and is not a directory")
    path, missing = os.path.abspath(directory), []
    while not os.path.exists(path):
        path, name = os.path.split(path)
        if not name:
            break
        missing.append(name)
    limit = name_max(path)
    for name in missing:
        if len(os.fsencode(name)) > limit:
            raise ValueError(f"save_pretrained: the directory name {name[:40]!r}... is too long "
                             f"({len(os.fsencode(name))} bytes; the filesystem takes {limit}): use a shorter "
                             "adapter name or directory")


def plan_save(lora_model, directory, adapter_name: Optional[str] = None) -> SavePlan:
    """Every check of saving an adapter (default: the first) to `directory`, nothing written: so a save
    of several adapters can check them all before it writes any."""
    adapter_name = lora_model.first_adapter if adapter_name is None else adapter_name
    tensors = adapter_state(lora_model, adapter_name)
    if not any(k.endswith(".lora_A.weight") for k in tensors):
        raise RuntimeError("save_pretrained: the model holds no LoRA layers; nothing to save")
    for key, t in tensors.items():  # loading refuses such a file: never write one
        nan, inf = _non_finite(t) if t.is_floating_point() else (0, 0)
        if nan or inf:
            raise ValueError(f"save_pretrained: adapter {adapter_name!r}: {key!r} holds NaN or inf ({nan} NaN, {inf} "
                             f"inf of {t.numel()} values; a diverged or broken adapter, which loading refuses); "
                             "nothing was written")
    peft_config = lora_model.peft_config[adapter_name]
    peft_config.validate()  # a mutable dataclass: never write a config that would not load
    _check_config_matches_layers(lora_model, adapter_name)
    if peft_config.lora_dropout > 0 and any(True for _ in lora_model.expert_layers()):
        raise ValueError(f"save_pretrained: adapter {adapter_name!r} has lora_dropout={peft_config.lora_dropout} on "
                         "expert stacks (target_parameters): dropout there is fused_lora's extension, which peft "
                         "refuses, so peft could not load this file; nothing was written. The trained weights "
                         "load into a model built the same way with lora_dropout=0, which saves: "
                         "plain = get_lora_model(base, config_with_lora_dropout_0); "
                         "plain.load_state_dict(model.state_dict()); plain.save_pretrained(...)")
    directory = os.fspath(directory)
    _check_directory(directory)
    config = peft_config.to_peft_dict()
    if config["base_model_name_or_path"] is None:  # as peft records it, so AutoPeftModel finds the base
        config["base_model_name_or_path"] = _name_or_path(lora_model.model)
    return SavePlan(directory, tensors, config)


def write_adapter(plan: SavePlan) -> None:
    """Write a planned pair of files; the directory holds the old pair or the new, at any moment."""
    tensors, config = plan.tensors, plan.config
    text = json.dumps(config, indent=2, sort_keys=True)
    directory = os.path.realpath(plan.directory)  # stage beside the real directory, not a link
    os.makedirs(directory, exist_ok=True)
    with _exclusive(directory):
        _finish_interrupted_save(directory)
        _remove_stale_staging(directory)
        folder, prefix = _staging_places(directory)[0 if _stage_beside(directory) else 1]
        # listed as it is created: no other thread's cleanup can judge it stale
        staging = tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=folder)
        _LIVE_STAGING.add(staging)
    weights_in = False
    try:
        staged_config, staged_weights = os.path.join(staging, CONFIG_NAME), os.path.join(staging, WEIGHTS_NAME)
        with open(staged_config, "w") as f:  # created as the umask says
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        save_file(tensors, staged_weights, metadata={"format": "pt", FUSED_CONFIG_KEY: _record(config)})
        # safetensors writes through its own 0600 temporary file: give the weights the config's mode.
        os.chmod(staged_weights, os.stat(staged_config).st_mode & 0o777)
        _fsync_file(staged_weights)
        _fsync_dir(staging)  # the staged config must survive a power cut too: it may complete the pair
        _fsync_dir(folder)
        with _exclusive(directory):  # the staged files were written in parallel; the pair goes in whole
            os.replace(staged_weights, os.path.join(directory, WEIGHTS_NAME))
            weights_in = True
            os.replace(staged_config, os.path.join(directory, CONFIG_NAME))
            _fsync_dir(directory)
    except BaseException:
        if not weights_in:  # the directory still holds the old pair: the staged files are useless
            shutil.rmtree(staging, ignore_errors=True)
        raise  # otherwise the staged config completes the pair (see _finish_interrupted_save)
    finally:
        with _SAVE_LOCK:
            _LIVE_STAGING.discard(staging)  # done or failed: the next save may clean it
    shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------- reading

def _weights_record(path: str) -> Optional[str]:
    """The config record in a weights file's header; None if absent (peft's files) or unreadable."""
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get(FUSED_CONFIG_KEY)
    except Exception:  # missing or corrupt: reported by the loader itself
        return None


def _not_found(path: str) -> AdapterError:
    """'not found', or what is there instead (a directory, a device, a dangling link)."""
    if os.path.lexists(path):
        return AdapterError(f"{path} exists but is not a regular file: not an adapter directory")
    return AdapterError(f"{path} not found: not an adapter directory")


def _read_config_text(path: str) -> str:
    # as every file anyone may have put in place: a regular file (checked on the opened descriptor), bounded
    data = read_regular_file(path, MAX_CONFIG_BYTES, "an adapter config", AdapterError)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise AdapterError(f"{path} is not UTF-8 text: {err}") from None


def _parse_config(text: str, path: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise AdapterError(f"{path}: the JSON is nested too deeply for an adapter config") from None
    except ValueError as err:
        raise AdapterError(f"{path} is not valid JSON: {err}") from None


def _text_record(text: str, path: str) -> Optional[str]:
    """The record of a config's text; None where it is not a JSON object."""
    try:
        d = _parse_config(text, path)
    except AdapterError:
        return None
    return _record(d) if isinstance(d, dict) else None


def _config_record(path: str) -> Optional[str]:
    try:
        return _text_record(_read_config_text(path), path)
    except (OSError, AdapterError):
        return None


def _staged_config(stagings: list[str], record: str) -> Optional[tuple[str, str]]:
    """(path, text) of a staged config in one of the staging directories `stagings` matching the
    weights' record. Read once: a save may move or replace the file meanwhile, so the text compared
    is the text returned."""
    for staging in stagings:
        path = os.path.join(staging, CONFIG_NAME)
        if not os.path.isfile(path):
            continue
        try:
            text = _read_config_text(path)
        except (OSError, AdapterError):  # moved into place by its save meanwhile, or damaged
            continue
        if _text_record(text, path) == record:
            return path, text
    return None


def _load_config(text: str, path: str) -> LoraConfig:
    d = _parse_config(text, path)
    try:
        return LoraConfig.from_peft_dict(d)
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{path}: {str(err).removeprefix('LoraConfig: ')}") from err


def _bound_config(directory: str, record: str) -> LoraConfig:
    """The config the weights were saved with: the directory's, or an interrupted save's staged one."""
    cfg_path = os.path.join(directory, CONFIG_NAME)
    text = _read_config_text(cfg_path) if os.path.isfile(cfg_path) else None
    # The text read is the text compared: a save may replace the file between two reads of it.
    if text is not None and _text_record(text, cfg_path) == record:
        return _load_config(text, cfg_path)
    staged = _staged_config([path for path, _ in _staging_dirs(directory)], record)
    if staged is not None:  # a save died (or is running) between its two renames: the new pair
        return _load_config(staged[1], staged[0])
    if text is None:
        raise _not_found(cfg_path)
    config = _load_config(text, cfg_path)  # a bad field is reported as such
    try:
        saved = json.loads(record)
    except (ValueError, RecursionError):
        saved = None
    if not isinstance(saved, dict):
        raise AdapterError(f"{os.path.join(directory, WEIGHTS_NAME)}: the config record in its header "
                           f"({FUSED_CONFIG_KEY}) is not a JSON object; the file is damaged")
    current = json.loads(_record(json.loads(text)))
    differ = [k for k in _SCALING if saved.get(k) != current.get(k)]
    if differ:
        k = differ[0]
        raise AdapterError(f"{cfg_path} and {WEIGHTS_NAME} are from different saves: the weights were saved "
                           f"with {k}={saved.get(k)!r}, the config says {current.get(k)!r} ({', '.join(_SCALING)} "
                           "are bound to the weights they were trained with; restore the file's value, or "
                           "train an adapter with the settings you want)")
    return config  # edited by hand in fields that the keys and shapes check below


_READ_ATTEMPTS = 10  # reads of a pair that concurrent saves keep replacing, before its refusal stands


def _identities(*paths: str) -> tuple:
    """Which files the paths name now (a rename puts another file there); None for a missing one."""
    found = []
    for path in paths:
        try:
            st = os.stat(path)
            found.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            found.append(None)
    return tuple(found)


def read_adapter(directory) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The config and tensors of an adapter directory (keys without peft's prefix)."""
    directory = os.path.realpath(os.fspath(directory))  # stage beside the real directory, not a link
    cfg_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(weights_path):
        if not os.path.isfile(cfg_path) and os.path.isfile(os.path.join(directory, "model.safetensors")):
            raise AdapterError(f"{directory} holds model.safetensors, a full model (as transformers' Trainer "
                               "saves a model it does not know), not an adapter; train a LoraModel with "
                               "fused_lora.LoraTrainer to get peft-format adapter checkpoints")
        if not os.path.isfile(cfg_path):
            subs = sorted(n for n in (os.listdir(directory) if os.path.isdir(directory) else ())
                          if os.path.isfile(os.path.join(directory, n, CONFIG_NAME)))
            if subs:  # peft's multi-adapter layout without a "default" adapter at the top
                raise AdapterError(f"{cfg_path} not found: {directory} holds adapters only in sub-directories "
                                   f"({', '.join(subs[:5])}; peft's layout for adapters not named 'default'): "
                                   f"load one of those directories")
            raise _not_found(cfg_path)
        pickled = [n for n in PICKLE_NAMES if os.path.isfile(os.path.join(directory, n))]
        if pickled:
            raise AdapterError(f"{directory} holds {pickled[0]} (a pickle): only {WEIGHTS_NAME} is read, since "
                               "unpickling can run arbitrary code; convert it with safetensors first")
        raise _not_found(weights_path)
    for attempt in range(_READ_ATTEMPTS):
        before = _identities(weights_path, cfg_path)
        try:
            with safe_open(weights_path, framework="pt") as f:
                metadata = f.metadata() or {}
                raw = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as err:  # safetensors raises its own error types for corrupt files
            raise AdapterError(f"{weights_path} is not a readable safetensors file: {err}") from err
        record = metadata.get(FUSED_CONFIG_KEY)
        try:
            if record is not None:
                config = _bound_config(directory, record)
            elif os.path.isfile(cfg_path):
                config = _load_config(_read_config_text(cfg_path), cfg_path)
            else:
                raise _not_found(cfg_path)
        except AdapterError:
            # A save replaced the pair while it was read (weights of one save, config of the next): read
            # the pair again rather than call a whole pair one from different saves.
            if attempt + 1 < _READ_ATTEMPTS and _identities(weights_path, cfg_path) != before:
                continue
            raise
        break
    bad = [k for k in raw if not k.startswith(PREFIX)]
    if bad:
        raise AdapterError(f"{weights_path}: key {bad[0]!r} lacks the {PREFIX!r} prefix of peft adapters")
    return config, {k[len(PREFIX):]: v for k, v in raw.items()}


# ---------------------------------------------------------------- checking against the model

def targets_in(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The modules an adapter file adapts: those with a lora_A or lora_B weight."""
    names = {k[: -len(s)] for k in tensors for s in (".lora_A.weight", ".lora_B.weight") if k.endswith(s)}
    return sorted(names)


def expected_tensors(model: nn.Module, config: LoraConfig, targets: list[str]
                     ) -> tuple[dict[str, tuple[torch.Size, Optional[torch.dtype]]], list[str]]:
    """Key -> (shape, dtype) an adapter for (unadapted) `model` must hold, dtype None meaning any
    floating-point type (a float is cast on load; other dtypes, e.g. BatchNorm's int64
    num_batches_tracked, must match), and the modules_to_save names."""
    to_save = find_modules_to_save(model, config)
    want = {}
    for name in targets:
        lin = model.get_submodule(name)
        in_features, out_features = base_features(lin)
        want[f"{name}.lora_A.weight"] = (torch.Size((config.r, in_features)), None)
        want[f"{name}.lora_B.weight"] = (torch.Size((out_features, config.r)), None)
        if config.use_dora:
            want[f"{name}.{MAGNITUDE}"] = (torch.Size((out_features,)), None)
        if config.bias != "none" and lin.bias is not None:
            want[f"{name}.base_layer.bias"] = (lin.bias.shape, None)
    for name in to_save:
        for key, t in model.get_submodule(name).state_dict().items():
            want[f"{name}.{key}"] = (t.shape, None if t.is_floating_point() else t.dtype)
    if config.bias == "all":
        want.update((n, (p.shape, None)) for n, p in _other_biases(model, targets + to_save))
    return want, to_save


def expected_expert_tensors(model: nn.Module, config: LoraConfig) -> dict[str, tuple[torch.Size, None]]:
    """Key -> (shape, None) of the expert stacks' lora_A (r E, in) / lora_B (out, r E) in peft's layout, for the
    config's target_parameters on (unadapted) `model`."""
    want = {}
    targets = expert_targets(model, config.target_parameters)
    for (module, param), prefix in file_prefixes(targets).items():
        shape_A, shape_B = file_shapes(model, module, param, config.r)
        want[f"{prefix}.lora_A.weight"], want[f"{prefix}.lora_B.weight"] = (shape_A, None), (shape_B, None)
    return want


def _shape_refusal(where: str, key: str, got: tuple, need: tuple, stacked: bool, r: int) -> AdapterError:
    """A file tensor of the wrong shape; for an expert stack's, what peft's layout makes of it (r x experts)."""
    message = f"{where}: key {PREFIX + key!r} has shape {got}, the model needs {need}"
    axis = 0 if key.endswith("lora_A.weight") else 1  # peft's (r E, in) and (out, r E)
    if stacked and len(got) == 2 and got[axis] != need[axis] and r and got[axis] % r == 0:
        message += (f" (an expert stack's adapter holds r x experts there: {got[axis]} is r = {r} for "
                    f"{got[axis] // r} experts, this model's stack has {need[axis] // r})")
    return AdapterError(message)


def _peft_redundant(key: str, to_save, want) -> bool:
    """Whether `key` is one of peft's duplicates of a modules_to_save module's tensors (bias="all" writes
    `<module>.original_module.*` and `<module>.modules_to_save.*`): accepted, not loaded. The one rule of
    every loader: a key under a real modules_to_save module (`to_save`) with one of those words that names
    no tensor of this model's adapter (`want`, keys without the prefix). A module merely named
    `original_module`, and a modules_to_save module's own child of that name, load."""
    return key not in want and any(key.startswith(s + r) for s in to_save for r in _PEFT_REDUNDANT)


def validate(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor], where: str
             ) -> tuple[list[str], dict[str, torch.Tensor]]:
    """Check the tensors against the model; returns the modules to adapt (named by the file) and the
    tensors to load, by key (peft's redundant copies left out). Values are checked again after the
    cast to the model's dtypes (_cast_file_tensor), once the layers that hold them exist."""
    embedding = [k for k in tensors if ".lora_embedding_" in k or k.endswith(".base_layer.weight")]
    if embedding:
        raise AdapterError(f"{where}: key {PREFIX + embedding[0]!r} is peft's LoRA on an embedding layer (or the "
                           "base weights peft saves with it): only Linear and Conv1D layers are supported")
    try:
        stacks = expected_expert_tensors(model, config)  # target_parameters: a list of names, matched as peft does
        targets = targets_in({k: t for k, t in tensors.items() if k not in stacks})
        if not targets and not stacks:
            raise ValueError("the weights hold no lora_A / lora_B tensors")
        check_loaded_targets(model, config, targets)
        want, to_save = expected_tensors(model, config, targets)
        want.update(stacks)
    except ValueError as err:
        raise AdapterError(f"{where}: the adapter does not fit this model: {err}") from err
    redundant = {k for k in tensors if _peft_redundant(k, to_save, want)}
    unexpected = sorted(set(tensors) - set(want) - redundant)
    if unexpected:
        raise AdapterError(f"{where}: key {PREFIX + unexpected[0]!r} names no tensor of this model's adapter "
                           f"({len(unexpected)} such keys)")
    missing = sorted(set(want) - set(tensors))
    if missing:
        raise AdapterError(f"{where}: key {PREFIX + missing[0]!r} is missing ({len(missing)} missing keys)")
    for key, (shape, dtype) in want.items():
        t = tensors[key]
        if t.shape != shape:
            raise _shape_refusal(where, key, tuple(t.shape), tuple(shape), key in stacks, config.r)
        _check_file_tensor(where, PREFIX + key, t, dtype)
    return targets, {key: tensors[key] for key in want}


@torch.no_grad()
def load_adapter(cls, model: nn.Module, directory, is_trainable: bool = False, backend: str = "auto",
                 adapter_name: str = "default", autocast_adapter_dtype: bool = True):
    check_backend(backend)  # the caller's argument: a plain ValueError, before the files are read
    cls.refuse_adapted(model)  # as get_lora_model: an adapted model takes more adapters with load_adapter
    config, tensors = read_adapter(directory)
    config.backend = backend
    try:
        config.validate()
    except (TypeError, ValueError) as err:
        raise AdapterError(f"{directory}: {err}") from err
    where = str(directory)
    targets, to_load = validate(model, config, tensors, where)
    # The file's weights replace the initial ones: build with the layer's default init and keep the
    # file's value (e.g. "eva", "orthogonal") in the config.
    try:
        lora_model = cls(model, dataclasses.replace(config, init_lora_weights=True, inference_mode=False),
                         targets=targets, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    except ValueError as err:  # e.g. a target inside a modules_to_save module; the model is unchanged
        raise AdapterError(f"{directory}: the adapter does not fit this model: {err}") from err
    try:
        config.fan_in_fan_out = lora_model.active_peft_config.fan_in_fan_out  # what the layers' kinds decided
        config.inference_mode = not is_trainable  # as peft: is_trainable decides
        lora_model.peft_config[adapter_name] = config
        # Every value is cast and checked before any is copied.
        staged = []
        for key, t in to_load.items():
            dest, layout = _destination(lora_model, key)
            staged.append((key, dest, layout(_cast_file_tensor(where, PREFIX + key, t, dest.dtype))))
        _check_compute_range(where, lora_model, staged)
        for _, dest, value in staged:
            dest.copy_(value)
        if not is_trainable:
            lora_model.requires_grad_(False)
            lora_model.eval()
    except BaseException:
        lora_model.restore_base()
        raise
    return lora_model


@torch.no_grad()
def load_extra_adapter(lora_model, directory, adapter_name: str, is_trainable: bool = False) -> None:
    """Load the adapter in `directory` into `lora_model` as a further adapter `adapter_name` (peft's
    PeftModel.load_adapter). Config and every key, shape and dtype are checked before anything changes;
    the values, cast to the new adapter's dtype, before any is copied (a refusal removes the adapter
    again: the model is left as it was)."""
    config, tensors = read_adapter(directory)
    where = str(directory)
    stacks = _expert_file_keys(lora_model)
    theirs = targets_in({k: t for k, t in tensors.items() if k not in stacks})
    try:  # the model's rules for a further adapter, on the modules the file's keys adapt
        lora_model.check_new_config(config, "load_adapter", targets=theirs)
    except ValueError as err:
        raise AdapterError(f"{where}: {err}") from err
    want = {}
    for name, layer in lora_model.linear_layers():
        want[f"{name}.lora_A.weight"] = (config.r, layer.in_features)
        want[f"{name}.lora_B.weight"] = (layer.out_features, config.r)
    for key, (layer, which) in stacks.items():  # peft's layout: (r E, in) and (out, r E)
        rE = config.r * layer.num_experts
        want[key] = (rE, layer.in_features) if which == 0 else (layer.out_features, rE)
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise AdapterError(f"{where}: key {PREFIX + extra[0]!r} names no tensor of this model's adapter")
    for key, shape in want.items():
        t = tensors.get(key)
        if t is None:
            raise AdapterError(f"{where}: key {PREFIX + key!r} is missing")
        if tuple(t.shape) != shape:
            raise _shape_refusal(where, key, tuple(t.shape), shape, key in stacks, config.r)
        _check_file_tensor(where, PREFIX + key, t)
    config.backend = lora_model.active_peft_config.backend
    config.inference_mode = not is_trainable  # as peft: is_trainable decides
    try:
        # The targets are the file's keys: the config's target_modules is not run on names.
        lora_model.add_checked_adapter(adapter_name, dataclasses.replace(config, init_lora_weights=True),
                                f"load_adapter({adapter_name!r})", targets=theirs)
    except ValueError as err:
        raise AdapterError(f"{where}: {err}") from err
    lora_model.peft_config[adapter_name] = dataclasses.replace(
        config, fan_in_fan_out=lora_model.peft_config[adapter_name].fan_in_fan_out)
    slot = lora_model.slot(adapter_name)
    try:  # every value cast and checked (in the dtype the new adapter has) before any is copied
        staged = []
        for key in want:
            dest, layout = _destination(lora_model, key, slot)
            staged.append((key, dest, layout(_cast_file_tensor(where, PREFIX + key, tensors[key], dest.dtype))))
        _check_compute_range(where, lora_model, staged, slot)
    except BaseException:
        lora_model.delete_adapter(adapter_name)
        raise
    for _, dest, value in staged:
        dest.copy_(value)
    if is_trainable:
        lora_model.set_requires_grad(adapter_name)


@torch.no_grad()
def load_weights_into(lora_model, directory) -> None:
    """Replace the adapter weights of `lora_model` by those saved in `directory` (a checkpoint of this
    very model: same modules, shapes and scaling), in peft's layout: the first adapter at the top (or
    in `directory/<its name>`), every other adapter from `directory/<name>` where saved. Everything
    is checked before anything is copied."""
    first = lora_model.first_adapter
    top = directory if os.path.isfile(os.path.join(directory, WEIGHTS_NAME)) else os.path.join(directory, first)
    plan = [(first, top)] + [(name, os.path.join(directory, name)) for name in lora_model.peft_config
                             if name != first and os.path.isfile(os.path.join(directory, name, WEIGHTS_NAME))]
    staged = []
    for name, where in plan:
        slot, mine = lora_model.slot(name), []
        for key, t in _checked_checkpoint(lora_model, where, name).items():
            dest, layout = _destination(lora_model, key[len(PREFIX):], slot)
            mine.append((key[len(PREFIX):], dest, layout(t)))
        _check_compute_range(str(where), lora_model, mine, slot)
        staged += mine
    for _, dest, value in staged:
        dest.copy_(value)


def _checked_checkpoint(lora_model, directory, adapter_name: str) -> dict[str, torch.Tensor]:
    """The tensors saved in `directory` for adapter `adapter_name`, by peft key, checked against it as
    from_pretrained checks a file (keys, shapes, dtypes, NaN / inf before and after the cast) and cast
    to the dtypes of the model's tensors."""
    config, tensors = read_adapter(directory)
    ours = lora_model.peft_config[adapter_name]
    differ = [k for k in _SCALING if getattr(config, k) != getattr(ours, k)]
    if differ:
        k = differ[0]
        raise AdapterError(f"{directory}: saved with {k}={getattr(config, k)!r}, this model's adapter "
                           f"{adapter_name!r} has {k}={getattr(ours, k)!r}")
    want = adapter_state(lora_model, adapter_name)
    to_save = [name for name, _ in lora_model.saved_modules()]
    ours = {k[len(PREFIX):] for k in want}
    tensors = {PREFIX + k: t for k, t in tensors.items() if not _peft_redundant(k, to_save, ours)}
    if set(tensors) != set(want):
        extra, missing = sorted(set(tensors) - set(want)), sorted(set(want) - set(tensors))
        raise AdapterError(f"{directory}: the saved adapter does not match this model's: "
                           + (f"key {extra[0]!r} is not in it; " if extra else "")
                           + (f"key {missing[0]!r} is missing" if missing else ""))
    bad = [k for k, t in tensors.items() if t.shape != want[k].shape]
    if bad:
        raise AdapterError(f"{directory}: key {bad[0]!r} has shape {tuple(tensors[bad[0]].shape)}, this model's "
                           f"is {tuple(want[bad[0]].shape)}")
    for key, t in tensors.items():
        _check_file_tensor(str(directory), key, t, None if want[key].is_floating_point() else want[key].dtype)
    return {key: _cast_file_tensor(str(directory), key, t, want[key].dtype) for key, t in tensors.items()}


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def _destination(lora_model, key: str, slot: str = "default"):
    """(The tensor of the adapted model a (validated) adapter key is loaded into, the map from the file's layout
    to its own); lora_A / lora_B go to the layers' adapter `slot` (never merely the active one); an expert
    stack's are in peft's layout in the file."""
    model = lora_model.model
    stacks = _expert_file_keys(lora_model)
    if key in stacks:
        layer, which = stacks[key]
        return layer.adapter_weights(slot)[which], lambda t, entry=stacks[key]: _from_file_layout(entry, t)
    owner = key.rpartition(".")[0]
    if key.endswith("." + MAGNITUDE):
        return model.get_submodule(key[: -len(MAGNITUDE) - 1]).adapter_parameters(slot)[2], _as_is
    if owner.endswith(".lora_A") or owner.endswith(".lora_B"):
        layer, _, attr = owner.rpartition(".")
        return model.get_submodule(layer).adapter_weights(slot)[0 if attr == "lora_A" else 1], _as_is
    if owner.endswith(".base_layer"):
        return model.get_submodule(owner[: -len(".base_layer")]).bias, _as_is
    for name, module in lora_model.saved_modules():
        if key.startswith(name + "."):
            return module.trainable.state_dict(keep_vars=True)[key[len(name) + 1:]], _as_is
    return model.get_parameter(key), _as_is  # a bias saved under bias="all"
