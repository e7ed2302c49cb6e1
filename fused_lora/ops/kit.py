"""What every op family shares to reach an implementation: choosing the row (`dispatch.select`, counted in
`dispatch.calls`), and the check rule's probe (the op on random LoRA weights). No family keeps its own copy.

    run_op(op, x, N, rank, backend, args, ...)   the chosen row's function for `op`, run on `args`
    chosen_row(op, x, N, rank, backend, ...)     the row alone (its keep_mask: the forward's mask in backward)
    probe(args, ...)                             the inputs the check rule compares rows on
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from .. import dispatch
from ..core.op_kinds import Op

EMPTY_SHAPE = (0,)  # what a custom op returns for a gradient not asked for (custom ops cannot return None)


def given(like: Tensor, t: Optional[Tensor]) -> Tensor:
    """`t`, or a fresh empty tensor (custom ops cannot return None, nor one tensor twice)."""
    return like.new_empty(EMPTY_SHAPE) if t is None else t


def max_rank(adapters) -> int:
    """The largest rank of (lora_A, lora_B, scaling, dropout_p) adapters (0 for none): a mixed batch's key."""
    return max([0] + [a[0].shape[0] for a in adapters])


def max_dropout(adapters) -> float:
    return max([0.0] + [a[3] for a in adapters])


def random_lora(lora_A: Tensor, lora_B: Tensor, seed: int = 0) -> tuple:
    """Random A and B of these shapes, dtypes and devices, with O(1) low-rank outputs: A (r x K) and B (N x r),
    or per expert (E x r x K, E x N x r)."""
    r, K = lora_A.shape[-2:]
    g = torch.Generator().manual_seed(seed)
    a = (torch.randn(*lora_A.shape, generator=g, dtype=torch.float64) * max(K, 1) ** -0.5).to(lora_A)
    b = (torch.randn(*lora_B.shape, generator=g, dtype=torch.float64) * max(r, 1) ** -0.5).to(lora_B)
    return a, b


def probe(op: Op, args: tuple, lora_at: Optional[int] = None, dropout_at: Optional[int] = None,
          adapters_at: Optional[int] = None, adapters_dropout: bool = True):
    """A `probe` for dispatch.select: the row's function for `op` on `args` with the LoRA weights random (a
    fresh adapter's B is zero, so on the actual inputs every low-rank term is zero and a row's check could
    not see a kernel that loses one): lora_A, lora_B at args[lora_at], args[lora_at + 1], or every adapter
    of the list at args[adapters_at]. The dropout off where asked (rows draw different masks, so only
    dropout-free outputs compare): args[dropout_at] = 0.0, or each adapter's with `adapters_dropout=False`.
    The inputs are made on first use and shared by every row."""
    made = []

    def inputs() -> tuple:
        if not made:
            new = list(args)
            if lora_at is not None:
                new[lora_at:lora_at + 2] = random_lora(args[lora_at], args[lora_at + 1])
            if dropout_at is not None:
                new[dropout_at] = 0.0
            if adapters_at is not None:
                new[adapters_at] = tuple((*random_lora(A, B, a), s, p if adapters_dropout else 0.0)
                                         for a, (A, B, s, p) in enumerate(args[adapters_at]))
            made.append(tuple(new))
        return made[0]
    return lambda module: (lambda: getattr(module, op.function)(*inputs()))


def problem(op: Op, x: Tensor, N: int, rank: int, dropout_p: float = 0.0, grads: tuple = (),
            layout: tuple = ("", 0), groups: int = 0) -> dispatch.Problem:
    """The dispatch Problem of `op` on x (M x K) and a weight of N rows; `layout`: a quantized base's
    (`core.formats.layout_name`) or the expert stack's; `groups`: the grouped op's number of experts."""
    return dispatch.Problem(op, x.device, x.dtype, x.shape[0], N, x.shape[-1], rank, dropout_p > 0.0, grads,
                            *layout, groups)


def refuse_early(op: Op, x: Tensor, N: int, rank: int, backend: str, dropout_p: float = 0.0,
                 layout: tuple = ("", 0), groups: int = 0) -> None:
    """BackendUnavailable now, before any work, when the backend asked for cannot run `op` on these inputs."""
    dispatch.select(problem(op, x, N, rank, dropout_p, (), layout, groups), backend)


def chosen_row(op: Op, x: Tensor, N: int, rank: int, backend: str, dropout_p: float = 0.0, grads: tuple = (),
               layout: tuple = ("", 0), bench=None, probe=None, counted_as: Optional[str] = None, groups: int = 0):
    """The implementation row that runs `op` on these inputs (x is M x K, W is N x K), chosen by
    `dispatch.select` (which, in auto on CUDA, times the candidates through `bench` on a key's first call,
    and checks rows on `probe`); counted in dispatch.calls under `counted_as` (default: the op's name).
    `layout`: a quantized base's (`core.formats.layout_name`), or the expert stack's ("experts" / "experts_t");
    `groups`: the grouped op's number of experts."""
    row = dispatch.select(problem(op, x, N, rank, dropout_p, grads, layout, groups), backend, bench, probe)
    dispatch.calls[(counted_as or op.name, row.name)] += 1
    return row


def run_op(op: Op, x: Tensor, N: int, rank: int, backend: str, args: tuple, dropout_p: float = 0.0,
           grads: tuple = (), layout: tuple = ("", 0), probe=None, fallback: Optional[Callable] = None,
           groups: int = 0):
    """`op` on `args` by the row `chosen_row` picks (timed on `args`, checked on `probe`); `fallback`, when
    given, runs instead once the choice is made and counted (inputs with nothing to launch: empty sizes)."""
    row = chosen_row(op, x, N, rank, backend, dropout_p, grads, layout,
                     bench=lambda module: lambda: getattr(module, op.function)(*args), probe=probe, groups=groups)
    return (fallback or row.function(op))(*args)
