"""The torch row's grouped op (issue 20 item 1, `torch_row.grouped`): besides its outputs it allocates no
M x N tensor and never a tensor the size of the expert stack (the weight is read through views, in either
layout), and it runs no product for an expert no row reaches: every allocation and every op is recorded by a
TorchDispatchMode around the row's own functions."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_lora.core.segments import grouped
from fused_lora.torch_row.grouped import grouped_backward, grouped_forward

E, M, K, N, R = 6, 64, 24, 48, 4  # M x N = 3072 > M x K = 1536; the stack E x N x K = 6912


class Recorder(TorchDispatchMode):
    """Every aten op run, and the sizes of the tensors they return in new storage."""

    def __init__(self):
        super().__init__()
        self.ops, self.new = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        self.ops.append(func.overloadpacket.__name__)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.new.append(t.numel())
        return out


def problem(transposed, sizes=(20, 0, 30, 0, 14, 0)):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    w = w.transpose(1, 2).contiguous() if transposed else w
    b, a, bb = torch.randn(E, N, generator=g), torch.randn(E, R, K, generator=g), torch.randn(E, N, R, generator=g)
    gs = torch.tensor(sizes)
    return x, grouped(gs, M), w, b, a, bb


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_m_by_n_temporary_and_no_copy_of_the_stack(transposed, p):
    x, segs, w, b, a, bb = problem(transposed)
    segs.offsets  # the host read, made by the op's value check before the row runs
    with Recorder() as fwd:
        y, h = grouped_forward(x, segs, w, b, a, bb, 0.5, p, 3, transposed)
    assert sorted(n for n in fwd.new if n >= M * N) == [M * N], "an M x N temporary besides Y (or a copy of W)"
    dy = torch.randn(M, N)
    with Recorder() as bwd:
        grouped_backward(dy, x, segs, w, a, bb, h, 0.5, p, 3, transposed, True, True, False, True)
    assert max(bwd.new) < M * N, "an M x N temporary (or a copy of W) in backward"
    with Recorder() as bwd_w:  # dW asked for: the one tensor the size of the stack is dW itself
        grouped_backward(dy, x, segs, w, a, bb, h, 0.5, p, 3, transposed, False, False, True, False)
    assert sorted(n for n in bwd_w.new if n >= M * N) == [E * N * K]


def test_experts_never_hit_run_no_product():
    """3 of the 6 experts get rows: 3 base GEMMs (addmm_ onto the low-rank start) in forward, and in backward
    one dX GEMM per expert hit; the others' gradients are the zeros they were made as."""
    x, segs, w, b, a, bb = problem(False)
    with Recorder() as fwd:
        y, h = grouped_forward(x, segs, w, b, a, bb, 0.5, 0.0, 0, False)
    assert fwd.ops.count("addmm_") == 3 and fwd.ops.count("addmm") == 3 and fwd.ops.count("mm") == 3
    with Recorder() as bwd:
        dx, dA, dB, dW, db = grouped_backward(torch.randn(M, N), x, segs, w, a, bb, h, 0.5, 0.0, 0, False,
                                              True, True, True, True)
    assert bwd.ops.count("addmm_") == 3
    for grad in (dA, dB, dW, db):
        assert [bool(torch.count_nonzero(grad[e])) for e in range(E)] == [True, False, True, False, True, False]
