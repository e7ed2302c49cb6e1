"""LoRA on expert weights (mixture-of-experts layers): the grouped op, built as `ops.lora`.

    lora_linear_grouped(x, group_sizes, W, b, A, B, s, p, seed, backend, transposed) -> Y
    y[rows of e] = x_e W_e^T + b_e + s B_e A_e (D x_e)

x (M x K) holds its rows sorted by expert, group_sizes[e] of them for expert e; W the frozen 3-D expert stack
(E x N x K, or E x K x N with transposed=True: read through its strides, never copied), b (E x N) or None,
A (E x r x K) and B (E x N x r) per expert, one scaling, one dropout p and seed. The low-rank term is computed
beside each expert's GEMM: W_e + s B_e A_e is never formed.

    fused_lora::lora_linear_grouped_fwd(x, sizes, W, b, A, B, s, p, seed, backend, transposed) -> (Y, H)
    fused_lora::lora_linear_grouped_bwd(dY, x, sizes, W, A, B, H, s, p, seed, backend, transposed, needs...)
        -> (dx, dA, dB, dW, db)

Each op body builds the row layout from group_sizes (`core.segments.grouped`: one host read of the E sizes,
which are checked there) and reaches its implementation through `ops.kit` (ops grouped_fwd / grouped_bwd of
`core.op_kinds`; the torch row runs `torch_row.grouped`). Under torch.compile the custom ops are traced
(fakes: static shapes, Y M x N and H M x r); in eager mode an autograd.Function runs the same code without the
custom-op dispatch and keeps the layout (no second host read in backward).

Gradients (per expert, from its rows only; W and b frozen unless they require grad):
    G_e = s dY_e B_e;  dB_e = s dY_e^T H_e;  dA_e = G_e^T (D x_e);  dX_e = dY_e W_e + D (G_e A_e)
    dW_e = dY_e^T x_e (its transpose in the transposed layout) and db_e = the sum of dY_e's rows, only when
    the weight / bias requires grad; experts no row reaches get zero gradients.
Only x, H (M x r) and the seed are saved (besides the parameters); D is regenerated from the seed. Where x was
gathered from a tensor the caller keeps (`core.gathered.remember`: the MoE block's hidden states, routed top-k
times), that tensor and the index are saved instead and x gathered again in backward.

Double backward (create_graph=True) is supported as for `lora_linear`: the forward is recomputed with
differentiable torch ops and the mask of the row that ran it, and differentiated by autograd.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import torch_row
from ..core.op_inputs import (GROUPED, as_scaling, as_seed_tensor, check_group_size_values,
                              check_grouped_backward_inputs, check_grouped_inputs, check_seed_tensor, named_for,
                              seed_value)
from ..core import gathered
from ..core.op_kinds import GROUPED_BWD, GROUPED_FWD
from ..core.segments import GroupedSegments, grouped
from ..torch_row import grouped as grouped_impl
from .kit import EMPTY_SHAPE, chosen_row, given, probe, run_op


def _layout(x: Tensor, group_sizes: Tensor) -> GroupedSegments:
    """The row layout, its sizes read on the host and checked (>= 0, summing to M)."""
    segs = grouped(group_sizes, x.shape[0])
    check_group_size_values(segs.sizes, x.shape[0])
    return segs


def _empty(x: Tensor, weight: Tensor) -> bool:
    """An empty M, N or K: nothing to launch (the torch row's loop gives the exact empty / zero results)."""
    return min(x.shape[0], x.shape[1], weight.shape[1], weight.shape[2]) == 0


def _where(weight: Tensor, transposed: bool) -> dict:
    """The dispatch arguments the grouped ops add: the expert stack's layout and its number of experts."""
    return {"layout": ("experts_t" if transposed else "experts", 0), "groups": weight.shape[0]}


def _run_forward(x, segs, weight, bias, lora_A, lora_B, scaling, dropout_p, seed: int, backend, transposed):
    if bias is not None:
        bias = bias.contiguous()  # (E, N): small
    args = (x, segs, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, transposed)
    N = grouped_impl.out_features(weight, transposed)
    return run_op(GROUPED_FWD, x, N, lora_A.shape[1], backend, args, dropout_p,
                  probe=probe(GROUPED_FWD, args, lora_at=4, dropout_at=7),
                  fallback=torch_row.grouped_forward if _empty(x, weight) else None, **_where(weight, transposed))


def _run_backward(dy, x, segs, weight, lora_A, lora_B, h, scaling, dropout_p, seed: int, backend, transposed,
                  need_dx, need_lora, need_dw, need_db):
    args = (dy.contiguous(), x, segs, weight, lora_A, lora_B, h, scaling, dropout_p, seed, transposed,
            need_dx, need_lora, need_dw, need_db)
    grads = tuple(n for n, need in zip(("dx", "lora", "dW", "db"), (need_dx, need_lora, need_dw, need_db)) if need)
    N = grouped_impl.out_features(weight, transposed)
    return run_op(GROUPED_BWD, x, N, lora_A.shape[1], backend, args, dropout_p, grads,
                  probe=probe(GROUPED_BWD, args, lora_at=4, dropout_at=8),
                  fallback=torch_row.grouped_backward if _empty(x, weight) else None, **_where(weight, transposed))


@torch.library.custom_op("fused_lora::lora_linear_grouped_fwd", mutates_args=())
def lora_linear_grouped_fwd(
    x: Tensor, group_sizes: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, backend: str, transposed: bool,
) -> tuple[Tensor, Tensor]:
    check_grouped_inputs(x, group_sizes, weight, bias, lora_A, lora_B, dropout_p, transposed)
    check_seed_tensor(seed)
    scaling = named_for(GROUPED, as_scaling, scaling)  # concrete here, also when torch.compile traced a symbol
    return _run_forward(x, _layout(x, group_sizes), weight, bias, lora_A, lora_B, scaling, dropout_p,
                        named_for(GROUPED, seed_value, seed), backend, transposed)


@lora_linear_grouped_fwd.register_fake
def _(x, group_sizes, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, transposed):
    check_grouped_inputs(x, group_sizes, weight, bias, lora_A, lora_B, dropout_p, transposed)
    check_seed_tensor(seed)
    N = grouped_impl.out_features(weight, transposed)
    return x.new_empty(x.shape[0], N), x.new_empty(x.shape[0], lora_A.shape[1])


@torch.library.custom_op("fused_lora::lora_linear_grouped_bwd", mutates_args=())
def lora_linear_grouped_bwd(
    dy: Tensor, x: Tensor, group_sizes: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, backend: str, transposed: bool,
    need_dx: bool, need_lora: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_grouped_backward_inputs(dy, x, group_sizes, weight, lora_A, lora_B, h, dropout_p, transposed)
    check_seed_tensor(seed)
    scaling = named_for(GROUPED, as_scaling, scaling)
    grads = _run_backward(dy, x, _layout(x, group_sizes), weight, lora_A, lora_B, h, scaling, dropout_p,
                          named_for(GROUPED, seed_value, seed), backend, transposed, need_dx, need_lora, need_dw,
                          need_db)
    return tuple(given(x, g) for g in grads)


@lora_linear_grouped_bwd.register_fake
def _(dy, x, group_sizes, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend, transposed,
      need_dx, need_lora, need_dw, need_db):
    check_grouped_backward_inputs(dy, x, group_sizes, weight, lora_A, lora_B, h, dropout_p, transposed)
    check_seed_tensor(seed)

    def maybe(flag, *shape):
        return x.new_empty(shape if flag else EMPTY_SHAPE)
    E, N = weight.shape[0], grouped_impl.out_features(weight, transposed)
    return (maybe(need_dx, *x.shape), maybe(need_lora, *lora_A.shape), maybe(need_lora, *lora_B.shape),
            maybe(need_dw, *weight.shape), maybe(need_db, E, N))


# ------------------------------------------------------------------ autograd, shared by both paths

def _save(ctx, x, group_sizes, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, backend, transposed,
          segs: Optional[GroupedSegments] = None):
    kept, index = gathered.kept_form(x)  # x's source and index where x is a remembered gather (MoE routing)
    ctx.save_for_backward(kept, group_sizes, weight, bias, lora_A, lora_B, h, seed, index)
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.transposed, ctx.segs = scaling, dropout_p, backend, transposed, segs


def _gradients(ctx, dy, backward_op):
    """Input gradients in the forward's argument order (x, sizes, W, b, A, B, s, p, seed, backend, transposed)."""
    kept, group_sizes, weight, bias, lora_A, lora_B, h, seed, index = ctx.saved_tensors
    x = gathered.regather(kept, index)
    need = ctx.needs_input_grad
    need_dx, need_dw, need_lora = need[0], need[2], need[4] or need[5]
    need_db = bool(bias is not None and need[3])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dy, x, weight, lora_A, lora_B)):
        dx, dA, dB, dW, db = _differentiable_backward(ctx, dy, x, group_sizes, weight, bias, lora_A, lora_B, seed,
                                                      need_dx, need_lora, need_dw, need_db)
    else:
        dx, dA, dB, dW, db = backward_op(ctx, dy, x, group_sizes, weight, lora_A, lora_B, h, seed,
                                         need_dx, need_lora, need_dw, need_db)
    return (dx if need_dx else None, None, dW if need_dw else None, db if need_db else None,
            dA if need[4] else None, dB if need[5] else None, None, None, None, None, None)


def _op_backward(ctx, dy, x, group_sizes, weight, lora_A, lora_B, h, seed, *needs):
    return lora_linear_grouped_bwd(dy, x, group_sizes, weight, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed,
                                   ctx.backend, ctx.transposed, *needs)


def _eager_backward(ctx, dy, x, group_sizes, weight, lora_A, lora_B, h, seed, *needs):
    return _run_backward(dy, x, ctx.segs, weight, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed_value(seed),
                         ctx.backend, ctx.transposed, *needs)


def _differentiable_backward(ctx, dy, x, group_sizes, weight, bias, lora_A, lora_B, seed, need_dx, need_lora,
                             need_dw, need_db):
    """The gradients with their own graph (create_graph=True): the forward recomputed with differentiable ops and
    the mask of the row that ran it (chosen as a backward of this forward; counted in dispatch.calls as
    ("grouped_bwd_differentiable", row)), differentiated by autograd."""
    segs = ctx.segs or _layout(x, group_sizes)
    N = grouped_impl.out_features(weight, ctx.transposed)
    row = chosen_row(GROUPED_BWD, x, N, lora_A.shape[1], ctx.backend, ctx.dropout_p,
                     counted_as="grouped_bwd_differentiable", **_where(weight, ctx.transposed))
    inputs = (x, lora_A, lora_B, weight, bias)
    needs = (need_dx, need_lora, need_lora, need_dw, need_db)
    with torch.enable_grad():
        y = grouped_impl.differentiable_forward(x, segs, weight, bias, lora_A, lora_B, ctx.scaling, ctx.dropout_p,
                                                seed_value(seed), ctx.transposed, row.load().keep_mask)
        wanted = [t for t, n in zip(inputs, needs) if n]
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True) if wanted else ())
    dx, dA, dB, dW, db = (next(grads) if n else None for n in needs)
    return dx, dA, dB, dW, db


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs[:6], output[1], *inputs[6:])


lora_linear_grouped_fwd.register_autograd(lambda ctx, dy, _dh: _gradients(ctx, dy, _op_backward),
                                          setup_context=_setup_context)


class _EagerLoRALinearGrouped(torch.autograd.Function):
    """The eager-mode path: the same row calls as the ops, without the custom-op dispatch; the layout (its host
    offsets) kept from forward to backward."""

    @staticmethod
    def forward(ctx, x, group_sizes, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend, transposed,
                segs):
        y, h = _run_forward(x, segs, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed), backend,
                            transposed)
        _save(ctx, x, group_sizes, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, backend, transposed,
              segs)
        return y

    @staticmethod
    def backward(ctx, dy):
        return (*_gradients(ctx, dy, _eager_backward), None)


def lora_linear_grouped(
    x: Tensor, group_sizes: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Optional[Tensor],
    lora_B: Optional[Tensor], scaling: float, dropout_p: float = 0.0, seed=None, backend: str = "auto",
    transposed: bool = False,
) -> Tensor:
    """LoRA on expert weights: y[rows of e] = x_e W_e^T + b_e + s B_e A_e (D x_e), differentiable (twice).

    x (M, K): the rows sorted by expert (group), `group_sizes[e]` rows for expert e: an int64 tensor of shape
    (E,) on x's device, each size >= 0, summing to M (empty groups, one group holding every row and M = 0 are
    all fine). weight: the 3-D expert stack (E, N, K) (transformers' `down_proj` / `gate_up_proj` layout), or
    (E, K, N) with `transposed=True` (GPT-OSS-like; transformers' `is_transposed`), read through its strides,
    never copied (a square stack, N = K, fits both layouts: only the flag tells them apart); bias (E, N) or
    None; lora_A (E, r, K) and lora_B (E, N, r), one adapter's factors per expert, or both None for the base
    alone (then dropout_p must be 0; `scaling` is not used). One floating dtype (float16, bfloat16, float32,
    float64) and one device for all tensors. `scaling` is a finite real
    number; dropout (p in [0, 1)) acts on the low-rank term's input: D x, with one M x K keep mask for the
    whole batch drawn from `seed` (a Python int in [0, 2^63) or a 0-dim int64 tensor, required when p > 0)
    by the mask generator of the row that runs (`core.dropout`; the Triton row draws its own) and drawn again
    in backward, never stored. Row m's mask does not depend on the group sizes.

    Gradients: x, lora_A, lora_B (expert e's from its rows only: zero for an expert no row reaches), and the
    weight (E x N x K per expert) and bias only when they require grad. Deterministic. Double backward works.

    Backends ("auto", "torch", ...: `fused_lora.dispatch`): the torch row loops over the experts hit
    (`torch_row.grouped`); the Triton row runs its grouped kernels (`kernels.grouped`: float16 / bfloat16 on a
    GPU, ranks up to 128; checked by auto against the torch row before it trusts them). Bad inputs raise
    ValueError (shapes, values, devices, expert counts) or TypeError (types, dtypes) naming the problem
    before anything runs (group_sizes' values are read on the host: one read of E integers per call; under
    torch.compile they are checked when the op runs). Under torch.compile the custom op
    `fused_lora::lora_linear_grouped_fwd` is traced (fullgraph works).
    """
    check_grouped_inputs(x, group_sizes, weight, bias, lora_A, lora_B, dropout_p, transposed)
    seed = named_for(GROUPED, as_seed_tensor, seed, dropout_p)
    scaling = named_for(GROUPED, as_scaling, scaling)
    if lora_A is None:  # the base alone: rank 0 (H is M x 0; no low-rank product runs)
        E, N = weight.shape[0], grouped_impl.out_features(weight, transposed)
        lora_A, lora_B = x.new_zeros(E, 0, x.shape[1]), x.new_zeros(E, N, 0)
    args = (x, group_sizes, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed, backend, transposed)
    if torch.compiler.is_compiling() or x.is_meta:  # the fake checks shapes; the op body checks the sizes' values
        return lora_linear_grouped_fwd(*args)[0]
    seed_int = named_for(GROUPED, seed_value, seed)  # a negative seed tensor refused before anything runs
    segs = _layout(x, group_sizes)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_A,
                                                                                         lora_B))):
        # Nothing to differentiate (inference): no autograd.Function machinery.
        return _run_forward(x, segs, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed_int, backend,
                            transposed)[0]
    return _EagerLoRALinearGrouped.apply(*args, segs)
