"""The one set of rules for adapter settings, used by LoraConfig, FusedLoRALinear and adapter loading.

Every check raises TypeError (wrong type) or ValueError (wrong value) with a message that starts
with the field's name, before anything is changed. Booleans are not numbers here: `r=True` or
`lora_alpha=True` is a mistake, not 1.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Optional

import torch
from torch import nn

from .. import dispatch
from ..core.op_inputs import rounding_bound

# init_lora_weights values FusedLoRALinear can initialise with.
LAYER_INITS = (True, False, "gaussian")
# peft inits that leave the base weights unchanged: a saved adapter made with them is a plain LoRA
# delta whose A and B replace the initial values, so it loads (fused_lora cannot initialise with them).
LOAD_ONLY_INITS = ("orthogonal", "eva")
# peft inits that also rewrite the base weights (W - s B0 A0, or a quantized W): their A and B are a
# delta on a base this model does not have.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# peft LoRA variants selected through init_lora_weights (another forward or training rule).
VARIANT_INITS = ("mica",)
BIAS_VALUES = ("none", "all", "lora_only")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


MAX_R = 2 ** 63 - 1  # a tensor's size is an int64


def check_r(r) -> None:
    if not _is_int(r):
        raise TypeError(f"r must be an integer >= 1, got {r!r} ({type(r).__name__})")
    if r < 1:
        raise ValueError(f"r must be an integer >= 1, got {r!r}")
    if r > MAX_R:  # no tensor has that many rows (and sqrt(r) for rsLoRA would overflow a float)
        raise ValueError(f"r must be at most 2**63 - 1 (a tensor's size), got an integer of {len(str(r))} digits")


def check_lora_alpha(lora_alpha) -> None:
    if not _is_real(lora_alpha):
        raise TypeError(f"lora_alpha must be a finite real number, got {lora_alpha!r} ({type(lora_alpha).__name__})")
    try:
        finite = math.isfinite(lora_alpha)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        raise ValueError(f"lora_alpha must be a finite real number, got {short_repr(lora_alpha)}")


def check_flag(name: str, value) -> None:
    """A real bool: the string "no" or the number 1 is refused rather than read as true."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_lora_dropout(lora_dropout) -> None:
    if not _is_real(lora_dropout):
        raise TypeError(f"lora_dropout must be a real number in [0, 1), got {lora_dropout!r} "
                        f"({type(lora_dropout).__name__})")
    if not 0.0 <= lora_dropout < 1.0:  # False for NaN as well
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")


def _is_pissa(value) -> bool:
    return isinstance(value, str) and (value == "pissa" or value.startswith("pissa_niter_"))


def check_init_lora_weights(value, for_layer: bool = False) -> None:
    """A peft init_lora_weights value fused_lora can honour.

    for_layer=False (configs, adapter files): inits whose saved adapter is a plain LoRA delta are
    accepted, since loading replaces A and B. for_layer=True: only what the layer can initialise.
    """
    if isinstance(value, bool) or (isinstance(value, str) and value in LAYER_INITS):
        return
    if not isinstance(value, str):
        raise TypeError(f"init_lora_weights must be True, False or a string, got {value!r} ({type(value).__name__})")
    if value == "loftq":
        raise ValueError(
            "init_lora_weights='loftq' replaces the base model's weights by LoftQ's quantized ones, so the "
            "adapter's A and B are a delta on a base this model does not have; fused_lora refuses it (peft has "
            "no converted form of LoftQ adapters: use them with peft on the LoftQ-quantized base)")
    if _is_pissa(value) or value in BASE_CHANGING_INITS:
        raise ValueError(
            f"init_lora_weights={value!r} changes the base model's weights as well as the adapter, so its "
            "A and B are not a LoRA delta on the original base; fused_lora does not do this initialisation "
            "and refuses such adapters. What loads is peft's converted form, the plain LoRA delta on the "
            "original base: save it from peft with save_pretrained(path, "
            "path_initial_model_for_weight_conversion=<the initial adapter>)")
    if value in VARIANT_INITS:
        raise ValueError(f"init_lora_weights={value!r} selects a peft LoRA variant that fused_lora does not implement")
    if value in LOAD_ONLY_INITS:
        if for_layer:
            raise ValueError(f"init_lora_weights={value!r}: fused_lora cannot initialise adapters this way "
                             f"(use one of {LAYER_INITS}); adapters peft trained with it load")
        return
    raise ValueError(f"init_lora_weights must be one of True, False, 'gaussian' (or a peft init such as "
                     f"{', '.join(repr(v) for v in LOAD_ONLY_INITS)}), got {value!r}")


def check_module_spec(name: str, value, allow_none: bool = True) -> None:
    """target_modules / exclude_modules: a regex string (compiled here: a bad one is named) or a
    list of names. Compiling is cheap whatever the pattern; only matching can be slow."""
    if value is None and allow_none:
        return
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"{name}: {value!r} is not a valid regular expression: {err}") from None
        return
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"{name} must be a string (a regex) or a list of strings, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold only strings, got {short_repr(bad[0])} ({type(bad[0]).__name__})")


def check_modules_to_save(value) -> None:
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(f"modules_to_save must be None or a list of strings, got {type(value).__name__}")
    bad = [v for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"modules_to_save must hold only strings, got {short_repr(bad[0])} ({type(bad[0]).__name__})")


def check_target_parameters(value) -> None:
    """None or a list of parameter names (a string is refused, as peft refuses it)."""
    if value is None:
        return
    if isinstance(value, str) or not isinstance(value, list):
        raise TypeError(f"target_parameters must be None or a list of parameter names, got {type(value).__name__}")
    bad = [t for t in value if not isinstance(t, str) or not t]
    if bad:
        raise TypeError(f"target_parameters must hold only non-empty strings, got {short_repr(bad[0])}")


def check_bias(bias) -> None:
    if not isinstance(bias, str) or bias not in BIAS_VALUES:
        raise ValueError(f"bias must be 'none', 'all' or 'lora_only', got {short_repr(bias)}")


def check_optional_str(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be None or a string, got {type(value).__name__}")


def check_task_type(task_type, allowed) -> None:
    """None or one of peft's TaskType names (peft refuses others too)."""
    if task_type is None:
        return
    if not isinstance(task_type, str):
        raise TypeError(f"task_type must be None or a string, got {type(task_type).__name__}")
    if task_type not in allowed:
        raise ValueError(f"task_type must be None or one of {', '.join(allowed)}, got {short_repr(task_type)}")


def check_backend(backend) -> None:
    if not isinstance(backend, str):
        raise TypeError(f"backend must be 'auto' or one of {', '.join(map(repr, dispatch.BACKENDS))}, got {backend!r}")
    dispatch.requested_backend(backend)  # validates the name now rather than at the first forward


def check_adapter_args(r, lora_dropout, init_lora_weights, backend, lora_alpha=8, use_rslora=False) -> None:
    """The settings FusedLoRALinear takes; raises before anything is changed."""
    check_r(r)
    check_lora_alpha(lora_alpha)
    check_flag("use_rslora", use_rslora)
    check_scaling(r, lora_alpha, use_rslora)
    check_lora_dropout(lora_dropout)
    check_init_lora_weights(init_lora_weights, for_layer=True)
    check_backend(backend)


def check_scaling(r, lora_alpha, use_rslora, dtype: Optional[torch.dtype] = None) -> None:
    """The scale s = lora_alpha / r (or / sqrt(r)) within float32's range, the dtype the ops take it in,
    and, given the dtype a layer computes in, within that one's (the PyTorch rows multiply its tensors
    by s: `modules.adapter_range`). ValueError naming lora_alpha; r and lora_alpha are checked first."""
    s = lora_scaling(r, lora_alpha, use_rslora)
    for d in (torch.float32,) if dtype is None or dtype == torch.float32 else (torch.float32, dtype):
        if abs(s) >= rounding_bound(d):
            how = "sqrt(r)" if use_rslora else "r"
            raise ValueError(f"lora_alpha={lora_alpha:g} gives the scale lora_alpha / {how} = {s:g}, beyond "
                             f"the range of {d} (largest finite {torch.finfo(d).max:g}), the dtype "
                             + ("the ops take the scale in" if d == torch.float32 else "this layer computes in"))


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (peft's definition)."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def short_repr(value, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


BASE_ADAPTER_NAME = "__base__"  # in forward's adapter_names: no adapter for that sample (peft's name)


def check_adapter_name(name, what: str) -> None:
    """An adapter's name: a non-empty string that is not "__base__" (which means no adapter), holds
    no "." (module paths), path separator or NUL (it names a sub-directory when saved), and is not an
    attribute of nn.ModuleDict (where a layer keeps its adapters)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: the adapter name must be a non-empty string, got {name!r}")
    if name == BASE_ADAPTER_NAME or any(c in name for c in "./\\\0") or hasattr(nn.ModuleDict(), name):
        raise ValueError(f"{what}: {name!r} cannot name an adapter ({BASE_ADAPTER_NAME!r} means no adapter; "
                         "names hold no '.', '/', '\\' or NUL and are not nn.ModuleDict attributes)")
