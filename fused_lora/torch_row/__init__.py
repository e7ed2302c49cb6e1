"""The PyTorch implementation (the "torch" row of `fused_lora.dispatch.table`): every op in plain torch ops
(cuBLAS on a GPU), the fallback wherever the Triton kernels cannot run and a second implementation of the
math the kernels are checked against.

    dense.py   one adapter over a 16-bit base          multi.py   several adapters in one batch
    quant.py   over a quantized base (row chunks)      dora.py    the DoRA op
    grouped.py expert weights: rows sorted by group, a loop over the groups hit
    dequant_once.py  over a quantized base, W dequantized whole by a given dequantizer, then dense.py's /
               multi.py's code: the dequant-once row's computation (composed in fused_lora.dispatch.dequant_once)

The row's interface, as every implementation row's: a function per op, named `op.function`
(`core.op_kinds`), and `keep_mask`.
"""
from ..core.dropout import keep_mask
from .dense import backward, forward
from .dora import dora_backward, dora_forward
from .grouped import grouped_backward, grouped_forward
from .multi import backward as multi_backward
from .multi import forward as multi_forward
from .quant import backward_quant, forward_quant, quant_multi_backward, quant_multi_forward

__all__ = ["keep_mask", "forward", "backward", "multi_forward", "multi_backward", "forward_quant", "backward_quant",
           "quant_multi_forward", "quant_multi_backward", "dora_forward", "dora_backward", "grouped_forward",
           "grouped_backward"]
