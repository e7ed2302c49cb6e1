"""LoRA on expert weights (issue 20 item 1): `lora_linear_grouped` against the float64 reference
(`core.reference.lora_linear_grouped_ref`, every expert applied to every row and the rows selected by 0/1
columns: nothing shared with the torch row's slicing), odd shapes, each dtype, both weight layouts, empty
groups, one group holding every row, experts no row reaches, M = 0, the base alone, dropout (the documented
mask, reproducible, the forward's mask in backward, never saved), gradcheck / gradgradcheck in float64,
opcheck of the custom ops, torch.compile(fullgraph=True), determinism, dispatch."""
import pytest
import torch

from fused_lora import BackendUnavailable
from fused_lora import dispatch
from fused_lora.core.dropout import keep_mask
from fused_lora.core.reference import lora_linear_grouped_ref, lora_linear_grouped_ref_h
from fused_lora.ops.grouped import lora_linear_grouped
from fused_lora.ops.lora import lora_linear

from utils import assert_close_rule

FWD_OP = torch.ops.fused_lora.lora_linear_grouped_fwd.default
BWD_OP = torch.ops.fused_lora.lora_linear_grouped_bwd.default


def make_grouped(sizes, K, N, r, dtype=torch.float64, bias=True, seed=0, transposed=False, trainable_base=False):
    """(x, group_sizes, W, b, A, B) with O(1) outputs, every expert's factors nonzero. The transposed weight is
    a (E, K, N) tensor; `trainable_base`: W and b require grad too."""
    g = torch.Generator().manual_seed(seed)
    E, M = len(sizes), sum(sizes)

    def rnd(*shape, scale=1.0, grad=True):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(grad)

    x = rnd(M, K)
    w = rnd(E, K, N, scale=max(K, 1) ** -0.5, grad=trainable_base) if transposed else rnd(E, N, K, scale=max(K, 1) ** -0.5,
                                                                                   grad=trainable_base)
    b = rnd(E, N, grad=trainable_base) if bias else None
    a = rnd(E, r, K, scale=max(K, 1) ** -0.5)
    bb = rnd(E, N, r, scale=max(r, 1) ** -0.5)
    return x, torch.tensor(sizes, dtype=torch.int64), w, b, a, bb


def grads_of(y, tensors, dy):
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, wanted, dy)) if wanted else iter(())
    return [next(got) if t is not None and t.requires_grad else None for t in tensors]


def check_against_reference(sizes, K, N, r, dtype, p=0.0, bias=True, transposed=False, trainable_base=False,
                            scaling=0.75, seed=5):
    """Y and every gradient of the op (torch row) against the reference: in float64 and in `dtype` (the rule of
    tests/utils: at most twice the same-precision reference's error, plus a dtype slack)."""
    x, gs, w, b, a, bb = make_grouped(sizes, K, N, r, dtype, bias, seed, transposed, trainable_base)
    M = x.shape[0]
    keep = keep_mask(seed, (M, K), p, "cpu") if p else None
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    tensors = (x, w, b, a, bb)
    before = dispatch.calls[("grouped_bwd", "torch")]
    y = lora_linear_grouped(x, gs, w, b, a, bb, scaling, p, seed, backend="torch", transposed=transposed)
    got = grads_of(y, tensors, dy)
    assert dispatch.calls[("grouped_bwd", "torch")] == before + 1
    assert y.shape == (M, N) and y.dtype == dtype
    y_eager = lora_linear_grouped_ref(x, gs, w, b, a, bb, scaling, keep, p, transposed)
    g_eager = grads_of(y_eager, tensors, dy)
    t64 = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    y64 = lora_linear_grouped_ref(t64[0], gs, *t64[1:], scaling, keep, p, transposed)
    g64 = grads_of(y64, t64, dy.double())
    assert_close_rule(y, y_eager.detach(), y64.detach(), dtype, "y")
    for name, t, gg, ge, g6 in zip(("dx", "dW", "db", "dA", "dB"), tensors, got, g_eager, g64):
        if t is not None and t.requires_grad:
            assert gg.shape == t.shape, name
            assert_close_rule(gg, ge, g6, dtype, name)


SIZES = {
    "spread": [3, 0, 7, 1, 2],  # an empty group in the middle
    "one_group_all": [0, 0, 13, 0],  # one expert holds every row; the others get none
    "ends": [12, 0, 0, 0, 1],  # the first and last experts only
    "one_row_each": [1, 1, 1],
}


@pytest.mark.parametrize("sizes", SIZES.values(), ids=SIZES.keys())
@pytest.mark.parametrize("transposed", [False, True])
def test_float64_equals_reference(sizes, transposed):
    check_against_reference(sizes, 11, 9, 3, torch.float64, transposed=transposed, trainable_base=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(37, 29, 5), (8, 3, 1), (65, 33, 64), (24, 40, 16)])
def test_dtypes_and_odd_shapes(dtype, shape):
    K, N, r = shape
    check_against_reference([9, 0, 17, 4, 0, 1], K, N, r, dtype, transposed=(r == 5), bias=(r != 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_equals_reference_with_the_documented_mask(dtype):
    """With dropout: D is the torch row's keep_mask(seed, (M, K), p) over the whole batch, and backward uses it
    (dA and dx would differ with another mask)."""
    check_against_reference([5, 0, 14, 2], 19, 23, 4, dtype, p=0.3, trainable_base=True)
    check_against_reference([5, 0, 14, 2], 19, 23, 4, dtype, p=0.3, transposed=True, bias=False)


def test_trainable_base_gradients_per_expert_and_zero_for_experts_never_hit():
    x, gs, w, b, a, bb = make_grouped([4, 0, 6], 7, 5, 2, trainable_base=True)
    y = lora_linear_grouped(x, gs, w, b, a, bb, 1.5)
    dx, dW, db, dA, dB = grads_of(y, (x, w, b, a, bb), torch.randn(10, 5, dtype=torch.float64))
    for grad in (dW, db, dA, dB):
        assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[0]) > 0
    assert db is not None and dW.shape == w.shape


def test_empty_batch():
    for sizes in ([0, 0, 0], [0]):
        x, gs, w, b, a, bb = make_grouped(sizes, 6, 4, 2, torch.float32, trainable_base=True)
        y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.2, 3)
        assert y.shape == (0, 4)
        dx, dW, db, dA, dB = grads_of(y, (x, w, b, a, bb), torch.zeros(0, 4))
        assert dx.shape == (0, 6)
        for grad, t in zip((dW, db, dA, dB), (w, b, a, bb)):
            assert grad.shape == t.shape and torch.count_nonzero(grad) == 0


def test_zero_sized_features():
    """K = 0 or N = 0 (a degenerate expert stack): the op gives the exact empty / bias-only results."""
    x, gs, w, b, a, bb = make_grouped([2, 3], 0, 4, 2)
    y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5)
    torch.testing.assert_close(y, torch.cat([b[0].expand(2, 4), b[1].expand(3, 4)]), rtol=0, atol=0)
    x, gs, w, b, a, bb = make_grouped([2, 3], 5, 0, 2)
    assert lora_linear_grouped(x, gs, w, b, a, bb, 0.5).shape == (5, 0)


def test_base_alone():
    """lora_A = lora_B = None: the base alone (rank 0), equal to the reference without LoRA, differentiable in x
    and a trainable base; dropout is refused there (it acts on the LoRA term only)."""
    for transposed in (False, True):
        x, gs, w, b, _, _ = make_grouped([3, 0, 5], 7, 6, 2, transposed=transposed, trainable_base=True)
        y = lora_linear_grouped(x, gs, w, b, None, None, 1.0, transposed=transposed)
        ref = lora_linear_grouped_ref(x, gs, w, b, None, None, 1.0, transposed=transposed)
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        dy = torch.randn(8, 6, dtype=torch.float64)
        for got, want in zip(grads_of(y, (x, w, b), dy), grads_of(ref, (x, w, b), dy)):
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="dropout_p = 0.1 without lora_A / lora_B"):
        lora_linear_grouped(x, gs, w, b, None, None, 1.0, 0.1, 3, transposed=True)
    with pytest.raises(TypeError, match="lora_A and lora_B must both be tensors, or both None"):
        lora_linear_grouped(x, gs, w, b, None, torch.zeros(3, 6, 2, dtype=torch.float64), 1.0, transposed=True)


def test_weight_read_through_strides():
    """A non-contiguous expert stack (a transposed view of the other layout) gives what its contiguous copy
    gives, in either layout, with a gradient of the weight's shape."""
    x, gs, w, b, a, bb = make_grouped([4, 0, 5], 6, 7, 3, torch.float32)
    w_t = w.detach().transpose(1, 2).contiguous().transpose(1, 2)  # (E, N, K) values, (E, K, N) storage
    assert not w_t.is_contiguous()
    y = lora_linear_grouped(x, gs, w_t, b, a, bb, 0.5)
    torch.testing.assert_close(y, lora_linear_grouped(x, gs, w.detach(), b, a, bb, 0.5))  # other BLAS layouts: rounding
    y_t = lora_linear_grouped(x, gs, w.detach().transpose(1, 2), b, a, bb, 0.5, transposed=True)
    torch.testing.assert_close(y_t, y)
    w_t.requires_grad_(True)
    (dW,) = torch.autograd.grad(lora_linear_grouped(x, gs, w_t, b, a, bb, 0.5).sum(), [w_t])
    assert dW.shape == w_t.shape


def test_one_group_equals_the_single_adapter_op():
    """With one expert the grouped op is lora_linear on x (same seed, same torch-row mask)."""
    x, gs, w, b, a, bb = make_grouped([13], 10, 8, 4, torch.float32)
    for p in (0.0, 0.4):
        y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, p, 21, backend="torch")
        want = lora_linear(x, w[0], b[0], a[0], bb[0], 0.5, p, 21, backend="torch")
        torch.testing.assert_close(y, want, rtol=0, atol=0)
        dy = torch.randn(13, 8)
        for got, ref in zip(grads_of(y, (x, a, bb), dy), grads_of(want, (x, a, bb), dy)):
            torch.testing.assert_close(got.reshape(ref.shape), ref, rtol=1e-6, atol=1e-6)


def test_dropout_mask_reproducible_and_independent_of_grouping():
    """One seed gives one output; another seed another. Row m's mask does not depend on the group sizes: the
    LoRA input seen by each expert (H) is the same rows of one M x K mask however the rows are grouped."""
    x, gs, w, b, a, bb = make_grouped([6, 0, 7], 16, 5, 3)
    a_same = a.detach()[0].expand(3, -1, -1).contiguous()  # every expert the same A: H depends on the mask only
    _, h1 = FWD_OP(x.detach(), gs, w.detach(), b.detach(), a_same, bb.detach(), 0.5, 0.5, torch.tensor(9), "torch",
                   False)
    _, h2 = FWD_OP(x.detach(), torch.tensor([13, 0, 0]), w.detach(), b.detach(), a_same, bb.detach(), 0.5, 0.5,
                   torch.tensor(9), "torch", False)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    keep = keep_mask(9, (13, 16), 0.5, "cpu")
    torch.testing.assert_close(h1, lora_linear_grouped_ref_h(x.detach(), gs, a_same, keep, 0.5))
    y1 = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.5, 9)
    y2 = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.5, torch.tensor(9))
    y3 = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.5, 10)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    assert not torch.allclose(y1, y3)


def test_only_x_h_and_the_seed_are_saved():
    """Saved for backward: x, H (M x r), the seed and the parameters themselves; no mask, no M x N tensor."""
    x, gs, w, b, a, bb = make_grouped([6, 0, 9], 12, 20, 3, torch.float32)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.3, 4)
    y.sum().backward()
    params = {id(t) for t in (x, gs, w, b, a, bb)}
    extra = [t for t in saved if id(t) not in params]
    assert sorted(tuple(t.shape) for t in extra) == [(), (15, 3)], [t.shape for t in extra]  # the seed, H
    assert all(t.dtype != torch.bool for t in saved)


def test_gradcheck_float64():
    x, gs, w, b, a, bb = make_grouped([2, 0, 3, 1], 5, 4, 2, trainable_base=True)
    for p, transposed in ((0.0, False), (0.4, False), (0.4, True)):
        wt = w.detach().transpose(1, 2).contiguous().requires_grad_(True) if transposed else w

        def f(x, w, b, a, bb, transposed=transposed, p=p):
            return lora_linear_grouped(x, gs, w, b, a, bb, 1.5, p, 77, transposed=transposed)
        assert torch.autograd.gradcheck(f, (x, wt, b, a, bb))


def test_double_backward_float64():
    x, gs, w, b, a, bb = make_grouped([2, 0, 3], 4, 3, 2, trainable_base=True)

    def f(x, w, b, a, bb):
        return lora_linear_grouped(x, gs, w, b, a, bb, 1.5, 0.3, 11)
    assert torch.autograd.gradgradcheck(f, (x, w, b, a, bb))
    assert dispatch.calls[("grouped_bwd_differentiable", "torch")] > 0

    def op(x, w, b, a, bb):  # the custom op's registered autograd (what torch.compile traces)
        return FWD_OP(x, gs, w, b, a, bb, 1.5, 0.3, torch.tensor(11), "torch", False)[0]
    assert torch.autograd.gradcheck(op, (x, w, b, a, bb)) and torch.autograd.gradgradcheck(op, (x, w, b, a, bb))


def test_deterministic_and_counted():
    x, gs, w, b, a, bb = make_grouped([40, 0, 25, 63], 48, 40, 8, torch.float32)
    dy = torch.randn(128, 40)
    runs = []
    for _ in range(2):
        before = (dispatch.calls[("grouped_fwd", "torch")], dispatch.calls[("grouped_bwd", "torch")])
        y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.2, 8)
        runs.append([y.detach(), *grads_of(y, (x, a, bb), dy)])
        assert (dispatch.calls[("grouped_fwd", "torch")], dispatch.calls[("grouped_bwd", "torch")]) == (
            before[0] + 1, before[1] + 1)
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_inference_takes_no_autograd_path():
    x, gs, w, b, a, bb = make_grouped([3, 4], 5, 6, 2, torch.float32)
    with torch.no_grad():
        y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5)
    assert y.grad_fn is None
    torch.testing.assert_close(y, lora_linear_grouped_ref(x, gs, w, b, a, bb, 0.5).detach())


def test_backends_auto_on_cpu_is_torch_and_triton_refuses_by_reason():
    """auto on the CPU runs the torch row; the triton row (its grouped kernels: tests/kernels/test_grouped_kernels.py)
    refuses what its kernels do not take, naming why."""
    x, gs, w, b, a, bb = make_grouped([3, 4], 8, 8, 2, torch.float16)
    before = dispatch.calls[("grouped_fwd", "torch")]
    lora_linear_grouped(x.detach(), gs, w, b, a.detach(), bb.detach(), 0.5)
    assert dispatch.calls[("grouped_fwd", "torch")] == before + 1
    x, gs, w, b, a, bb = make_grouped([3, 4], 8, 8, 2, torch.float64)
    with pytest.raises(BackendUnavailable, match="the triton backend was requested but cannot run: .*float64"):
        lora_linear_grouped(x, gs, w, b, a, bb, 0.5, backend="triton")


def test_meta_tensors_give_shapes():
    x, gs, w, b, a, bb = (None if t is None else t.detach().to("meta") for t in make_grouped([3, 4], 5, 6, 2))
    y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5)
    assert y.is_meta and y.shape == (7, 6)


@pytest.mark.parametrize("transposed", [False, True])
def test_custom_ops_opcheck(transposed):
    x, gs, w, b, a, bb = (None if t is None else t.detach()
                          for t in make_grouped([4, 0, 5, 2], 6, 5, 3, torch.float32, transposed=transposed))
    for bias in (b, None):
        args = (x.requires_grad_(True), gs, w, bias, a.requires_grad_(True), bb.requires_grad_(True), 0.5, 0.25,
                torch.tensor(5), "torch", transposed)
        torch.library.opcheck(FWD_OP, args)
    y, h = FWD_OP(*args)
    dy = torch.randn_like(y)
    for needs in ((True, True, False, False), (False, True, True, True), (True, False, True, False)):
        bwd_args = (dy, x.detach(), gs, w, a.detach(), bb.detach(), h.detach(), 0.5, 0.25, torch.tensor(5), "torch",
                    transposed, *needs)
        torch.library.opcheck(BWD_OP, bwd_args)
        dx, dA, dB, dW, db = BWD_OP(*bwd_args)
        assert dx.shape == (x.shape if needs[0] else (0,)) and dW.shape == (w.shape if needs[2] else (0,))
        assert dA.shape == (a.shape if needs[1] else (0,)) and db.shape == ((4, 5) if needs[3] else (0,))


def test_compiled_fullgraph_forward_backward_matches_eager():
    """torch.compile(fullgraph=True) traces the custom ops (forward and its backward): same output and gradients
    as eager; a bad group size is refused when the compiled op runs."""
    torch._dynamo.reset()
    x, gs, w, b, a, bb = make_grouped([5, 0, 9, 2], 12, 10, 4, torch.float32, transposed=True)

    def f(x, gs, a, bb):
        return lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.25, 13, transposed=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    dy = torch.randn(16, 10)
    outs = []
    for fn in (compiled, f):
        y = fn(x, gs, a, bb)
        outs.append([y.detach(), *grads_of(y, (x, a, bb), dy)])
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="group_sizes sums to 15 but x has 16 rows"):
        compiled(x, torch.tensor([5, 0, 8, 2]), a, bb)
