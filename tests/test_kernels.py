"""The Triton kernels against the reference: on a GPU when present, else through TRITON_INTERPRET=1.

The interpreter is slow and computes bf16 tl.dot wrongly, so on CPU the shapes are small and the
dtypes fp32/fp16; on CUDA the same checks run on larger shapes and in bf16 too.
"""
import math

import pytest
import torch

from fused_lora import FusedLoRALinear, backends
from fused_lora.ops import lora_linear_bwd, lora_linear_fwd
from fused_lora.reference import lora_linear_ref
from utils import backend_module, check_op_against_reference, make_problem

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    backends.triton_not_supported_reasons(torch.device(DEVICE), torch.float32, 16) != [],
    reason="Triton cannot run here: " + "; ".join(backends.triton_not_supported_reasons(torch.device(DEVICE), torch.float32, 16)),
)

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
