"""torch_row.dequant_once: the quantized ops with W dequantized whole, then torch_row.dense / multi's code on it.

Outputs and every gradient against the float64 reference on the dequantized weight (the project's rule:
error <= 2 x the same-precision eager error + atol), one adapter and several in one batch, with and without
dropout (the torch row's mask), every format; and what it promises of memory: W dequantized once per
forward and once per backward that needs dX, never when dX is not asked for, and not kept after the call.

`check_single` / `check_multi` take the row, so tests/dispatch runs the same checks on the row composed
with the Triton dequantization (under the interpreter)."""
import gc
import weakref

import pytest
import torch

from fused_lora.core import formats
from fused_lora.core.dropout import keep_mask
from fused_lora.core.formats import int8, nf4
from fused_lora.core.reference import lora_linear_multi_ref
from fused_lora.core.segments import segments
from fused_lora.torch_row import quant as torch_quant
from fused_lora.torch_row.dequant_once import DequantOnce
from utils import assert_close_rule, mixed_batch_keeps, ref_forward_backward, to64

SCALING = 0.5
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = {"nf4": lambda w: nf4.quantize(w, 64, False), "nf4-nested": lambda w: nf4.quantize(w, 64, True),
           "nf4-32": lambda w: nf4.quantize(w, 32, True), "int8": int8.quantize}


def weight(fmt, N=40, K=128, seed=0, device="cpu"):
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(seed)) * K ** -0.5
    data = FORMATS[fmt](w)
    return type(data)(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in data.__dict__.items()})


def _rnd(g, dtype, device, *shape, scale=1.0):
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)


def check_single(row, data, M, r, dtype, p=0.0, bias=True, seed=1, device="cpu"):
    """The row's forward_quant and backward_quant (every gradient) against the reference."""
    N, K = data.shape
    g = torch.Generator().manual_seed(seed)
    x, b = _rnd(g, dtype, device, M, K), (_rnd(g, dtype, device, N) if bias else None)
    a, bb = _rnd(g, dtype, device, r, K, scale=K ** -0.5), _rnd(g, dtype, device, N, r, scale=r ** -0.5)
    dy = _rnd(g, dtype, device, M, N)
    kseed = 1000 + seed
    y, h = row.forward_quant(x, data, b, a, bb, SCALING, p, kseed)
    dx, dA, dB, db = row.backward_quant(dy, x, data, a, bb, h, SCALING, p, kseed, True, True, bias)
    w = data.dequantize_rows(0, N).to(dtype)  # what a 16-bit copy of the base would hold
    keep = keep_mask(kseed, (M, K), p, device) if p > 0 else None
    ins = (x.clone().requires_grad_(True), w, b, a.clone().requires_grad_(True), bb.clone().requires_grad_(True))
    y_eager, g_eager = ref_forward_backward(*ins, SCALING, dy, keep, p)
    y64, g64 = ref_forward_backward(*to64(*ins), SCALING, dy.double(), keep, p)
    assert y.shape == (M, N) and y.dtype == dtype and h.shape == (M, r)
    assert_close_rule(y, y_eager, y64, dtype, "y")
    for name, got, ge, g6 in zip(("dx", "dA", "dB"), (dx, dA, dB), (g_eager[0], g_eager[3], g_eager[4]),
                                 (g64[0], g64[3], g64[4])):
        assert got.dtype == dtype
        assert_close_rule(got, ge, g6, dtype, name)
    if bias:
        assert_close_rule(db, dy.sum(0), dy.double().sum(0), dtype, "db")
    else:
        assert db is None


def check_multi(row, data, dtype, specs, row_adapter, seed=3, device="cpu"):
    """The row's quant_multi_forward / quant_multi_backward against lora_linear_multi_ref. `specs`: (rank,
    scaling, dropout_p) per adapter."""
    N, K = data.shape
    M = row_adapter.shape[0]
    row_adapter = row_adapter.to(device)
    g = torch.Generator().manual_seed(seed)
    x, b, dy = _rnd(g, dtype, device, M, K), _rnd(g, dtype, device, N), _rnd(g, dtype, device, M, N)
    adapters = [(_rnd(g, dtype, device, r, K, scale=K ** -0.5), _rnd(g, dtype, device, N, r, scale=r ** -0.5), s, p)
                for r, s, p in specs]
    segs = segments(row_adapter, len(adapters))
    y, h = row.quant_multi_forward(x, data, b, adapters, segs, seed)
    dx, pairs, db = row.quant_multi_backward(dy, x, data, adapters, h, segs, seed, True, [True] * len(adapters), True)
    keeps = mixed_batch_keeps(row_adapter, K, [(r, p) for r, _, p in specs], seed, keep_mask)
    w = data.dequantize_rows(0, N).to(dtype)

    def reference(x, w, b, flat, dy):
        ads = [(flat[2 * i], flat[2 * i + 1], s, p) for i, (_, s, p) in enumerate(specs)]
        out = lora_linear_multi_ref(x, w, b, ads, row_adapter, keeps)
        return out.detach(), torch.autograd.grad(out, [x, *flat], dy)

    flat = [t.clone().requires_grad_(True) for a in adapters for t in a[:2]]
    y_e, g_e = reference(x.clone().requires_grad_(True), w, b, flat, dy)
    flat64 = to64(*flat)
    y64, g64 = reference(*to64(x.clone().requires_grad_(True), w, b), flat64, dy.double())
    assert_close_rule(y, y_e, y64, dtype, "y")
    assert_close_rule(dx, g_e[0], g64[0], dtype, "dx")
    for i, (dA, dB) in enumerate(pairs):
        assert_close_rule(dA, g_e[1 + 2 * i], g64[1 + 2 * i], dtype, f"dA_{i}")
        assert_close_rule(dB, g_e[2 + 2 * i], g64[2 + 2 * i], dtype, f"dB_{i}")
    assert_close_rule(db, dy.sum(0), dy.double().sum(0), dtype, "db")


ROW = DequantOnce(formats.dequantize)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("p,bias", [(0.0, True), (0.25, False)])
def test_one_adapter_against_the_float64_reference(fmt, dtype, p, bias):
    check_single(ROW, weight(fmt, 40, 128, seed=2), 37, 5, dtype, p, bias)


@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("dropout", [False, True])
def test_several_adapters_against_the_float64_reference(fmt, dtype, dropout):
    row_adapter = torch.randint(-1, 3, (45,), generator=torch.Generator().manual_seed(5))
    specs = [(3, 0.5, 0.3 if dropout else 0.0), (5, 2.0, 0.0), (1, -1.25, 0.1 if dropout else 0.0)]
    check_multi(ROW, weight(fmt, 24, 192, seed=4), dtype, specs, row_adapter)


def test_same_results_as_the_chunked_torch_row():
    # The dropout mask is the torch row's: with dropout the two rows agree to rounding (H bit for bit).
    data = weight("nf4-nested", 40, 128, seed=6)
    g = torch.Generator().manual_seed(7)
    x, a, b, dy = torch.randn(30, 128, generator=g), torch.randn(4, 128, generator=g) * 0.1, \
        torch.randn(40, 4, generator=g) * 0.3, torch.randn(30, 40, generator=g)
    y, h = ROW.forward_quant(x, data, None, a, b, SCALING, 0.3, 11)
    y_t, h_t = torch_quant.forward_quant(x, data, None, a, b, SCALING, 0.3, 11)
    assert torch.equal(h, h_t)
    torch.testing.assert_close(y, y_t)
    got = ROW.backward_quant(dy, x, data, a, b, h, SCALING, 0.3, 11, True, True, False)
    want = torch_quant.backward_quant(dy, x, data, a, b, h_t, SCALING, 0.3, 11, True, True, False)
    for g1, g2 in zip(got, want):
        assert (g1 is None) == (g2 is None)
        if g2 is not None:
            torch.testing.assert_close(g1, g2)


class Counting:
    """A dequantizer that counts its calls and knows which of its results are still alive."""

    def __init__(self):
        self.calls, self.refs = 0, []

    def __call__(self, data, dtype):
        self.calls += 1
        w = formats.dequantize(data, dtype)
        self.refs.append(weakref.ref(w))
        return w

    def alive(self) -> int:
        gc.collect()
        return sum(r() is not None for r in self.refs)


@pytest.mark.parametrize("need_dx,need_lora", [(True, True), (False, True), (True, False), (False, False)])
def test_w_is_dequantized_per_call_only_when_needed_and_never_kept(need_dx, need_lora):
    counting = Counting()
    row = DequantOnce(counting)
    data = weight("nf4-nested", 40, 128)
    g = torch.Generator().manual_seed(8)
    x, a, b, dy = torch.randn(9, 128, generator=g), torch.randn(4, 128, generator=g), \
        torch.randn(40, 4, generator=g), torch.randn(9, 40, generator=g)
    y, h = row.forward_quant(x, data, None, a, b, SCALING, 0.0, 1)
    assert counting.calls == 1 and counting.alive() == 0
    dx, dA, dB, db = row.backward_quant(dy, x, data, a, b, h, SCALING, 0.0, 1, need_dx, need_lora, False)
    assert counting.calls == 1 + need_dx and counting.alive() == 0
    assert (dx is not None) == need_dx and (dA is not None) == need_lora and (dB is not None) == need_lora
    segs = segments(torch.tensor([0, -1, 0, 0, -1, 0, 0, 0, 0]), 1)
    adapters = [(a, b, SCALING, 0.0)]
    y, h = row.quant_multi_forward(x, data, None, adapters, segs, 1)
    assert counting.calls == 2 + need_dx and counting.alive() == 0
    dx, pairs, _ = row.quant_multi_backward(dy, x, data, adapters, h, segs, 1, need_dx, [need_lora], False)
    assert counting.calls == 2 + 2 * need_dx and counting.alive() == 0
    assert (dx is not None) == need_dx and (pairs[0] is not None) == need_lora


def test_keep_mask_is_the_torch_rows():
    assert DequantOnce.keep_mask is keep_mask and ROW.keep_mask is keep_mask
