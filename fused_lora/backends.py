"""The one place that decides which implementation runs an op: "torch" or "triton".

Rules, in order:
- an explicit request (argument, else the FUSED_LORA_BACKEND environment variable) wins; asking
  for "triton" where it cannot run raises `BackendUnavailable` with the reasons, never a silent
  fallback;
- otherwise ("auto"): CUDA tensors that Triton supports go to Triton, everything else to torch.

Triton runs on CPU tensors only under TRITON_INTERPRET=1 (its interpreter), and only when asked
for by name: that is how CI tests the real kernels without a GPU. The interpreter computes
bfloat16 matrix products wrongly, so bfloat16 is refused under it.

`calls` counts which backend ran each op, so tests (and users) can see it.
"""
from __future__ import annotations

import importlib.util
import os
from collections import Counter
from functools import lru_cache

import torch

BACKENDS = ("torch", "triton")
ENV_VAR = "FUSED_LORA_BACKEND"
MAX_TRITON_RANK = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

calls: Counter = Counter()  # (op name, backend) -> number of calls


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run these inputs."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_not_supported_reasons(device: torch.device, dtype: torch.dtype, rank: int) -> list[str]:
    """Why the Triton kernels cannot run on these inputs (empty when they can)."""
    reasons = []
    if not triton_installed():
        reasons.append("triton is not installed")
    if device.type == "cpu" and not interpreting():
        reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
    elif device.type not in ("cuda", "cpu"):
        reasons.append(f"device type {device.type!r} is not supported by the Triton kernels")
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not one of float16, bfloat16, float32")
    elif dtype == torch.bfloat16 and interpreting():
        # The interpreter holds bf16 as uint16 and its tl.dot gives garbage (errors ~1e10);
        # compiled kernels on a GPU (TRITON_INTERPRET unset) compute bf16 correctly.
        reasons.append("bfloat16 is not supported under the Triton interpreter (TRITON_INTERPRET=1), "
                       "whose bfloat16 tl.dot is wrong; use float16/float32 there, or a GPU without the interpreter")
    if rank > MAX_TRITON_RANK:
        reasons.append(f"rank {rank} is above {MAX_TRITON_RANK}")
    return reasons


def requested_backend(requested: str = "auto") -> str:
    """The backend asked for: the argument unless "auto", else the environment, else "auto"."""
    choice = requested if requested != "auto" else os.environ.get(ENV_VAR, "auto") or "auto"
    if choice not in ("auto",) + BACKENDS:
        raise ValueError(f"unknown backend {choice!r} (from {'argument' if requested != 'auto' else ENV_VAR}); "
                         f"expected one of auto, torch, triton")
    return choice


def choose_backend(device: torch.device, dtype: torch.dtype, rank: int, requested: str = "auto") -> str:
    """Name of the backend that runs an op on tensors of this device, dtype and LoRA rank."""
    choice = requested_backend(requested)
    if choice == "torch":
        return "torch"
    reasons = triton_not_supported_reasons(device, dtype, rank)
    if choice == "triton":
        if reasons:
            raise BackendUnavailable("the triton backend was requested but cannot run: " + "; ".join(reasons))
        return "triton"
    return "triton" if device.type == "cuda" and not reasons else "torch"


def describe(device: torch.device, dtype: torch.dtype, rank: int, requested: str = "auto") -> str:
    """The backend name, or why none can run, for reprs and error-free display."""
    try:
        return choose_backend(device, dtype, rank, requested)
    except (BackendUnavailable, ValueError) as err:
        return f"unavailable ({err})"
