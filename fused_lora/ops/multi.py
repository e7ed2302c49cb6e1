"""Several adapters in one batch: `lora_linear_multi` (a per-row adapter index; the PyTorch path in
`torch_row.multi`, the row layout in `core.segments`), built as `ops.lora`: custom ops
fused_lora::lora_linear_multi_fwd/_bwd (adapters as tensor lists, H packed into one M x max(r) tensor so the
fake shapes are static, the row layout recomputed from the index inside each op) under torch.compile, an
autograd.Function in eager mode, the row chosen through the same table (ops multi_fwd / multi_bwd: the
torch row runs `torch_row.multi`, the triton row the segment kernels).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..core.op_inputs import (as_seed_tensor, check_adapters, check_row_adapter, check_row_adapter_shape,
                              check_seed_tensor, seed_value)
from ..core.op_kinds import MULTI_BWD, MULTI_FWD
from ..core.segments import packed_h_shape, segments
from ..torch_row import multi as torch_multi
from .kit import EMPTY_SHAPE, chosen_row, given, max_dropout, max_rank, probe, refuse_early, run_op


def _as_adapters(lora_A, lora_B, scaling, dropout_p) -> tuple:
    return tuple(zip(lora_A, lora_B, scaling, dropout_p))


def _multi_forward(x, weight, bias, adapters, segs, seed: int, backend):
    """(Y, packed H) on the backend the table chooses (counted as multi_fwd)."""
    if bias is not None:
        bias = bias.contiguous()
    args = (x, weight, bias, adapters, segs, seed)
    return run_op(MULTI_FWD, x, weight.shape[0], max_rank(adapters), backend, args, max_dropout(adapters),
                  probe=probe(MULTI_FWD, args, adapters_at=3))


def _multi_backward(dy, x, weight, adapters, h, segs, seed: int, backend, need_dx, need_lora, need_dw, need_db):
    args = (dy.contiguous(), x, weight, adapters, h, segs, seed, need_dx, need_lora, need_dw, need_db)
    return run_op(MULTI_BWD, x, weight.shape[0], max_rank(adapters), backend, args, max_dropout(adapters),
                  probe=probe(MULTI_BWD, args, adapters_at=3))


# The custom ops (what torch.compile traces): the layout is recomputed from row_adapter inside each.

@torch.library.custom_op("fused_lora::lora_linear_multi_fwd", mutates_args=())
def lora_linear_multi_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
    scaling: list[float], dropout_p: list[float], row_adapter: Tensor, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    adapters = check_adapters(x, weight, bias, _as_adapters(lora_A, lora_B, scaling, dropout_p))
    check_row_adapter(row_adapter, x, len(adapters))
    check_seed_tensor(seed)
    segs = segments(row_adapter, len(adapters))
    return _multi_forward(x, weight, bias, adapters, segs, seed_value(seed), backend)


@lora_linear_multi_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, row_adapter, seed, backend):
    adapters = check_adapters(x, weight, bias, _as_adapters(lora_A, lora_B, scaling, dropout_p))
    check_row_adapter_shape(row_adapter, x)
    check_seed_tensor(seed)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(packed_h_shape(x.shape[0], adapters))


@torch.library.custom_op("fused_lora::lora_linear_multi_bwd", mutates_args=())
def lora_linear_multi_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], h: Tensor,
    scaling: list[float], dropout_p: list[float], row_adapter: Tensor, seed: Tensor, backend: str,
    need_dx: bool, need_lora: list[bool], need_dw: bool, need_db: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    adapters = check_adapters(x, weight, None, _as_adapters(lora_A, lora_B, scaling, dropout_p))
    segs = segments(row_adapter, len(adapters))
    dx, pairs, dW, db = _multi_backward(dy, x, weight, adapters, h, segs, seed_value(seed), backend,
                                        need_dx, need_lora, need_dw, need_db)
    return (given(x, dx), [given(x, p and p[0]) for p in pairs], [given(x, p and p[1]) for p in pairs], given(x, dW),
            given(x, db))


@lora_linear_multi_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, row_adapter, seed, backend, need_dx, need_lora, need_dw,
      need_db):
    def maybe(flag, *shape):
        return x.new_empty(shape if flag else EMPTY_SHAPE)
    M, K = x.shape
    N = weight.shape[0]
    return (maybe(need_dx, M, K), [maybe(n, *A.shape) for A, n in zip(lora_A, need_lora)],
            [maybe(n, *B.shape) for B, n in zip(lora_B, need_lora)], maybe(need_dw, N, K), maybe(need_db, N))


def _multi_setup_context(ctx, inputs, output):
    x, weight, bias, lora_A, lora_B, scaling, dropout_p, row_adapter, seed, backend = inputs
    ctx.save_for_backward(x, weight, output[1], row_adapter, seed, *lora_A, *lora_B)
    ctx.scaling, ctx.dropout_p, ctx.backend, ctx.has_bias = scaling, dropout_p, backend, bias is not None


def _multi_op_backward(ctx, dy, _dh):
    n = len(ctx.scaling)
    x, weight, h, row_adapter, seed, *lora = ctx.saved_tensors
    lora_A, lora_B = lora[:n], lora[n:]
    need = ctx.needs_input_grad  # list inputs: one flag for the whole list
    need_db = bool(ctx.has_bias and need[2])
    need_lora = [bool(need[3] or need[4])] * n
    dx, dA, dB, dW, db = lora_linear_multi_bwd(dy, x, weight, lora_A, lora_B, h, ctx.scaling, ctx.dropout_p,
                                               row_adapter, seed, ctx.backend, need[0], need_lora, need[1], need_db)
    return (dx if need[0] else None, dW if need[1] else None, db if need_db else None,
            list(dA) if need[3] else None, list(dB) if need[4] else None, None, None, None, None, None)


lora_linear_multi_fwd.register_autograd(_multi_op_backward, setup_context=_multi_setup_context)


class _EagerLoRALinearMulti(torch.autograd.Function):
    """Several adapters, eager mode. Inputs after the non-tensor ones: lora_A_0, lora_B_0, lora_A_1, ...

    Per adapter a, on its rows R_a only (H_a = (D_a x[R_a]) A_a^T saved from forward):
        G_a = s_a dY[R_a] B_a;  dB_a = s_a dY[R_a]^T H_a;  dA_a = G_a^T (D_a x[R_a]);  dx[R_a] += D_a (G_a A_a)
    and once for the whole batch: dx = dY W (+ the above), dW = dY^T x, db = sum of dY's rows.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, segs, spec, seed, backend, *lora):
        adapters = tuple((lora[2 * a], lora[2 * a + 1], s, p) for a, (s, p) in enumerate(spec))
        y, h = _multi_forward(x, weight, bias, adapters, segs, seed, backend)
        ctx.save_for_backward(x, weight, bias, h, *lora)
        ctx.segs, ctx.spec, ctx.seed, ctx.backend = segs, spec, seed, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        n = len(ctx.spec)
        x, weight, bias, h, *lora = ctx.saved_tensors
        adapters = tuple((lora[2 * a], lora[2 * a + 1], s, p) for a, (s, p) in enumerate(ctx.spec))
        need = ctx.needs_input_grad
        need_lora = [need[7 + 2 * a] or need[8 + 2 * a] for a in range(n)]
        need_db = bias is not None and need[2]
        if torch.is_grad_enabled() and any(t.requires_grad for t in (dy, x, weight, *lora)):
            return _multi_double_backward(ctx, dy, x, weight, bias, adapters, need)
        dx, lora_grads, dW, db = _multi_backward(dy, x, weight, adapters, h, ctx.segs, ctx.seed, ctx.backend,
                                                 need[0], need_lora, need[1], need_db)
        flat = []
        for a, pair in enumerate(lora_grads):
            dA, dB = pair if pair is not None else (None, None)
            flat += [dA if need[7 + 2 * a] else None, dB if need[8 + 2 * a] else None]
        return (dx, dW, db if need_db else None, None, None, None, None, *flat)


def _multi_double_backward(ctx, dy, x, weight, bias, adapters, need):
    """Gradients with their own graph (create_graph=True): the forward recomputed with differentiable
    ops and the same masks, differentiated by autograd."""
    inputs = (x, weight, bias, *(t for a in adapters for t in a[:2]))
    needs = (need[0], need[1], need[2]) + tuple(need[7:])
    # The masks of the backend that ran the forward (with dropout, backward follows its choice).
    row = chosen_row(MULTI_BWD, x, weight.shape[0], max_rank(adapters), ctx.backend, max_dropout(adapters),
                     counted_as="multi_bwd_differentiable")
    with torch.enable_grad():
        y = torch_multi.differentiable_forward(x, weight, bias, adapters, ctx.segs, ctx.seed, row.load().keep_mask)
        wanted = [t for t, n in zip(inputs, needs) if n]
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    out = [next(grads) if n else None for n in needs]
    return (*out[:3], None, None, None, None, *out[3:])


def lora_linear_multi(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], adapters, row_adapter: Tensor,
    seed: Optional[Tensor] = None, backend: str = "auto",
) -> Tensor:
    """Several adapters in one batch: y[m] = x[m] W^T + b + s_a B_a A_a (D_a x[m]), a = row_adapter[m].

    x (M x K), weight (N x K), bias (N) or None as for `lora_linear`; `adapters` a list of
    (lora_A (r_a x K), lora_B (N x r_a), scaling s_a, dropout_p p_a), each with its own rank, scaling and
    dropout; `row_adapter` an int64 tensor of M adapter indices in [-1, len(adapters)) on x's device,
    -1 meaning no adapter (peft's "__base__"). Differentiable in x, W, b and every adapter's A and B:
    adapter a's gradients come from its own rows only (twice differentiable, in eager mode).

    The base GEMM runs once for the whole batch; each adapter's low-rank term acts on its rows only
    (on the torch backend, `torch_row.multi`: all adapters stacked into one GEMM per product when their
    ranks sum to at most torch_row.multi.DENSE_MAX_RANK, else run by run; the same results). `seed` (int
    or 0-dim int64 tensor, required when some p_a > 0) fixes the dropout masks: adapter a draws its
    mask as the single-adapter op would on its rows alone with the seed `core.dropout.adapter_seed(seed,
    a)`, with the mask generator of the backend that runs (as for one adapter, the torch and Triton
    backends draw different masks from one seed). Backends: "torch",
    "triton" (the segment kernels: ranks up to 128, float16/bfloat16 on a GPU) and "auto".
    Bad inputs raise ValueError or
    TypeError naming the problem (and the adapter's index) before anything runs (under torch.compile,
    row_adapter's values are checked when the op runs). Under torch.compile the custom op
    `fused_lora::lora_linear_multi_fwd` is traced (fullgraph works).
    """
    adapters = check_adapters(x, weight, bias, adapters)
    seed = as_seed_tensor(seed, max([0.0] + [a[3] for a in adapters]))
    if torch.compiler.is_compiling() or x.is_meta:  # the op's fake checks shapes; its body checks values
        if not isinstance(row_adapter, Tensor) or row_adapter.dtype != torch.int64:
            check_row_adapter(row_adapter, x, len(adapters))  # the type errors
        lists = [list(t) for t in zip(*adapters)] if adapters else [[], [], [], []]
        return lora_linear_multi_fwd(x, weight, bias, *lists, row_adapter, seed, backend)[0]
    check_row_adapter(row_adapter, x, len(adapters))
    seed_int = seed_value(seed)
    refuse_early(MULTI_FWD, x, weight.shape[0], max_rank(adapters), backend, max_dropout(adapters))
    segs = segments(row_adapter, len(adapters))
    lora = [t for a in adapters for t in a[:2]]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *lora))):
        return _multi_forward(x, weight, bias, adapters, segs, seed_int, backend)[0]  # inference: no autograd
    spec = tuple((a[2], a[3]) for a in adapters)
    return _EagerLoRALinearMulti.apply(x, weight, bias, segs, spec, seed_int, backend, *lora)
