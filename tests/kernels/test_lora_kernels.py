"""The Triton kernels against the reference: on a GPU when present, else through TRITON_INTERPRET=1.

The interpreter is slow and computes bf16 tl.dot wrongly, so on CPU the shapes are small and the
dtypes fp32/fp16; on CUDA the same checks run on larger shapes and in bf16 too.
"""
import math

import pytest
import torch

from fused_lora import FusedLoRALinear
from fused_lora.ops.lora import lora_linear_bwd, lora_linear_fwd
from fused_lora.core.reference import lora_linear_ref
from utils import backend_module, check_op_against_reference, make_problem, needs_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = needs_triton(DEVICE)

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
SHAPES = [(1, 1, 1, 1), (7, 13, 5, 3), (33, 65, 17, 4), (40, 48, 70, 16)]
if CUDA:
    SHAPES += [(1000, 1100, 900, 16), (517, 2048, 300, 64), (256, 384, 512, 256), (4096, 1024, 1024, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_triton_op_matches_reference(shape, dtype, p):
    check_op_against_reference("triton", *shape, dtype=dtype, p=p, device=DEVICE)


@pytest.mark.parametrize("r", [1, 17, 100, 256])
def test_ranks_are_padded(r):
    check_op_against_reference("triton", 19, 24, 21, r, torch.float32, p=0.1, device=DEVICE)


def test_no_bias_trainable_base_and_noncontiguous_input():
    check_op_against_reference("triton", 23, 29, 31, 5, torch.float16, p=0.3, device=DEVICE, bias=False,
                               trainable_base=True, noncontiguous=True)


def test_empty_batch():
    check_op_against_reference("triton", 0, 12, 9, 2, torch.float32, device=DEVICE)


def test_keep_mask_rate_and_reproducibility():
    kernels = backend_module("triton")
    M, K, p = 128, 160, 0.25
    keep = kernels.keep_mask(77, (M, K), p, DEVICE)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 5 * math.sqrt(p * (1 - p) / (M * K))
    assert torch.equal(keep, kernels.keep_mask(77, (M, K), p, DEVICE))
    assert not torch.equal(keep, kernels.keep_mask(78, (M, K), p, DEVICE))


def test_layer_on_triton_same_mask_in_forward_and_backward():
    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 20, r=4, lora_dropout=0.3, init_lora_weights=False, backend="triton").to(DEVICE)
    x = torch.randn(2, 9, 24, device=DEVICE, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = backend_module("triton").keep_mask(seed, (18, 24), 0.3, DEVICE).reshape(2, 9, 24)
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, keep, 0.3)
    tol = dict(atol=5e-3, rtol=5e-3) if CUDA else {}  # TF32 on GPU
    torch.testing.assert_close(y, ref, **tol)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    want = torch.autograd.grad(ref, (x, layer.lora_A, layer.lora_B), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


def test_opcheck_triton():
    x, w, b, a, bb = make_problem(16, 32, 24, 4, torch.float32, DEVICE, seed=2)
    seed = torch.tensor(11, dtype=torch.int64)
    torch.library.opcheck(lora_linear_fwd, (x, w.detach(), b.detach(), a, bb, 0.5, 0.1, seed, "triton"))
    with torch.no_grad():
        y, h = lora_linear_fwd(x, w, b, a, bb, 0.5, 0.1, seed, "triton")
    torch.library.opcheck(lora_linear_bwd, (torch.randn_like(y), x.detach(), w.detach(), a.detach(), bb.detach(), h,
                                            0.5, 0.1, seed, "triton", True, True, False, False))


def _backward_inputs(M, K, N, r, dtype, p, seed=3):
    """A forward on the Triton backend, and what its backward takes."""
    kernels = backend_module("triton")
    x, w, b, a, bb = make_problem(M, K, N, r, dtype, DEVICE, seed=seed, requires_grad=False)
    y, h = kernels.forward(x, w, b, a, bb, 0.5, p, 99)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype).to(DEVICE)
    return kernels, (dy, x, w, a, bb, h, 0.5, p, 99)


def test_dy_pass_split_over_columns_matches_reference():
    # Few rows and many columns: the dY pass splits N into several chunks, and G is their sum.
    kernels = backend_module("triton")
    M, N = 9, 600
    assert math.ceil(N / kernels.dy_chunk(M, N)) >= 2
    check_op_against_reference("triton", M, 20, N, 5, torch.float32, p=0.1, device=DEVICE)
    check_op_against_reference("triton", M, 20, N, 5, torch.float16, p=0.0, device=DEVICE)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_backward_bit_identical_run_to_run(p):
    # Several row blocks (dA, dB partials) and column chunks (G partials). Under the interpreter the
    # programs run one after another, so this holds for atomics too; on a GPU it is the real check.
    kernels, args = _backward_inputs(70, 40, 530, 6, torch.float32, p)
    first = kernels.backward(*args, True, True, False, False)
    for _ in range(2):
        again = kernels.backward(*args, True, True, False, False)
        for name, u, v in zip(("dx", "dA", "dB"), first[:3], again[:3]):
            assert torch.equal(u, v), f"{name} differs between two runs"


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("need_dx,need_lora", [(True, False), (False, True)])
def test_backward_flag_variants_match_full_backward(need_dx, need_lora, p):
    # HAS_DX / HAS_DA / HAS_DB variants compute each gradient exactly as the full variant does,
    # which test_triton_op_matches_reference holds against the float64 reference.
    kernels, args = _backward_inputs(37, 45, 70, 4, torch.float16, p)
    full = kernels.backward(*args, True, True, False, False)
    part = kernels.backward(*args, need_dx, need_lora, False, False)
    for name, want, got, needed in zip(("dx", "dA", "dB"), full[:3], part[:3], (need_dx, need_lora, need_lora)):
        if needed:
            assert got is not None and torch.equal(got, want), f"{name} differs from the full backward"
        else:
            assert got is None, f"{name} computed though not asked for"


@pytest.mark.parametrize("out_dtypes", [(torch.float32, torch.float32), (torch.float16, torch.float32)], ids=str)
def test_reduction_pass_sums_partials_in_order(out_dtypes):
    from fused_lora.kernels.reduce import BLOCK, sum_partials
    g = torch.Generator().manual_seed(0)
    ws0 = torch.randn(5, 3, BLOCK + 7, generator=g).to(DEVICE)  # sizes straddle a program boundary
    ws1 = torch.randn(3, 2 * BLOCK + 1, generator=g).to(DEVICE)
    out0 = torch.empty(ws0.shape[1:], dtype=out_dtypes[0], device=DEVICE)
    out1 = torch.empty(ws1.shape[1:], dtype=out_dtypes[1], device=DEVICE)
    sum_partials((ws0, out0), (ws1, out1))
    for ws, out in ((ws0, out0), (ws1, out1)):
        want = ws.double().sum(0)
        torch.testing.assert_close(out.double(), want.to(out.dtype).double(), atol=1e-5 if out.dtype == torch.float32 else 2e-3, rtol=1e-3)
    single = torch.empty_like(out1)
    sum_partials((ws1, single))
    assert torch.equal(single, out1)


def test_autotune_keys_hold_every_flag():
    # A config tuned for one variant (say without dropout) must not be reused for another.
    from fused_lora.kernels.lora.launchers import KERNELS as _KERNELS
    for name, (fn, key) in _KERNELS.items():
        flags = {a for a in fn.arg_names if a.startswith("HAS_")}
        assert flags and flags <= set(key), f"{name}: autotuning key {key} misses {flags - set(key)}"
