"""The LoRA ops as torch.library custom ops (fakes and autograd registered, so torch.compile traces them),
with eager autograd.Functions that skip the custom-op dispatch. Each op reaches its implementation
through the dispatch layer with one shared kit (`kit`): the module never sees a kernel.

    lora.py    one adapter, 16-bit base          multi.py   several adapters in one batch
    quant.py   a quantized base (one or several) dora.py    the DoRA op
    grouped.py LoRA on expert weights (a 3-D expert stack, rows grouped by expert)
"""
from .dora import dora_linear
from .grouped import lora_linear_grouped
from .lora import lora_linear
from .multi import lora_linear_multi
from .quant import lora_linear_quant, lora_linear_quant_multi, quant_linear

__all__ = ["lora_linear", "lora_linear_multi", "lora_linear_quant", "lora_linear_quant_multi", "quant_linear",
           "dora_linear", "lora_linear_grouped"]
