"""The LoRA layer as `torch.library` custom ops, with fake implementations and autograd.

    fused_lora::lora_linear_fwd(x, W, b, A, B, s, p, seed, backend) -> (Y, H)
    fused_lora::lora_linear_bwd(dY, x, W, A, B, H, s, p, seed, backend, needs...) -> (dx, dA, dB, dW, db)

Each op body asks `backends.select` which implementation runs and calls it; the module
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

Inputs are checked once, before a backend is chosen (`op_inputs`), in the eager paths and in the
fake implementations alike, so every path and backend refuses bad inputs with the same error.

`lora_linear_multi` is the entry for several adapters in one batch (a per-row adapter index; the
PyTorch path in `multi_impl`), built the same way: custom ops fused_lora::lora_linear_multi_fwd/_bwd
(adapters as tensor lists, H packed into one M x max(r) tensor so the fake shapes are static, the
row layout recomputed from the index inside each op) under torch.compile, an autograd.Function in
eager mode, the backend chosen through the same table (ops "multi_fwd" / "multi_bwd": the torch row
runs `multi_impl`, the Triton row the segment kernels of `kernels.multi`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..dispatch import registry as backends
from ..torch_row import multi as multi_impl, dense as torch_impl
from ..core.segments import packed_h_shape, segments
from ..core.op_inputs import _require, as_scaling, as_seed_tensor, check_backward_inputs, check_op_inputs, check_seed_tensor, seed_value

_EMPTY_SHAPE = (0,)


def _impl(name: str):
    """The module of backend `name` (backends' table; imported on first use: no Triton work at import)."""
    return backends.get(name).load()


def _chosen(op: str, x: Tensor, rank: int, backend: str, weight: Optional[Tensor] = None, dropout_p: float = 0.0,
            grads: tuple = (), bench=None, counted_as: Optional[str] = None, probe=None):
    """The implementation that runs `op` on these inputs, chosen by `backends.select` (which, in auto
    on CUDA, times the candidates through `bench` on a key's first call, and checks rows on `probe`);
    counted in backends.calls under `counted_as` (default: op)."""
    problem = backends.Problem(op, x.device, x.dtype, x.shape[0], weight.shape[0] if weight is not None else 0,
                               x.shape[-1], rank, dropout_p > 0.0, grads)
    impl = backends.select(problem, backend, bench, probe)
    backends.calls[(counted_as or op, impl.name)] += 1
    return impl.load()


def _empty(x: Tensor, weight: Tensor) -> bool:
    """An empty M, N or K: nothing to launch, and torch's ops give the exact empty / zero results."""
    return min(x.shape[0], x.shape[1], weight.shape[0]) == 0


def _random_lora(lora_A: Tensor, lora_B: Tensor, seed: int = 0) -> tuple:
    """Random A and B of these shapes, dtypes and devices, with O(1) low-rank outputs."""
    (r, K), N = lora_A.shape, lora_B.shape[0]
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(r, K, generator=g, dtype=torch.float64) * max(K, 1) ** -0.5).to(lora_A)
    b = (torch.randn(N, r, generator=g, dtype=torch.float64) * max(r, 1) ** -0.5).to(lora_B)
    return a, b


def _probe(args: tuple, a_at: int, method, replace=None):
    """A `probe` for backends.select: `method(module)` on `args` with lora_A, lora_B (at a_at, a_at + 1)
    replaced by random ones of the same shapes (made on first use, shared by every row); `replace`
    instead maps args[a_at] alone. A fresh adapter's B is zero, so on the actual inputs every
    low-rank term is zero and a row's check could not see a kernel that loses one."""
    made = []

    def probe(module):
        if not made:
            if replace is not None:
                made.append(args[:a_at] + (replace(args[a_at]),) + args[a_at + 1:])
            else:
                made.append(args[:a_at] + _random_lora(args[a_at], args[a_at + 1]) + args[a_at + 2:])
        return lambda: method(module)(*made[0])
    return probe


def _run_forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed: int, backend):
    if bias is not None:
        bias = bias.contiguous()  # the kernels read the bias with unit stride; N elements, cheap
    args = (x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    impl = _chosen("fwd", x, lora_A.shape[0], backend, weight, dropout_p, bench=lambda m: lambda: m.forward(*args),
                   probe=_probe(args, 3, lambda m: m.forward))
    return (torch_impl if _empty(x, weight) else impl).forward(*args)


def _run_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed: int, backend,
                  need_dx, need_lora, need_dw, need_db):
    args = (dy.contiguous(), x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_dw, need_db)
    grads = tuple(n for n, need in zip(("dx", "lora", "dW", "db"), (need_dx, need_lora, need_dw, need_db)) if need)
    impl = _chosen("bwd", x, lora_A.shape[0], backend, weight, dropout_p, grads,
                   bench=lambda m: lambda: m.backward(*args), probe=_probe(args, 3, lambda m: m.backward))
    return (torch_impl if _empty(x, weight) else impl).backward(*args)


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
    return tuple(g if g is not None else x.new_empty(_EMPTY_SHAPE) for g in grads)


@lora_linear_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, backend, need_dx, need_lora, need_dw, need_db):
    check_backward_inputs(dy, x, weight, lora_A, lora_B, h, dropout_p)
    check_seed_tensor(seed)

    def maybe(flag, *shape):
        return x.new_empty(shape if flag else _EMPTY_SHAPE)
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
    backends.calls as ("bwd_differentiable", backend whose mask is used).
    """
    # Chosen as a backward of this forward: with dropout, the backend (so the mask) the forward used.
    impl = _chosen("bwd", x, lora_A.shape[0], backend, weight, dropout_p, counted_as="bwd_differentiable")
    keep = impl.keep_mask(seed_value(seed), x.shape, dropout_p, x.device) if dropout_p > 0.0 else None
    h = torch.mm(torch_impl.dropped(x, keep, dropout_p), lora_A.t())
    return torch_impl.backward_with_mask(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, keep, *needs)


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


# ------------------------------------------------------------------ several adapters in one batch

def _multi_adapters(x, weight, bias, adapters) -> tuple:
    """The adapters as ((A, B, float scaling, float p), ...), each checked as the single-adapter op checks
    its inputs (errors name the adapter's index)."""
    if isinstance(adapters, (str, bytes, Tensor)) or not isinstance(adapters, (list, tuple)):
        raise TypeError("lora_linear_multi: adapters must be a list of (lora_A, lora_B, scaling, dropout_p), "
                        f"got {type(adapters).__name__}")
    if not adapters:  # still check x, weight, bias: against an empty adapter
        shaped = isinstance(x, Tensor) and isinstance(weight, Tensor) and x.dim() == 2 and weight.dim() == 2
        empty_A = x.new_empty(0, x.shape[1]) if shaped else x
        empty_B = x.new_empty(weight.shape[0], 0) if shaped else x
        check_op_inputs(x, weight, bias, empty_A, empty_B, 0.0)
    out = []
    for i, adapter in enumerate(adapters):
        try:
            if not isinstance(adapter, (list, tuple)) or len(adapter) != 4:
                raise TypeError(f"must be a (lora_A, lora_B, scaling, dropout_p) tuple, got {type(adapter).__name__}"
                                + (f" of length {len(adapter)}" if isinstance(adapter, (list, tuple)) else ""))
            lora_A, lora_B, scaling, dropout_p = adapter
            check_op_inputs(x, weight, bias, lora_A, lora_B, dropout_p)
            out.append((lora_A, lora_B, as_scaling(scaling), float(dropout_p)))
        except (TypeError, ValueError) as err:
            raise type(err)(f"lora_linear_multi: adapter {i}: {str(err).replace('lora_linear: ', '')}") from None
    return tuple(out)


def _check_row_adapter(row_adapter, x: Tensor, n_adapters: int) -> None:
    """row_adapter: an int64 tensor of length M on x's device, values in [-1, n_adapters)."""
    if not isinstance(row_adapter, Tensor):
        raise TypeError(f"lora_linear_multi: row_adapter must be an int64 tensor, got {type(row_adapter).__name__}")
    if row_adapter.dtype != torch.int64:
        raise TypeError(f"lora_linear_multi: row_adapter has dtype {row_adapter.dtype}, expected torch.int64")
    if row_adapter.dim() != 1 or row_adapter.shape[0] != x.shape[0]:
        raise ValueError(f"lora_linear_multi: row_adapter has shape {tuple(row_adapter.shape)} but x has "
                         f"{x.shape[0]} rows: expected ({x.shape[0]},), one adapter index per row")
    if row_adapter.device != x.device:
        raise ValueError(f"lora_linear_multi: row_adapter is on {row_adapter.device} but x is on {x.device}")
    if row_adapter.numel() and not row_adapter.is_meta:
        low, high = (int(v) for v in torch.aminmax(row_adapter))
        if low < -1 or high >= n_adapters:
            bad = low if low < -1 else high
            raise ValueError(f"lora_linear_multi: row_adapter holds {bad}, outside [-1, {n_adapters}) "
                             f"(-1 = no adapter; {n_adapters} adapter(s) given)")


def _check_row_adapter_shape(row_adapter: Tensor, x: Tensor) -> None:
    _require(ValueError, row_adapter.dim() == 1 and row_adapter.shape[0] == x.shape[0],
             lambda: f"lora_linear_multi: row_adapter has shape {tuple(row_adapter.shape)} but x has {x.shape[0]} "
                     f"rows: expected ({x.shape[0]},), one adapter index per row")


def _as_adapters(lora_A, lora_B, scaling, dropout_p) -> tuple:
    return tuple(zip(lora_A, lora_B, scaling, dropout_p))


def _multi_forward(x, weight, bias, adapters, segs, seed: int, backend):
    """(Y, packed H) on the backend the table chooses (counted as multi_fwd)."""
    if bias is not None:
        bias = bias.contiguous()
    args = (x, weight, bias, adapters, segs, seed)
    return _chosen_multi("multi_fwd", x, weight, adapters, backend, bench=lambda m: lambda: m.multi_forward(*args),
                         probe=_multi_probe(args, 3, lambda m: m.multi_forward)).multi_forward(*args)


def _multi_backward(dy, x, weight, adapters, h, segs, seed: int, backend, need_dx, need_lora, need_dw, need_db):
    args = (dy.contiguous(), x, weight, adapters, h, segs, seed, need_dx, need_lora, need_dw, need_db)
    impl = _chosen_multi("multi_bwd", x, weight, adapters, backend, bench=lambda m: lambda: m.multi_backward(*args),
                         probe=_multi_probe(args, 3, lambda m: m.multi_backward))
    return impl.multi_backward(*args)


# The custom ops (what torch.compile traces): the layout is recomputed from row_adapter inside each.

@torch.library.custom_op("fused_lora::lora_linear_multi_fwd", mutates_args=())
def lora_linear_multi_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: list[Tensor], lora_B: list[Tensor],
    scaling: list[float], dropout_p: list[float], row_adapter: Tensor, seed: Tensor, backend: str,
) -> tuple[Tensor, Tensor]:
    adapters = _multi_adapters(x, weight, bias, _as_adapters(lora_A, lora_B, scaling, dropout_p))
    _check_row_adapter(row_adapter, x, len(adapters))
    check_seed_tensor(seed)
    segs = segments(row_adapter, len(adapters))
    return _multi_forward(x, weight, bias, adapters, segs, seed_value(seed), backend)


@lora_linear_multi_fwd.register_fake
def _(x, weight, bias, lora_A, lora_B, scaling, dropout_p, row_adapter, seed, backend):
    adapters = _multi_adapters(x, weight, bias, _as_adapters(lora_A, lora_B, scaling, dropout_p))
    _check_row_adapter_shape(row_adapter, x)
    check_seed_tensor(seed)
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(packed_h_shape(x.shape[0], adapters))


@torch.library.custom_op("fused_lora::lora_linear_multi_bwd", mutates_args=())
def lora_linear_multi_bwd(
    dy: Tensor, x: Tensor, weight: Tensor, lora_A: list[Tensor], lora_B: list[Tensor], h: Tensor,
    scaling: list[float], dropout_p: list[float], row_adapter: Tensor, seed: Tensor, backend: str,
    need_dx: bool, need_lora: list[bool], need_dw: bool, need_db: bool,
) -> tuple[Tensor, list[Tensor], list[Tensor], Tensor, Tensor]:
    adapters = _multi_adapters(x, weight, None, _as_adapters(lora_A, lora_B, scaling, dropout_p))
    segs = segments(row_adapter, len(adapters))
    dx, pairs, dW, db = _multi_backward(dy, x, weight, adapters, h, segs, seed_value(seed), backend,
                                        need_dx, need_lora, need_dw, need_db)
    def given(t):  # custom ops cannot return None, nor one tensor twice: a fresh empty tensor each
        return x.new_empty(_EMPTY_SHAPE) if t is None else t
    return (given(dx), [given(p and p[0]) for p in pairs], [given(p and p[1]) for p in pairs], given(dW), given(db))


@lora_linear_multi_bwd.register_fake
def _(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, row_adapter, seed, backend, need_dx, need_lora, need_dw,
      need_db):
    def maybe(flag, *shape):
        return x.new_empty(shape if flag else _EMPTY_SHAPE)
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
    impl = _chosen_multi("multi_bwd", x, weight, adapters, ctx.backend, counted_as="multi_bwd_differentiable")
    with torch.enable_grad():
        y = multi_impl.differentiable_forward(x, weight, bias, adapters, ctx.segs, ctx.seed, impl.keep_mask)
        wanted = [t for t, n in zip(inputs, needs) if n]
        grads = iter(torch.autograd.grad(y, wanted, dy, create_graph=True, allow_unused=True))
    out = [next(grads) if n else None for n in needs]
    return (*out[:3], None, None, None, None, *out[3:])


def _chosen_multi(op: str, x: Tensor, weight: Tensor, adapters, backend: str, bench=None,
                  counted_as: Optional[str] = None, probe=None):
    rank = max([0] + [a[0].shape[0] for a in adapters])
    return _chosen(op, x, rank, backend, weight, max([0.0] + [a[3] for a in adapters]), bench=bench,
                   counted_as=counted_as, probe=probe)


def _multi_probe(args: tuple, at: int, method):
    """`_probe` for the multi-adapter ops: every adapter's A and B (the adapters at args[at]) random."""
    def with_random(adapters):
        return tuple((*_random_lora(lora_A, lora_B, a), s, p) for a, (lora_A, lora_B, s, p) in enumerate(adapters))
    return _probe(args, at, method, with_random)


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
    (on the torch backend, `multi_impl`: all adapters stacked into one GEMM per product when their
    ranks sum to at most multi_impl.DENSE_MAX_RANK, else run by run; the same results). `seed` (int
    or 0-dim int64 tensor, required when some p_a > 0) fixes the dropout masks: adapter a draws its
    mask as the single-adapter op would on its rows alone with the seed `multi_impl.adapter_seed(seed,
    a)`, with the mask generator of the backend that runs (as for one adapter, the torch and Triton
    backends draw different masks from one seed). Backends: "torch",
    "triton" (segment kernels, `kernels.multi`: ranks up to 128, float16/bfloat16 on a GPU) and "auto".
    Bad inputs raise ValueError or
    TypeError naming the problem (and the adapter's index) before anything runs (under torch.compile,
    row_adapter's values are checked when the op runs). Under torch.compile the custom op
    `fused_lora::lora_linear_multi_fwd` is traced (fullgraph works).
    """
    adapters = _multi_adapters(x, weight, bias, adapters)
    seed = as_seed_tensor(seed, max([0.0] + [a[3] for a in adapters]))
    if torch.compiler.is_compiling() or x.is_meta:  # the op's fake checks shapes; its body checks values
        if not isinstance(row_adapter, Tensor) or row_adapter.dtype != torch.int64:
            _check_row_adapter(row_adapter, x, len(adapters))  # the type errors
        lists = [list(t) for t in zip(*adapters)] if adapters else [[], [], [], []]
        return lora_linear_multi_fwd(x, weight, bias, *lists, row_adapter, seed, backend)[0]
    _check_row_adapter(row_adapter, x, len(adapters))
    seed_int = seed_value(seed)
    backends.select(backends.Problem("multi_fwd", x.device, x.dtype, x.shape[0], weight.shape[0], x.shape[1],
                                     max([0] + [a[0].shape[0] for a in adapters])), backend)  # fails early
    segs = segments(row_adapter, len(adapters))
    lora = [t for a in adapters for t in a[:2]]
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, *lora))):
        return _multi_forward(x, weight, bias, adapters, segs, seed_int, backend)[0]  # inference: no autograd
    spec = tuple((a[2], a[3]) for a in adapters)
    return _EagerLoRALinearMulti.apply(x, weight, bias, segs, spec, seed_int, backend, *lora)
