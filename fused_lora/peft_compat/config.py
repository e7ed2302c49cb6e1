"""LoraConfig: which modules get adapters and how, with peft's names and defaults; and the rule for
every field of peft's LoraConfig (honoured, refused when set, or ignored), which docs/ADAPTERS.md
mirrors and adapter loading follows."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, fields
from typing import NamedTuple, Optional, Union

from ..modules import validation as v

HONOURED, REFUSED, IGNORED = "honoured", "refused when set", "ignored"


class FieldRule(NamedTuple):
    status: str  # HONOURED, REFUSED (any value but the off value: None, False, {}, []) or IGNORED
    reason: str


# Every field of peft 0.21's LoraConfig (tests/peft_compat/test_adapter_files.py fails when peft adds one).
PEFT_FIELD_RULES: dict[str, FieldRule] = {
    "r": FieldRule(HONOURED, "the rank"),
    "lora_alpha": FieldRule(HONOURED, "scaling numerator; a finite real number"),
    "lora_dropout": FieldRule(HONOURED, "dropout on the LoRA branch's input, in [0, 1)"),
    "use_rslora": FieldRule(HONOURED, "scaling alpha / sqrt(r)"),
    "target_modules": FieldRule(HONOURED, "on load the weights file's keys name the adapted modules; a list "
                                          "of names is checked against them, a regex is not run; none means "
                                          "peft's default for the model type, as in peft"),
    "exclude_modules": FieldRule(HONOURED, "as target_modules"),
    "modules_to_save": FieldRule(HONOURED, "full trainable copies, buffers included"),
    "bias": FieldRule(HONOURED, "'none', 'all' or 'lora_only'"),
    "init_lora_weights": FieldRule(HONOURED, "True, False, 'gaussian'; on load also 'orthogonal' and 'eva' (the "
                                             "base is unchanged, the file's A and B replace the init); 'pissa', "
                                             "'pissa_niter_*', 'olora', 'corda', 'loftq', 'lora_ga' change the "
                                             "base weights and 'mica' is a variant: refused"),
    "fan_in_fan_out": FieldRule(HONOURED, "as peft: follows the base layer's kind, True for transformers' Conv1D "
                                          "(in x out weights), False for nn.Linear (a warning when it is changed)"),
    "task_type": FieldRule(HONOURED, "one of peft's TaskType values; SEQ_CLS and TOKEN_CLS add 'classifier' and "
                                     "'score', QUESTION_ANS adds 'qa_outputs' to modules_to_save, as peft does"),
    "base_model_name_or_path": FieldRule(HONOURED, "kept and written back; the model passed in is the base"),
    "peft_type": FieldRule(HONOURED, "must be 'LORA'"),
    "revision": FieldRule(IGNORED, "names the base model's revision; the model passed in is the base"),
    "inference_mode": FieldRule(HONOURED, "True freezes the adapter; on load from_pretrained's is_trainable "
                                          "decides, as in peft"),
    "auto_mapping": FieldRule(IGNORED, "peft's record of a custom model class; no effect on the weights"),
    "peft_version": FieldRule(IGNORED, "provenance only"),
    "runtime_config": FieldRule(IGNORED, "peft does not save it; runtime options only"),
    "megatron_core": FieldRule(IGNORED, "used only with megatron_config, which is refused"),
    "qalora_group_size": FieldRule(IGNORED, "used only with use_qalora, which is refused"),
    "layers_to_transform": FieldRule(REFUSED, "selecting layers by index is not implemented"),
    "layers_pattern": FieldRule(REFUSED, "used with layers_to_transform, not implemented"),
    "rank_pattern": FieldRule(REFUSED, "per-module ranks are not implemented"),
    "alpha_pattern": FieldRule(REFUSED, "per-module alphas are not implemented"),
    "megatron_config": FieldRule(REFUSED, "Megatron parallel layers are not supported"),
    "trainable_token_indices": FieldRule(REFUSED, "trainable token embeddings are not implemented"),
    "loftq_config": FieldRule(REFUSED, "LoftQ quantizes and changes the base weights"),
    "eva_config": FieldRule(IGNORED, "EVA's settings for its data-driven init; the file's A and B replace the "
                                     "init and its rank redistribution is in rank_pattern (refused)"),
    "corda_config": FieldRule(REFUSED, "CorDA changes the base weights"),
    "lora_ga_config": FieldRule(REFUSED, "LoRA-GA changes the base weights"),
    "use_dora": FieldRule(HONOURED, "DoRA (lora_magnitude_vector, the norm by a low-rank identity, fused); the "
                                    "first adapter only: a further adapter with DoRA is refused"),
    "velora_config": FieldRule(REFUSED, "VeLoRA (a peft variant) is not implemented"),
    "alora_invocation_tokens": FieldRule(REFUSED, "activated LoRA (token-dependent adapter) is not implemented"),
    "use_qalora": FieldRule(REFUSED, "QALoRA (pooled inputs) is not implemented"),
    "monteclora_config": FieldRule(REFUSED, "MonteCLoRA (a peft variant) is not implemented"),
    "layer_replication": FieldRule(REFUSED, "layer replication changes the model's structure"),
    "lora_bias": FieldRule(REFUSED, "a bias on lora_B is not implemented"),
    "target_parameters": FieldRule(HONOURED, "the 3-D expert stacks of transformers experts modules (gate_up_proj / "
                                             "up_proj, down_proj), matched as peft matches them; peft's ParamWrapper "
                                             "keys and shapes in files; other parameters are refused"),
    "use_bdlora": FieldRule(REFUSED, "block-diagonal LoRA (a peft variant) is not implemented"),
    "arrow_config": FieldRule(REFUSED, "Arrow routing (a peft variant) is not implemented"),
    "kasa_config": FieldRule(REFUSED, "KaSA (a peft variant) is not implemented"),
    "ensure_weight_tying": FieldRule(REFUSED, "tied adapters are not implemented"),
}

# peft's TaskType values, and the classification heads peft adds to modules_to_save for some of
# them (PeftModelForSequenceClassification / ...TokenClassification / ...QuestionAnswering).
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
TASK_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"),
              "QUESTION_ANS": ("qa_outputs",)}

# Fields written to adapter_config.json, in peft's vocabulary (so peft can read our adapters).
PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
               "bias", "use_rslora", "init_lora_weights", "fan_in_fan_out", "task_type",
               "base_model_name_or_path", "inference_mode", "use_dora", "target_parameters")


def is_off(value) -> bool:
    """The value of a feature that is not used: None, False, {} or []."""
    return value is None or value is False or (isinstance(value, (dict, list)) and len(value) == 0)


def check_peft_fields(values: dict) -> None:
    """peft's fields that LoraConfig does not carry, by PEFT_FIELD_RULES (the loader's rule and the
    constructor's): ValueError naming a refused field that is set, an unknown field that is set, or a
    peft_type other than LORA; ignored fields and off values pass."""
    peft_type = values.get("peft_type")
    if peft_type is not None and peft_type != "LORA":
        raise ValueError(f"peft_type {peft_type!r} is not LORA")
    for key, value in values.items():
        rule = PEFT_FIELD_RULES.get(key)
        if rule is None and not is_off(value):
            raise ValueError(f"{key}: unknown field (set to {v.short_repr(value)}); fused_lora does not know "
                             "what it does, so it refuses rather than ignore it")
        if rule is not None and rule.status == REFUSED and not is_off(value):
            raise ValueError(f"{key}={v.short_repr(value)} is not supported by fused_lora: {rule.reason}")


@dataclass
class LoraConfig:
    """LoRA settings with peft's names and defaults, checked on construction (fused_lora.modules.validation).

    target_modules: a list of exact module names or dotted suffixes ("q_proj" matches
        "model.layers.0.self_attn.q_proj"); a string is a regular expression matched against
        full names; "all-linear" adapts every nn.Linear except the output layer
        (`model.get_output_embeddings()`, when the model has one).
    exclude_modules: the same forms, removed from the targets.
    modules_to_save: modules (same matching as a target list) that get a full trainable copy.
    bias: "none", "all" (every bias trainable and saved) or "lora_only" (the adapted layers' biases).
    init_lora_weights: True, False or "gaussian"; adapters peft made with "orthogonal" or "eva" load too.
    fan_in_fan_out: as in peft, set per layer from the base's kind (True for transformers' Conv1D,
        False for nn.Linear), with a warning when the value given disagrees.
    task_type: one of peft's TaskType names. As in peft, "SEQ_CLS" and "TOKEN_CLS" add "classifier"
        and "score" to modules_to_save, "QUESTION_ANS" adds "qa_outputs" (done here, on construction;
        a head the model lacks is skipped).
    inference_mode: True builds the adapters frozen (peft's meaning).
    use_dora: DoRA (peft's meaning: a trained magnitude per output feature, `lora_magnitude_vector`,
        times the direction W + s B A normalised per row); the first adapter of a model only.
    target_parameters: peft's name for adapting parameters rather than modules: here the 3-D expert stacks of
        transformers' mixture-of-experts layers, e.g. ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        (exact names or dotted suffixes, as peft matches them). The experts then compute through
        `fused_lora.lora_linear_grouped` (the "fused_lora" experts implementation, `fused_lora.modules.experts`);
        files use peft's ParamWrapper keys and shapes. With target_parameters, target_modules None means peft's
        default for the model type where peft has one, and no modules otherwise (as peft); `target_modules=[]`
        adapts no module. lora_dropout on expert stacks is fused_lora's extension (peft refuses it): it trains,
        and saving such an adapter is refused by name (peft could not load it).
    backend: which implementation runs the adapted layers ("auto", "torch", "triton"); not saved.

    target_modules None (peft's default) means the model type's default target modules, peft's table
    (fused_lora.peft_compat.targets.DEFAULT_TARGET_MODULES, by `model.config.model_type`), taken when a model is
    adapted and then recorded here, as peft records them; a model type outside the table is an error.

    peft's other fields are taken too, by the rule adapter loading follows (PEFT_FIELD_RULES,
    docs/ADAPTERS.md): a field fused_lora does not implement is refused with a ValueError naming it
    when set (e.g. `layers_to_transform=[0]`) and accepted at its off value (None, False, {}, []);
    provenance fields (`revision`, `peft_version`, ...) are ignored.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    modules_to_save: Optional[list[str]] = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: Union[bool, str] = True
    fan_in_fan_out: bool = False
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    inference_mode: bool = False
    use_dora: bool = False  # peft's name: DoRA (weight-decomposed LoRA), see fused_lora.ops.dora
    target_parameters: Optional[list[str]] = None  # peft's name: expert stacks (3-D parameters) to adapt
    backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            v.check_module_spec("target_modules", self.target_modules)
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.target_parameters, (set, frozenset, tuple)):  # peft's weight conversion makes a set
            self.target_parameters = sorted(self.target_parameters)
        if isinstance(self.modules_to_save, (set, frozenset, tuple)):
            v.check_modules_to_save(self.modules_to_save)
            self.modules_to_save = list(self.modules_to_save)
        try:
            self.validate()
            heads = TASK_HEADS.get(self.task_type, ())
            if heads:  # peft's PeftModelFor<Task> does this to the config it is given
                self.modules_to_save = list(self.modules_to_save or []) + [
                    h for h in heads if h not in (self.modules_to_save or [])]
        except (TypeError, ValueError) as err:
            raise type(err)(f"LoraConfig: {err}") from None

    def validate(self) -> None:
        """Check every field (again: the dataclass is mutable); TypeError/ValueError naming the field."""
        v.check_module_spec("target_modules", self.target_modules)
        v.check_module_spec("exclude_modules", self.exclude_modules)
        v.check_modules_to_save(self.modules_to_save)
        v.check_target_parameters(self.target_parameters)
        v.check_r(self.r)
        v.check_lora_alpha(self.lora_alpha)
        v.check_lora_dropout(self.lora_dropout)
        v.check_flag("use_rslora", self.use_rslora)
        v.check_scaling(self.r, self.lora_alpha, self.use_rslora)
        v.check_flag("fan_in_fan_out", self.fan_in_fan_out)
        v.check_flag("inference_mode", self.inference_mode)
        v.check_flag("use_dora", self.use_dora)
        v.check_bias(self.bias)
        v.check_init_lora_weights(self.init_lora_weights)
        v.check_task_type(self.task_type, TASK_TYPES)
        v.check_optional_str("base_model_name_or_path", self.base_model_name_or_path)
        v.check_backend(self.backend)

    def to_peft_dict(self) -> dict:
        """The adapter_config.json content (peft's schema)."""
        d = {k: getattr(self, k) for k in PEFT_FIELDS}
        d["peft_type"] = "LORA"
        d["inference_mode"] = True  # peft writes True: a loaded adapter is frozen unless is_trainable
        d["rank_pattern"] = {}
        d["alpha_pattern"] = {}
        return d

    @classmethod
    def from_peft_dict(cls, d) -> "LoraConfig":
        """Read an adapter_config.json written by fused_lora or by peft, following PEFT_FIELD_RULES:
        a refused field that is set, or an unknown field that is set, raises naming the field."""
        if not isinstance(d, dict):
            raise TypeError(f"must hold a JSON object, got {type(d).__name__}")
        if "peft_type" in d and d["peft_type"] is None:
            raise ValueError("peft_type None is not LORA")
        check_peft_fields({k: value for k, value in d.items() if k not in PEFT_FIELDS})
        return cls(**{k: d[k] for k in PEFT_FIELDS if k in d})


def _taking_peft_fields(init):
    """LoraConfig's constructor also takes peft's fields it does not carry, by check_peft_fields (a
    refused one set: ValueError naming it, in the loader's words); a name that is no field of peft's
    either stays Python's TypeError."""
    own = {f.name for f in fields(LoraConfig)}

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        theirs = {k: kwargs.pop(k) for k in list(kwargs) if k not in own and k in PEFT_FIELD_RULES}
        try:
            check_peft_fields(theirs)
        except ValueError as err:
            raise ValueError(f"LoraConfig: {err}") from None
        init(self, *args, **kwargs)

    return __init__


LoraConfig.__init__ = _taking_peft_fields(LoraConfig.__init__)
