"""core.formats.dequantize, the whole weight in a dtype (the dequant-once row's dequantization off CUDA): bit
for bit the reference (dequantize_rows(0, N) in fp32, rounded once to the dtype) for every format, NF4 block
size and dtype, across its 16-bit chunk boundaries, and for NF4 bitsandbytes' dequantize_4bit of its own
packed data."""
import pytest
import torch

from fused_lora.core import formats
from fused_lora.core.formats import Int8Data, NF4Data, common, int8, nf4

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _random_nf4(N, K, blocksize, nested, seed=0) -> NF4Data:
    """Arbitrary bytes and scales (every nibble, every nested code), several second-level groups."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = N * K // blocksize
    packed = torch.randint(0, 256, (N * K // 2,), generator=g, dtype=torch.uint8)
    code = torch.tensor(nf4.NF4_LEVELS)
    if not nested:
        return NF4Data((N, K), packed, code, blocksize, absmax=torch.rand(n_blocks, generator=g) + 0.1)
    return NF4Data((N, K), packed, code, blocksize, qabsmax=torch.randint(0, 256, (n_blocks,), generator=g,
                                                                         dtype=torch.uint8),
                   code2=nf4.dynamic_code(), absmax2=torch.rand(-(-n_blocks // 4), generator=g) + 0.1, blocksize2=4,
                   offset=0.37)


def _assert_bit_exact(data, dtype):
    got = formats.dequantize(data, dtype)
    want = data.dequantize_rows(0, data.shape[0]).to(dtype)
    assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
    assert torch.equal(got, want), f"{int((got != want).sum())} elements differ"


@pytest.mark.parametrize("blocksize", nf4.BLOCKSIZES)
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_is_the_reference_bit_for_bit(blocksize, nested):
    data = _random_nf4(7, 2 * max(blocksize, 64), blocksize, nested, seed=blocksize)
    for dtype in DTYPES:
        _assert_bit_exact(data, dtype)


@pytest.mark.parametrize("chunk", [100, 4096 + 64, 1 << 20])
def test_chunks_end_anywhere(monkeypatch, chunk):
    # The result is made common.CHUNK_ELEMENTS elements at a time (NF4: cut to whole blocks, through one
    # scratch; int8: whole rows): a chunk smaller than a block or a row, one block past a row, and one larger
    # than the weight.
    monkeypatch.setattr(common, "CHUNK_ELEMENTS", chunk)
    for blocksize, nested in ((64, True), (256, False)):
        data = _random_nf4(33, 1024, blocksize, nested, seed=chunk)
        for dtype in DTYPES:
            _assert_bit_exact(data, dtype)
    g = torch.Generator().manual_seed(chunk)
    data = Int8Data((33, 301), torch.randint(-128, 128, (33, 301), generator=g, dtype=torch.int8),
                    torch.rand(33, generator=g) / 127)
    for dtype in DTYPES:
        _assert_bit_exact(data, dtype)


@pytest.mark.parametrize("N,K", [(1, 1), (37, 301)])
def test_int8_is_the_reference_bit_for_bit(N, K):
    g = torch.Generator().manual_seed(K)
    data = Int8Data((N, K), torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8),
                    torch.rand(N, generator=g) / 127)
    for dtype in DTYPES:
        _assert_bit_exact(data, dtype)


def test_quantized_weights_and_a_nested_offset_tensor():
    # What the container holds (quantize); under torch.compile the nested offset is a 0-dim tensor.
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(3))
    for data in (nf4.quantize(w, 64, True), nf4.quantize(w, 128, False), int8.quantize(w)):
        for dtype in DTYPES:
            _assert_bit_exact(data, dtype)
    nested = nf4.quantize(w, 64, True)
    as_tensor = NF4Data(nested.shape, nested.packed, nested.code, 64, qabsmax=nested.qabsmax, code2=nested.code2,
                        absmax2=nested.absmax2, blocksize2=nested.blocksize2, offset=torch.tensor(nested.offset))
    assert torch.equal(formats.dequantize(as_tensor, torch.bfloat16), formats.dequantize(nested, torch.bfloat16))


@pytest.mark.parametrize("blocksize", [32, 64, 1024])  # 2048 and up: bitsandbytes compiles its fallback (slow)
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_is_bitsandbytes_dequantize_4bit(blocksize, nested):
    bnbf = pytest.importorskip("bitsandbytes.functional")
    w = torch.randn(24, 4096, generator=torch.Generator().manual_seed(blocksize)) * 0.05
    q, st = bnbf.quantize_4bit(w, quant_type="nf4", blocksize=blocksize, compress_statistics=nested)
    if nested:
        data = NF4Data(tuple(w.shape), q.reshape(-1), st.code.float(), blocksize, qabsmax=st.absmax,
                       code2=st.state2.code.float(), absmax2=st.state2.absmax.float(),
                       blocksize2=st.state2.blocksize, offset=float(st.offset))
    else:
        data = NF4Data(tuple(w.shape), q.reshape(-1), st.code.float(), blocksize, absmax=st.absmax.float())
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        st.dtype = dtype
        assert torch.equal(formats.dequantize(data, dtype), bnbf.dequantize_4bit(q, st))
