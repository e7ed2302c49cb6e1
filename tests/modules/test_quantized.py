"""The quantized base: our NF4 / int8 quantization against bitsandbytes', the chunked PyTorch path against
a float64 reference over the dequantized weight, memory per parameter, bad inputs.

bitsandbytes (the venv's 0.50) runs on CPU; it prints a harmless "Failed to load CPU gemm_4bit_forward
from kernels-community" line on first use.
"""
import importlib.util

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora import FusedLoRALinear, lora_linear, lora_linear_quant
from fused_lora import dispatch as backends
from fused_lora.modules import quantized as quant
from fused_lora.torch_row import quant as quant_impl
from fused_lora.core.dropout import keep_mask
from fused_lora.core import formats
from fused_lora.core.formats import common as formats_common
from fused_lora.core.formats import NF4Data, QuantizationError
from fused_lora.modules.quantized import QuantizedLinear, quantize_int8, quantize_nf4
from fused_lora.peft_compat.quantize import quantize_model

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

SHAPES = [(64, 128), (96, 192), (3, 64), (257, 320)]


def weight(N, K, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)


# ------------------------------------------------------------------ quantization against bitsandbytes

@pytest.mark.parametrize("shape,blocksize", [(s, 64) for s in SHAPES] + [((64, 128), 128), ((5, 256), 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_codes_equal_bitsandbytes(shape, blocksize, dtype, monkeypatch):
    monkeypatch.setattr(formats_common, "CHUNK_ELEMENTS", 2 * shape[1])  # quantized two rows at a time
    w = weight(*shape, dtype=dtype)
    ours = quantize_nf4(w, blocksize=blocksize, double_quant=False)
    packed, state = BF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.code, state.code)
    assert ours.dtype == dtype


def _nearest_index_distance(code, v, idx):
    return (code[idx.long()] - v).abs()


@pytest.mark.parametrize("shape", [(512, 1024), (96, 192)])
def test_nf4_double_quant_matches_bitsandbytes(shape):
    """Packed codes, code tables, absmax2 and offset are bitsandbytes' exactly. The nested absmax indices
    are the nearest code2 entry (bitsandbytes' rule in its default and CUDA kernels); its CPU library's
    approximate binary search picks the other neighbour for values very near a midpoint (about 1 in 1000):
    every index that differs is off by one, within 1% of the gap from a midpoint."""
    w = weight(*shape)
    ours = quantize_nf4(w, blocksize=64, double_quant=True)
    packed, state = BF.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    assert torch.equal(ours.packed, packed.reshape(-1))
    assert torch.equal(ours.code2, state.state2.code)
    assert torch.equal(ours.absmax2, state.state2.absmax)
    assert ours.data().offset == float(state.offset)
    differ = (ours.qabsmax != state.absmax).nonzero().view(-1)
    assert differ.numel() <= max(2, ours.qabsmax.numel() // 500)
    # the value each index encodes, from bitsandbytes' own unnested absmax
    _, plain = BF.quantize_4bit(w, blocksize=64, quant_type="nf4")
    centred = plain.absmax - state.offset
    scale = state.state2.absmax.repeat_interleave(256)[: centred.numel()]
    v = centred / scale
    ours_d = _nearest_index_distance(ours.code2, v, ours.qabsmax)
    theirs_d = _nearest_index_distance(ours.code2, v, state.absmax)
    assert bool((ours_d <= theirs_d + 1e-6).all())  # ours is never farther (the nearest)
    if differ.numel():
        assert (ours.qabsmax[differ].int() - state.absmax[differ].int()).abs().max() == 1
        gap = (ours.code2[ours.qabsmax[differ].long()] - ours.code2[state.absmax[differ].long()]).abs()
        assert bool(((ours_d[differ] - theirs_d[differ]).abs() < 0.01 * gap).all())  # within 1% of a midpoint


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:2] + [(128, 256)])
def test_dequantization_bit_exact_on_bitsandbytes_packed_data(nested, shape):
    """Rows read from bitsandbytes' own packed data (through the converter) equal dequantize_4bit's."""
    from fused_lora.modules.convert_bnb import weight_from_bnb
    w = weight(*shape, seed=3)
    layer = bnb.nn.Linear4bit(shape[1], shape[0], bias=False, compute_dtype=torch.float32, quant_type="nf4",
                              compress_statistics=nested)
    layer.load_state_dict({"weight": w})
    layer = layer.to("cpu")
    qw = weight_from_bnb(layer)
    assert qw.nested == nested
    assert qw.packed.data_ptr() == layer.weight.data.data_ptr()  # shared, not copied
    expected = BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
    assert torch.equal(qw.dequantize(torch.float32), expected)
    assert torch.equal(qw.dequantize_rows(1, 3), expected[1:3])


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_fast_dequantization_equals_the_reference_bit_for_bit(nested, fmt):
    """The PyTorch path's lean dequantization equals quant_format's reference on every row range."""
    w = weight(300, 256, seed=7)
    data = (quantize_nf4(w, double_quant=nested) if fmt == "nf4" else quantize_int8(w)).data()
    for start, stop in ((0, 300), (0, 1), (17, 130), (299, 300)):
        assert torch.equal(formats.dequantize_rows(data, start, stop), data.dequantize_rows(start, stop))


def test_int8_codes_equal_bitsandbytes(monkeypatch):
    monkeypatch.setattr(formats_common, "CHUNK_ELEMENTS", 5 * 96)  # five rows at a time, the last chunk short
    w = weight(64, 96)
    ours = quantize_int8(w)
    cb, scb, _ = BF.int8_vectorwise_quant(w.clone())
    assert torch.equal(ours.qweight, cb)
    torch.testing.assert_close(ours.scale * 127, scb, rtol=1e-7, atol=0)
    torch.testing.assert_close(ours.dequantize(torch.float32), cb.float() * scb[:, None] / 127, rtol=2e-7, atol=0)


# ------------------------------------------------------------------ memory

def test_bytes_per_parameter_targets():
    w = weight(2048, 2048)
    nf4 = quantize_nf4(w, double_quant=True)
    counted = sum(t.numel() * t.element_size() for t in nf4.state_dict().values())
    assert nf4.nbytes() == counted
    assert nf4.bytes_per_param() <= 0.53
    assert quantize_nf4(w, double_quant=False).bytes_per_param() <= 0.5626  # 4 bits + one fp32 per 64
    assert quantize_int8(w).bytes_per_param() <= 1.01
    layer = QuantizedLinear(nf4)
    assert not list(layer.parameters())  # nothing trainable, nothing 16-bit
    assert all(t.dtype in (torch.uint8, torch.float32) for t in layer.state_dict().values())


# ------------------------------------------------------------------ the op against float64

def _ref(x, W, b, A, B, s, p, seed):
    keep = keep_mask(seed, x.shape, p, x.device) if p > 0 else None
    x64, W64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, W, A, B))
    b64 = None if b is None else b.detach().double().requires_grad_()
    xd = x64 if keep is None else x64 * keep / (1 - p)
    y = x64 @ W64.t() + s * (xd @ A64.t()) @ B64.t()
    if b64 is not None:
        y = y + b64
    return y, (x64, b64, A64, B64)


@pytest.mark.parametrize("fmt", ["nf4", "nf4-plain", "int8"])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_float64_reference(fmt, p, bias, monkeypatch):
    monkeypatch.setattr(formats_common, "CHUNK_ELEMENTS", 40 * 128)  # several chunks, the last one short
    N, K, M, r = 96, 128, 7, 4
    w = weight(N, K)
    qw = quantize_int8(w) if fmt == "int8" else quantize_nf4(w, double_quant=fmt == "nf4")
    W = qw.dequantize(torch.float32)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, K, generator=g, requires_grad=True)
    A = (torch.randn(r, K, generator=g) * 0.1).requires_grad_()
    B = (torch.randn(N, r, generator=g) * 0.1).requires_grad_()
    b = torch.randn(N, generator=g).requires_grad_() if bias else None
    y = lora_linear_quant(x, qw, b, A, B, 0.7, p, 1234)
    y64, leaves = _ref(x, W, b, A, B, 0.7, p, 1234)
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    dy = torch.randn(M, N, generator=g)
    y.backward(dy)
    y64.backward(dy.double())
    for ours, ref in zip((x, b, A, B), leaves):
        if ours is not None:
            torch.testing.assert_close(ours.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


def test_same_mask_and_values_as_lora_linear_on_the_dequantized_weight():
    """Dropout draws the torch row's mask from the seed, as the unquantized op does: same results."""
    qw = quantize_nf4(weight(64, 128))
    W = qw.dequantize(torch.float32)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(9, 128, generator=g)
    A, B = torch.randn(8, 128, generator=g) * 0.1, torch.randn(64, 8, generator=g) * 0.1
    y1 = lora_linear_quant(x, qw, None, A, B, 2.0, 0.5, 99, backend="torch")
    y2 = lora_linear(x, W, None, A, B, 2.0, 0.5, 99, backend="torch")
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)


def test_chunks_never_hold_the_whole_weight(monkeypatch):
    monkeypatch.setattr(formats_common, "CHUNK_ELEMENTS", 32 * 256)
    seen = []
    monkeypatch.setattr(quant_impl, "chunk_hook", lambda start, stop, w: seen.append((start, stop, w.numel())))
    N, K = 200, 256
    qw = quantize_nf4(weight(N, K))
    x = torch.randn(5, K, requires_grad=True)
    A, B = torch.randn(4, K, requires_grad=True), torch.randn(N, 4, requires_grad=True)
    lora_linear_quant(x, qw, None, A, B, 1.0).sum().backward()
    assert seen and max(n for _, _, n in seen) <= 32 * 256 < N * K
    fwd_rows = sorted((s, e) for s, e, _ in seen[: len(seen) // 2])
    assert fwd_rows[0][0] == 0 and fwd_rows[-1][1] == N  # forward and backward each cover every row once
    assert len(seen) == 2 * len(list(formats.row_chunks(N, K)))


def test_no_gradient_reaches_the_quantized_weight():
    layer = FusedLoRALinear.from_linear(QuantizedLinear(quantize_nf4(weight(64, 128))), r=4, init_lora_weights=False)
    layer(torch.randn(3, 128)).sum().backward()
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]
    assert all(not t.requires_grad for t in layer.weight.buffers())


def test_triton_row_for_quantized_ops():
    """Until fused_lora.kernels.quantized.launchers exists, asking for triton says why; once it does, it must agree with torch."""
    qw = quantize_nf4(weight(64, 128))
    x, A, B = torch.randn(16, 128), torch.randn(16, 128) * 0.1, torch.randn(64, 16) * 0.1
    if importlib.util.find_spec("fused_lora.kernels.quantized.launchers") is None:
        with pytest.raises(backends.BackendUnavailable, match="quantized base"):
            lora_linear_quant(x, qw, None, A, B, 1.0, backend="triton")
        assert backends.select(backends.Problem("quant_fwd", x.device, x.dtype, 16, 64, 128, 16), "auto").name == "torch"
    else:
        torch.testing.assert_close(lora_linear_quant(x, qw, None, A, B, 1.0, backend="triton"),
                                   lora_linear_quant(x, qw, None, A, B, 1.0, backend="torch"), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ the container

def test_to_dtype_keeps_the_packed_tensors():
    ql = QuantizedLinear(quantize_nf4(weight(64, 128)), torch.zeros(64))
    before = {k: v.clone() for k, v in ql.weight.state_dict().items()}
    ql.half()
    assert ql.weight.dtype == torch.float16 and ql.bias.dtype == torch.float16
    after = ql.weight.state_dict()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)


@pytest.mark.parametrize("nested", [False, True])
def test_state_dict_round_trip(nested):
    ql = QuantizedLinear(quantize_nf4(weight(64, 128), double_quant=nested), torch.randn(64))
    other = QuantizedLinear(quantize_nf4(weight(64, 128, seed=5), double_quant=nested), torch.zeros(64))
    other.load_state_dict(ql.state_dict())
    x = torch.randn(2, 128)
    assert torch.equal(other(x), ql(x))


def test_quantized_linear_matches_dequantized_linear():
    qw = quantize_int8(weight(48, 64))
    b = torch.randn(48)
    x = torch.randn(2, 3, 64)
    torch.testing.assert_close(QuantizedLinear(qw, b)(x), nn.functional.linear(x, qw.dequantize(), b),
                               atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ bad input

def test_bad_weights_refused_clearly():
    with pytest.raises(QuantizationError, match="multiple of the block size 64"):
        quantize_nf4(weight(8, 96))
    with pytest.raises(QuantizationError, match="blocksize"):
        quantize_nf4(weight(8, 128), blocksize=48)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_nf4(torch.ones(8, 128, dtype=torch.int32))
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_int8(torch.ones(8))
    w = weight(8, 128)
    w[0, 0] = float("nan")
    with pytest.raises(QuantizationError, match="NaN"):
        quantize_int8(w)
    with pytest.raises(ValueError, match="quant_type"):
        quant.quantize(weight(8, 128), "fp4")


def test_inconsistent_packed_data_refused():
    qw = quantize_nf4(weight(8, 128), double_quant=False)
    data = qw.data()
    bad = NF4Data(data.shape, data.packed[:-2], data.code, data.blocksize, absmax=data.absmax)
    with pytest.raises(QuantizationError, match="packed"):
        quant.QuantizedWeight(bad)
    missing = NF4Data(data.shape, data.packed, data.code, data.blocksize)  # no absmax, no nested triple
    with pytest.raises(QuantizationError, match="absmax"):
        quant.QuantizedWeight(missing)


def test_op_inputs_checked():
    qw = quantize_nf4(weight(64, 128))
    A, B = torch.randn(4, 128), torch.randn(64, 4)
    with pytest.raises(ValueError, match="weight has shape"):
        lora_linear_quant(torch.randn(3, 64), qw, None, A, B, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        lora_linear_quant(torch.randn(3, 128, dtype=torch.float64), qw, None, A, B, 1.0)
    with pytest.raises(TypeError, match="QuantizedWeight"):
        lora_linear_quant(torch.randn(3, 128), torch.randn(64, 128), None, A, B, 1.0)
    with pytest.raises(ValueError, match="seed"):
        lora_linear_quant(torch.randn(3, 128), qw, None, A, B, 1.0, dropout_p=0.1)


def test_quantize_model_all_or_nothing():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 96), nn.Linear(96, 8))
    before = [type(m) for m in model]
    with pytest.raises(QuantizationError, match=r"layer '3'.*multiple of the block size"):
        quantize_model(model, "nf4", target_modules=["0", "2", "3"])
    assert [type(m) for m in model] == before  # nothing replaced
    quantize_model(model, "nf4", target_modules=["0", "2"])
    assert isinstance(model[0], QuantizedLinear) and isinstance(model[2], QuantizedLinear)
    assert type(model[3]) is nn.Linear
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        quantize_model(nn.Sequential(nn.ReLU()), "int8")


# ------------------------------------------------------------------ the layer

def _quantized_layer(fmt="nf4", N=64, K=128, bias=True):
    lin = nn.Linear(K, N, bias=bias)
    return FusedLoRALinear.from_linear(QuantizedLinear.from_linear(lin, fmt), r=4, lora_alpha=8,
                                       init_lora_weights=False), lin


def test_layer_forward_and_to_linear():
    layer, _ = _quantized_layer()
    x = torch.randn(2, 5, 128)
    W = layer.weight.dequantize(torch.float32)
    expected = nn.functional.linear(x, W + layer.delta_weight(), layer.bias)
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    merged = layer.to_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    torch.testing.assert_close(merged(x), expected, atol=1e-5, rtol=1e-5)
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, W, layer.bias), atol=1e-5, rtol=1e-5)
    assert layer.quantized and "nf4" in repr(layer)


def test_layer_merge_refused_nothing_changed():
    layer, _ = _quantized_layer("int8")
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for call in (lambda: layer.merge(), lambda: layer.merge(safe_merge=True), lambda: layer.check_merge()):
        with pytest.raises(ValueError, match="quantized"):
            call()
    assert not layer.merged
    assert all(torch.equal(v, layer.state_dict()[k]) for k, v in before.items())


def test_layer_autocast_and_half_inputs():
    layer, _ = _quantized_layer()
    x = torch.randn(3, 128)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), layer(x), atol=0.05, rtol=0.05)


def test_get_lora_model_on_quantize_model_and_unload():
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 64))
    quantize_model(model, "nf4", target_modules=["0", "2"])
    lm = fused_lora.get_lora_model(model, fused_lora.LoraConfig(r=4, target_modules=["0", "2"],
                                                                init_lora_weights=False))
    assert all(layer.quantized for _, layer in lm.lora_layers())
    x = torch.randn(4, 128)
    y = lm(x)
    out = lm.merge_and_unload()
    assert type(out[0]) is nn.Linear and type(out[2]) is nn.Linear
    torch.testing.assert_close(out(x), y, atol=1e-5, rtol=1e-5)

    model = nn.Sequential(nn.Linear(128, 64))
    quantize_model(model, "int8", target_modules=["0"])
    packed = model[0].weight.qweight
    lm = fused_lora.get_lora_model(model, fused_lora.LoraConfig(r=4, target_modules=["0"]))
    back = lm.unload()
    assert isinstance(back[0], QuantizedLinear) and back[0].weight.qweight is packed


@pytest.mark.parametrize("fmt", ["nf4", "int8"])
def test_torch_compile_fullgraph_matches_eager(fmt):
    """Under torch.compile the custom ops run (no graph break), with the eager results and mask."""
    qw = quantize_nf4(weight(64, 128)) if fmt == "nf4" else quantize_int8(weight(64, 128))
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 128, generator=g, requires_grad=True)
    A = (torch.randn(4, 128, generator=g) * 0.1).requires_grad_()
    B = (torch.randn(64, 4, generator=g) * 0.1).requires_grad_()
    b = torch.randn(64, generator=g).requires_grad_()

    def f(x, b, A, B):
        return lora_linear_quant(x, qw, b, A, B, 0.5, 0.25, 77)

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    y1 = compiled(x, b, A, B)
    grads1 = torch.autograd.grad(y1.square().sum(), (x, b, A, B))
    y2 = f(x, b, A, B)
    grads2 = torch.autograd.grad(y2.square().sum(), (x, b, A, B))
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-6)
    for g1, g2 in zip(grads1, grads2):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-5)


def test_custom_op_opcheck():
    from fused_lora.ops import quant as quant_ops
    qw = quantize_nf4(weight(64, 128))
    x = torch.randn(5, 128, requires_grad=True)
    A, B = torch.randn(4, 128, requires_grad=True), torch.randn(64, 4, requires_grad=True)
    args = (x, *formats.op_args(qw.data()), None, A, B, 0.5, 0.0, torch.tensor(3), "torch")
    torch.library.opcheck(quant_ops.lora_linear_quant_fwd, args)


def test_double_backward_refused_clearly():
    layer, _ = _quantized_layer()
    x = torch.randn(3, 128, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_meta_device_gives_shapes():
    layer, _ = _quantized_layer()
    layer.to("meta")
    assert layer.weight.device.type == "meta"
    assert layer(torch.empty(2, 5, 128, device="meta")).shape == (2, 5, 64)
