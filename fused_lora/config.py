"""LoraConfig: which modules get adapters and how, with peft's names and defaults."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Union

# Fields written to adapter_config.json, in peft's vocabulary (so peft can read our adapters).
PEFT_FIELDS = ("r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules", "modules_to_save",
               "bias", "use_rslora", "init_lora_weights", "fan_in_fan_out", "task_type",
               "base_model_name_or_path")
# peft features fused_lora does not implement: loading an adapter that uses them is refused.
UNSUPPORTED_WHEN_SET = ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                        "layer_replication", "loftq_config", "megatron_config", "trainable_token_indices",
                        "lora_bias", "target_parameters", "use_qalora", "alora_invocation_tokens")


@dataclass
class LoraConfig:
    """LoRA settings with peft's names and defaults.

    target_modules: a list of exact module names or dotted suffixes ("q_proj" matches
        "model.layers.0.self_attn.q_proj"); a string is a regular expression matched against
        full names; "all-linear" adapts every nn.Linear except the output layer
        (`model.get_output_embeddings()`, when the model has one).
    exclude_modules: the same forms, removed from the targets.
    modules_to_save: modules (same matching as a target list) that get a full trainable copy.
    bias: "none", "all" (every bias trainable and saved) or "lora_only" (the adapted layers' biases).
    backend: which implementation runs the adapted layers ("auto", "torch", "triton"); not saved.
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
    backend: str = field(default="auto", compare=False)

    def __post_init__(self):
        if self.target_modules is None:
            raise ValueError("LoraConfig: target_modules is required (a list of names, a regex, or 'all-linear')")
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.modules_to_save, (set, tuple)):
            self.modules_to_save = list(self.modules_to_save)
        if self.bias not in ("none", "all", "lora_only"):
            raise ValueError(f"LoraConfig: bias must be 'none', 'all' or 'lora_only', got {self.bias!r}")
        if self.fan_in_fan_out:
            raise ValueError("LoraConfig: fan_in_fan_out=True (Conv1D-style weights) is not supported")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoraConfig: r must be an integer >= 1, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")

    def to_peft_dict(self) -> dict:
        """The adapter_config.json content (peft's schema)."""
        d = {k: getattr(self, k) for k in PEFT_FIELDS}
        d["peft_type"] = "LORA"
        d["inference_mode"] = True
        d["use_dora"] = False
        d["rank_pattern"] = {}
        d["alpha_pattern"] = {}
        return d

    @classmethod
    def from_peft_dict(cls, d: dict) -> "LoraConfig":
        """Read an adapter_config.json written by fused_lora or by peft."""
        if d.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"adapter_config.json: peft_type {d.get('peft_type')!r} is not LORA")
        for key in UNSUPPORTED_WHEN_SET:
            if d.get(key):
                raise ValueError(f"adapter_config.json: {key}={d[key]!r} is not supported by fused_lora")
        known = {f.name for f in dataclasses.fields(cls)} & set(PEFT_FIELDS)
        kwargs = {k: d[k] for k in known if k in d}
        return cls(**kwargs)
