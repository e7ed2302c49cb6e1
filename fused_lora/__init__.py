"""fused_lora: LoRA layers whose forward and backward are fused kernels.

Public API:
    FusedLoRALinear                 drop-in nn.Linear with a LoRA adapter
    lora_linear                     the functional op (differentiable)
    BackendUnavailable              raised when a requested backend cannot run
"""
from .backends import BackendUnavailable
from .layer import FusedLoRALinear
from .ops import lora_linear

__version__ = "0.1.0"

__all__ = ["FusedLoRALinear", "lora_linear", "BackendUnavailable", "__version__"]
