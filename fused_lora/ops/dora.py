"""The DoRA op (weight-decomposed LoRA, peft's `use_dora=True`) at LoRA's cost: never forming W + s B A.

peft's DoRA layer computes, with the norm detached (the paper's section 4.3),

    y = (m / n) * (x W^T + s (D x) A^T B^T) + b,     n_j = || W_j + s B_j A ||   (one per output j)

and this op computes the same without the out x in matrix W + s B A: n from the low-rank identity
(`core.dora_norm.weight_norm`).

The op (`dora_linear`): the column scale c = m / n multiplies the fused GEMM's output (in the
Triton kernel's epilogue; on the PyTorch path folded into W or B, see `torch_row.dora`). Backward:

    dY' = dY * c (columnwise), then LoRA's backward on dY' (dx, dA, dB; n is detached)
    dm_j = sum_i dY_ij Y0_ij / n_j,   Y0 = x W^T + s H B^T = (Y - b) / c

Y0 is recovered from the op's own output Y, which autograd keeps (no copy: the tensor the caller
holds), so dm needs no third GEMM and no M x N buffer: dm_j = sum_i dY_ij (Y_ij - b_j) / (c_j n_j),
reduced in fp32 in the dY pass (Triton: per-row-block partials summed in a fixed order). Columns
with c_j == 0 (m_j == 0: Y holds no Y0) are recomputed directly from x (an M x |J| product).
Memory held: x, H (M x r) as LoRA, plus the output Y itself (shared with the caller; it is extra
only where the next op would not have kept it) and one fp32 vector of out floats (n; c = m / n is
recomputed in backward from the magnitude parameter itself).
Compute: against LoRA, the norm (r/M of the forward GEMM), one more read of Y in the dY pass (Triton;
the PyTorch path: one fp32 pass over dY and Y), and c * W (N x K, in W's dtype, built per forward on
the PyTorch path when N x K < M x N, and per backward for dX on both paths: a transient that raises
the peak, not the memory held). The alternatives cost more: keeping Y0 is an M x N tensor held,
recomputing it is a third GEMM, and scaling dY instead of W is an M x N transient.
Precision: Y is rounded to the input dtype, so in float16/bfloat16 dm carries that rounding
(relative ~2^-8 of |Y|/|Y - b| per element), as peft's own low-precision DoRA does with its
rounded intermediates; float32 matches peft to rounding.

Under torch.compile `dora_linear` calls the custom ops fused_lora::dora_linear_fwd / _bwd (same code,
autograd registered on them); in eager mode an autograd.Function that
skips the custom-op dispatch, as `fused_lora.ops.lora` does for LoRA.

The op has no dropout: the layer applies DoRA's dropout around it as peft does (`modules.variants`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.dora_norm import acc_dtype, sync_free, weight_norm
from ..core.op_inputs import as_scaling, check_op_inputs
from ..core.op_kinds import DORA_BWD, DORA_FWD, Op
from .kit import chosen_row

# On CUDA nothing here waits for the GPU: the ZERO_COLUMNS columns of smallest |m| always get dm from x, and
# more such columns in one layer raise through torch._assert_async (core.dora_norm does the same for its rows).
ZERO_COLUMNS = 16


def _row(op: Op, x: Tensor, rank: int, weight: Tensor, backend: str, bench=None):
    """The implementation row for a DoRA op (no check rule: no probe)."""
    return chosen_row(op, x, weight.shape[0], rank, backend, bench=bench)


def _dm(dm_num: Tensor, colscale: Tensor, norm: Tensor, dy: Tensor, x: Tensor, weight: Tensor, h: Tensor,
        lora_B: Tensor, scaling: float) -> Tensor:
    """dm_j = sum_i dY_ij (Y_ij - b_j) / (c_j n_j); columns with c_j == 0 (Y holds no Y0) from x directly."""
    denom = colscale * norm
    zeros = denom == 0
    if sync_free(denom):
        k = min(denom.shape[0], ZERO_COLUMNS)
        zero = torch.topk(denom.abs(), k, largest=False).indices  # recomputed whether zero or not
        torch._assert_async(zeros.sum() <= k, f"DoRA: more than {k} magnitudes of one layer are exactly 0; "
                                              "raise fused_lora.ops.dora.ZERO_COLUMNS")
    elif bool(zeros.any()):
        zero = zeros.nonzero().flatten()
    else:
        return dm_num / denom
    dm = dm_num / torch.where(zeros, torch.ones_like(denom), denom)
    y0 = torch.mm(x, weight[zero].t()) + scaling * torch.mm(h, lora_B[zero].t())
    acc = dm.dtype
    dm[zero] = (dy[:, zero].to(acc) * y0.to(acc)).sum(0) / norm[zero]
    return dm


class _DoraLinear(torch.autograd.Function):
    """Forward y = c * (x W^T + s (x A^T) B^T) + b with c = m / n (n detached); backward as the module says.
    W is frozen (its gradient is not computed: refused in `dora_linear`); db is dY's column sum."""

    @staticmethod
    def _colscale(magnitude: Tensor, norm: Tensor, x: Tensor) -> Tensor:
        """c = m / n (fp32; fp64 for fp64 inputs): recomputed in backward, bit for bit, rather than kept."""
        colscale = magnitude.detach().to(norm.dtype) / norm
        return colscale if x.dtype == torch.float64 else colscale.float()

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, magnitude, scaling, backend, weight_sq):
        norm = weight_norm(weight, lora_A, lora_B, scaling, weight_sq)
        colscale = _DoraLinear._colscale(magnitude, norm, x)
        args = (x, weight, bias, lora_A, lora_B, scaling, colscale)
        y, h = _row(DORA_FWD, x, lora_A.shape[0], weight, backend,
                    bench=lambda m: lambda: m.dora_forward(*args)).function(DORA_FWD)(*args)
        # magnitude is the caller's parameter (no copy); its version counter refuses an in-place change
        ctx.save_for_backward(x, weight, bias, lora_A, lora_B, h, y, magnitude, norm)
        ctx.scaling, ctx.backend = scaling, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():  # create_graph=True: a gradient of this gradient is asked for
            raise RuntimeError("dora_linear: double backward (create_graph=True) is not supported with DoRA")
        x, weight, bias, lora_A, lora_B, h, y, magnitude, norm = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dA, dB, dm = _backward(dy.contiguous(), x, weight, bias, lora_A, lora_B, h, y, magnitude, norm,
                                   ctx.scaling, ctx.backend, need[0], need[3] or need[4], need[5])
        return (dx if need[0] else None, None, _bias_grad(dy, need[2]), dA if need[3] else None,
                dB if need[4] else None, dm, None, None, None)


def _bias_grad(dy: Tensor, needed: bool) -> Optional[Tensor]:
    """db = dY's column sum: b is added after the column scale, outside the weight norm (peft trains it
    with bias="all" / "lora_only")."""
    return dy.sum(0) if needed else None


def _backward(dy, x, weight, bias, lora_A, lora_B, h, y, magnitude, norm, scaling, backend,
              need_dx, need_lora, need_dm):
    """(dx, dA, dB, dm), None where not needed: the backend's kernels, then dm from their column sums."""
    colscale = _DoraLinear._colscale(magnitude, norm, x)
    args = (dy, x, weight, lora_A, lora_B, h, scaling, colscale, y, bias, need_dx, need_lora, need_dm)
    row = _row(DORA_BWD, x, lora_A.shape[0], weight, backend, bench=lambda m: lambda: m.dora_backward(*args))
    dx, dA, dB, dm_num = row.function(DORA_BWD)(*args)
    dm = _dm(dm_num, colscale, norm, dy, x, weight, h, lora_B, scaling).to(magnitude.dtype) if need_dm else None
    return dx, dA, dB, dm


# ------------------------------------------------------------------ the same op for torch.compile

@torch.library.custom_op("fused_lora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, scaling: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, H, n): what _DoraLinear.forward computes, as a custom op torch.compile traces without breaks."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    colscale = _DoraLinear._colscale(magnitude, norm, x)
    y, h = _row(DORA_FWD, x, lora_A.shape[0], weight, backend).function(DORA_FWD)(
        x, weight, bias, lora_A, lora_B, scaling, colscale)
    return y, h, norm


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scaling, backend):
    acc = acc_dtype(x, weight, lora_A, lora_B)
    return (x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0]),
            weight.new_empty(weight.shape[0], dtype=acc))


@torch.library.custom_op("fused_lora::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    h: Tensor, y: Tensor, magnitude: Tensor, norm: Tensor, scaling: float, backend: str,
                    need_dx: bool, need_lora: bool, need_dm: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dm), empty where not asked for (custom ops cannot return None)."""
    grads = _backward(dy.contiguous(), x, weight, bias, lora_A, lora_B, h, y, magnitude, norm, scaling, backend,
                      need_dx, need_lora, need_dm)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@dora_linear_bwd.register_fake
def _(dy, x, weight, bias, lora_A, lora_B, h, y, magnitude, norm, scaling, backend, need_dx, need_lora, need_dm):
    def maybe(flag, *shape, dtype=None):
        return x.new_empty(shape if flag else (0,), dtype=dtype if flag else None)
    return (maybe(need_dx, *x.shape), maybe(need_lora, *lora_A.shape), maybe(need_lora, *lora_B.shape),
            maybe(need_dm, weight.shape[0], dtype=magnitude.dtype))


def _op_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, magnitude, scaling, backend = inputs
    ctx.save_for_backward(x, weight, bias, lora_A, lora_B, output[1], output[0], magnitude, output[2])
    ctx.scaling, ctx.backend = scaling, backend


def _op_backward(ctx, dy, _dh, _dn):
    x, weight, bias, lora_A, lora_B, h, y, magnitude, norm = ctx.saved_tensors
    need = ctx.needs_input_grad
    dx, dA, dB, dm = dora_linear_bwd(dy, x, weight, bias, lora_A, lora_B, h, y, magnitude, norm, ctx.scaling,
                                     ctx.backend, need[0], need[3] or need[4], need[5])
    return (dx if need[0] else None, None, _bias_grad(dy, need[2]), dA if need[3] else None,
            dB if need[4] else None, dm if need[5] else None, None, None)


dora_linear_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


def check_magnitude(magnitude, weight: Tensor) -> None:
    if not isinstance(magnitude, Tensor):
        raise TypeError(f"dora_linear: magnitude must be a tensor, got {type(magnitude).__name__}")
    if magnitude.dim() != 1 or magnitude.shape[0] != weight.shape[0]:
        raise ValueError(f"dora_linear: magnitude has shape {tuple(magnitude.shape)}, expected "
                         f"({weight.shape[0]},): one per output feature")
    if not magnitude.is_floating_point():
        raise TypeError(f"dora_linear: magnitude has dtype {magnitude.dtype}, not floating point")
    if magnitude.device != weight.device:
        raise ValueError(f"dora_linear: magnitude is on {magnitude.device} but weight is on {weight.device}")


def check_weight_sq(weight_sq: Optional[Tensor], weight: Tensor) -> None:
    """weight_sq, where given: a floating (N,) tensor on the weight's device (its values, ||W_j||^2, are the
    caller's: not read here)."""
    if weight_sq is None:
        return
    if not isinstance(weight_sq, Tensor):
        raise TypeError(f"dora_linear: weight_sq must be a tensor (||W_j||^2 per output row) or None, got "
                        f"{type(weight_sq).__name__}")
    if not weight_sq.dtype.is_floating_point:
        raise TypeError(f"dora_linear: weight_sq has dtype {weight_sq.dtype}; expected a floating dtype")
    if tuple(weight_sq.shape) != (weight.shape[0],):
        raise ValueError(f"dora_linear: weight_sq has shape {tuple(weight_sq.shape)}, expected ({weight.shape[0]},) "
                         f"(one ||W_j||^2 per output row)")
    if weight_sq.device != weight.device:
        raise ValueError(f"dora_linear: weight_sq is on {weight_sq.device} but weight is on {weight.device}")


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, backend: str = "auto",
                weight_sq: Optional[Tensor] = None) -> Tensor:
    """y = (m / n) * (x W^T + s (x A^T) B^T) + b for a 2-D x (M x K), n_j = ||W_j + s B_j A|| detached
    (peft's DoRA without dropout).

    x, weight (N x K), bias (N) or None, lora_A (r x K), lora_B (N x r) share one floating dtype and
    device (as `lora_linear`); magnitude (N,) any floating dtype (its gradient comes back in it).
    Differentiable in x, bias, lora_A, lora_B and magnitude, once (create_graph=True raises RuntimeError);
    W frozen.
    `weight_sq`: ||W_j||^2 if the caller knows it for this W (else computed; its values are trusted, not
    read for checking). Bad inputs raise ValueError / TypeError.
    """
    scaling = as_scaling(scaling)
    check_op_inputs(x, weight, bias, lora_A, lora_B, 0.0)
    check_magnitude(magnitude, weight)
    check_weight_sq(weight_sq, weight)
    if weight.requires_grad:
        raise ValueError("dora_linear: the base weight must be frozen with DoRA (requires_grad=False): "
                         "its gradient through the weight norm is not implemented")
    if min(x.shape[0], x.shape[1], weight.shape[0], lora_A.shape[0]) == 0:
        raise ValueError(f"dora_linear: empty sizes are not supported (x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, rank {lora_A.shape[0]})")
    if torch.compiler.is_compiling():  # the custom op: traced without graph breaks
        return dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, scaling, backend)[0]
    return _DoraLinear.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, backend, weight_sq)
