"""The one-launch dequantization (fused_lora.kernels.quantized.launchers.dequantize, the dequant-once row's on
CUDA) equals the reference bit for bit: `core.formats` dequantize_rows(0, N) rounded once to the output
dtype, and for NF4 bitsandbytes' own dequantize_4bit (on the CPU) of bitsandbytes' own packed data; every
format (NF4 with and without the nested absmax, int8), every NF4 block size (32 to 4096), fp32 and fp16
under the interpreter (bf16 on a GPU only: the interpreter rounds fp32 to bf16 by truncation, compiled
Triton to nearest even, as torch does).

Weights are arbitrary bytes (every nibble and absmax code) at shapes whose rows and columns end inside a
tile (tiles of 32 x 256, and 128 x 32 for blocks of 32)."""
import pytest
import torch

from fused_lora.core.formats import Int8Data, NF4Data
from fused_lora.core.formats.nf4 import BLOCKSIZES
from test_quantized_kernels import DEVICE, DTYPES, random_int8, random_nf4
from utils import needs_triton

pytestmark = needs_triton(DEVICE)


def dequantize(wq, dtype):
    from fused_lora.kernels.quantized.launchers import dequantize
    return dequantize(wq, dtype)


def reference(wq, dtype):
    return wq.dequantize_rows(0, wq.shape[0]).to(dtype)


def assert_bit_exact(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape and got.is_contiguous()
    differ = got.view(-1) != want.view(-1)
    assert not bool(differ.any()), f"{int(differ.sum())} of {got.numel()} elements differ, first at " \
                                   f"{differ.nonzero()[0]}"


def _columns(blocksize: int) -> int:
    """Rows of whole blocks, and a partial 256-column tile where the block allows (320 = 256 + 64)."""
    return max(blocksize, 320 - 320 % blocksize)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nf4_is_the_reference_bit_for_bit(blocksize, nested, dtype):
    wq = random_nf4(35, _columns(blocksize), blocksize, nested, seed=blocksize)
    assert_bit_exact(dequantize(wq, dtype), reference(wq, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,K", [(35, 300), (1, 7), (130, 513)])
def test_int8_is_the_reference_bit_for_bit(dtype, N, K):
    wq = random_int8(N, K, seed=N)
    assert_bit_exact(dequantize(wq, dtype), reference(wq, dtype))


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("N,K", [(34, 70), (34, 45)])
def test_nf4_rows_that_are_not_whole_blocks(nested, N, K):
    # The general tile loader (no weight the container holds: rows of 70 and 45 elements, runs across
    # blocks, odd rows starting in a byte's low nibble), blocks of 64.
    wq = random_nf4(N, K, 64, nested, seed=K)
    assert_bit_exact(dequantize(wq, torch.float32), reference(wq, torch.float32))
    assert_bit_exact(dequantize(wq, torch.float16), reference(wq, torch.float16))


def _bnb_nf4(w, blocksize, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=nested)
    N, K = w.shape
    if nested:
        wq = NF4Data((N, K), q.reshape(-1), st.code.float(), blocksize, qabsmax=st.absmax,
                     code2=st.state2.code.float(), absmax2=st.state2.absmax.float(), blocksize2=st.state2.blocksize,
                     offset=float(st.offset))
    else:
        wq = NF4Data((N, K), q.reshape(-1), st.code.float(), blocksize, absmax=st.absmax.float())
    return bnbf, q, st, wq


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_is_bitsandbytes_dequantize_4bit_bit_for_bit(blocksize, nested):
    # bitsandbytes quantizes a real weight; its dequantize_4bit (CPU) in each dtype is what the kernel writes.
    w = torch.randn(33, _columns(blocksize), generator=torch.Generator().manual_seed(blocksize)) * 0.05
    bnbf, q, st, wq = _bnb_nf4(w, blocksize, nested)
    on_device = type(wq)(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in wq.__dict__.items()})
    for dtype in DTYPES:
        st.dtype = dtype
        theirs = bnbf.dequantize_4bit(q, st)
        assert theirs.dtype == dtype
        assert_bit_exact(dequantize(on_device, dtype).cpu(), theirs)


def test_nested_absmax_is_not_one_fused_multiply_add():
    # absmax = code2[q] * absmax2 + offset rounds twice (the reference, bitsandbytes); one fused multiply-add
    # would round once. Values chosen so that the two differ: the kernel must give the two-rounding value.
    code2 = torch.full((256,), 1.0 + 2.0 ** -23)
    absmax2 = torch.full((1,), 1.0 + 2.0 ** -22)
    offset = -1.0
    two_roundings = (code2[:1] * absmax2 + offset).item()
    fused = (code2[:1].double() * absmax2.double() + offset).float().item()
    assert two_roundings != fused  # the case tells the two apart
    packed = torch.full((32,), 0xFF, dtype=torch.uint8)  # level 1.0 everywhere
    wq = NF4Data((1, 64), packed.to(DEVICE), torch.linspace(-1, 1, 16).to(DEVICE), 64,
                 qabsmax=torch.zeros(1, dtype=torch.uint8, device=DEVICE), code2=code2.to(DEVICE),
                 absmax2=absmax2.to(DEVICE), blocksize2=256, offset=offset)
    got = dequantize(wq, torch.float32)
    assert_bit_exact(got, reference(wq, torch.float32))
    assert got[0, 0].item() == two_roundings


def test_what_the_kernel_cannot_take_is_refused_by_name():
    good = random_nf4(8, 64, 64, seed=1)
    # blocks of 32 are taken when rows are whole blocks only; 96 is no power of two
    with pytest.raises(ValueError, match="blocksize 32"):
        dequantize(NF4Data((8, 48), good.packed[:192], good.code, 32, absmax=torch.ones(12, device=DEVICE)),
                   torch.float32)
    with pytest.raises(ValueError, match="blocksize 96"):
        dequantize(NF4Data((8, 96), torch.zeros(384, dtype=torch.uint8, device=DEVICE), good.code, 96,
                           absmax=torch.ones(8, device=DEVICE)), torch.float32)
    with pytest.raises(ValueError, match="absmax must be"):
        dequantize(NF4Data((8, 64), good.packed, good.code, 64, absmax=good.absmax[:-1]), torch.float32)
    with pytest.raises(ValueError, match="float64"):
        dequantize(good, torch.float64)
    with pytest.raises(ValueError, match="scale must be"):
        dequantize(Int8Data((8, 64), torch.zeros(8, 64, dtype=torch.int8, device=DEVICE),
                            torch.ones(8, dtype=torch.float16, device=DEVICE)), torch.float32)
    with pytest.raises(ValueError, match="expected NF4Data or Int8Data"):
        dequantize(torch.zeros(8, 64), torch.float32)

