"""DoRA (weight-decomposed LoRA, peft's `use_dora=True`) at LoRA's cost: never forming W + s B A.

peft's DoRA layer computes, with the norm detached (the paper's section 4.3),

    y = (m / n) * (x W^T + s (D x) A^T B^T) + b,     n_j = || W_j + s B_j A ||   (one per output j)

and this module computes the same without the out x in matrix W + s B A:

    n_j^2 = ||W_j||^2 + 2 s B_j . (A W_j^T) + s^2 B_j (A A^T) B_j^T,   n_j = ||W_j|| sqrt(1 + t_j)

in float32 (float64 for float64 inputs), t_j the low-rank terms over ||W_j||^2. Where they are exactly
zero (B_j = 0: a fresh adapter) n_j is peft's own ||W_j|| (torch.linalg.norm over W's rows in W's dtype,
as peft reduces W + s B A), so peft's initial magnitude gives c = m / n = 1 exactly and the layer is
its base bit for bit. ||W_j|| is recomputed per forward (one more pass over W in fp32; for a
low-precision W one fp32 pass over row chunks serving A W^T too, and peft's norm in W's dtype): a cache
keyed on the weight's version missed writes through `.data` and, under autocast,
keyed a per-call cast copy whose address the allocator reuses. A W^T is an r x out product (2 r in
out FLOPs: r/M of the forward GEMM) and A A^T is r x r. The identity cancels when W_j + s B_j A is small against W_j
(||W_j||^2 + s^2 ||B_j A||^2 over n_j^2 large); such rows (n_j^2 < 2^-6 of that sum, so the
identity's rounding stays below ~64 ulp of n_j^2) are recomputed directly (a rows x in temporary,
rows = the few bad ones; on CUDA, without a host sync, always the DIRECT_ROWS rows nearest to
cancelling, and more such rows in one layer raise through torch._assert_async).

The op (`dora_linear`): the column scale c = m / n multiplies the fused GEMM's output (in the
Triton kernel's epilogue; on the PyTorch path folded into W or B, see `dora_torch`). Backward:

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

Dropout (p > 0, training): matched to peft, whose DoRA computes the base term on the dropped input:
y = x W^T + b + (c - 1) (D x) W^T + c s (D x) A^T B^T (not the paper's c (x W^T + s B A D x) + b).
That costs a second GEMM: y = (x - D x) W^T + b + dora_linear(D x) with D drawn by torch's dropout
(the same random stream as peft's nn.Dropout), D x held for backward (M x in). With p = 0 or in eval
the single fused op runs.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.op_inputs import as_scaling, check_op_inputs

MAGNITUDE = "lora_magnitude_vector"  # peft's parameter name (and its adapter file key)
CANCELLATION = 2.0 ** -6  # n^2 below this fraction of ||W_j||^2 + s^2 ||B_j A||^2: computed directly
_CHUNK_ELEMENTS = 1 << 24  # rows of a low-precision W cast to fp32 at a time (64 MiB)
# On CUDA nothing here waits for the GPU (a host sync per layer would stall the launch queue): the
# DIRECT_ROWS rows nearest to cancelling are always recomputed directly, the ZERO_COLUMNS columns of
# smallest |m| always get dm from x, and more than that many cases raise through torch._assert_async.
DIRECT_ROWS = 64
ZERO_COLUMNS = 16
SYNC_FREE: Optional[bool] = None  # None: on CUDA only (tests set True to run that path on the CPU)


def _sync_free(t: Tensor) -> bool:
    return t.is_cuda if SYNC_FREE is None else SYNC_FREE


def _acc_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _row_chunks(weight: Tensor, acc: torch.dtype):
    """(start, rows of W as `acc`) in chunks, so a low-precision W is never copied whole to fp32."""
    N, K = weight.shape
    step = N if weight.dtype == acc else max(1, _CHUNK_ELEMENTS // max(K, 1))
    for i in range(0, N, step):
        yield i, weight[i:i + step].to(acc)


@torch.no_grad()
def weight_sq_norms(weight: Tensor, acc: Optional[torch.dtype] = None) -> Tensor:
    """||W_j||^2 per row of W (N x K), in `acc` (default fp32, fp64 for fp64 W)."""
    acc = acc or _acc_dtype(weight)
    out = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
    for i, rows in _row_chunks(weight, acc):
        out[i:i + rows.shape[0]] = (rows * rows).sum(1)
    return out


@torch.no_grad()
def weight_norm(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                weight_sq: Optional[Tensor] = None) -> Tensor:
    """n_j = ||W_j + s B_j A|| for W (N x K), A (r x K), B (N x r), without forming W + s B A;
    fp32 (fp64 if any input is fp64), as ||W_j|| sqrt(1 + t_j) with t_j = (2 s B_j . (A W_j^T) +
    s^2 ||B_j A||^2) / ||W_j||^2. Where the low-rank terms of row j are exactly zero (B_j = 0: a fresh
    adapter) n_j is peft's ||W_j|| bit for bit: torch.linalg.norm over W's rows in W's dtype and layout, as
    peft reduces W + s B A, so peft's initial magnitude gives a column scale of exactly 1 and the layer is its
    base. Elsewhere ||W_j|| is reduced in fp32 (for a 16-bit W, peft's norm rounded to W's dtype would cost
    the identity its accuracy; the two differ by that rounding). `weight_sq`: ||W_j||^2 if already known
    (`weight_sq_norms`; its square root then stands for ||W_j||, at zero low-rank terms too); otherwise
    computed here, from the same reads of W as the cross term (W is read as it is now: a cache would miss
    writes through `.data`, which bump no version counter)."""
    acc = _acc_dtype(weight, lora_A, lora_B)
    A, B = lora_A.detach().to(acc), lora_B.detach().to(acc)
    weight = weight.detach()
    # peft's ||W_j||: the same reduction peft runs (in W's dtype, over W's own layout), one pass over W
    peft_norm = torch.linalg.norm(weight, dim=1).to(acc) if weight_sq is None else None
    if weight.dtype == acc:  # B_j . (A W_j^T), W read in place; peft's reduction is the fp32 one
        cross = torch.mm(weight, A.t()).mul_(B).sum(1)
        w_norm = peft_norm
    else:  # a low-precision W: fp32 copies of row chunks only, each read for both terms
        cross = torch.empty(weight.shape[0], dtype=acc, device=weight.device)
        w_norm = torch.empty_like(cross) if weight_sq is None else None
        for i, rows in _row_chunks(weight, acc):
            cross[i:i + rows.shape[0]] = (torch.mm(rows, A.t()) * B[i:i + rows.shape[0]]).sum(1)
            if w_norm is not None:
                w_norm[i:i + rows.shape[0]] = torch.linalg.vector_norm(rows, dim=1)
    if weight_sq is not None:
        w_norm = weight_sq.to(acc).sqrt()
        peft_norm = w_norm
    weight_sq = w_norm.square()
    lora_sq = torch.mm(B, torch.mm(A, A.t())).mul_(B).sum(1)  # ||B_j A||^2
    s = float(scaling)
    lora_sq.mul_(s * s)
    low = torch.add(lora_sq, cross, alpha=2.0 * s)  # n_j^2 - ||W_j||^2
    n2 = weight_sq + low
    # ||W_j|| sqrt(1 + t_j); a zero row of W: sqrt(n_j^2) (= s ||B_j A||)
    n = torch.where(weight_sq > 0, w_norm * (low / weight_sq).add_(1.0).clamp_min_(0.0).sqrt_(),
                    n2.clamp_min(0.0).sqrt())
    zero = (lora_sq == 0) & (cross == 0)  # row j's low-rank term is zero (B_j = 0: a fresh adapter)
    if n.is_meta:  # a model built on the meta device (weights come later): shapes only, no values to guard
        return n
    ratio = n2 / (weight_sq + lora_sq)  # 1 without cancellation, 0 where W_j + s B_j A vanishes
    if _sync_free(n2):
        k = min(n2.shape[0], DIRECT_ROWS)
        bad = torch.topk(ratio, k, largest=False).indices  # the rows nearest to cancelling, recomputed
        torch._assert_async(ratio.kthvalue(k).values > CANCELLATION if k < n2.shape[0] else torch.tensor(True),
                            f"DoRA weight norm: more than {k} rows of one layer cancel (||W_j + s B_j A|| tiny "
                            "beside ||W_j||); raise fused_lora.ops.dora.DIRECT_ROWS")
    else:
        bad = (ratio <= CANCELLATION).nonzero().flatten() if bool((ratio <= CANCELLATION).any()) else None
    if bad is not None:
        rows = weight.detach()[bad].to(acc) + s * torch.mm(B[bad], A)
        n[bad] = torch.linalg.vector_norm(rows, dim=1)
    return torch.where(zero, peft_norm, n)  # after the direct rows: the sync-free path recomputes any k rows


# ------------------------------------------------------------------ the op

def _impl(op: str, x: Tensor, rank: int, weight: Tensor, backend: str, bench=None):
    from .lora import _chosen  # the one place that chooses (and counts) an implementation
    return _chosen(op, x, rank, backend, weight, 0.0, bench=bench)


def _dm(dm_num: Tensor, colscale: Tensor, norm: Tensor, dy: Tensor, x: Tensor, weight: Tensor, h: Tensor,
        lora_B: Tensor, scaling: float) -> Tensor:
    """dm_j = sum_i dY_ij (Y_ij - b_j) / (c_j n_j); columns with c_j == 0 (Y holds no Y0) from x directly."""
    denom = colscale * norm
    zeros = denom == 0
    if _sync_free(denom):
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
        impl = _impl("dora_fwd", x, lora_A.shape[0], weight, backend,
                     bench=lambda m: lambda: m.dora_forward(*args))
        y, h = impl.dora_forward(*args)
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
    impl = _impl("dora_bwd", x, lora_A.shape[0], weight, backend, bench=lambda m: lambda: m.dora_backward(*args))
    dx, dA, dB, dm_num = impl.dora_backward(*args)
    dm = _dm(dm_num, colscale, norm, dy, x, weight, h, lora_B, scaling).to(magnitude.dtype) if need_dm else None
    return dx, dA, dB, dm


# ------------------------------------------------------------------ the same op for torch.compile

@torch.library.custom_op("fused_lora::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    magnitude: Tensor, scaling: float, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """(Y, H, n): what _DoraLinear.forward computes, as a custom op torch.compile traces without breaks."""
    norm = weight_norm(weight, lora_A, lora_B, scaling)
    colscale = _DoraLinear._colscale(magnitude, norm, x)
    y, h = _impl("dora_fwd", x, lora_A.shape[0], weight, backend).dora_forward(
        x, weight, bias, lora_A, lora_B, scaling, colscale)
    return y, h, norm


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, magnitude, scaling, backend):
    acc = _acc_dtype(x, weight, lora_A, lora_B)
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


def dora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                magnitude: Tensor, scaling: float, backend: str = "auto",
                weight_sq: Optional[Tensor] = None) -> Tensor:
    """y = (m / n) * (x W^T + s (x A^T) B^T) + b for a 2-D x (M x K), n_j = ||W_j + s B_j A|| detached
    (peft's DoRA without dropout).

    x, weight (N x K), bias (N) or None, lora_A (r x K), lora_B (N x r) share one floating dtype and
    device (as `lora_linear`); magnitude (N,) any floating dtype (its gradient comes back in it).
    Differentiable in x, bias, lora_A, lora_B and magnitude, once (create_graph=True raises RuntimeError);
    W frozen.
    `weight_sq`: ||W_j||^2 if the caller knows it for this W (else computed). Bad inputs raise ValueError / TypeError.
    """
    scaling = as_scaling(scaling)
    check_op_inputs(x, weight, bias, lora_A, lora_B, 0.0)
    check_magnitude(magnitude, weight)
    if weight.requires_grad:
        raise ValueError("dora_linear: the base weight must be frozen with DoRA (requires_grad=False): "
                         "its gradient through the weight norm is not implemented")
    if min(x.shape[0], x.shape[1], weight.shape[0], lora_A.shape[0]) == 0:
        raise ValueError(f"dora_linear: empty sizes are not supported (x {tuple(x.shape)}, weight "
                         f"{tuple(weight.shape)}, rank {lora_A.shape[0]})")
    if torch.compiler.is_compiling():  # the custom op: traced without graph breaks
        return dora_linear_fwd(x, weight, bias, lora_A, lora_B, magnitude, scaling, backend)[0]
    return _DoraLinear.apply(x, weight, bias, lora_A, lora_B, magnitude, scaling, backend, weight_sq)


# ------------------------------------------------------------------ the layer's DoRA

def is_dora(layer: nn.Module, adapter_name: str) -> bool:
    """Whether `adapter_name` on this FusedLoRALinear is a DoRA adapter (only "default" can be)."""
    return adapter_name == "default" and MAGNITUDE in layer._parameters


@torch.no_grad()
def enable(layer: nn.Module) -> None:
    """Give the layer's default adapter a magnitude vector, initialised as peft does: ||W + s B A||
    per output (so the layer starts equal to its LoRA, which B = 0 makes the base), in the
    adapter's dtype."""
    lora_A, lora_B = layer.adapter_weights("default")
    weight = layer._base_weight().detach()
    norm = weight_norm(weight, lora_A, lora_B, layer.adapter_settings("default").scaling)
    layer._parameters[MAGNITUDE] = nn.Parameter(norm.to(lora_A.dtype), requires_grad=lora_A.requires_grad)


def dora_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                 magnitude: Tensor, scaling: float, dropout_p: float, backend: str) -> Tensor:
    """peft's DoRA layer on x of any leading shape (weight out x in, in x's dtype; A and B cast to it):
    the fused op, or with dropout_p > 0 peft's dropout formula (see the module docstring). Shared by
    FusedLoRALinear and patched peft layers."""
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    A, B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    if x2.shape[0] == 0:  # no rows (an MoE expert without tokens): peft's formula, every gradient zero
        colscale = magnitude / weight_norm(weight, A, B, scaling).to(magnitude.dtype)
        y = (F.linear(x2, weight) + scaling * F.linear(F.linear(x2, A), B)) * colscale.to(x.dtype)
        y = y + bias if bias is not None else y
    elif dropout_p > 0.0:  # peft's formula: the (c - 1) base term on the dropped input
        xd = F.dropout(x2, dropout_p, training=True)
        y = F.linear(x2 - xd, weight, bias) + dora_linear(xd, weight, None, A, B, magnitude, scaling, backend)
    else:
        y = dora_linear(x2, weight, bias, A, B, magnitude, scaling, backend)
    return y.reshape(*lead, weight.shape[0])


def forward(layer: nn.Module, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The FusedLoRALinear's DoRA forward (its default adapter; weight as out x in, in x's dtype)."""
    lora_A, lora_B = layer.adapter_weights("default")
    settings = layer.adapter_settings("default")
    return dora_forward(x, weight, bias, lora_A, lora_B, layer._parameters[MAGNITUDE], settings.scaling,
                        settings.lora_dropout if layer.training else 0.0, layer.backend)


@torch.no_grad()
def merged_weight(layer: nn.Module) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """peft's DoRA merge: (c (W + s B A), in W's own layout and dtype; what unmerge needs) with
    n = ||W + s B A|| of the unmerged W and c = m / n. The layer keeps the second item to unmerge:
    n, and the rows j with c_j == 0 with their unmerged W_j (the merge zeroes them: W / c cannot)."""
    delta = layer.delta_weight("default")  # out x in, fp32 / fp64
    weight = layer._base_weight().detach()
    lora_A, lora_B = layer.adapter_weights("default")
    norm = weight_norm(weight, lora_A, lora_B, layer.adapter_settings("default").scaling)
    c = layer._parameters[MAGNITUDE].detach().to(norm.dtype) / norm
    merged = (weight.to(delta.dtype) + delta) * c[:, None].to(delta.dtype)
    lost = (c == 0).nonzero().flatten()
    return layer._base_weight(merged).to(layer.weight.dtype), (norm, lost, weight[lost].clone())


@torch.no_grad()
def unmerged_weight(layer: nn.Module, kept: tuple[Tensor, Tensor, Tensor]) -> Tensor:
    """peft's DoRA unmerge: W = W_merged / c - s B A, c = m / n with the n saved at merge; the rows with
    c_j == 0 are put back from the copies saved at merge."""
    norm, lost, rows = kept
    delta = layer.delta_weight("default")
    c = layer._parameters[MAGNITUDE].detach().to(norm.dtype) / norm
    weight = layer._base_weight().detach().to(delta.dtype)
    unmerged = weight / c[:, None].to(delta.dtype) - delta
    unmerged[lost] = rows.to(delta.dtype)
    return layer._base_weight(unmerged).to(layer.weight.dtype)


def refuse_in_mixed_batch(layer: nn.Module, used) -> None:
    if any(is_dora(layer, name) for name in used):
        raise ValueError("FusedLoRALinear: adapter_names (several adapters in one batch) is not supported with a "
                         "DoRA adapter (use_dora=True); run the DoRA adapter's samples separately")


__all__ = ["MAGNITUDE", "dora_linear", "weight_norm", "weight_sq_norms", "is_dora", "enable", "forward",
           "merged_weight", "unmerged_weight"]
