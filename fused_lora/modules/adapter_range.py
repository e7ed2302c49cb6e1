"""One compute dtype: the rule for an adapter's values.

The fused ops compute the LoRA branch in one dtype, the input's: x, W, A and B alike (that is what lets the
low-rank term share the base GEMM's tiles, its accumulator and its single write). An adapter held in another
dtype, as peft's default keeps it (fp32 adapters on a 16-bit model: `autocast_adapter_dtype=True`), is cast
to the compute dtype on every call, where peft computes the LoRA branch in the adapter's own dtype. A value
that fp32 holds and fp16 does not (|B| = 1e5 with s = 1e-4: s B = 10 is harmless) would turn into inf in
that cast and the output into NaN where peft's output and the float64 reference are finite. So an adapter is
refused, by name, where its values do not fit the compute dtype:

    the largest finite |A| and |B|, the scale |s|, and |s| * max |B| (the DoRA op forms c s B, and the grouped
    op's batched PyTorch path s B, in the compute dtype; the other PyTorch paths take s through the GEMM's
    alpha) must each round to a finite value of the compute dtype.

- At load (`from_pretrained`, `load_adapter`, a Trainer resume, `add_weighted_adapter`): against the model's
  compute dtype (the base weight's), `range_problem`.
- Where the adapter meets a compute dtype at run time (`compute_adapter`, called by every forward: the
  layer's, the mixed batch's, patched peft layers'): `AdapterRangeError`. The scale is a Python number,
  checked on every call. The tensors are checked where the call casts them to a narrower dtype or |s| > 1
  (otherwise A and B are already values of the compute dtype and s B is no larger than B):
  on the CPU on every such call (two reductions over the adapter: no GEMM's cost, no device to wait for);
  on a GPU, reading the result waits for the device, so it is checked once per version of the tensors
  (torch counts every in-place write to a tensor: an optimizer step, `fill_`, `copy_`; a write through
  `.data` is not counted) and not in a training forward (grad enabled, the adapter trainable), which
  would wait once per layer and step. There an out-of-range adapter gives inf / NaN outputs and loss, and
  inf / NaN gradients, which torch's GradScaler detects (it skips the step and lowers the loss scale) and
  which `fused_lora.cli.finetune` stops on; never a finite wrong value. Under torch.compile (where the scale
  may be symbolic) nothing is checked here (the ops still refuse a scale beyond float32), and under
  tracing the tensors are not read.

The gradients are computed in the compute dtype as well: s dY B and s H^T dY (H = x A^T), s applied inside
the products (the GEMM's alpha, `torch_row.dense.scaled_mm`; the Triton kernels scale in float32) so that
where the float64 reference is finite they overflow no earlier than it must; where a product of the compute
dtype still overflows (a large dY under fp16 loss scaling, a large s |H|) the gradient holds inf or NaN,
which is what GradScaler skips, never a finite wrong value.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from ..core.op_inputs import rounding_bound


class AdapterRangeError(ValueError):
    """An adapter whose values do not fit the dtype its LoRA branch is computed in (see the module doc)."""


def _largest_finite(tensors: tuple[Tensor, ...]) -> list[float]:
    """The largest finite magnitude of each tensor (0 for an empty one or one with no finite value), read with
    one wait for the device: max |t|, and only where that is NaN or inf the slower maximum over the finite
    entries."""
    tensors = tuple(t.detach() for t in tensors)
    peaks = torch.stack([t.abs().amax().to(torch.float64) if t.numel() else t.new_zeros((), dtype=torch.float64)
                         for t in tensors]).tolist()
    for i, (t, peak) in enumerate(zip(tensors, peaks)):
        if not math.isfinite(peak):
            a = t.abs()
            peaks[i] = torch.where(torch.isfinite(a), a, a.new_zeros(())).amax().item()
    return peaks


def _beyond(dtype: torch.dtype) -> str:
    return f"beyond the range of {dtype} (largest finite {torch.finfo(dtype).max:g})"


def scale_problem(scaling: float, dtype: torch.dtype) -> Optional[str]:
    """Why the scale s cannot multiply tensors of `dtype` (torch converts it to that dtype in some products), or
    None."""
    if abs(scaling) >= rounding_bound(dtype):
        return f"its scale s = {scaling:g} (lora_alpha / r) is {_beyond(dtype)}"
    return None


def range_problem(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> Optional[str]:
    """What of an adapter (A, B and its scale s) `dtype` cannot hold (see the module doc), or None. NaN and
    inf entries are the adapter's own (non-finite in any dtype) and not this rule's business. Reads the
    tensors' values."""
    bound = rounding_bound(dtype)
    if bound == math.inf:
        return None
    problem = scale_problem(scaling, dtype)
    if problem is not None:
        return problem
    limit = _beyond(dtype)
    if lora_A.dtype == dtype:  # its values are values of dtype: only B's, through s B, can leave the range
        (peak_B,), peak_A = _largest_finite((lora_B,)), 0.0
    else:
        peak_A, peak_B = _largest_finite((lora_A, lora_B))
    if peak_A >= bound:
        return f"lora_A holds {peak_A:g}, {limit}"
    if peak_B >= bound:
        return f"lora_B holds {peak_B:g}, {limit}"
    if abs(scaling) * peak_B >= bound:
        return f"s * lora_B reaches {abs(scaling) * peak_B:g} (s = {scaling:g}, |lora_B| up to {peak_B:g}), {limit}"
    return None


def refusal(name: str, problem: str, dtype: torch.dtype) -> str:
    """The words of a refusal at run time: the adapter, the problem, the rule and the ways out."""
    return (f"adapter {name!r}: {problem}, the dtype its LoRA branch is computed in (the input's: the fused ops "
            f"compute in one dtype and cast the adapter to it on every call; peft computes the branch in the "
            f"adapter's dtype). Run in a wider dtype, keep the adapter within {dtype}'s range, or merge it "
            f"(merge_and_unload computes s B A in float32)")


# tensor -> the (versions, data pointers, dtype, scale) last found in range, on devices where reading waits
_CHECKED = WeakIdKeyDictionary()


def _tensors_to_check(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> bool:
    """Whether this call reads the adapter's values (see the module doc: where, and how often)."""
    if lora_A.dtype == dtype and lora_B.dtype == dtype and abs(scaling) <= 1.0:
        return False
    if rounding_bound(dtype) == math.inf or lora_A.is_meta or lora_B.is_meta:
        return False
    if torch.jit.is_tracing():
        return False
    if lora_A.device.type == "cpu":
        return True
    if torch.is_grad_enabled() and (lora_A.requires_grad or lora_B.requires_grad):
        return False
    return _CHECKED.get(lora_A) != _version_key(lora_A, lora_B, scaling, dtype)


def _version_key(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype) -> tuple:
    return lora_A._version, lora_B._version, lora_A.data_ptr(), lora_B.data_ptr(), dtype, scaling


def compute_adapter(lora_A: Tensor, lora_B: Tensor, scaling: float, dtype: torch.dtype,
                    name: str = "default") -> tuple[Tensor, Tensor]:
    """(A, B) in `dtype`, the compute dtype (their gradients come back in their own dtype); an adapter whose
    values `dtype` cannot hold raises AdapterRangeError naming adapter `name` (see the module doc)."""
    if torch.compiler.is_compiling():  # the scale may be symbolic, the values are not read in a graph
        return lora_A.to(dtype), lora_B.to(dtype)
    problem = scale_problem(scaling, dtype)  # a number: checked on every call, at no cost
    if problem is None and _tensors_to_check(lora_A, lora_B, scaling, dtype):
        problem = range_problem(lora_A, lora_B, scaling, dtype)
        if problem is None and lora_A.device.type != "cpu":
            _CHECKED[lora_A] = _version_key(lora_A, lora_B, scaling, dtype)
    if problem is not None:
        raise AdapterRangeError(refusal(name, problem, dtype))
    return lora_A.to(dtype), lora_B.to(dtype)

