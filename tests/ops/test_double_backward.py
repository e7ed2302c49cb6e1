"""Double backward (a gradient of a gradient): gradgradcheck and a gradient penalty, both backends.

The backward normally runs non-differentiable kernels on a saved H; when the gradient's own graph
is asked for (create_graph=True), the op must give the true second derivatives, with the same
dropout mask as the forward.
"""
import pytest
import torch

from fused_lora import FusedLoRALinear
from fused_lora import dispatch as backends
from fused_lora.ops.lora import lora_linear
from fused_lora.core.reference import lora_linear_ref
from utils import backend_module, float64_op_case, make_problem, needs_triton, to64

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON_CAN_RUN = needs_triton(DEVICE)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradgradcheck_float64(p, bias):
    """Every input differentiable twice; the fixed seed gives the same mask in every evaluation."""
    f, ins = float64_op_case(p, bias)
    assert torch.autograd.gradgradcheck(f, ins)


def gradient_penalty_grads(fn, x, a, bb, dy):
    """loss = |d(y . dy)/dx|^2 + |d(y . dy)/dA|^2 + |d(y . dy)/dB|^2; returns d loss / (x, A, B)."""
    y = fn(x, a, bb)
    gx, ga, gb = torch.autograd.grad(y, (x, a, bb), dy, create_graph=True)
    loss = gx.pow(2).sum() + ga.pow(2).sum() + gb.pow(2).sum()
    return torch.autograd.grad(loss, (x, a, bb))


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=TRITON_CAN_RUN)])
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_gradient_penalty_matches_reference(backend, p):
    dtype = torch.float64 if backend == "torch" else torch.float32
    x, w, b, a, bb = make_problem(8, 12, 10, 4, dtype, DEVICE, seed=5)
    w.requires_grad_(False)
    b.requires_grad_(False)
    dy = torch.randn(8, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEVICE)
    seed = 4321
    keep = backend_module(backend).keep_mask(seed, (8, 12), p, DEVICE) if p > 0 else None

    before = dict(backends.calls)
    got = gradient_penalty_grads(
        lambda x, a, bb: lora_linear(x, w, b, a, bb, 0.75, p, torch.tensor(seed), backend=backend), x, a, bb, dy)
    # the backward with create_graph=True took the differentiable path (once)
    assert backends.calls[("bwd_differentiable", backend)] == before.get(("bwd_differentiable", backend), 0) + 1
    x64, w64, b64, a64, bb64 = to64(x, w, b, a, bb)
    want = gradient_penalty_grads(
        lambda x, a, bb: lora_linear_ref(x, w64, b64, a, bb, 0.75, keep, p), x64, a64, bb64, dy.double())
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-3, atol=2e-3)
    for name, g, ref in zip(("x", "A", "B"), got, want):
        assert g.abs().max() > 0
        torch.testing.assert_close(g.double(), ref, **tol, msg=lambda m: f"d loss/d{name}: {m}")


def test_layer_gradient_penalty_in_training_mode():
    """Through FusedLoRALinear with dropout: the mask of the second pass is the forward's."""
    torch.manual_seed(0)
    layer = FusedLoRALinear(12, 9, r=3, lora_dropout=0.2, init_lora_weights=False, dtype=torch.float64)
    x = torch.randn(2, 4, 12, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = backend_module("torch").keep_mask(seed, (8, 12), 0.2, "cpu").reshape(2, 4, 12)
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, keep, 0.2)
    params = (layer.lora_A, layer.lora_B)

    def penalty_grads(out):  # |d sum(y) / d(x, A, B)|^2, differentiated w.r.t. A and B
        grads = torch.autograd.grad(out.sum(), (x,) + params, create_graph=True)
        return torch.autograd.grad(sum(g.pow(2).sum() for g in grads), params)

    got, want = penalty_grads(y), penalty_grads(ref)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_custom_op_path_double_backward():
    """The path torch.compile uses (the custom op with registered autograd) is differentiable twice
    too; AOTAutograd itself refuses double backward with its own clear error, never a wrong value."""
    x, w, b, a, bb = make_problem(4, 6, 5, 2, torch.float64, seed=9)
    w.requires_grad_(False)
    b.requires_grad_(False)
    seed = torch.tensor(17)

    def f(x, a, bb):
        return lora_linear(x, w, b, a, bb, 0.5, 0.2, seed, backend="torch")

    keep = backend_module("torch").keep_mask(17, (4, 6), 0.2, "cpu")
    want = gradient_penalty_grads(lambda x, a, bb: lora_linear_ref(x, w, b, a, bb, 0.5, keep, 0.2),
                                  x, a, bb, torch.ones(4, 5, dtype=torch.float64))
    dy = torch.ones(4, 5, dtype=torch.float64)
    got = gradient_penalty_grads(torch.compile(f, fullgraph=True, backend="eager"), x, a, bb, dy)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref)
    # the op itself, called directly (what the compiled graph calls)
    from fused_lora.ops.lora import lora_linear_fwd
    got = gradient_penalty_grads(lambda x, a, bb: lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, seed, "torch")[0],
                                 x, a, bb, dy)
    for g, ref in zip(got, want):
        torch.testing.assert_close(g, ref)
    with pytest.raises(RuntimeError, match="double backward"):
        gradient_penalty_grads(torch.compile(f, fullgraph=True, backend="aot_eager"), x, a, bb, dy)
