"""The op's inputs: any strides of every tensor, the same clear error for bad inputs on every path
and backend, and the Triton backend's refusals (bfloat16 under the interpreter)."""
import contextlib
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fused_lora import dispatch as backends
from fused_lora.core.op_inputs import as_scaling, seed_value
from fused_lora.ops.lora import lora_linear, lora_linear_fwd
from utils import assert_close_rule, backend_module, make_problem, needs_triton, ref_forward_backward, to64

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton(DEVICE))]
NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "dy")


def strided_view(t, layout):
    """The same values as `t` in another memory layout (a leaf, so it can require grad)."""
    t = t.detach()
    if layout == "step2":  # every other element of a bigger buffer along the last dim
        buf = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        buf[..., ::2] = t
        return buf[..., ::2]
    if layout == "colmajor":  # transposed storage; for a 1-D tensor: elements 3 apart
        if t.dim() == 1:
            buf = torch.zeros(3 * t.shape[0], dtype=t.dtype, device=t.device)
            buf[::3] = t
            return buf[::3]
        return t.t().contiguous().t()
    if layout == "offset":  # contiguous, but starting inside a larger storage
        buf = torch.zeros(t.numel() + 5, dtype=t.dtype, device=t.device)
        buf[5:] = t.flatten()
        return buf[5:].view(t.shape)
    if layout == "broadcast":  # stride 0: the first row (element) repeated, as expand() gives
        return t[:1].clone().expand(t.shape)
    raise AssertionError(layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["step2", "colmajor", "offset", "broadcast"])
@pytest.mark.parametrize("which", NAMES)
def test_any_strides_of_every_input(backend, which, layout):
    """Output and every gradient against the float64 reference with one input in a strided layout."""
    dtype, p, scaling = torch.float32, 0.2, 0.7
    M, K, N, r = 9, 14, 11, 3
    ins = dict(zip(NAMES, (*make_problem(M, K, N, r, dtype, DEVICE, seed=4, requires_grad=False),
                           torch.randn(M, N, dtype=dtype, generator=torch.Generator().manual_seed(8)).to(DEVICE))))
    ins[which] = strided_view(ins[which], layout)
    assert (not ins[which].is_contiguous()) or layout == "offset" or ins[which].shape[0] == 1
    for name in NAMES[:5]:
        ins[name].requires_grad_(True)
    x, w, b, a, bb, dy = (ins[n] for n in NAMES)
    seed = 321
    keep = backend_module(backend).keep_mask(seed, (M, K), p, DEVICE)
    y = lora_linear(x, w, b, a, bb, scaling, p, torch.tensor(seed), backend=backend)
    got = torch.autograd.grad(y, (x, w, b, a, bb), dy)
    y_eager, g_eager = ref_forward_backward(x, w, b, a, bb, scaling, dy, keep, p)
    y64, g64 = ref_forward_backward(*to64(x, w, b, a, bb), scaling, dy.double(), keep, p)
    tf32 = "tf32" if (backend == "triton" and CUDA) else None
    assert_close_rule(y, y_eager, y64, dtype, f"y ({which} {layout})", tf32)
    for name, g, ge, g6 in zip(NAMES, got, g_eager, g64):
        assert_close_rule(g, ge, g6, dtype, f"d{name} ({which} {layout})", tf32)


# ---------------------------------------------------------------- bad inputs: one error on every path

def _good():
    x, w, b, a, bb = make_problem(5, 8, 6, 2, torch.float32, seed=1, requires_grad=False)
    return dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=0.5, dropout_p=0.1, seed=7)


BAD = {  # case -> (changes to a good call, exception type, message pattern)
    "x_not_a_tensor": (dict(x=[[1.0] * 8] * 5), TypeError, "x must be a tensor"),
    "x_3d": (dict(x=torch.randn(1, 5, 8)), ValueError, "x must be 2-D"),
    "x_int": (dict(x=torch.ones(5, 8, dtype=torch.int64)), TypeError, "x has dtype torch.int64"),
    "weight_1d": (dict(weight=torch.randn(8)), ValueError, "weight must be 2-D"),
    "weight_wrong_K": (dict(weight=torch.randn(6, 7)), ValueError, r"weight has shape \(6, 7\)"),
    "bias_wrong_length": (dict(bias=torch.randn(3)), ValueError, r"bias has shape \(3,\), expected \(6,\)"),
    "bias_2d": (dict(bias=torch.randn(1, 6)), ValueError, "bias must be 1-D"),
    "A_wrong_K": (dict(lora_A=torch.randn(2, 9)), ValueError, r"lora_A has shape \(2, 9\)"),
    "A_3d": (dict(lora_A=torch.randn(1, 2, 8)), ValueError, "lora_A must be 2-D"),
    "B_rank3": (dict(lora_B=torch.randn(1, 6, 2)), ValueError, "lora_B must be 2-D"),
    "B_wrong_r": (dict(lora_B=torch.randn(6, 3)), ValueError, r"lora_B has shape \(6, 3\)"),
    "B_wrong_N": (dict(lora_B=torch.randn(5, 2)), ValueError, r"lora_B has shape \(5, 2\)"),
    "weight_dtype": (dict(weight=torch.randn(6, 8, dtype=torch.float16)), TypeError, "weight has dtype torch.float16"),
    "A_dtype": (dict(lora_A=torch.randn(2, 8, dtype=torch.float64)), TypeError, "lora_A has dtype torch.float64"),
    "bias_device": (dict(bias=torch.randn(6, device="meta")), ValueError, "bias is on meta"),
    "p_one": (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    "p_negative": (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    "p_nan": (dict(dropout_p=math.nan), ValueError, r"dropout_p must be in \[0, 1\)"),
    "p_string": (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number"),
    "scaling_string": (dict(scaling="2"), TypeError, "scaling must be a real number"),
    "scaling_inf": (dict(scaling=math.inf), ValueError, "scaling must be finite"),
    "scaling_nan": (dict(scaling=math.nan), ValueError, "scaling must be finite"),
    # beyond float32, the dtype the ops take it in (issue 18, attacker re-trial, finding 7: torch's "value
    # cannot be converted to type float without overflow" from inside a row), and an int beyond any float
    "scaling_beyond_float32": (dict(scaling=5e38), ValueError, r"scaling 5e\+38 is beyond float32's range"),
    "scaling_negative_beyond_float32": (dict(scaling=-3.5e38), ValueError, "beyond float32's range"),
    "scaling_huge_int": (dict(scaling=10**400), ValueError, "scaling must be finite, got an integer of 401 digits"),
    "scaling_grad_tensor": (dict(scaling=torch.tensor(2.0, requires_grad=True)), TypeError, "requires grad"),
    "seed_missing": (dict(seed=None), ValueError, "seed .* is required when dropout_p > 0"),
    "seed_negative": (dict(seed=-1), ValueError, "seed must be in"),
    "seed_too_big": (dict(seed=2**63), ValueError, "seed must be in"),
    "seed_bool": (dict(seed=True), TypeError, "seed must be an int"),
    "seed_float": (dict(seed=1.5), TypeError, "seed must be an int"),
    "seed_float_tensor": (dict(seed=torch.tensor(1.0)), TypeError, "seed must be a 0-dim int64 tensor"),
    "seed_1d_tensor": (dict(seed=torch.tensor([1])), TypeError, "seed must be a 0-dim int64 tensor"),
    "seed_negative_tensor": (dict(seed=torch.tensor(-3)), ValueError, "seed must be >= 0"),
}


def _call(backend, grad, kw):
    """lora_linear with these arguments; with `grad`, A requires grad (the autograd.Function path)."""
    a = kw["lora_A"]
    if grad and isinstance(a, torch.Tensor):
        a = a.detach().requires_grad_(True)
    return lora_linear(kw["x"], kw["weight"], kw["bias"], a, kw["lora_B"], kw["scaling"], kw["dropout_p"],
                       kw["seed"], backend=backend)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", list(BAD))
def test_bad_inputs_same_clear_error_on_both_backends(case, backend, grad):
    """Checked before a backend is chosen, so the Triton backend (even where it cannot run) gives the
    torch backend's error and no kernel ever sees a bad shape."""
    changes, exc, pattern = BAD[case]
    kw = {**_good(), **changes}
    with pytest.raises(exc, match=pattern):
        _call(backend, grad, kw)


def test_good_call_passes_and_int_seed_equals_tensor_seed():
    kw = _good()
    y_int = _call("torch", False, kw)
    y_tensor = _call("torch", False, {**kw, "seed": torch.tensor(7)})
    assert y_int.shape == (5, 6) and torch.equal(y_int, y_tensor)


SHAPE_CASES = [c for c in BAD if not c.startswith(("p_", "seed_", "scaling_", "x_not")) and c not in ("x_int",)]


@pytest.mark.parametrize("case", SHAPE_CASES)
def test_fake_implementation_gives_the_same_error(case):
    """What torch.compile and opcheck see: the fake implementation refuses with the same message."""
    changes, exc, pattern = BAD[case]
    kw = {**_good(), **changes}
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        args = [mode.from_tensor(kw[n]) if isinstance(kw[n], torch.Tensor) else kw[n]
                for n in ("x", "weight", "bias", "lora_A", "lora_B")]
        with pytest.raises(exc, match=pattern):
            lora_linear_fwd(*args, 0.5, 0.1, torch.tensor(7), "torch")


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_call_gives_the_same_error(dynamic):
    """With dynamic shapes the size checks are symbolic (recorded as guards): still the same error."""
    kw = {**_good(), **BAD["weight_wrong_K"][0]}
    f = torch.compile(lambda x, w, b, a, bb: lora_linear(x, w, b, a, bb, 0.5, backend="torch"),
                      fullgraph=True, backend="eager", dynamic=dynamic)
    good = _good()
    for M in (3, 4):  # good calls of two sizes compile and run
        assert f(torch.randn(M, 8), good["weight"], good["bias"], good["lora_A"], good["lora_B"]).shape == (M, 6)
    # with dynamic shapes the sizes in the message may be symbolic (s0, s1, ...)
    with pytest.raises(Exception, match=r"lora_linear: weight has shape .* expected \(N, ") as info:
        f(kw["x"], kw["weight"], kw["bias"], kw["lora_A"], kw["lora_B"])
    chain, err = [], info.value  # dynamo wraps the fake implementation's ValueError
    while err is not None and len(chain) < 10:
        chain.append(err)
        err = err.__cause__ or err.__context__
    assert any(isinstance(e, ValueError) for e in chain), [type(e).__name__ for e in chain]


# ---------------------------------------------------------------- what the Triton backend refuses

def test_bfloat16_refused_under_the_interpreter(monkeypatch):
    """The interpreter's bf16 tl.dot is wrong (errors ~1e10): asking for it is an error, not garbage."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    reasons = backends.triton_not_supported_reasons(cpu, torch.bfloat16, 8)
    assert any("bfloat16" in r and "interpreter" in r for r in reasons), reasons
    assert backends.choose_backend(cpu, torch.bfloat16, 8) == "torch"  # auto: the torch path
    x, w, b, a, bb = make_problem(4, 8, 6, 2, torch.bfloat16)
    with pytest.raises(backends.BackendUnavailable, match="bfloat16.*interpreter"):
        lora_linear(x, w, b, a, bb, 1.0, backend="triton")
    # float16/float32 stay accepted there, and compiled GPU kernels keep bfloat16
    if backends.triton_installed():
        assert backends.triton_not_supported_reasons(cpu, torch.float16, 8) == []
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        assert backends.triton_not_supported_reasons(torch.device("cuda"), torch.bfloat16, 8) == []


@pytest.mark.parametrize("fake", [False, True], ids=["eager", "fake"])
@pytest.mark.parametrize("bad", ["dy_rows", "dy_cols", "h_rank", "h_dtype"])
def test_backward_op_checks_dy_and_h(bad, fake):
    """The backward op, called directly (as opcheck and compiled graphs do), checks dY and H too."""
    from fused_lora.ops.lora import lora_linear_bwd
    x, w, b, a, bb = make_problem(5, 8, 6, 2, torch.float32, requires_grad=False)
    dy, h = torch.randn(5, 6), torch.randn(5, 2)
    dy, h, exc, pattern = {
        "dy_rows": (torch.randn(4, 6), h, ValueError, r"dy has shape \(4, 6\), expected \(5, 6\)"),
        "dy_cols": (torch.randn(5, 7), h, ValueError, r"dy has shape \(5, 7\), expected \(5, 6\)"),
        "h_rank": (dy, torch.randn(5, 3), ValueError, r"h has shape \(5, 3\), expected \(5, 2\)"),
        "h_dtype": (dy, h.double(), TypeError, "h has dtype torch.float64"),
    }[bad]
    args = [dy, x, w, a, bb, h]
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else contextlib.nullcontext()
    with mode:
        if fake:
            args = [mode.from_tensor(t) for t in args]
        with pytest.raises(exc, match=pattern):
            lora_linear_bwd(*args, 0.5, 0.0, torch.tensor(3), "torch", True, True, False, False)


def test_a_meta_seed_or_scaling_holds_no_value_and_is_refused_by_name():
    """A meta tensor has no value to read (Tensor.item() raised torch's RuntimeError; found by fuzzing)."""
    with pytest.raises(ValueError, match="seed is a meta tensor"):
        seed_value(torch.tensor(1, device="meta"))
    with pytest.raises(ValueError, match="scaling is a meta tensor"):
        as_scaling(torch.tensor(1.0, device="meta"))


@pytest.mark.parametrize("which", ["x", "weight"])
def test_a_sparse_tensor_is_refused_by_name(which):
    """The ops take dense (strided) tensors: a sparse one is a TypeError naming it (it failed deep inside the
    Triton launchers, or inside addmm; found by fuzzing)."""
    g = torch.Generator().manual_seed(0)
    t = {"x": torch.randn(4, 5, generator=g), "weight": torch.randn(6, 5, generator=g)}
    t[which] = t[which].to_sparse()
    with pytest.raises(TypeError, match=f"{which} has layout torch.sparse_coo; the ops take dense"):
        lora_linear(t["x"], t["weight"], None, torch.randn(2, 5), torch.randn(6, 2), 1.0, backend="torch")
