"""The torch row's grouped op (issue 20 item 1, `torch_row.grouped`): besides its outputs it allocates no
M x N tensor and never a tensor the size of the expert stack (the weight is read through views, in either
layout), and it runs no product for an expert no row reaches: every allocation and every op is recorded by a
TorchDispatchMode around the row's own functions. Both of its paths: the loop (float64 here) and the low-rank
products batched as torch._grouped_mm (float32 / bfloat16 on the CPU at 16-byte multiples), the latter also
against the float64 reference."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fused_lora.core.dropout import keep_mask
from fused_lora.core.reference import lora_linear_grouped_ref
from fused_lora.core.segments import grouped
from fused_lora.torch_row.grouped import batched, grouped_backward, grouped_forward

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


PATHS = {"loop": torch.float64, "batched": torch.float32}  # the row's two paths, by the dtype that takes each


def problem(transposed, sizes=(20, 0, 30, 0, 14, 0), dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(E, N, K, generator=g)
    w = w.transpose(1, 2).contiguous() if transposed else w
    b, a, bb = torch.randn(E, N, generator=g), torch.randn(E, R, K, generator=g), torch.randn(E, N, R, generator=g)
    gs = torch.tensor(sizes)
    return (x.to(dtype), grouped(gs, M), *(t.to(dtype) for t in (w, b, a, bb)))


def test_each_path_is_taken_where_it_should_be():
    x = torch.randn(M, K)
    assert batched(x, R, N) and batched(x.bfloat16(), 8, N) and batched(x, R, N, torch.randn(M, N))
    assert not batched(x.double(), R, N)  # torch._grouped_mm takes no float64
    assert not batched(x, 3, N) and not batched(x.bfloat16(), R, N)  # r not a multiple of 16 bytes
    assert not batched(x[:, :23], R, N) and not batched(x, R, 47)  # K, N likewise (and x not contiguous)
    assert not batched(x, 0, N) and not batched(x, R, N, torch.randn(N, M).t())  # r = 0; dY not contiguous


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_no_m_by_n_temporary_and_no_copy_of_the_stack(transposed, p, path):
    x, segs, w, b, a, bb = problem(transposed, dtype=PATHS[path])
    assert batched(x, R, N) == (path == "batched")
    segs.offsets  # the host read, made by the op's value check before the row runs
    with Recorder() as fwd:
        y, h = grouped_forward(x, segs, w, b, a, bb, 0.5, p, 3, transposed)
    assert sorted(n for n in fwd.new if n >= M * N) == [M * N], "an M x N temporary besides Y (or a copy of W)"
    dy = torch.randn(M, N, dtype=x.dtype)
    with Recorder() as bwd:
        grouped_backward(dy, x, segs, w, a, bb, h, 0.5, p, 3, transposed, True, True, False, True)
    assert max(bwd.new) < M * N, "an M x N temporary (or a copy of W) in backward"
    with Recorder() as bwd_w:  # dW asked for: the one tensor the size of the stack is dW itself
        grouped_backward(dy, x, segs, w, a, bb, h, 0.5, p, 3, transposed, False, False, True, False)
    assert sorted(n for n in bwd_w.new if n >= M * N) == [E * N * K]


@pytest.mark.parametrize("path", PATHS)
def test_experts_never_hit_run_no_product(path):
    """3 of the 6 experts get rows: 3 base GEMMs (addmm_ onto the low-rank start) in forward, and in backward
    one dX GEMM per expert hit (and the loop's dB_e, addmm_ with alpha); the others' gradients are the zeros they were made as. Batched, each low-rank
    product is one torch._grouped_mm over every expert (2 in forward, 4 in backward)."""
    x, segs, w, b, a, bb = problem(False, dtype=PATHS[path])
    with Recorder() as fwd:
        y, h = grouped_forward(x, segs, w, b, a, bb, 0.5, 0.0, 0, False)
    assert fwd.ops.count("addmm_") == 3
    if path == "loop":
        assert fwd.ops.count("addmm") == 3 and fwd.ops.count("mm") == 3
    else:
        assert fwd.ops.count("_grouped_mm") == 2 and fwd.ops.count("add_") == 3 and fwd.ops.count("mm") == 0
    with Recorder() as bwd:
        dx, dA, dB, dW, db = grouped_backward(torch.randn(M, N, dtype=x.dtype), x, segs, w, a, bb, h, 0.5, 0.0, 0,
                                              False, True, True, True, True)
    # the loop: dY_e W_e onto D (G_e A_e), and dB_e (s through alpha: torch_row.dense.scaled_mm); batched: the first
    assert bwd.ops.count("addmm_") == (3 if path == "batched" else 6)
    assert bwd.ops.count("_grouped_mm") == (4 if path == "batched" else 0)
    for grad in (dA, dB, dW, db):
        assert [bool(torch.count_nonzero(grad[e])) for e in range(E)] == [True, False, True, False, True, False]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("views", [False, True])
def test_batched_path_equals_the_float64_reference(dtype, transposed, p, views):
    """The batched path's Y and every gradient against the float64 reference (autograd through it; the same
    keep mask), with experts never hit, both layouts, dropout, and A / B as non-contiguous views (peft's
    factors seen in our layout). Tolerance: each output and gradient is a sum over K, N or the rows of rounded
    products; relative to its largest entry, 1e-5 in float32 and 2e-2 in bfloat16 (8 bits of mantissa)."""
    rank = 8  # 16 bytes in bfloat16 too
    g = torch.Generator().manual_seed(1)
    sizes = torch.tensor((20, 0, 30, 0, 14, 0))
    x = torch.randn(M, K, generator=g)
    w = torch.randn(E, K, N, generator=g) if transposed else torch.randn(E, N, K, generator=g)
    b = torch.randn(E, N, generator=g)
    a = torch.randn(E, rank, K, generator=g) / K ** 0.5
    bb = torch.randn(E, N, rank, generator=g) / rank ** 0.5
    if views:  # E fastest, as peft's (r E, K) / (N, r E) seen per expert
        a = a.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        bb = bb.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        assert not a.is_contiguous() and not bb.is_contiguous()
    segs, dy = grouped(sizes, M), torch.randn(M, N, generator=g)
    xs, ws, bs, As, Bs, dys = (t.to(dtype) for t in (x, w, b, a, bb, dy))
    assert batched(xs, rank, N, dys)
    keep = keep_mask(5, (M, K), p, "cpu") if p else None
    y, h = grouped_forward(xs, segs, ws, bs, As, Bs, 0.5, p, 5, transposed)
    dx, dA, dB, dW, db = grouped_backward(dys, xs, segs, ws, As, Bs, h, 0.5, p, 5, transposed, True, True, True, True)
    leaves = [t.double().requires_grad_() for t in (xs, ws, bs, As, Bs)]
    ref = lora_linear_grouped_ref(leaves[0], sizes, *leaves[1:], 0.5, keep=keep, dropout_p=p, transposed=transposed)
    ref.backward(dys.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, got, want in [("y", y, ref), *zip(("dx", "dW", "db", "dA", "dB"), (dx, dW, db, dA, dB),
                                                   (t.grad for t in leaves))]:
        assert got.dtype == dtype and got.shape == want.shape, name
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err <= tol, (name, float(err))
