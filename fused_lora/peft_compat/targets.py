"""Which modules of a model a LoraConfig names: peft's matching rules, with clear errors."""
from __future__ import annotations

import itertools
import re
from typing import Optional, Union

from torch import nn

from .config import TASK_HEADS, LoraConfig
from ..modules.bases import QDORA_REFUSAL, base_refusal, is_conv1d
from ..modules.convert_bnb import is_quantized_base
from ..modules.quantized import QuantizedLinear
from ..modules.validation import short_repr

Spec = Optional[Union[list, str]]

# peft's default target modules by transformers model type (config.model_type), used when a LoraConfig
# has no target_modules, as peft does. A copy of peft 0.21.2's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
# (peft/utils/constants.py), carried rather than imported: peft is optional (a minimal install adapts a
# llama without it), and which modules get adapters must not change with the installed peft.
# tests/peft_compat/test_peft_vocabulary.py fails when peft's table differs.
DEFAULT_TARGET_MODULES: dict[str, Union[list[str], str]] = {
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bloom": ["query_key_value"],
    "blip-2": ["q", "v", "q_proj", "v_proj"],
    "opt": ["q_proj", "v_proj"],
    "gptj": ["q_proj", "v_proj"],
    "gpt_neox": ["query_key_value"],
    "gpt_neo": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "electra": ["query", "value"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "layoutlm": ["query", "value"],
    "llama": ["q_proj", "v_proj"],
    "llama4": ["q_proj", "v_proj"],
    "chatglm": ["query_key_value"],
    "gpt_bigcode": ["c_attn"],
    "mpt": ["Wqkv"],
    "RefinedWebModel": ["query_key_value"],
    "RefinedWeb": ["query_key_value"],
    "falcon": ["query_key_value"],
    "btlm": ["c_proj", "c_attn"],
    "codegen": ["qkv_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "stablelm": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "gemma3_text": ["q_proj", "v_proj"],
    "gemma4": r".*language_model\..*\.(q_proj|v_proj)",
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "nemotron_h": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "rwkv": ["key", "value", "receptance", "output"],
    "rwkv7": ["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
}


# peft (0.21.2, on transformers 5) reads target_modules of these mixture-of-experts model types as written for
# transformers 4, whose experts were nn.Linear: before matching, it rewrites the old projection names into
# target_parameters on the fused 3-D stacks (gate and up both into gate_up_proj, with rank_pattern / alpha_pattern
# doubling r and alpha there) and the router's name into its weight, and drops them from target_modules; with
# target_modules None that leaves no module (the model type's default is not taken). A copy of the families and
# names of peft.utils.transformers_weight_conversion (_MOE_TARGET_MODULE_MAPPING, _MODEL_TO_CONVERSION_PATTERN
# where transformers has a conversion mapping), carried as DEFAULT_TARGET_MODULES is;
# tests/peft_compat/test_expert_lora_refusals.py fails when peft's differ.
PEFT_MOE_RENAMED = {"mixtral": ("gate", "w1", "w2", "w3"), "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj")}
PEFT_MOE_FAMILY = {
    **dict.fromkeys(("minimax", "minimax_m2", "mixtral"), "mixtral"),
    **dict.fromkeys(("Dots3NoteTextModel", "UnlimitedOcrTextModel", "afmoe", "beam", "cohere2_moe", "deepseek_v2",
                     "deepseek_v3", "deepseek_v32", "dots1", "ernie4_5_moe", "exaone_moe", "flex_olmo", "glm4_moe",
                     "glm4_moe_lite", "glm4v_moe", "glm_moe_dsa", "hunyuan_v1_moe", "longcat_flash", "mellum",
                     "olmoe", "qwen3_moe", "qwen3_next", "qwen3_omni_moe", "qwen3_omni_moe_text",
                     "qwen3_omni_moe_thinker", "sarvam_mla", "solar_open"), "qwen2_moe"),
}


def _model_type(model: nn.Module) -> Optional[str]:
    return getattr(getattr(model, "config", None), "model_type", None)


def refuse_peft_moe_renames(model: nn.Module, config: LoraConfig, run_regex: bool = True) -> None:
    """ValueError when target_modules names what peft would rewrite into expert targets on this model type (see
    PEFT_MOE_RENAMED): fused_lora does not do that conversion, and matching the names as modules would silently
    adapt something else than peft. "all-linear" counts (peft adds the old names to it); a regex is probed as peft
    probes it (on `<experts module>.<old name>`), unless `run_regex` is False (loading)."""
    family = PEFT_MOE_FAMILY.get(_model_type(model))
    spec = config.target_modules
    if family is None or spec is None:
        return
    old = PEFT_MOE_RENAMED[family]
    if spec == "all-linear":
        named = list(old)
    elif isinstance(spec, str):
        if not run_regex:
            return
        # peft takes the leaf names of the real modules and parameters the regex matches (a dense layer's
        # gate_proj is renamed as an expert's would be), then probes the experts' transformers-4 keys
        leaves = {key.rpartition(".")[2] for key in itertools.chain((n for n, _ in model.named_modules()),
                                                                    (n for n, _ in model.named_parameters()))
                  if re.fullmatch(spec, key)}
        containers = {n.rpartition(".")[0] for n, _ in model.named_parameters()
                      if n.rpartition(".")[2] in ("gate_up_proj", "down_proj", "weight")}
        named = [o for o in old if o in leaves or any(re.fullmatch(spec, f"{c}.{o}") for c in containers)]
    else:
        named = [t for t in spec if any(t == o or t.endswith("." + o) for o in old)]
    if named:
        says = "includes, in peft," if spec == "all-linear" else "names"  # peft adds the old names to all-linear
        raise ValueError(f"target_modules {short_repr(spec)} on a {_model_type(model)} model {says} {named}: peft "
                         "(on transformers 5) rewrites these transformers-4 names of the experts and the router into "
                         "target_parameters on the fused expert stacks (gate and up into gate_up_proj with rank and "
                         "alpha doubled there), whatever module the names match (a dense layer's Linears too), which "
                         "fused_lora does not do, so a file adapting them would load into other layers in peft; "
                         "name the stacks with "
                         "target_parameters=['mlp.experts.gate_up_proj', 'mlp.experts.down_proj'] and the attention "
                         "projections with target_modules")


def default_target_modules(model: nn.Module) -> Union[list[str], str]:
    """peft's default target modules for `model`'s transformers model type (a sorted list, or a regex),
    as peft takes them when a LoraConfig has none; ValueError when the model has no type in the table."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        raise ValueError(f"target_modules is required: {type(model).__name__} has no transformers config.model_type "
                         "to take peft's default target modules from (give a list of module names, a regex, or "
                         "'all-linear')")
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ValueError(f"target_modules is required: peft has no default target modules for model type "
                         f"{model_type!r} (give a list of module names, a regex, or 'all-linear'; "
                         f"{_linear_listing(model)})")
    default = DEFAULT_TARGET_MODULES[model_type]
    return default if isinstance(default, str) else sorted(set(default))


def target_spec(model: nn.Module, config: LoraConfig) -> Optional[Union[list[str], str]]:
    """The config's target_modules, or peft's default for the model type when it has none. With
    target_parameters and no default for the model type: None, no module (peft's meaning)."""
    if config.target_modules is not None:
        return config.target_modules
    if config.target_parameters:
        model_type = _model_type(model)
        if model_type not in DEFAULT_TARGET_MODULES or model_type in PEFT_MOE_FAMILY:  # peft's rewrite empties it
            return None
    return default_target_modules(model)


def adapts_no_module(model: nn.Module, config: LoraConfig) -> bool:
    """Whether `config` adapts parameters only: target_parameters with target_modules [] (or None and no default
    for the model type)."""
    return bool(config.target_parameters) and target_spec(model, config) in (None, [])


def dotted_suffixes(name: str) -> list[str]:
    """"a.b.c" -> ["a.b.c", "b.c", "c"]: the list entries that match `name` under peft's rule."""
    parts = name.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def name_matches(name: str, spec: Spec) -> bool:
    """peft's rule: a string is a regex over the full name; a list holds exact names or dotted suffixes.
    (Pass a set for long lists: each name costs its depth, not the list's length.)"""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    entries = spec if isinstance(spec, (set, frozenset)) else set(spec)
    return any(s in entries for s in dotted_suffixes(name))


def unmatched_entries(spec: list, names) -> list[str]:
    """The entries of a name list that match none of `names`."""
    matched = {s for n in names for s in dotted_suffixes(n)}
    return [t for t in spec if t not in matched]


def _as_set(spec: Spec) -> Spec:
    return spec if spec is None or isinstance(spec, str) else set(spec)


def output_layer_name(model: nn.Module) -> Optional[str]:
    get = getattr(model, "get_output_embeddings", None)
    out = get() if callable(get) else None
    if out is None:
        return None
    return next((n for n, m in model.named_modules() if m is out), None)


def is_adaptable(module: nn.Module) -> bool:
    """What gets a LoRA adapter: an nn.Linear, or transformers' Conv1D (GPT-2; peft adapts it too), or a
    quantized Linear (bitsandbytes' Linear4bit / Linear8bitLt are nn.Linear; fused_lora's QuantizedLinear)."""
    return isinstance(module, (nn.Linear, QuantizedLinear)) or is_conv1d(module)


def base_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of an adaptable module (a Conv1D stores its weight in x out)."""
    return tuple(module.weight.shape) if is_conv1d(module) else (module.in_features, module.out_features)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_adaptable(m)]


def _linear_listing(model: nn.Module) -> str:
    return "the nn.Linear (or Conv1D) modules are: " + (_few(_linear_names(model), 20) or "none")


def _self_and_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def _without_task_heads(names: list[str], config: LoraConfig) -> list[str]:
    """As peft: a task's classification head gets a full copy (modules_to_save), never an adapter."""
    heads = set(TASK_HEADS.get(config.task_type, ()))
    if not heads:
        return names
    return [n for n in names if not any(name_matches(p, heads) for p in _self_and_parents(n))]


def _check_bases(names: list[str], modules: dict) -> None:
    """Targets whose function the adapted layer would not reproduce (a subclass's own forward, hooks,
    a quantized weight) are an error naming them, never silently adapted into something else."""
    by_reason: dict[str, list[str]] = {}  # each reason said once (a quantized model's can be long)
    for n in names:
        reason = base_refusal(modules[n])
        if reason:
            by_reason.setdefault(reason, []).append(n)
    if by_reason:
        raise ValueError("cannot adapt " + "; ".join(f"{_few(refused)} ({reason})"
                                                     for reason, refused in by_reason.items()))


def check_dora_targets(model: nn.Module, names: list[str]) -> None:
    """use_dora=True: ValueError naming the targets whose base is quantized (QDoRA is not implemented)."""
    modules = dict(model.named_modules())
    quantized = [n for n in names if is_quantized_base(modules[n])]
    if quantized:
        kinds = ", ".join(sorted({type(modules[n]).__name__ for n in quantized}))
        raise ValueError(f"use_dora=True: cannot adapt {_few(quantized)} ({kinds}): {QDORA_REFUSAL}")


def named_targets(model: nn.Module, config: LoraConfig, adaptable=is_adaptable) -> list[str]:
    """The module names `config` selects (target_modules, exclude_modules, a task's head left out), unchecked:
    "all-linear" takes every module `adaptable` accepts but the output layer, as peft does."""
    target_modules = target_spec(model, config)
    if target_modules == "all-linear":
        skip = output_layer_name(model)
        names = [n for n, m in model.named_modules() if adaptable(m) and n != skip]
    else:
        spec = _as_set(target_modules)
        names = [n for n, _ in model.named_modules() if n and name_matches(n, spec)]
    exclude = _as_set(config.exclude_modules)
    names = [n for n in names if not name_matches(n, exclude)]
    return _without_task_heads(names, config)


def find_targets(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the nn.Linear (or Conv1D) modules to adapt. Raises ValueError when a target matches
    nothing, or matches a module that is neither, listing what the model holds. "all-linear" takes
    every one of them but the output layer, as peft does; no target_modules, peft's default for the
    model type (whose entries need not all match, as in peft)."""
    refuse_peft_moe_renames(model, config)
    if adapts_no_module(model, config):
        return []
    names = named_targets(model, config)
    target_modules = target_spec(model, config)
    modules = dict(model.named_modules())
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in names if not is_adaptable(modules[n])]
    if wrong:
        raise ValueError(f"target_modules {target_modules!r} matches modules that are not nn.Linear or "
                         f"Conv1D: {_few(wrong)}; {_linear_listing(model)}")
    if not names:
        raise ValueError(f"target_modules {target_modules!r} matches no module; {_linear_listing(model)}")
    _check_bases(names, modules)
    if isinstance(config.target_modules, list):
        unmatched = unmatched_entries(config.target_modules, names)
        if unmatched and config.exclude_modules is None:
            raise ValueError(f"target_modules entries {unmatched} match no module; {_linear_listing(model)}")
    return names


def check_loaded_targets(model: nn.Module, config: LoraConfig, targets: list[str]) -> None:
    """Loading: `targets` (the modules the weights file adapts) must be nn.Linear (or Conv1D) modules of `model`,
    and a list (or "all-linear") in the config must name exactly them. A regex in the config is not
    run on module names: a downloaded config must not be able to stall the loader."""
    modules = dict(model.named_modules())
    absent = [t for t in targets if t not in modules]
    if absent:
        raise ValueError(f"the weights adapt {absent[0]!r}, which is not a module of this model; "
                         f"{_linear_listing(model)}")
    wrong = [f"{n} ({type(modules[n]).__name__})" for n in targets if not is_adaptable(modules[n])]
    if wrong:
        raise ValueError(f"the weights adapt modules that are not nn.Linear or Conv1D: {_few(wrong)}")
    _check_bases(targets, modules)
    refuse_peft_moe_renames(model, config, run_regex=False)
    if adapts_no_module(model, config):
        if targets:
            raise ValueError(f"the weights adapt {_few(targets)}, which the config's target_modules "
                             f"({config.target_modules!r}, beside target_parameters) does not name")
        return
    # no target_modules: peft's default for the model type, as peft loads such a file (an unknown type: refused)
    spec, exclude = _as_set(target_spec(model, config)), _as_set(config.exclude_modules)
    if isinstance(exclude, str):
        exclude = None  # a regex: not run; the file's keys decide
        if spec == "all-linear":
            return
    if spec == "all-linear":
        skip = output_layer_name(model)
        named = [n for n in _linear_names(model) if n != skip]
    elif isinstance(spec, set):
        named = [n for n, m in modules.items() if n and is_adaptable(m) and name_matches(n, spec)]
    else:
        return
    named = {n for n in _without_task_heads(named, config) if not name_matches(n, exclude)}
    if isinstance(config.exclude_modules, str):  # an unrun exclude regex may remove names: only check inclusion
        extra = sorted(set(targets) - named)
        missing = []
    else:
        extra, missing = sorted(set(targets) - named), sorted(named - set(targets))
    if extra or missing:
        raise ValueError(f"target_modules {short_repr(config.target_modules)} does not agree with the weights: "
                         + (f"the weights adapt {_few(extra)}, which it does not name; " if extra else "")
                         + (f"it names {_few(missing)}, which the weights do not adapt" if missing else ""))


def _few(names: list[str], n: int = 5) -> str:
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def find_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Names of the modules that get a trainable copy. Each entry must match something, except the
    classification heads a task_type adds (peft adds "classifier" and "score" for SEQ_CLS, a model
    has one of them)."""
    if not config.modules_to_save:
        return []
    spec = set(config.modules_to_save)
    names = [n for n, _ in model.named_modules() if n and name_matches(n, spec)]
    optional = set(TASK_HEADS.get(config.task_type, ()))
    missing = [m for m in unmatched_entries(config.modules_to_save, names) if m not in optional]
    if missing:
        raise ValueError(f"modules_to_save entries {_few([repr(m) for m in missing])} match no module; the model's top-level modules "
                         f"are: {_few([n for n, _ in model.named_children()], 20)}")
    # A container and its children both matching: keep the outermost.
    return [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
