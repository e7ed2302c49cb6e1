"""The custom ops on the PyTorch path: values and gradients against the reference, gradcheck, opcheck."""
import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.ops.lora import lora_linear, lora_linear_bwd, lora_linear_fwd
from utils import check_op_against_reference, float64_op_case, make_problem

SHAPES = [  # (M, K, N, r): unit, odd, round, wide rank, empty batch
    (1, 1, 1, 1), (7, 13, 5, 3), (33, 65, 17, 4), (64, 128, 96, 16), (5, 16, 40, 32), (0, 12, 9, 2),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_torch_op_matches_reference(shape, dtype, p):
    check_op_against_reference("torch", *shape, dtype=dtype, p=p)


@pytest.mark.parametrize("bias", [True, False])
def test_torch_op_trainable_base(bias):
    check_op_against_reference("torch", 11, 19, 7, 3, torch.float32, p=0.1, bias=bias, trainable_base=True)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(p, bias):
    f, ins = float64_op_case(p, bias)
    assert torch.autograd.gradcheck(f, ins)


def test_opcheck_forward_and_backward():
    x, w, b, a, bb = make_problem(6, 10, 8, 2, torch.float32, seed=1)
    seed = torch.tensor(5, dtype=torch.int64)
    torch.library.opcheck(lora_linear_fwd, (x, w.detach(), b.detach(), a, bb, 0.5, 0.2, seed, "torch"))
    with torch.no_grad():
        y, h = lora_linear_fwd(x, w, b, a, bb, 0.5, 0.2, seed, "torch")
    dy = torch.randn_like(y)
    torch.library.opcheck(lora_linear_bwd, (dy, x.detach(), w.detach(), a.detach(), bb.detach(), h, 0.5, 0.2, seed,
                                            "torch", True, True, False, True))


def test_dropout_requires_seed():
    x, w, b, a, bb = make_problem(3, 4, 5, 2)
    with pytest.raises(ValueError, match="seed"):
        lora_linear(x, w, b, a, bb, 1.0, 0.1)


def test_same_seed_same_output_different_seed_differs():
    x, w, b, a, bb = make_problem(16, 32, 8, 4, requires_grad=False)
    s1, s2 = torch.tensor(1), torch.tensor(2)
    y1 = lora_linear(x, w, b, a, bb, 1.0, 0.5, s1, backend="torch")
    assert torch.equal(y1, lora_linear(x, w, b, a, bb, 1.0, 0.5, s1, backend="torch"))
    assert not torch.equal(y1, lora_linear(x, w, b, a, bb, 1.0, 0.5, s2, backend="torch"))


def test_backend_choice_rules(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.choose_backend(cpu, torch.float32, 8) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.choose_backend(cpu, torch.float32, 8) == "torch"
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        backends.choose_backend(cpu, torch.float32, 8)
    monkeypatch.delenv(backends.ENV_VAR)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(backends.BackendUnavailable, match="TRITON_INTERPRET"):
        backends.choose_backend(cpu, torch.float32, 8, "triton")
    with pytest.raises(backends.BackendUnavailable, match="rank 300"):
        backends.choose_backend(cpu, torch.float32, 300, "triton")
    with pytest.raises(backends.BackendUnavailable, match="float64"):
        backends.choose_backend(cpu, torch.float64, 8, "triton")


def test_forced_triton_is_not_a_silent_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, w, b, a, bb = make_problem(3, 4, 5, 2)
    with pytest.raises(backends.BackendUnavailable):
        lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(backends.BackendUnavailable):
        lora_linear(x, w, b, a, bb, 1.0)


def test_calls_record_which_backend_ran():
    x, w, b, a, bb = make_problem(3, 4, 5, 2)
    before = backends.calls[("fwd", "torch")]
    lora_linear(x, w, b, a, bb, 1.0, backend="torch")
    assert backends.calls[("fwd", "torch")] == before + 1


try:
    from hypothesis import given, settings
    from hypothesis import strategies as st
except ImportError:  # the test extra installs it; without it this property test is not collected
    given = None

if given is not None:
    @settings(max_examples=25, deadline=None)
    @given(M=st.integers(0, 40), K=st.integers(1, 40), N=st.integers(1, 40), r=st.integers(1, 12),
           p=st.sampled_from([0.0, 0.15]), bias=st.booleans(), seed=st.integers(0, 1000))
    def test_torch_op_random_shapes(M, K, N, r, p, bias, seed):
        check_op_against_reference("torch", M, K, N, r, torch.float32, p=p, bias=bias, seed=seed)


def test_compiled_layers_with_different_scales_share_a_graph():
    """torch.compile turns a scale that varies between calls into a symbolic float: the op must take
    it (the finiteness check moves into the op's body), for plain, DoRA and quantized layers."""
    import torch._dynamo
    from fused_lora import FusedLoRALinear, quantize_model
    torch._dynamo.reset()
    try:
        for make in (lambda a: FusedLoRALinear(32, 16, r=4, lora_alpha=a, init_lora_weights=False, backend="torch"),
                     lambda a: FusedLoRALinear(32, 16, r=4, lora_alpha=a, init_lora_weights=False, backend="torch",
                                               use_dora=True),
                     lambda a: FusedLoRALinear.from_linear(quantize_model(torch.nn.Linear(64, 16), "nf4"), r=4,
                                                           lora_alpha=a, init_lora_weights=False, backend="torch")):
            for alpha in (8, 16, 4):
                layer = make(alpha)
                x = torch.randn(5, layer.in_features)
                torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))
            torch._dynamo.reset()
        # A non-finite scale is still refused when the compiled op runs.
        x, w, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
        for bad in (1.0, float("inf")):
            f = torch.compile(lambda x, s: lora_linear(x, w, None, a, b, s, backend="torch"), fullgraph=True)
            if bad == 1.0:
                f(x, 2.0)  # a second value makes the scale symbolic
                f(x, 1.0)
            else:
                with pytest.raises(ValueError, match="scaling must be finite"):
                    f(x, bad)
    finally:
        torch._dynamo.reset()
