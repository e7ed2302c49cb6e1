"""The one implementation table: each row, what it is, where its code lives, the ops it implements, why it
cannot run a `Problem`, and which row checks it (in order of preference on ties).

    torch           fused_lora.torch_row: PyTorch ops (cuBLAS on a GPU); runs whatever torch runs
    triton          fused_lora.kernels: the fused Triton kernels
    triton-tma      fused_lora.kernels.hopper.tma: the Hopper path (TMA + persistent forward and dX GEMMs)
    triton-onepass  fused_lora.kernels.hopper.one_pass: the single-pass forward (no shrink pass)
    dequant-once    fused_lora.dispatch.dequant_once: a quantized base's W dequantized whole (one Triton launch on
                    CUDA) into a transient buffer, then the torch row's GEMMs (torch_row.dequant_once)

A row's module offers the ops it implements in one way: for each op of the row's `ops`, a function named
`op.function` (forward, backward, multi_forward, forward_quant, dora_backward, ...: `core.op_kinds`), and
`keep_mask(seed, shape, p, device)`, its dropout mask. Adding an implementation is one row here and one
such module (tests/dispatch checks every row's module offers its ops). Each row states why it cannot run a problem (its `not_supported_reasons`,
empty when it can), as xformers' dispatch does; an op outside a row's `ops` is always among them.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import torch

from ..core.interpreter import interpreting
from ..core.limits import HOPPER_MAX_RANK, KERNEL_LAYOUTS, MAX_TRITON_MULTI_RANK, MAX_TRITON_RANK
from ..core.op_kinds import (ALL_OPS, BWD, FWD, QUANT_BWD, QUANT_FWD, QUANT_MULTI_BWD, QUANT_MULTI_FWD,
                             Op)
from . import dequant_once
from .problem import Problem

ENV_VAR = "FUSED_LORA_BACKEND"
NO_TRANSIENT_WEIGHT_ENV_VAR = "FUSED_LORA_NO_TRANSIENT_WEIGHT"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HOPPER_DTYPES = (torch.float16, torch.bfloat16)
HOPPER_OPS = frozenset({FWD, BWD})
HOPPER_OP_REFUSAL = ("the Hopper-path rows run one plain adapter (ops fwd, bwd); several adapters in one batch run "
                     "on the triton row's segment kernels, expert weights (grouped ops) on its grouped kernels")
TRITON_OPS = frozenset(ALL_OPS)


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run these inputs."""


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
        reasons.append("bfloat16 is not supported by Triton's interpreter (its bf16 dot is wrong); "
                       "compiled GPU bf16 is")
    if rank > MAX_TRITON_RANK:
        reasons.append(f"rank {rank} is above {MAX_TRITON_RANK}")
    return reasons


def triton_multi_reasons(problem: Problem) -> list[str]:
    """What the segment kernels (several adapters in one batch; expert weights, the grouped ops, which run on
    them) cannot run, beyond the single-adapter reasons: ranks above 128 and, compiled on a GPU, float32
    (their compiled variants are 16-bit: kernels.compile_check)."""
    if problem.op.adapters != "several" and problem.op.base != "experts":
        return []
    kind = "expert-weight (grouped)" if problem.op.base == "experts" else "multi-adapter"
    reasons = []
    if problem.rank > MAX_TRITON_MULTI_RANK:
        reasons.append(f"the {kind} kernels take ranks up to {MAX_TRITON_MULTI_RANK}, the largest "
                       f"rank here is {problem.rank}")
    if problem.dtype == torch.float32 and problem.device.type == "cuda":
        reasons.append(f"the {kind} kernels are compiled for float16 and bfloat16 on a GPU, not float32")
    return reasons


def triton_base_reasons(p: Problem) -> list[str]:
    """Why the triton row cannot run over this quantized base's layout (empty when it can): a layout its
    kernels do not read, or blocks smaller than they take (core.limits.KERNEL_LAYOUTS)."""
    if p.op.base != "quant" or not p.base:
        return []
    if p.base not in KERNEL_LAYOUTS:
        return [f"the Triton kernels do not read the {p.base} layout; the torch backend runs it"]
    name, min_block = KERNEL_LAYOUTS[p.base]
    if p.blocksize < min_block:
        return [f"{name} blocksize {p.blocksize}: the Triton kernels take blocks of {min_block} elements "
                "or more; the torch backend runs it"]
    return []


def triton_reasons(p: Problem) -> list[str]:
    """Why the triton row cannot run `p` (empty when it can)."""
    return (triton_not_supported_reasons(p.device, p.dtype, p.rank) + triton_multi_reasons(p)
            + triton_base_reasons(p))


def segment_kernels_checked_against(p: Problem) -> Optional[str]:
    """The triton row's segment kernels (several adapters; expert weights) and its quantized-base kernels
    (NF4/int8 dequantized in the GEMMs), which no GPU has run yet, are checked against the torch row's path
    for the op. The mixed batch's probe keeps the dropout, and the two rows draw different masks: with
    dropout they are unchecked. The quantized and grouped ops' probes turn the dropout off (ops.quant,
    ops.grouped), so their forward is checked with dropout too; a backward with dropout follows its
    forward's row (rule 4), and torch, another mask, could not stand in for it: unchecked there. The
    single-adapter 16-bit ops are trusted."""
    if p.op.base in ("quant", "experts"):
        return None if p.op.backward and p.dropout else "torch"
    return "torch" if p.op.adapters == "several" and not p.dropout else None


def hopper_reasons(p: Problem, tma: bool) -> list[str]:
    """Why the Hopper-path kernels (fused_lora.kernels.hopper) cannot run `p`: what the triton row cannot
    run, and beyond it what their compiled variant set leaves out (the static gate compiles them for
    sm_90, in float16/bfloat16, at ranks <= 64; the triton row runs the rest), and for TMA rows of K and
    N that are not 16-byte multiples (a descriptor's row stride)."""
    reasons = triton_not_supported_reasons(p.device, p.dtype, p.rank)
    if p.device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(p.device)
        if major != 9:
            reasons.append(f"this GPU is sm_{major}{minor}: the Hopper-path kernels are built and gated for "
                           f"sm_90 only{' (TMA descriptors need sm_90)' if tma and major < 9 else ''}")
    if p.dtype in TRITON_DTYPES and p.dtype not in HOPPER_DTYPES:
        reasons.append(f"dtype {str(p.dtype).replace('torch.', '')}: the Hopper-path kernels are compiled for "
                       "float16 and bfloat16 only (the triton row runs it)")
    if HOPPER_MAX_RANK < p.rank <= MAX_TRITON_RANK:
        reasons.append(f"rank {p.rank} is above {HOPPER_MAX_RANK}, the largest the Hopper-path kernels are "
                       "compiled for (the triton row runs it)")
    if tma and p.dtype in HOPPER_DTYPES:
        elt = torch.empty((), dtype=p.dtype).element_size()
        odd = [f"{name}={n}" for name, n in (("K", p.K), ("N", p.N)) if (n * elt) % 16]
        if odd:
            reasons.append(f"TMA descriptors need rows of 16-byte multiples: {', '.join(odd)} in "
                           f"{str(p.dtype).replace('torch.', '')} is not (the triton row runs it)")
    return reasons


def hopper_checked_against(p: Problem) -> str:
    """The row a Hopper-path row's output is checked against before auto times it: torch (an
    independent implementation) without dropout; with dropout the pointer kernels (triton), whose
    dropout mask the Hopper path shares bit for bit (torch draws a different one)."""
    return "triton" if p.dropout else "torch"


QUANT_OPS = frozenset({QUANT_FWD, QUANT_BWD, QUANT_MULTI_FWD, QUANT_MULTI_BWD})
DEQUANT_ONCE_OP_REFUSAL = ("the dequant-once row runs the ops over a quantized base (quant_fwd, quant_bwd, "
                           "quant_multi_fwd, quant_multi_bwd)")


def dequant_once_reasons(p: Problem) -> list[str]:
    """Why the dequant-once row cannot run `p`: on CUDA its one-launch dequantization needs Triton and writes
    float16, bfloat16 or float32 (elsewhere it dequantizes with PyTorch, in any dtype)."""
    if p.device.type != "cuda":
        return []
    reasons = [] if triton_installed() else ["triton is not installed (the dequantization on CUDA is a Triton kernel)"]
    if p.dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {p.dtype} is not one of float16, bfloat16, float32 (what the dequantization on CUDA "
                       "writes; the torch row runs it)")
    return reasons


def dequant_once_checked_against(p: Problem) -> str:
    """The dequant-once row's output is checked against the torch row's before auto times it: no GPU has run
    its Triton dequantization yet. The two draw the same dropout mask (torch_row's), so every key, dropout or
    not, backward or forward, can be checked (the quantized ops' probes turn the dropout off anyway)."""
    return "torch"


def no_transient_weight() -> bool:
    """Whether FUSED_LORA_NO_TRANSIENT_WEIGHT is set (to anything but "" or "0"): auto then leaves out the rows
    that allocate a transient 16-bit copy of a quantized weight (`Implementation.transient_weight`); a row
    asked for by name still runs."""
    return os.environ.get(NO_TRANSIENT_WEIGHT_ENV_VAR, "") not in ("", "0")


@dataclass(frozen=True)
class Implementation:
    """One row of the table: a name, what it is, the module holding its code (imported on first use: no
    Triton work at package import), the ops it implements, and what it cannot run.

    `check_against`: for a row auto must not trust untested on a device, the name of the row whose output
    its own must match, on the same inputs, before auto times it (see `Registry._time`); None (or a
    callable returning None for a problem): trusted."""
    name: str
    doc: str
    module: Any  # the module's import path (or a callable returning the module: test fakes)
    reasons: Callable[[Problem], list] = lambda problem: []
    check_against: Optional[Callable[[Problem], Optional[str]]] = None
    ops: frozenset = frozenset(ALL_OPS)
    op_refusal: str = ""  # what to say of an op outside `ops` (default: that the row does not implement it)
    transient_weight: bool = False  # allocates a 16-bit copy of a quantized weight per call (auto leaves it out
    # under FUSED_LORA_NO_TRANSIENT_WEIGHT: `no_transient_weight`)

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        reasons = list(self.reasons(problem))
        if problem.op not in self.ops:
            reasons.append(f"op {problem.op}: " + (self.op_refusal or f"not implemented by the {self.name} row"))
        return reasons

    def load(self) -> Any:
        """The row's module (its op functions and `keep_mask`)."""
        return self.module() if callable(self.module) else importlib.import_module(self.module)

    def function(self, op: Op) -> Callable:
        """The row's function for `op` (its module's function named `op.function`)."""
        return getattr(self.load(), op.function)


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("torch", "PyTorch ops (cuBLAS GEMMs onto the rank-r term on a GPU); runs anywhere torch runs",
                   "fused_lora.torch_row"),
    Implementation("dequant-once", "quantized base: W dequantized whole (one Triton launch on CUDA) into a transient "
                   "buffer of the compute dtype, then the torch row's GEMMs; its peak memory grows by the largest "
                   "layer's W", dequant_once.module, dequant_once_reasons, dequant_once_checked_against, QUANT_OPS,
                   DEQUANT_ONCE_OP_REFUSAL, transient_weight=True),
    Implementation("triton", "the fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)",
                   "fused_lora.kernels", reasons=triton_reasons, check_against=segment_kernels_checked_against,
                   ops=TRITON_OPS),
    Implementation("triton-tma", "Hopper path: TMA descriptors + persistent grid for the forward and dX GEMMs "
                   "(fused_lora.kernels.hopper.tma; sm_90)", "fused_lora.kernels.hopper.tma",
                   lambda p: hopper_reasons(p, tma=True), hopper_checked_against, HOPPER_OPS, HOPPER_OP_REFUSAL),
    Implementation("triton-onepass", "single-pass forward: H accumulated in the GEMM's K loop, no shrink pass "
                   "(fused_lora.kernels.hopper.one_pass; sm_90)", "fused_lora.kernels.hopper.one_pass",
                   lambda p: hopper_reasons(p, tma=False), hopper_checked_against, HOPPER_OPS, HOPPER_OP_REFUSAL),
)
BACKENDS = tuple(impl.name for impl in IMPLEMENTATIONS)
