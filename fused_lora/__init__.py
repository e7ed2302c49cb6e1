"""fused_lora: LoRA layers whose forward and backward are fused kernels.

Public API:
    FusedLoRALinear                 drop-in nn.Linear with a LoRA adapter
    lora_linear                     the functional op (differentiable)
    lora_linear_multi               the same with several adapters, one per row (mixed batches)
    dora_linear                     the DoRA op (weight-decomposed LoRA, peft's use_dora; differentiable)
    lora_linear_grouped             LoRA on a 3-D expert stack, rows grouped by expert (mixture of experts)
    register_experts_implementation "fused_lora" in transformers' ExpertsInterface (MoE experts through the
                                    grouped op; LoraConfig(target_parameters=...) adapts the expert stacks)
    LoraConfig, get_lora_model      adapt a whole model (peft's vocabulary)
    LoraModel                       the adapted model: counts, merge_and_unload, save/load
    patch_peft, unpatch_peft        run an existing peft model's LoRA layers through the fused op
    LoraTrainer, lora_trainer_class transformers' Trainer (or e.g. TRL's SFTTrainer) checkpointing a
                                    LoraModel as a peft adapter (imports transformers on first use)
    quantize_model                  quantize a plain model's Linears to NF4 / int8 (QLoRA base, no bitsandbytes)
    QuantizedLinear, QuantizedWeight
                                    the frozen quantized base (also read from bitsandbytes' Linear4bit/8bitLt)
    lora_linear_quant               the functional op over a quantized base
    AdapterError                    an adapter directory that cannot be loaded
    AdapterRangeError               an adapter whose values its compute dtype cannot hold (at a forward)
    BackendUnavailable              a requested backend cannot run
"""
from . import backends  # noqa: F401  (fused_lora.backends.report(), as documented)
from .core import files as _files
from .core.version import __version__
from .peft_compat.adapters import AdapterError
from .modules.adapter_range import AdapterRangeError
from .dispatch import BackendUnavailable
from .peft_compat.config import LoraConfig
from .modules.experts import register_experts_implementation
from .modules.layer import FusedLoRALinear
from .peft_compat.model import LoraModel, get_lora_model
from .ops import dora_linear, lora_linear, lora_linear_grouped, lora_linear_multi, lora_linear_quant
from .peft_compat.patch import patch_peft, unpatch_peft
from .modules.quantized import QuantizedLinear, QuantizedWeight, quantize_int8, quantize_nf4
from .peft_compat.quantize import quantize_model


__all__ = ["FusedLoRALinear", "lora_linear", "lora_linear_multi", "dora_linear", "lora_linear_grouped",
           "register_experts_implementation", "LoraConfig", "get_lora_model", "LoraModel", "AdapterError",
           "AdapterRangeError", "BackendUnavailable", "patch_peft", "unpatch_peft",
           "quantize_model", "QuantizedLinear", "QuantizedWeight", "quantize_nf4", "quantize_int8", "lora_linear_quant",
           "LoraTrainer", "lora_trainer_class", "__version__"]


def __getattr__(name):
    if name in ("LoraTrainer", "lora_trainer_class"):  # transformers is imported only when asked for
        try:
            from .peft_compat import trainer
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] != "transformers":
                raise
            raise ImportError(_files.missing_extra(f"fused_lora.{name}", "transformers", "hf")) from None
        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
