"""Checks of the LoRA op's inputs, run once before a backend is chosen.

The kernels trust their arguments (a wrong size reads out of bounds), so every entry point checks
here first: the eager paths before dispatch and the fake implementations under torch.compile,
with the same messages. Sizes may be symbolic under torch.compile (checked then through
`torch._check_with`). Shapes, ranks, devices and values raise ValueError; types and dtypes TypeError.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor

SEED_LIMIT = 2**63  # seeds are int64 tensors: [0, 2^63)
OP_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require(error: type, cond, message) -> None:
    """Raise error(message()) unless cond; a symbolic cond (fake tensors, dynamic shapes) goes to
    torch._check_with, which records it as a guard. Plain bools take the fast path: these checks
    run on every eager call."""
    if cond is True:
        return
    if isinstance(cond, bool):
        raise error(message())
    torch._check_with(error, cond, message)


def _shape(t: Tensor) -> tuple:
    return tuple(t.shape)


def check_dropout_p(dropout_p) -> None:
    """dropout_p must be a real number in [0, 1) (1 would divide by zero: nothing kept)."""
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:  # the common case, fast
        return
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"lora_linear: dropout_p must be a real number, got {type(dropout_p).__name__}")
    if not (0.0 <= float(dropout_p) < 1.0):
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p!r}")


def rounding_bound(dtype: torch.dtype) -> float:
    """The magnitude from which round-to-nearest leaves `dtype`'s finite range: its largest value plus
    half a unit in its last place (65520 for float16); inf for float64 (a Python float is one)."""
    info = torch.finfo(dtype)
    if info.bits >= 64:
        return math.inf
    return info.max + 2.0 ** math.floor(math.log2(info.max)) * info.eps / 2


# The ops take the scale as a float32 (the kernels' scalar argument, torch's opmath scalar): the largest
# magnitude that stays finite there.
SCALING_BOUND = rounding_bound(torch.float32)


def as_scaling(scaling) -> float:
    """The LoRA scale s as a float: a finite real number within float32's range, the dtype the ops take it
    in (a string or a tensor needing a gradient is refused)."""
    if isinstance(scaling, Tensor):
        if scaling.numel() != 1 or scaling.requires_grad:
            raise TypeError("lora_linear: scaling must be a number (a one-element tensor without grad is read "
                            f"as one), got a tensor of shape {_shape(scaling)}"
                            f"{' that requires grad' if scaling.requires_grad else ''}")
        if scaling.is_meta:
            raise ValueError("lora_linear: scaling is a meta tensor, which holds no value: pass a number")
        scaling = scaling.item()
    if isinstance(scaling, bool) or not isinstance(scaling, numbers.Real):
        raise TypeError(f"lora_linear: scaling must be a real number, got {type(scaling).__name__}")
    if torch.compiler.is_compiling():
        # torch.compile may make the scale symbolic (layers with different scales share one graph):
        # the ops check it again, concrete, where they run.
        return scaling
    try:
        scaling = float(scaling)
    except OverflowError:  # an int beyond any float
        raise ValueError(f"lora_linear: scaling must be finite, got an integer of {len(str(scaling))} digits") from None
    if not math.isfinite(scaling):
        raise ValueError(f"lora_linear: scaling must be finite, got {scaling!r}")
    if abs(scaling) >= SCALING_BOUND:
        raise ValueError(f"lora_linear: scaling {scaling:g} is beyond float32's range (largest finite "
                         f"{torch.finfo(torch.float32).max:g}), the dtype the ops take the scale in")
    return scaling


def check_tensor_kinds(op: str, named, optional: tuple = ()) -> None:
    """An op's tensors (`named`: (name, tensor, rank), x first): each a tensor (None allowed for the names in
    `optional`) of its rank, x of a floating dtype the ops take, the others of x's dtype and on x's device.
    Types, ranks, dtypes and devices are never symbolic: plain checks (this runs on every call)."""
    for name, t, _ in named:
        if not isinstance(t, Tensor) and not (t is None and name in optional):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(t).__name__}")
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"{op}: {name} has layout {t.layout}; the ops take dense (strided) tensors")
    for name, t, want in named:
        if t is not None and t.dim() != want:
            raise ValueError(f"{op}: {name} must be {want}-D, got shape {_shape(t)}")
    dtype, device = named[0][1].dtype, named[0][1].device
    if dtype not in OP_DTYPES:
        raise TypeError(f"{op}: x has dtype {dtype}; expected one of float16, bfloat16, float32, float64")
    for name, t, _ in named[1:]:
        if t is not None and t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype} but x has {dtype} (cast them to one dtype)")
        if t is not None and t.device != device:
            raise ValueError(f"{op}: {name} is on {t.device} but x is on {device}")


def check_op_inputs(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                    dropout_p: float) -> None:
    """x (M x K), W (N x K), b (N) or None, A (r x K), B (N x r): one floating dtype, one device."""
    check_tensor_kinds("lora_linear", (("x", x, 2), ("weight", weight, 2), ("bias", bias, 1), ("lora_A", lora_A, 2),
                                       ("lora_B", lora_B, 2)), optional=("bias",))
    # Sizes may be symbolic under torch.compile: require. (Each .shape builds a torch.Size: once each.)
    xs, ws, As, Bs = x.shape, weight.shape, lora_A.shape, lora_B.shape
    K, N, r = xs[1], ws[0], As[0]
    require(ValueError, ws[1] == K, lambda: f"lora_linear: weight has shape {tuple(ws)} but x has {tuple(xs)}: "
                                            f"expected (N, {K})")
    require(ValueError, As[1] == K, lambda: f"lora_linear: lora_A has shape {tuple(As)} but x has {tuple(xs)}: "
                                            f"expected (r, {K})")
    for size, want in ((Bs[0], N), (Bs[1], r)):
        require(ValueError, size == want, lambda: f"lora_linear: lora_B has shape {tuple(Bs)}, expected (N, r) = "
                                                  f"({N}, {r}) from weight {tuple(ws)} and lora_A {tuple(As)}")
    if bias is not None:
        require(ValueError, bias.shape[0] == N, lambda: f"lora_linear: bias has shape {_shape(bias)}, expected "
                                                        f"({N},) from weight {tuple(ws)}")
    check_dropout_p(dropout_p)


def check_backward_inputs(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, h: Tensor,
                          dropout_p: float) -> None:
    """The forward's checks, plus dY (M x N) and H (M x r) of the matching sizes, dtype and device."""
    check_op_inputs(x, weight, None, lora_A, lora_B, dropout_p)
    M, N, r = x.shape[0], weight.shape[0], lora_A.shape[0]
    for name, t, want in (("dy", dy, (M, N)), ("h", h, (M, r))):
        require(ValueError, t.dim() == 2 and t.shape[0] == want[0] and t.shape[1] == want[1],
                           lambda: f"lora_linear backward: {name} has shape {_shape(t)}, expected {want}")
        require(TypeError, t.dtype == x.dtype, lambda: f"lora_linear backward: {name} has dtype {t.dtype} but x has "
                                                      f"{x.dtype}")
        require(ValueError, t.device == x.device, lambda: f"lora_linear backward: {name} is on {t.device} but x is "
                                                         f"on {x.device}")


def check_seed_tensor(seed: Tensor) -> None:
    """A seed tensor is a 0-dim int64 tensor (its value is checked where it is read)."""
    require(TypeError, seed.dtype == torch.int64 and seed.dim() == 0,
                      lambda: f"lora_linear: seed must be a 0-dim int64 tensor or an int, got a {seed.dtype} "
                              f"tensor of shape {_shape(seed)}")


def seed_value(seed: Tensor) -> int:
    """The seed as a Python int, refused if negative (the dropout generators take seeds in [0, 2^63))."""
    if seed.is_meta:
        raise ValueError("lora_linear: seed is a meta tensor, which holds no value: pass an int or an int64 tensor "
                         "on a real device")
    value = int(seed.item())
    if value < 0:
        raise ValueError(f"lora_linear: seed must be >= 0, got {value}")
    return value


def as_seed_tensor(seed, dropout_p: float) -> Tensor:
    """None (only without dropout), a Python int in [0, 2^63) or a 0-dim int64 tensor -> the seed tensor."""
    check_dropout_p(dropout_p)
    if seed is None:
        if dropout_p > 0.0:
            raise ValueError("lora_linear: a seed (int or 0-dim int64 tensor) is required when dropout_p > 0")
        return torch.zeros((), dtype=torch.int64)
    if isinstance(seed, Tensor):
        if not torch.compiler.is_compiling():  # under compile the fake implementation checks it
            check_seed_tensor(seed)
        return seed
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"lora_linear: seed must be an int or a 0-dim int64 tensor, got {type(seed).__name__}")
    if not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"lora_linear: seed must be in [0, 2^63), got {seed}")
    return torch.tensor(int(seed), dtype=torch.int64)


__all__ = ["SCALING_BOUND", "as_scaling", "as_seed_tensor", "check_adapters", "check_backward_inputs",
           "check_dropout_p", "check_op_inputs", "check_row_adapter", "check_row_adapter_shape", "check_seed_tensor",
           "require", "rounding_bound", "seed_value", "named_for", "check_grouped_inputs",
           "check_grouped_backward_inputs", "check_group_sizes", "check_group_size_values", "check_tensor_kinds"]


# ------------------------------------------------------------------ several adapters in one batch

def check_adapters(x, weight, bias, adapters) -> tuple:
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


def check_row_adapter(row_adapter, x: Tensor, n_adapters: int) -> None:
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


def check_row_adapter_shape(row_adapter: Tensor, x: Tensor) -> None:
    require(ValueError, row_adapter.dim() == 1 and row_adapter.shape[0] == x.shape[0],
             lambda: f"lora_linear_multi: row_adapter has shape {tuple(row_adapter.shape)} but x has {x.shape[0]} "
                     f"rows: expected ({x.shape[0]},), one adapter index per row")


# ------------------------------------------------------------------ expert weights (the grouped op)

GROUPED = "lora_linear_grouped"


def named_for(op: str, fn, *args):
    """fn(*args), its errors naming `op` where they name lora_linear (the shared checks of seed, scaling, p)."""
    try:
        return fn(*args)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("lora_linear:", f"{op}:", 1)) from None


def check_group_sizes(group_sizes, x: Tensor, n_experts) -> None:
    """group_sizes: an int64 tensor of shape (E,) on x's device (its values: `check_group_size_values`)."""
    if not isinstance(group_sizes, Tensor):
        raise TypeError(f"{GROUPED}: group_sizes must be an int64 tensor of shape (E,), got "
                        f"{type(group_sizes).__name__}")
    if group_sizes.dtype != torch.int64:
        raise TypeError(f"{GROUPED}: group_sizes has dtype {group_sizes.dtype}, expected torch.int64")
    if group_sizes.dim() != 1:
        raise ValueError(f"{GROUPED}: group_sizes must be 1-D (one row count per expert), got shape "
                         f"{_shape(group_sizes)}")
    if group_sizes.device != x.device:
        raise ValueError(f"{GROUPED}: group_sizes is on {group_sizes.device} but x is on {x.device}")
    require(ValueError, group_sizes.shape[0] == n_experts,
            lambda: f"{GROUPED}: group_sizes has {group_sizes.shape[0]} entries but weight has {n_experts} experts: "
                    "expected one row count per expert")


def check_group_size_values(sizes, M) -> None:
    """The groups' sizes read on the host: each >= 0, summing to x's row count M."""
    for g, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"{GROUPED}: group_sizes holds {size} (expert {g}): row counts must be >= 0")
    total = sum(sizes)
    if total != M:
        raise ValueError(f"{GROUPED}: group_sizes sums to {total} but x has {M} rows: every row belongs to "
                         "one expert's group (rows sorted by expert)")


def check_grouped_inputs(x: Tensor, group_sizes: Tensor, weight: Tensor, bias: Optional[Tensor],
                         lora_A: Optional[Tensor], lora_B: Optional[Tensor], dropout_p: float,
                         transposed: bool = False) -> None:
    """x (M, K), rows sorted by expert; group_sizes (E,) int64; weight (E, N, K), or (E, K, N) when
    `transposed`; bias (E, N) or None; lora_A (E, r, K) and lora_B (E, N, r), or both None (the base alone,
    without dropout): one floating dtype, one device. Sizes may be symbolic (torch.compile): `require`."""
    if not isinstance(transposed, bool):
        raise TypeError(f"{GROUPED}: transposed must be a bool, got {type(transposed).__name__}")
    if (lora_A is None) != (lora_B is None):
        raise TypeError(f"{GROUPED}: lora_A and lora_B must both be tensors, or both None for the base alone")
    named = (("x", x, 2), ("weight", weight, 3), ("bias", bias, 2), ("lora_A", lora_A, 3), ("lora_B", lora_B, 3))
    check_tensor_kinds(GROUPED, named, optional=("bias", "lora_A", "lora_B"))
    xs, ws = x.shape, weight.shape
    E, K = ws[0], xs[1]
    w_k, N = (ws[1], ws[2]) if transposed else (ws[2], ws[1])
    require(ValueError, E >= 1, lambda: f"{GROUPED}: weight has no experts (shape {tuple(ws)})")
    for name, t, _ in named[2:]:
        if t is not None:
            require(ValueError, t.shape[0] == E,
                    lambda name=name, t=t: f"{GROUPED}: {name} has {t.shape[0]} experts (shape {_shape(t)}) but weight has {E} "
                            f"(shape {tuple(ws)}): every per-expert tensor leads with the expert count")
    check_group_sizes(group_sizes, x, E)
    layout = "(E, K, N) (transposed=True)" if transposed else "(E, N, K)"
    other = ws[2] if transposed else ws[1]  # K in the other layout: then the flag is what is wrong
    hint = (f"; it reads as {'(E, N, K): transposed=False' if transposed else '(E, K, N): transposed=True'}"
            if other == K else "")
    require(ValueError, w_k == K, lambda: f"{GROUPED}: weight has shape {tuple(ws)} but x has {tuple(xs)}: expected "
                                          f"{layout.replace('K', str(K))}{hint}")
    if bias is not None:
        require(ValueError, bias.shape[1] == N, lambda: f"{GROUPED}: bias has shape {_shape(bias)}, expected "
                                                        f"({E}, {N}) from weight {tuple(ws)}")
    if lora_A is not None:
        As, Bs = lora_A.shape, lora_B.shape
        r = As[1]
        require(ValueError, As[2] == K, lambda: f"{GROUPED}: lora_A has shape {tuple(As)} but x has {tuple(xs)}: "
                                                f"expected (E, r, {K})")
        for size, want in ((Bs[1], N), (Bs[2], r)):
            require(ValueError, size == want, lambda: f"{GROUPED}: lora_B has shape {tuple(Bs)}, expected (E, N, r) = "
                                                      f"({E}, {N}, {r}) from weight {tuple(ws)} and lora_A {tuple(As)}")
    named_for(GROUPED, check_dropout_p, dropout_p)
    if lora_A is None and dropout_p > 0.0:
        raise ValueError(f"{GROUPED}: dropout_p = {dropout_p} without lora_A / lora_B: dropout acts on the LoRA "
                         "term only (pass dropout_p=0.0 for the base alone)")


def check_grouped_backward_inputs(dy: Tensor, x: Tensor, group_sizes: Tensor, weight: Tensor, lora_A: Tensor,
                                  lora_B: Tensor, h: Tensor, dropout_p: float, transposed: bool = False) -> None:
    """The forward's checks, plus dY (M, N) and H (M, r) of the matching sizes, dtype and device."""
    check_grouped_inputs(x, group_sizes, weight, None, lora_A, lora_B, dropout_p, transposed)
    M, N, r = x.shape[0], weight.shape[1 if not transposed else 2], lora_A.shape[1]
    for name, t, want in (("dy", dy, (M, N)), ("h", h, (M, r))):
        require(ValueError, t.dim() == 2 and t.shape[0] == want[0] and t.shape[1] == want[1],
                lambda name=name, t=t, want=want: f"{GROUPED} backward: {name} has shape {_shape(t)}, expected {want}")
        require(TypeError, t.dtype == x.dtype,
                lambda name=name, t=t: f"{GROUPED} backward: {name} has dtype {t.dtype} but x has {x.dtype}")
        require(ValueError, t.device == x.device,
                lambda name=name, t=t: f"{GROUPED} backward: {name} is on {t.device} but x is on {x.device}")
