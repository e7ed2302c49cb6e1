"""The Triton kernels over a quantized frozen base (fused_lora.kernels.quantized) against the reference on
the dequantized weight: W = wq.dequantize_rows(0, N) (fused_lora.core.formats.layouts, the layouts' one
definition), cast to the compute dtype, then the float64 reference of fused_lora.core.reference.

The kernels dequantize exactly what dequantize_rows does (fp32 level x fp32 absmax, rounded once to
the compute dtype), so the only differences are the accumulation order and the compute dtype's
roundings: the project's rule applies unchanged (error <= 2 x the same-precision eager error +
atol, tests/utils.py). On CPU the kernels run through TRITON_INTERPRET=1 (fp32 and fp16).
"""
import pytest
import torch

from fused_lora.core.formats import Int8Data, NF4Data
from fused_lora.core.formats.nf4 import NF4_LEVELS
from utils import assert_close_rule, needs_triton, ref_forward_backward, to64

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = needs_triton(DEVICE)
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
SCALING = 0.5


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def random_nf4(N, K, blocksize=64, nested=False, seed=0) -> NF4Data:
    """Arbitrary packed bytes (every nibble value) and absmax: the kernels must read any data."""
    g = _gen(seed)
    n_blocks = -(-(N * K) // blocksize)
    packed = torch.randint(0, 256, (N * K // 2,), generator=g, dtype=torch.uint8)
    code = torch.tensor(NF4_LEVELS, dtype=torch.float32)
    scale = K ** -0.5
    if not nested:
        absmax = (torch.rand(n_blocks, generator=g) + 0.5) * scale
        return NF4Data((N, K), packed.to(DEVICE), code.to(DEVICE), blocksize, absmax=absmax.to(DEVICE))
    blocksize2 = 4  # several second-level groups even for small weights
    qabsmax = torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8)
    code2 = torch.linspace(-1, 1, 256)
    absmax2 = (torch.rand(-(-n_blocks // blocksize2), generator=g) + 0.5) * 0.3 * scale
    return NF4Data((N, K), packed.to(DEVICE), code.to(DEVICE), blocksize, qabsmax=qabsmax.to(DEVICE),
                   code2=code2.to(DEVICE), absmax2=absmax2.to(DEVICE), blocksize2=blocksize2, offset=0.9 * scale)


def bnb_nf4(w: torch.Tensor, blocksize=64, nested=False) -> NF4Data:
    """bitsandbytes' own NF4 quantization of w (CPU), its packed data taken as it is. (CI installs
    bitsandbytes, and fails on any skip; the GPU suite may lack it.)"""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    q, st = bnbf.quantize_4bit(w.float(), quant_type="nf4", blocksize=blocksize, compress_statistics=nested)
    N, K = w.shape
    if nested:
        wq = NF4Data((N, K), q.reshape(-1), st.code.float(), blocksize, qabsmax=st.absmax, code2=st.state2.code.float(),
                     absmax2=st.state2.absmax.float(), blocksize2=st.state2.blocksize, offset=float(st.offset))
    else:
        wq = NF4Data((N, K), q.reshape(-1), st.code.float(), blocksize, absmax=st.absmax.float())
    # The container reads bitsandbytes' layout as bitsandbytes does.
    assert torch.equal(wq.dequantize_rows(0, N), bnbf.dequantize_4bit(q, st).float())
    return _on_device(wq)


def _on_device(wq):
    fields = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in wq.__dict__.items()}
    return type(wq)(**fields)


def random_int8(N, K, seed=0) -> Int8Data:
    g = _gen(seed)
    qweight = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, generator=g) + 0.5) * K ** -0.5 / 127
    return Int8Data((N, K), qweight.to(DEVICE), scale.to(DEVICE))


def make_weight(fmt, N, K, seed=0, blocksize=64):
    if fmt == "int8":
        return random_int8(N, K, seed)
    return random_nf4(N, K, blocksize, nested=fmt == "nf4-nested", seed=seed)


def lora_inputs(M, K, N, r, dtype, bias=True, seed=1):
    g = _gen(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(DEVICE)

    return (rnd(M, K), rnd(N) if bias else None, rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5),
            rnd(M, N))


def check_against_reference(wq, M, r, dtype, p=0.0, bias=True, seed=1):
    """Y, H and dX, dA, dB of the quantized kernels against the reference on the dequantized weight."""
    from fused_lora.kernels import keep_mask
    from fused_lora.kernels.quantized.launchers import backward_quant, forward_quant
    from fused_lora.core.reference import lora_linear_ref_h

    N, K = wq.shape
    x, b, a, bb, dy = lora_inputs(M, K, N, r, dtype, bias, seed)
    kseed = 1000 + seed
    y, h = forward_quant(x, wq, b, a, bb, SCALING, p, kseed)
    dx, dA, dB, db = backward_quant(dy, x, wq, a, bb, h, SCALING, p, kseed, True, True, True)
    torch.testing.assert_close(db, dy.double().sum(0).to(dy.dtype))

    w = wq.dequantize_rows(0, N).to(dtype)  # what a 16-bit copy of the base would hold
    keep = keep_mask(kseed, (M, K), p, DEVICE) if p > 0 else None
    ins = (x.clone().requires_grad_(True), w, b, a.clone().requires_grad_(True), bb.clone().requires_grad_(True))
    y_eager, g_eager = ref_forward_backward(*ins, SCALING, dy, keep, p)
    y64, g64 = ref_forward_backward(*to64(*ins), SCALING, dy.double(), keep, p)
    tf32 = "tf32" if (dtype == torch.float32 and CUDA) else None
    assert y.shape == (M, N) and y.dtype == dtype and h.shape == (M, r)
    assert_close_rule(y, y_eager, y64, dtype, "y", tf32)
    h64 = lora_linear_ref_h(x.double(), a.double(), keep, p)
    assert_close_rule(h, lora_linear_ref_h(x, a, keep, p), h64, dtype, "h", tf32)
    for name, got, ge, g6 in zip(("dx", "dA", "dB"), (dx, dA, dB), (g_eager[0], g_eager[3], g_eager[4]),
                                 (g64[0], g64[3], g64[4])):
        assert got.dtype == dtype
        assert_close_rule(got, ge, g6, dtype, name, tf32)


FORMATS = ["nf4", "nf4-nested", "int8"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.2, False)])
def test_quant_kernels_match_dequantized_reference(fmt, dtype, p, bias):
    # K = 70: rows end inside a 64-block, so runs straddle two absmax blocks; several row and
    # column tiles (interpreter tiles are 32).
    check_against_reference(make_weight(fmt, 34, 70, seed=3), 37, 5, dtype, p, bias)


@pytest.mark.parametrize("nested", [False, True])
def test_odd_k_rows_start_inside_a_byte(nested):
    # K = 45, N = 34: N * K even, and every odd row starts in a byte's low nibble.
    check_against_reference(random_nf4(34, 45, 64, nested, seed=5), 23, 4, torch.float32, p=0.1)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("M,N,K", [(1, 2, 1), (3, 6, 5)])
def test_tiny_shapes(fmt, M, N, K):
    check_against_reference(make_weight(fmt, N, K, seed=13), M, 1, torch.float32, p=0.5)


def test_int8_odd_k():
    check_against_reference(random_int8(19, 45, seed=6), 23, 4, torch.float16, p=0.1)


@pytest.mark.parametrize("blocksize,nested", [(64, False), (64, True), (128, True)])
def test_bitsandbytes_packed_data(blocksize, nested):
    w = torch.randn(48, 200, generator=_gen(7)) * 200 ** -0.5
    check_against_reference(bnb_nf4(w, blocksize, nested), 33, 8, torch.float32, p=0.1)
    check_against_reference(bnb_nf4(w, blocksize, nested), 33, 8, torch.float16)


@pytest.mark.parametrize("r", [1, 17, 33])
def test_ranks_loop_over_rank_chunks(r):
    # The low-rank term runs over chunks of 16 ranks: one, two (17) and three (33) chunks.
    check_against_reference(random_nf4(40, 64, 64, True, seed=8), 21, r, torch.float32, p=0.2)


@pytest.mark.parametrize("fmt", FORMATS)
def test_gpu_tile_sizes(fmt, monkeypatch):
    # The GPU configs dequantize runs of 64 (forward) and 128 (dX) columns: a run of 128 crosses
    # three 64-element absmax blocks when K is not a multiple of 64. The interpreter's own config
    # has runs of 32, so run the kernels here with the GPU's run lengths.
    from fused_lora.kernels import configs
    from fused_lora.kernels.quantized import launchers as quant
    tiles = {"quant_forward": configs._cfg(32, 32, 64, 4, 1, group=2), "quant_dx": configs._cfg(32, 128, 32, 4, 1, group=2)}
    monkeypatch.setattr(configs, "quant_candidates", lambda name, *args: [tiles[name]])
    quant._tuned.cache_clear()
    try:
        check_against_reference(make_weight(fmt, 36, 150, seed=9), 40, 6, torch.float32, p=0.2)
    finally:
        monkeypatch.undo()
        quant._tuned.cache_clear()


@pytest.mark.parametrize("need_dx,need_lora", [(True, False), (False, True), (False, False)])
def test_backward_flags(need_dx, need_lora):
    from fused_lora.kernels.quantized.launchers import backward_quant, forward_quant
    wq = random_nf4(30, 66, 64, True, seed=10)
    x, b, a, bb, dy = lora_inputs(25, 66, 30, 3, torch.float16)
    y, h = forward_quant(x, wq, b, a, bb, SCALING, 0.3, 5)
    full = backward_quant(dy, x, wq, a, bb, h, SCALING, 0.3, 5, True, True)[:3]
    part = backward_quant(dy, x, wq, a, bb, h, SCALING, 0.3, 5, need_dx, need_lora)[:3]
    for name, want, got, needed in zip(("dx", "dA", "dB"), full, part, (need_dx, need_lora, need_lora)):
        if needed:
            assert torch.equal(got, want), f"{name} differs from the full backward"
        else:
            assert got is None, f"{name} computed though not asked for"


def test_same_result_as_the_16bit_kernels_on_the_dequantized_weight():
    # Same dropout mask, same H, G, dA, dB passes: against fused_lora.kernels on W in fp32, the
    # outputs agree to accumulation order (H and dB bit for bit: they never read W).
    from fused_lora import kernels
    from fused_lora.kernels.quantized.launchers import backward_quant, forward_quant
    wq = random_nf4(34, 70, 64, False, seed=11)
    x, b, a, bb, dy = lora_inputs(29, 70, 34, 4, torch.float32)
    w = wq.dequantize_rows(0, 34)
    y, h = forward_quant(x, wq, b, a, bb, SCALING, 0.25, 9)
    y16, h16 = kernels.forward(x, w, b, a, bb, SCALING, 0.25, 9)
    assert torch.equal(h, h16)
    torch.testing.assert_close(y, y16, atol=1e-5, rtol=1e-5)
    got = backward_quant(dy, x, wq, a, bb, h, SCALING, 0.25, 9, True, True)[:3]
    want = kernels.backward(dy, x, w, a, bb, h16, SCALING, 0.25, 9, True, True, False, False)[:3]
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])


def test_bad_weights_are_refused_with_a_clear_message():
    from fused_lora.kernels.quantized.launchers import forward_quant
    x, b, a, bb, _ = lora_inputs(4, 64, 8, 2, torch.float32)
    good = random_nf4(8, 64, 64, seed=12)
    cases = {
        "blocksize 32": NF4Data((8, 64), good.packed, good.code, 32, absmax=torch.ones(16, device=DEVICE)),
        "blocksize 96": NF4Data((8, 64), good.packed, good.code, 96, absmax=torch.ones(6, device=DEVICE)),
        "packed must be": NF4Data((8, 64), good.packed.to(torch.int8), good.code, 64, absmax=good.absmax),
        "absmax must be": NF4Data((8, 64), good.packed, good.code, 64, absmax=good.absmax[:-1]),
        "absmax is missing": NF4Data((8, 64), good.packed, good.code, 64),
        "does not match": NF4Data((8, 66), good.packed, good.code, 64, absmax=good.absmax),
        "qweight must be": Int8Data((8, 64), torch.zeros(64, 8, dtype=torch.int8, device=DEVICE).t(),
                                    torch.ones(8, device=DEVICE)),
        "scale must be": Int8Data((8, 64), torch.zeros(8, 64, dtype=torch.int8, device=DEVICE),
                                  torch.ones(8, dtype=torch.float16, device=DEVICE)),
        "expected NF4Data or Int8Data": torch.zeros(8, 64),
    }
    for message, wq in cases.items():
        with pytest.raises(ValueError, match=message):
            forward_quant(x, wq, b, a, bb, SCALING, 0.0, 1)
    odd = NF4Data((7, 9), torch.zeros(32, dtype=torch.uint8, device=DEVICE), good.code, 64, absmax=good.absmax[:1])
    with pytest.raises(ValueError, match="is odd"):
        forward_quant(torch.zeros(4, 9, device=DEVICE), odd, None, torch.zeros(2, 9, device=DEVICE),
                      torch.zeros(7, 2, device=DEVICE), SCALING, 0.0, 1)
