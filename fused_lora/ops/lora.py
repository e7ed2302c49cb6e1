"""The LoRA layer as `torch.library` custom ops, with fake implementations and autograd.

    fused_lora::lora_linear_fwd(x, W, b, A, B, s, p, seed, backend) -> (Y, H)
    fused_lora::lora_linear_bwd(dY, x, W, A, B, H, s, p, seed, backend, needs...) -> (dx, dA, dB, dW, db)

Each op body asks `dispatch.select` which implementation runs and calls it; the module
never sees a kernel. Fake implementations let torch.compile trace the layer without graph breaks.
Gradients not asked for come back as empty tensors (custom ops cannot return None).

`lora_linear` is the entry point: under torch.compile it calls the custom op (autograd registered
on it), and in eager mode an autograd.Function that calls the same backend code directly, because
the custom-op dispatch costs a few hundred microseconds per layer and step, which on a GPU can
exceed the layer's own kernel time. Both paths share the saved state and the gradient code below.

Derivation (W, b frozen unless they require grad), with H = (D x) A^T and Y = x W^T + b + s H B^T:
    dH = s dY B                                    (G, M x r)
    dB = s dY^T H                                  (N x r)
    dA = dH^T (D x) = G^T (D x)                    (r x K)
    dx = dY W + D (G A)                            (the dropout mask multiplies the LoRA branch only)
    dW = dY^T x,  db = sum over rows of dY
Only x, H and the seed are saved; D is regenerated from the seed in backward.

Double backward (a gradient of a gradient, e.g. a gradient penalty): when the backward itself is
differentiated (create_graph=True, so grad mode is on inside backward), H is recomputed under
autograd and the gradients are computed with differentiable torch ops, with the dropout mask of
the backend that ran the forward; otherwise the backend's (non-differentiable) kernels run.

Inputs are checked once, before a backend is chosen (`core.op_inputs`), in the eager paths and in the
fake implementations alike, so every path and backend refuses bad inputs with the same error.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import torch_row
from ..core.op_inputs import (as_scaling, as_seed_tensor, check_backward_inputs, check_op_inputs, check_seed_tensor,
                              seed_value)
from ..core.op_kinds import BWD, FWD
from ..torch_row import dense
from .kit import EMPTY_SHAPE, chosen_row, given, probe, run_op


def _empty(x: Tensor, weight: Tensor) -> bool:
    """An empty M, N or K: nothing to launch, and torch's ops give the exact empty / zero results."""
    return min(x.shape[0], x.shape[1], weight.shape[0]) == 0


def _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed: int, backend):
    if bias is not None:
        bias = bias.contiguous()  # the kernels read the bias with unit stride; N elements, cheap
    args = (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    return run_op(FWD, x, weight.shape[0], lora_A.shape[0], backend, args, dropout_p,
                  probe=probe(FWD, args, lora_at=3), fallback=torch_row.forward if _empty(x, weight) else None)


def _run_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed: int, backend,
                  need_dx, need_lora, need_dw, need_db):
    args = (dy.contiguous(), x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_dw, need_db)
    grads = tuple(n for n, need in zip(("dx", "lora", "dW", "db"), (need_dx, need_lora, need_dw, need_db)) if need)
    return run_op(BWD, x, weight.shape[0], lora_A.shape[0], backend, args, dropout_p, grads,
                  probe=probe(BWD, args, lora_at=3), fallback=torch_row.backward if _empty(x, weight) else None)


@torch.library.custom_op("fused_lora::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    check_op_inputs(x, weight, bias, lora_A, lora_B, dropout_p)
    check_seed_tensor(seed)
    scaling = as_scaling(scaling)  # concrete here, also when torch.compile traced it as a symbol
    return _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed), backend)


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
    check_op_inputs(x, weight, bias, lora_A, lora_B, dropout_p)
    check_seed_tensor(seed)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], lora_A.shape[0])


@torch.library.custom_op("fused_lora::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
    scaling: float, dropout_p: float, seed: Tensor, backend: str,
    need_dx: bool, need_lora: bool, need_dw: bool, need_db: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    check_backward_inputs(dy, x, weight, lora_A, lora_B, h, dropout_p)
    check_seed_tensor(seed)
    grads = _run_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed_value(seed), backend,
                          need_dx, need_lora, need_dw, need_db)
    return tuple(given(x, g) for g in grads)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx, need_lora, need_dw, need_db):
    check_backward_inputs(dy, x, weight, lora_A, lora_B, h, dropout_p)
    check_seed_tensor(seed)

    def maybe(flag, *shape):
        return x.new_empty(shape if flag else EMPTY_SHAPE)
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    return (maybe(need_dx, M, K), maybe(need_lora, r, K), maybe(need_lora, N, r),
            maybe(need_dw, N, K), maybe(need_db, N))


# ------------------------------------------------------------------ autograd, shared by both paths

def _save(ctx, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, backend):
    ctx.save_for_backward(x, weight, lora_A, lora_B, h, seed)
    ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
    ctx.has_bias = bias is not None


def _gradients(ctx, dy, backward_op):
    """Input gradients in the forward's argument order (x, W, b, A, B, s, p, seed, backend)."""
    x, weight, lora_A, lora_B, h, seed = ctx.saved_tensors
    need = ctx.needs_input_grad
    need_db = bool(ctx.has_bias and need[2])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dy, x, weight, lora_A, lora_B)):
        backward_op = _differentiable_backward  # the gradient's own graph is asked for: double backward
    dx, dA, dB, dW, db = backward_op(dy, x, weight, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p, seed,
                                     ctx.backend, need[0], need[3] or need[4], need[1], need_db)
    return (dx if need[0] else None, dW if need[1] else None, db if need_db else None,
            dA if need[3] else None, dB if need[4] else None, None, None, None, None)


def _setup_context(ctx, inputs, output):
    _save(ctx, *inputs[:5], output[1], *inputs[5:])


lora_linear_fwd.register_autograd(lambda ctx, dy, _dh: _gradients(ctx, dy, lora_linear_bwd),
                                  setup_context=_setup_context)


def _eager_backward_op(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend, *needs):
    return _run_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed_value(seed), backend, *needs)


def _differentiable_backward(dy, x, weight, lora_A, lora_B, _h, scaling, dropout_p, seed, backend, *needs):
    """The gradients through autograd-differentiable torch ops, with the forward backend's mask.

    The saved H was computed without a graph, so it is recomputed here from x and A. Counted in
    dispatch.calls as ("bwd_differentiable", backend whose mask is used).
    """
    # Chosen as a backward of this forward: with dropout, the backend (so the mask) the forward used.
    row = chosen_row(BWD, x, weight.shape[0], lora_A.shape[0], backend, dropout_p, counted_as="bwd_differentiable")
    keep = row.load().keep_mask(seed_value(seed), x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    h = torch.mm(dense.dropped(x, keep, dropout_p), lora_A.t())
    return dense.backward_with_mask(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, keep, *needs)


class _EagerLoRALinear(torch.autograd.Function):
    """The eager-mode path: the same backend calls as the ops, without the custom-op dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed, backend):
        y, h = _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed_value(seed), backend)
        _save(ctx, x, weight, bias, lora_A, lora_B, h, scaling, dropout_p, seed, backend)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _gradients(ctx, dy, _eager_backward_op)


def lora_linear(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
    scaling: float, dropout_p: float = 0.0, seed: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    """Y = x W^T + b + s * ((D x) A^T) B^T for a 2-D x (M x K), differentiable in every tensor
    (twice: double backward is supported).

    x (M x K), weight (N x K), bias (N) or None, lora_A (r x K) and lora_B (N x r) share one
    floating dtype and one device; any strides. `scaling` is a finite real number, `dropout_p` is
    in [0, 1); `seed` (a Python int in [0, 2^63) or a 0-dim int64 tensor) fixes the dropout mask
    and is required when dropout_p > 0. Bad inputs raise ValueError (shapes, values, devices) or
    TypeError (types, dtypes) before any backend runs.
    """
    seed = as_seed_tensor(seed, dropout_p)
    scaling = as_scaling(scaling)
    args = (x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed, backend)
    if torch.compiler.is_compiling():  # the fake implementation checks the inputs
        return lora_linear_fwd(*args)[0]
    check_op_inputs(x, weight, bias, lora_A, lora_B, dropout_p)  # once, before any backend is chosen
    if x.is_meta:
        # Meta tensors (shape propagation, e.g. a model built on the meta device) take the
        # custom op, whose fake implementation gives the outputs' shapes without computing.
        return lora_linear_fwd(*args)[0]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in args[:5])):
        # Nothing to differentiate (inference): skip the autograd.Function machinery.
        return _run_forward(x, weight, bias, lora_A, lora_B, scaling, float(dropout_p), seed_value(seed),
                            backend)[0]
    return _EagerLoRALinear.apply(*args)
