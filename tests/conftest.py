"""Test-session setup.

Without a GPU, the Triton kernels are tested through Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, at collection time, unless the caller set it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FUSED_LORA_BACKEND", None)  # tests choose backends explicitly
