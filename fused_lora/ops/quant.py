"""The LoRA op over a frozen quantized base: `lora_linear_quant` (and `lora_linear_quant_multi`, several
adapters in one batch), chosen through the one implementation table (`ops.kit`).

    Y = x W^T + b + s ((D x) A^T) B^T,   W = dequantize(packed)  (whole only on the dequant-once row, for one call)

The rows implement ops quant_fwd / quant_bwd as
    forward_quant(x, data, bias, lora_A, lora_B, scaling, dropout_p, seed: int) -> (Y, H)
    backward_quant(dy, x, data, lora_A, lora_B, h, scaling, dropout_p, seed: int,
                   need_dx: bool, need_lora: bool, need_db: bool) -> (dx, dA, dB, db)   (None where not asked)
where `data` is the `fused_lora.core.formats` layout (NF4Data / Int8Data, on x's device), x is M x K,
contiguous or not, dy contiguous, H = (D x) A^T (M x r) as the same row's forward returned it, and the
dropout mask D is the row's own (`keep_mask`), drawn from `seed`: the torch row in `torch_row.quant` (W
dequantized in row chunks), the triton row in the kernels' quantized family (dequantized inside the
GEMMs' K loop), the dequant-once row in `dispatch.dequant_once` (W dequantized whole into a transient
buffer, then `torch_row.dense`'s GEMMs; its mask is the torch row's). What the launchers may rely on
(checked by `core.formats.check_data` when the container is built): the format's layout whole (see
`core.formats.nf4` / `.int8`), every NF4 row a whole number of blocks, all on x's device; x's dtype is the
compute dtype.

`quant_linear(x, qweight, bias)` is the base alone (a QuantizedLinear that is not adapted, or a disabled
adapter): custom ops fused_lora::quant_linear_fwd / _bwd (torch row), so backward dequantizes W again
instead of keeping the forward's dequantized chunks (a full copy of W) alive.

The quantized weight is frozen: there is no dW (gradients never flow to it; it is not a tensor
autograd sees). The bias's gradient is computed when the bias requires grad (peft's bias="all").
Double backward (create_graph=True through this op) is refused with a clear error.

As `ops.lora_linear`: under torch.compile the custom ops fused_lora::lora_linear_quant_fwd / _bwd (the
packed tensors as a list, their layout as integers: `core.formats.op_args`) with fake implementations and
registered autograd, traced without graph breaks; in eager mode an autograd.Function calling the same
backend code without the custom-op dispatch cost.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import torch_row
from ..core import formats
from ..core.formats import layout_name
from ..core.op_inputs import (as_scaling, as_seed_tensor, check_adapters, check_op_inputs, check_row_adapter,
                              check_row_adapter_shape, check_seed_tensor, seed_value)
from ..core.op_kinds import QUANT_BWD, QUANT_FWD, QUANT_MULTI_BWD, QUANT_MULTI_FWD
from ..core.segments import packed_h_shape, segments
from ..torch_row import quant as torch_quant
from .kit import given, max_dropout, max_rank, probe, refuse_early, run_op


def layout_of(qweight, what: str):
    """The format layout (`core.formats`) a quantized weight holds: a fused_lora.QuantizedWeight (its
    `data()`), which this layer takes without importing the module that defines it (modules sit above ops).
    TypeError naming `what` for anything else."""
    data = qweight.data() if callable(getattr(qweight, "data", None)) and not isinstance(qweight, Tensor) else None
    if not formats.is_layout(data):
        raise TypeError(f"{what}: qweight must be a fused_lora.QuantizedWeight, got {type(qweight).__name__}")
    return data


def _run_forward(x, data, bias, lora_A, lora_B, scaling, dropout_p, seed: int, backend):
    args = (x, data, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return run_op(QUANT_FWD, x, data.shape[0], lora_A.shape[0], backend, args, dropout_p, layout=layout_name(data),
                  probe=probe(QUANT_FWD, args, lora_at=3, dropout_at=6),
                  fallback=torch_row.forward_quant if x.shape[0] == 0 else None)


def _run_backward(dy, x, data, lora_A, lora_B, h, scaling, dropout_p, seed: int, backend, need_dx, need_lora,
                  need_db):
    grads = tuple(n for n, f in zip(("dx", "lora", "db"), (need_dx, need_lora, need_db)) if f)
    args = (dy.contiguous(), x, data, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_db)
    return run_op(QUANT_BWD, x, data.shape[0], lora_A.shape[0], backend, args, dropout_p, grads, layout_name(data),
                  probe=probe(QUANT_BWD, args, lora_at=3, dropout_at=7),
                  fallback=torch_row.backward_quant if x.shape[0] == 0 else None)


def _refuse_double_backward(dy, x, lora_A, lora_B) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dy, x, lora_A, lora_B)):
        raise RuntimeError("lora_linear_quant: double backward (create_graph=True) through a quantized base "
                           "is not supported")


# ------------------------------------------------------------------ custom ops (what torch.compile traces)
# The packed tensors travel as a list with their layout in `meta` (formats.op_args / formats.from_op_args).

@torch.library.custom_op("fused_lora::lora_linear_quant_fwd", mutates_args=())
def lora_linear_quant_fwd(
    x: Tensor, qtensors: list[Tensor], meta: list[int], offset: float, bias: Optional[Tensor], lora_A: Tensor,
    lora_B: Tensor, scaling: float, dropout_p: float, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    data = formats.from_op_args(qtensors, meta, offset)
    return _run_forward(x, data, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed), backend)


@lora_linear_quant_fwd.register_fake
def _(x, qtensors, meta, offset, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    N = meta[1]
    _check(x, N, meta[2], bias, lora_A, lora_B, dropout_p)
    return x.new_empty(x.shape[0], N), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fused_lora::lora_linear_quant_bwd", mutates_args=())
def lora_linear_quant_bwd(
    dy: Tensor, x: Tensor, qtensors: list[Tensor], meta: list[int], offset: float, lora_A: Tensor, lora_B: Tensor,
    h: Tensor, scaling: float, dropout_p: float, seed: Tensor, backend: str, need_dx: bool, need_lora: bool,
    need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    data = formats.from_op_args(qtensors, meta, offset)
    grads = _run_backward(dy, x, data, lora_A, lora_B, h, scaling, dropout_p, seed_value(seed), backend,
                          need_dx, need_lora, need_db)
    return tuple(given(x, g) for g in grads)


@lora_linear_quant_bwd.register_fake
def _(dy, x, qtensors, meta, offset, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx, need_lora,
      need_db):
    M, K = x.shape
    N, r = meta[1], lora_A.shape[0]
    return (x.new_empty((M, K) if need_dx else (0,)), x.new_empty((r, K) if need_lora else (0,)),
            x.new_empty((N, r) if need_lora else (0,)), x.new_empty((N,) if need_db else (0,)))


def _op_setup_context(ctx, inputs, output):
    x, qtensors, meta, offset, bias, lora_A, lora_B, scaling, dropout_p, seed, backend = inputs
    ctx.save_for_backward(x, lora_A, lora_B, output[1], seed, *qtensors)
    ctx.meta, ctx.offset, ctx.scaling, ctx.dropout_p, ctx.backend = meta, offset, scaling, dropout_p, backend
    ctx.has_bias = bias is not None


def _op_backward(ctx, dy, _dh):
    x, lora_A, lora_B, h, seed, *qtensors = ctx.saved_tensors
    need = ctx.needs_input_grad  # x, qtensors, meta, offset, bias, lora_A, lora_B, ...
    _refuse_double_backward(dy, x, lora_A, lora_B)
    need_db = bool(ctx.has_bias and need[4])
    dx, dA, dB, db = lora_linear_quant_bwd(dy, x, qtensors, ctx.meta, ctx.offset, lora_A, lora_B, h, ctx.scaling,
                                           ctx.dropout_p, seed, ctx.backend, need[0], need[5] or need[6], need_db)
    return (dx if need[0] else None, [None] * len(qtensors), None, None, db if need_db else None,
            dA if need[5] else None, dB if need[6] else None, None, None, None, None)


lora_linear_quant_fwd.register_autograd(_op_backward, setup_context=_op_setup_context)


# ------------------------------------------------------------------ eager mode (no custom-op dispatch cost)

class _QuantLoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, lora_A, lora_B, data, scaling, dropout_p, seed, backend):
        y, h = _run_forward(x, data, bias, lora_A, lora_B, scaling, dropout_p, seed, backend)
        ctx.save_for_backward(x, lora_A, lora_B, h)
        ctx.data, ctx.scaling, ctx.dropout_p, ctx.seed, ctx.backend = data, scaling, dropout_p, seed, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B, h = ctx.saved_tensors
        need = ctx.needs_input_grad
        _refuse_double_backward(dy, x, lora_A, lora_B)
        need_db = bool(ctx.has_bias and need[1])
        dx, dA, dB, db = _run_backward(dy, x, ctx.data, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, ctx.seed,
                                       ctx.backend, need[0], need[2] or need[3], need_db)
        return (dx if need[0] else None, db if need_db else None, dA if need[2] else None,
                dB if need[3] else None, None, None, None, None, None)


def _check(x, N, K, bias, lora_A, lora_B, dropout_p) -> None:
    """The unquantized op's checks, with a stride-0 stand-in of W's shape (x's dtype and device, no memory)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"lora_linear: x must be a tensor, got {type(x).__name__}")
    check_op_inputs(x, x.new_empty(1).expand(N, K) if x.dim() == 2 else x, bias, lora_A, lora_B, dropout_p)


def lora_linear_quant(
    x: Tensor, qweight, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    """`lora_linear` with a frozen quantized base: Y = x W^T + b + s ((D x) A^T) B^T for a 2-D x (M x K),
    W the N x K weight `qweight` (NF4 or int8) holds, computed in x's dtype. Differentiable in x, bias,
    lora_A and lora_B; never in W. x, bias, lora_A and lora_B share x's dtype and device (the quantized
    weight must be on that device too). Bad inputs raise ValueError / TypeError before anything runs.
    """
    data = layout_of(qweight, "lora_linear_quant")
    seed = as_seed_tensor(seed, dropout_p)
    scaling = as_scaling(scaling)
    N, K = qweight.shape
    if torch.compiler.is_compiling() or (isinstance(x, Tensor) and x.is_meta):  # the fake checks the inputs
        return lora_linear_quant_fwd(x, *formats.op_args(data), bias, lora_A, lora_B, scaling, float(dropout_p),
                                     seed, backend)[0]
    _check(x, N, K, bias, lora_A, lora_B, dropout_p)
    if qweight.device != x.device:
        raise ValueError(f"lora_linear_quant: the quantized weight is on {qweight.device} but x is on {x.device}")
    args = (x, bias, lora_A, lora_B, data, scaling, float(dropout_p), seed_value(seed), backend)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, lora_A, lora_B))):
        return _run_forward(x, data, bias, lora_A, lora_B, scaling, float(dropout_p), seed_value(seed), backend)[0]
    return _QuantLoRALinear.apply(*args)


# ------------------------------------------------------------------ the quantized base alone (QuantizedLinear)
# y = x W^T + b without an adapter: what a quantized layer that is not adapted, or an adapted one with its
# adapter disabled, computes. Plain torch ops would save every dequantized chunk for backward (a full copy
# of W); this op saves only the packed tensors and dequantizes again in backward (dx = dY W, chunked).

def _base_backward(dy: Tensor, data, need_dx: bool, need_db: bool) -> tuple[Optional[Tensor], Optional[Tensor]]:
    dx = torch_quant.accumulate_grad_input(dy.new_zeros(dy.shape[0], data.shape[1]), dy, data) if need_dx else None
    return dx, (dy.sum(0) if need_db else None)


@torch.library.custom_op("fused_lora::quant_linear_fwd", mutates_args=())
def quant_linear_fwd(x: Tensor, qtensors: list[Tensor], meta: list[int], offset: float,
                     bias: Optional[Tensor]) -> Tensor:
    return torch_quant.base_linear(x, formats.from_op_args(qtensors, meta, offset), bias)


@quant_linear_fwd.register_fake
def _(x, qtensors, meta, offset, bias):
    return x.new_empty(x.shape[0], meta[1])


@torch.library.custom_op("fused_lora::quant_linear_bwd", mutates_args=())
def quant_linear_bwd(dy: Tensor, qtensors: list[Tensor], meta: list[int], offset: float, need_dx: bool,
                     need_db: bool) -> tuple[Tensor, Tensor]:
    dx, db = _base_backward(dy.contiguous(), formats.from_op_args(qtensors, meta, offset), need_dx, need_db)
    return (dx if dx is not None else dy.new_empty(0)), (db if db is not None else dy.new_empty(0))


@quant_linear_bwd.register_fake
def _(dy, qtensors, meta, offset, need_dx, need_db):
    return dy.new_empty((dy.shape[0], meta[2]) if need_dx else (0,)), dy.new_empty((meta[1],) if need_db else (0,))


def _base_setup_context(ctx, inputs, output):
    x, qtensors, meta, offset, bias = inputs
    ctx.save_for_backward(*qtensors)
    ctx.meta, ctx.offset, ctx.has_bias = meta, offset, bias is not None


def _base_op_backward(ctx, dy):
    need_dx, need_db = ctx.needs_input_grad[0], bool(ctx.has_bias and ctx.needs_input_grad[4])
    dx, db = quant_linear_bwd(dy, list(ctx.saved_tensors), ctx.meta, ctx.offset, need_dx, need_db)
    return (dx if need_dx else None), [None] * len(ctx.saved_tensors), None, None, (db if need_db else None)


quant_linear_fwd.register_autograd(_base_op_backward, setup_context=_base_setup_context)


class _QuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, data):
        ctx.data, ctx.has_bias = data, bias is not None
        return torch_quant.base_linear(x, data, bias)

    @staticmethod
    def backward(ctx, dy):
        need = ctx.needs_input_grad
        dx, db = _base_backward(dy.contiguous(), ctx.data, need[0], bool(ctx.has_bias and need[1]))
        return dx, db, None


def quant_linear(x: Tensor, qweight, bias: Optional[Tensor]) -> Tensor:
    """x W^T + b for a 2-D x (M x K) and a frozen quantized W, in x's dtype (bias already in it): the
    dequantized weight is never kept for backward (dx = dY W is dequantized again, chunk by chunk)."""
    data = qweight.data()
    if torch.compiler.is_compiling() or x.is_meta:
        return quant_linear_fwd(x, *formats.op_args(data), bias)
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _QuantLinear.apply(x, bias, data)
    return torch_quant.base_linear(x, data, bias)


# ------------------------------------------------------------------ several adapters in one batch
# Each row provides quant_multi_forward(x, data, bias, adapters, segs, seed) -> (Y, packed H) and
# quant_multi_backward(dy, x, data, adapters, h, segs, seed, need_dx, need_lora, need_db) -> (dx, [(dA_a, dB_a)
# or None per adapter], db), with `segs` the row layout (`core.segments`) and adapter a's dropout mask the row's
# own keep_mask of `core.dropout.adapter_seed(seed, a)` over its rows in increasing order.

def _run_multi_forward(x, data, bias, adapters, segs, seed: int, backend):
    args = (x, data, None if bias is None else bias.contiguous(), adapters, segs, seed)
    return run_op(QUANT_MULTI_FWD, x, data.shape[0], max_rank(adapters), backend, args, max_dropout(adapters),
                  layout=layout_name(data), probe=probe(QUANT_MULTI_FWD, args, adapters_at=3, adapters_dropout=False),
                  fallback=torch_row.quant_multi_forward if x.shape[0] == 0 else None)  # nothing to launch


def _run_multi_backward(dy, x, data, adapters, h, segs, seed: int, backend, need_dx, need_lora, need_db):
    grads = tuple(n for n, f in zip(("dx", "lora", "db"), (need_dx, any(need_lora), need_db)) if f)
    args = (dy.contiguous(), x, data, adapters, h, segs, seed, need_dx, list(need_lora), need_db)
    return run_op(QUANT_MULTI_BWD, x, data.shape[0], max_rank(adapters), backend, args, max_dropout(adapters),
                  grads, layout_name(data), probe=probe(QUANT_MULTI_BWD, args, adapters_at=3, adapters_dropout=False),
                  fallback=torch_row.quant_multi_backward if x.shape[0] == 0 else None)


def _refuse_multi_double_backward(*tensors) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError("lora_linear_quant_multi: double backward (create_graph=True) through a quantized base "
                           "is not supported")


def _stand_in(x, N: int, K: int):
    """A stride-0 tensor of W's shape in x's dtype and device (no memory), for the unquantized ops' checks."""
    return x.new_empty(1).expand(N, K) if isinstance(x, Tensor) and x.dim() == 2 else x


def _checked_adapters(x, N, K, bias, lora_A, lora_B, scaling, dropout_p):
    return check_adapters(x, _stand_in(x, N, K), bias, tuple(zip(lora_A, lora_B, scaling, dropout_p)))


# The custom ops (what torch.compile traces): the packed weight as `formats.op_args`, the adapters as lists,
# the row layout recomputed from row_adapter inside each op (as ops.lora_linear_multi_fwd / _bwd).

@torch.library.custom_op("fused_lora::lora_linear_quant_multi_fwd", mutates_args=())
def lora_linear_quant_multi_fwd(
    x: Tensor, qtensors: list[Tensor], meta: list[int], offset: float, bias: Optional[Tensor],
    lora_A: list[Tensor], lora_B: list[Tensor], scaling: list[float], dropout_p: list[float],
    row_adapter: Tensor, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    adapters = _checked_adapters(x, meta[1], meta[2], bias, lora_A, lora_B, scaling, dropout_p)
    check_row_adapter(row_adapter, x, len(adapters))
    check_seed_tensor(seed)
    data = formats.from_op_args(qtensors, meta, offset)
    return _run_multi_forward(x, data, bias, adapters, segments(row_adapter, len(adapters)), seed_value(seed),
                              backend)


@lora_linear_quant_multi_fwd.register_fake
def _(x, qtensors, meta, offset, bias, lora_A, lora_B, scaling, dropout_p, row_adapter, seed, backend):
    adapters = _checked_adapters(x, meta[1], meta[2], bias, lora_A, lora_B, scaling, dropout_p)
    check_row_adapter_shape(row_adapter, x)
    check_seed_tensor(seed)
    return x.new_empty(x.shape[0], meta[1]), x.new_empty(packed_h_shape(x.shape[0], adapters))


@torch.library.custom_op("fused_lora::lora_linear_quant_multi_bwd", mutates_args=())
def lora_linear_quant_multi_bwd(
    dy: Tensor, x: Tensor, qtensors: list[Tensor], meta: list[int], offset: float, lora_A: list[Tensor],
    lora_B: list[Tensor], h: Tensor, scaling: list[float], dropout_p: list[float], row_adapter: Tensor,
    seed: Tensor, backend: str, need_dx: bool, need_lora: list[bool], need_db: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor]:
    adapters = _checked_adapters(x, meta[1], meta[2], None, lora_A, lora_B, scaling, dropout_p)
    data = formats.from_op_args(qtensors, meta, offset)
    dx, pairs, db = _run_multi_backward(dy, x, data, adapters, h, segments(row_adapter, len(adapters)),
                                        seed_value(seed), backend, need_dx, need_lora, need_db)
    return given(x, dx), [given(x, p and p[0]) for p in pairs], [given(x, p and p[1]) for p in pairs], given(x, db)


@lora_linear_quant_multi_bwd.register_fake
def _(dy, x, qtensors, meta, offset, lora_A, lora_B, h, scaling, dropout_p, row_adapter, seed, backend, need_dx,
      need_lora, need_db):
    def maybe(flag, *shape):
        return x.new_empty(shape if flag else (0,))
    return (maybe(need_dx, *x.shape), [maybe(n, *A.shape) for A, n in zip(lora_A, need_lora)],
            [maybe(n, *B.shape) for B, n in zip(lora_B, need_lora)], maybe(need_db, meta[1]))


def _multi_setup_context(ctx, inputs, output):
    x, qtensors, meta, offset, bias, lora_A, lora_B, scaling, dropout_p, row_adapter, seed, backend = inputs
    ctx.save_for_backward(x, output[1], row_adapter, seed, *lora_A, *lora_B, *qtensors)
    ctx.n = len(lora_A)
    ctx.meta, ctx.offset, ctx.scaling, ctx.dropout_p, ctx.backend = meta, offset, scaling, dropout_p, backend
    ctx.has_bias = bias is not None


def _multi_op_backward(ctx, dy, _dh):
    n = ctx.n
    x, h, row_adapter, seed, *rest = ctx.saved_tensors
    lora_A, lora_B, qtensors = rest[:n], rest[n:2 * n], rest[2 * n:]
    need = ctx.needs_input_grad  # list inputs: one flag for the whole list
    _refuse_multi_double_backward(dy, x, *lora_A, *lora_B)
    need_db = bool(ctx.has_bias and need[4])
    dx, dA, dB, db = lora_linear_quant_multi_bwd(
        dy, x, qtensors, ctx.meta, ctx.offset, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, row_adapter, seed,
        ctx.backend, bool(need[0]), [bool(need[5] or need[6])] * n, need_db)
    return (dx if need[0] else None, [None] * len(qtensors), None, None, db if need_db else None,
            list(dA) if need[5] else None, list(dB) if need[6] else None, None, None, None, None, None)


lora_linear_quant_multi_fwd.register_autograd(_multi_op_backward, setup_context=_multi_setup_context)


# ------------------------------------------------------------------ eager mode (no custom-op dispatch cost)

class _QuantLoRALinearMulti(torch.autograd.Function):
    """Eager mode. Inputs after the non-tensor ones: lora_A_0, lora_B_0, lora_A_1, ...

    Per adapter a, on its rows R_a only (H_a = (D_a x[R_a]) A_a^T saved from forward):
        G_a = s_a dY[R_a] B_a;  dB_a = s_a dY[R_a]^T H_a;  dA_a = G_a^T (D_a x[R_a]);  dx[R_a] += D_a (G_a A_a)
    and once for the whole batch: dx = dY W (+ the above), db = sum of dY's rows. W is frozen: no dW.
    """

    @staticmethod
    def forward(ctx, x, bias, data, segs, spec, seed, backend, *lora):
        adapters = tuple((lora[2 * a], lora[2 * a + 1], s, p) for a, (s, p) in enumerate(spec))
        y, h = _run_multi_forward(x, data, bias, adapters, segs, seed, backend)
        ctx.save_for_backward(x, h, *lora)
        ctx.data, ctx.segs, ctx.spec, ctx.seed, ctx.backend = data, segs, spec, seed, backend
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, *lora = ctx.saved_tensors
        n, need = len(ctx.spec), ctx.needs_input_grad
        _refuse_multi_double_backward(dy, x, *lora)
        adapters = tuple((lora[2 * a], lora[2 * a + 1], s, p) for a, (s, p) in enumerate(ctx.spec))
        need_lora = [bool(need[7 + 2 * a] or need[8 + 2 * a]) for a in range(n)]
        need_db = bool(ctx.has_bias and need[1])
        dx, pairs, db = _run_multi_backward(dy, x, ctx.data, adapters, h, ctx.segs, ctx.seed, ctx.backend,
                                            bool(need[0]), need_lora, need_db)
        flat = []
        for a, pair in enumerate(pairs):
            dA, dB = pair if pair is not None else (None, None)
            flat += [dA if need[7 + 2 * a] else None, dB if need[8 + 2 * a] else None]
        return (dx if need[0] else None, db if need_db else None, None, None, None, None, None, *flat)


def lora_linear_quant_multi(
    x: Tensor, qweight, bias: Optional[Tensor], adapters, row_adapter: Tensor,
    seed: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    """`ops.lora_linear_multi` over a frozen quantized base: y[m] = x[m] W^T + b + s_a B_a A_a (D_a x[m]),
    a = row_adapter[m] (-1: no adapter), W = dequantize(qweight) (whole only on the dequant-once row). Same arguments,
    checks and dropout rule as lora_linear_multi: adapter a's mask is the running backend's keep_mask of
    `core.dropout.adapter_seed(seed, a)` over its rows (the torch and Triton rows draw different masks from one
    seed). Differentiable in x, bias and every A_a, B_a, never in W (double backward is refused). Backends:
    the table's ops "quant_multi_fwd" / "quant_multi_bwd" ("torch", "dequant-once", "triton" where it can run,
    "auto").
    Under torch.compile the custom op fused_lora::lora_linear_quant_multi_fwd is traced (fullgraph works)."""
    data = layout_of(qweight, "lora_linear_quant_multi")
    N, K = qweight.shape
    adapters = check_adapters(x, _stand_in(x, N, K), bias, adapters)
    seed = as_seed_tensor(seed, max([0.0] + [a[3] for a in adapters]))
    if qweight.device != x.device:
        raise ValueError(f"lora_linear_quant_multi: the quantized weight is on {qweight.device} but x is on "
                         f"{x.device}")
    if torch.compiler.is_compiling():  # the op's fake checks shapes; its body checks values
        if not isinstance(row_adapter, Tensor) or row_adapter.dtype != torch.int64:
            check_row_adapter(row_adapter, x, len(adapters))  # the type errors
        lists = [list(t) for t in zip(*adapters)] if adapters else [[], [], [], []]
        return lora_linear_quant_multi_fwd(x, *formats.op_args(data), bias, *lists, row_adapter, seed, backend)[0]
    check_row_adapter(row_adapter, x, len(adapters))
    if x.is_meta:
        return x.new_empty(x.shape[0], N)
    refuse_early(QUANT_MULTI_FWD, x, N, max_rank(adapters), backend, max_dropout(adapters), layout_name(data))
    segs, seed_int = segments(row_adapter, len(adapters)), seed_value(seed)
    lora = [t for a in adapters for t in a[:2]]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, bias, *lora))):
        return _run_multi_forward(x, data, bias, adapters, segs, seed_int, backend)[0]
    spec = tuple((a[2], a[3]) for a in adapters)
    return _QuantLoRALinearMulti.apply(x, bias, data, segs, spec, seed_int, backend, *lora)
