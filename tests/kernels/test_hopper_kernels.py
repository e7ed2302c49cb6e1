"""The Hopper-path kernels (TMA + persistent forward and dX GEMMs, the single-pass forward) against the
reference: on an sm_90 GPU when present, else through TRITON_INTERPRET=1, whose interpreter runs
tensor-descriptor kernels (host-side TensorDescriptor) on CPU tensors.

Through their backend rows ("triton-tma", "triton-onepass": float16/bfloat16 only) and, for float32,
by calling the launchers directly (the interpreter computes fp32 dots exactly, so index and mask
errors show without low-precision noise). Shapes are not multiples of any tile; the TMA shapes keep
K and N 16-byte multiples, which descriptors need (the row refuses the others).
"""
import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.kernels.hopper import one_pass, tma
from utils import assert_close_rule, check_op_against_reference, make_problem, ref_forward_backward, to64

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
_why_not = backends.IMPLEMENTATIONS[[i.name for i in backends.IMPLEMENTATIONS].index("triton-tma")].not_supported_reasons(
    backends.Problem("fwd", torch.device(DEVICE), torch.float16, 64, 64, 64, 16))
pytestmark = pytest.mark.skipif(_why_not != [], reason="the Hopper path cannot run here: " + "; ".join(_why_not))

ROW_DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [])
# (M, K, N, r): M, K, N not multiples of the tiles (32 under the interpreter); K, N multiples of 8.
TMA_SHAPES = [(37, 40, 72, 3), (70, 48, 40, 16), (33, 64, 96, 64)]
ONEPASS_SHAPES = TMA_SHAPES + [(7, 13, 5, 3), (1, 1, 1, 1)]
if CUDA:
    TMA_SHAPES += [(1000, 1104, 904, 16), (517, 2048, 304, 64)]
    ONEPASS_SHAPES += [(1000, 1100, 900, 16), (517, 2048, 300, 64)]


@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_tma_row_matches_reference(shape, dtype, p, bias, monkeypatch):
    _no_pointer_fallback(monkeypatch)
    check_op_against_reference("triton-tma", *shape, dtype=dtype, p=p, device=DEVICE, bias=bias)


@pytest.mark.parametrize("shape", ONEPASS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", ROW_DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
@pytest.mark.parametrize("bias", [True, False])
def test_onepass_row_matches_reference(shape, dtype, p, bias):
    check_op_against_reference("triton-onepass", *shape, dtype=dtype, p=p, device=DEVICE, bias=bias)


def _no_pointer_fallback(monkeypatch):
    """Make the TMA launcher's pointer fallbacks fail for aligned inputs, so a test cannot pass by
    running the pointer kernels; without dX the pointer kernel's dA-only variant is the design."""
    def refuse(*args, **kwargs):
        raise AssertionError("the TMA launcher fell back to the pointer GEMM on aligned inputs")

    pointer_dx_da = tma.dx_da_pointer

    def dx_da_only(dy, x, weight, g, lora_A, p, seed, need_dx, need_lora):
        assert not need_dx, "the TMA launcher fell back to the pointer dX kernel on aligned inputs"
        return pointer_dx_da(dy, x, weight, g, lora_A, p, seed, need_dx, need_lora)

    monkeypatch.setattr(tma, "forward_gemm", refuse)
    monkeypatch.setattr(tma, "dx_da_pointer", dx_da_only)


def _check_module(module, M, K, N, r, dtype, p, bias, need_dx=True, need_lora=True):
    """The launchers' forward and backward against the reference (same dropout mask)."""
    x, w, b, a, bb = make_problem(M, K, N, r, dtype, DEVICE, bias, seed=5, requires_grad=False)
    seed = 4321
    keep = module.keep_mask(seed, (M, K), p, DEVICE) if p > 0 else None
    y, h = module.forward(x, w, b, a, bb, 0.5, p, seed)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype).to(DEVICE)
    dx, dA, dB, dW, db = module.backward(dy, x, w, a, bb, h, 0.5, p, seed, need_dx, need_lora, False, False)
    assert dW is None and db is None
    ins = [t.clone().requires_grad_(True) if t is not None else None for t in (x, w, b, a, bb)]
    y_e, g_e = ref_forward_backward(*ins, 0.5, dy, keep, p)
    y64, g64 = ref_forward_backward(*to64(*ins), 0.5, dy.double(), keep, p)
    assert_close_rule(y, y_e, y64, dtype, "y")
    h64 = (x.double() * (keep.double() / (1 - p) if keep is not None else 1.0)) @ a.double().t()
    assert_close_rule(h, h64.to(dtype), h64, dtype, "H")
    for name, got, i, needed in (("dx", dx, 0, need_dx), ("dA", dA, 3, need_lora), ("dB", dB, 4, need_lora)):
        if needed:
            assert_close_rule(got, g_e[i], g64[i], dtype, name)
        else:
            assert got is None, f"{name} computed though not asked for"


@pytest.mark.skipif(CUDA, reason="float32 launcher checks run under the interpreter (the rows refuse float32)")
@pytest.mark.parametrize("shape", TMA_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_tma_launchers_float32(shape, p, bias, monkeypatch):
    _no_pointer_fallback(monkeypatch)
    _check_module(tma, *shape, torch.float32, p, bias)


@pytest.mark.skipif(CUDA, reason="float32 launcher checks run under the interpreter (the rows refuse float32)")
@pytest.mark.parametrize("shape", ONEPASS_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_onepass_launcher_float32(shape, p, bias):
    _check_module(one_pass, *shape, torch.float32, p, bias)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("need_dx,need_lora", [(True, False), (False, True)])
def test_tma_backward_flag_variants(need_dx, need_lora, p, monkeypatch):
    _no_pointer_fallback(monkeypatch)
    _check_module(tma, 37, 40, 72, 5, torch.float16, p, True, need_dx, need_lora)


@pytest.mark.skipif(CUDA, reason="forces an interpreter config; on a GPU the configs are the gate's")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tma_256_wide_tiles_store_in_two_halves(dtype, p, monkeypatch):
    # 256-wide output tiles leave through two TMA stores of 128 columns (forward_tma.epilogue_parts);
    # the interpreter's own config is 32 wide, so force a 256-wide one. K and N of 264: the second
    # column tile is mostly outside the matrix (its right half entirely), which the stores clip.
    from fused_lora.kernels import configs
    from fused_lora.kernels.hopper import forward_tma
    wide = configs._cfg(16, 256, 32, 4, 1, group=2)
    assert forward_tma.epilogue_parts(wide) == 2
    monkeypatch.setattr(configs, "tma_candidates", lambda *args, **kwargs: [wide])
    _no_pointer_fallback(monkeypatch)
    _check_module(tma, 20, 264, 264, 5, dtype, p, True)


def test_tma_grid_is_persistent():
    # The shapes above have more tiles than the interpreter's persistent programs, so each program
    # walks several tiles (the persistent loop is exercised, not just its first iteration).
    tiles = -(-70 // 32) * -(-72 // 32)
    assert tma._programs(torch.device("cpu"), tiles) < tiles or CUDA


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_onepass_h_is_the_shrink_pass_h(p):
    # Same mask, same meaning: H from the single pass equals the shrink pass's (fp32: to rounding).
    from fused_lora import kernels
    x, w, b, a, bb = make_problem(45, 56, 70, 6, torch.float32, DEVICE, seed=8, requires_grad=False)
    _, h_one = one_pass.forward(x, w, b, a, bb, 0.5, p, 77)
    h_two = kernels.shrink(x, a, p, 77)
    torch.testing.assert_close(h_one, h_two, atol=1e-5, rtol=1e-5)


def test_tma_falls_back_for_unaligned_views():
    # A transposed view of x has no unit last stride: the launcher runs the pointer kernels.
    check_op_against_reference("triton-tma", 23, 40, 24, 5, torch.float16, p=0.3, device=DEVICE, noncontiguous=True)
    x = torch.zeros(8, 16, dtype=torch.float16, device=DEVICE)
    assert tma.tma_ready(x) and not tma.tma_ready(x.t()) and not tma.tma_ready(x[:, 1:])
