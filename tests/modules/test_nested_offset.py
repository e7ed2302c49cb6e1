"""The nested NF4 `offset` buffer is the one truth: every way of changing it (an in-place write, a new tensor
in its place as a device move makes, load_state_dict, a copy of the module) is seen by the next forward,
backward, dequantize and merge, in eager mode and under torch.compile, while an unchanged offset is not read
from the device again (on a GPU that read is a device-to-host sync). A write of NaN or inf is refused.

References: the quant_format reference dequantization with the offset read from the buffer by the test, in
float64.

issue 18 item 6 (and item 26: NaN and inf separately).
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear
from fused_lora.modules.quantized import QuantizationError, QuantizedLinear, quantize_nf4
from fused_lora.core.formats import NF4Data

N, K = 64, 128


def _quantized_linear(seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * K ** -0.5
    return QuantizedLinear(quantize_nf4(w, double_quant=True), torch.randn(N, generator=g))


def reference_weight(qw) -> torch.Tensor:
    """W in float64 from the buffers as they are now: the reference dequantization, the offset read here."""
    get = qw._buffers.get
    data = NF4Data((N, K), get("packed"), get("code"), qw.blocksize, qabsmax=get("qabsmax"), code2=get("code2"),
                   absmax2=get("absmax2"), blocksize2=qw.blocksize2, offset=float(get("offset")))
    return data.dequantize_rows(0, N).double()


def reference(ql, x):
    return x.double() @ reference_weight(ql.weight).T + ql.bias.double()


WRITES = {
    "add_": lambda t: t.add_(1.0),
    "copy_": lambda t: t.copy_(torch.tensor(-0.75)),
    "fill_": lambda t: t.fill_(2.5),
    "mul_": lambda t: t.mul_(-3.0),
    "setitem": lambda t: t.__setitem__((), 0.5),
    "data_assign": lambda t: setattr(t, "data", torch.tensor(0.25)),  # no version bump: a new data pointer
}


@pytest.mark.parametrize("write", list(WRITES))
def test_inplace_write_to_offset_is_seen_by_the_next_forward(write):
    """A write to the offset buffer after a forward (which read it) is seen by the next forward: in place, or
    through `.data =` (which keeps the version count); the output follows the float64 reference with the new
    offset, not the old one."""
    ql = _quantized_linear()
    x = torch.randn(5, K)
    y_old = ql(x)
    torch.testing.assert_close(y_old.double(), reference(ql, x), atol=1e-5, rtol=1e-5)
    WRITES[write](ql.weight.offset)
    y = ql(x)
    torch.testing.assert_close(y.double(), reference(ql, x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(y, y_old, atol=1e-3)


def test_offset_write_is_seen_by_the_adapted_layer_backward_dequantize_and_merge():
    """Over an adapted layer: forward, dx, a mixed-adapter batch, dequantize() and to_linear() all follow a
    write made after each of them ran once."""
    torch.manual_seed(0)
    layer = FusedLoRALinear.from_linear(_quantized_linear(), r=4, lora_alpha=8, init_lora_weights=False)
    layer.add_adapter("b", r=2, init_lora_weights=False)
    x = torch.randn(4, K, requires_grad=True)
    names = ["default", "b", "__base__", "default"]

    def run():
        y = layer(x)
        (dx,) = torch.autograd.grad(y.sum(), x)
        return y, dx, layer(x, adapter_names=names), layer.weight.dequantize(), layer.to_linear().weight

    run()
    layer.weight.offset.add_(0.5)
    y, dx, y_mixed, W, merged = run()
    W64 = reference_weight(layer.weight)
    delta = layer.delta_weight().double()
    x64 = x.detach().double()
    torch.testing.assert_close(y.double(), x64 @ (W64 + delta).T + layer.bias.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx.double(), torch.ones(4, N, dtype=torch.float64) @ (W64 + delta), atol=1e-5,
                               rtol=1e-5)
    torch.testing.assert_close(W.double(), W64, atol=0, rtol=0)
    torch.testing.assert_close(merged.double(), W64 + delta, atol=1e-6, rtol=1e-6)
    base_row = x64[2] @ W64.T + layer.bias.double()
    torch.testing.assert_close(y_mixed[2].double(), base_row, atol=1e-5, rtol=1e-5)


def test_new_offset_tensor_in_place_of_the_buffer_is_seen():
    """A new tensor put in the buffer's place (what a device move or accelerate's loading does), even with the
    same version count as the old one, is read."""
    ql = _quantized_linear()
    x = torch.randn(3, K)
    ql(x)
    ql.weight.offset = torch.tensor(float(ql.weight.offset) + 1.0)
    torch.testing.assert_close(ql(x).double(), reference(ql, x), atol=1e-5, rtol=1e-5)


def test_load_state_dict_after_a_forward_is_seen():
    ql, src = _quantized_linear(0), _quantized_linear(1)
    x = torch.randn(3, K)
    ql(x)
    ql.load_state_dict(src.state_dict())
    assert torch.equal(ql(x), src(x))


def test_a_copy_has_its_own_offset():
    """deepcopy: a write to the copy's offset is seen by the copy, not by the original (and the other way)."""
    ql = _quantized_linear()
    x = torch.randn(3, K)
    y = ql(x)
    twin = copy.deepcopy(ql)
    twin.weight.offset.add_(1.0)
    assert torch.equal(ql(x), y)
    torch.testing.assert_close(twin(x).double(), reference(twin, x), atol=1e-5, rtol=1e-5)
    ql.weight.offset.sub_(1.0)
    torch.testing.assert_close(ql(x).double(), reference(ql, x), atol=1e-5, rtol=1e-5)


def test_offset_write_under_inference_mode_is_seen():
    """A weight quantized and written inside torch.inference_mode (whose tensors carry no version counter)."""
    with torch.inference_mode():
        ql = _quantized_linear()
        x = torch.randn(3, K)
        ql(x)
        ql.weight.offset.add_(1.0)
        y = ql(x)
    torch.testing.assert_close(y.double(), reference(ql, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call", ["base", "adapted", "mixed"])
def test_offset_write_is_seen_under_torch_compile(call):
    """Compiled (fullgraph) forwards and backwards: a write between two compiled calls is seen by the second,
    through each custom op that takes the weight (the base alone, one adapter, a mixed-adapter batch)."""
    torch.manual_seed(0)
    ql = _quantized_linear()
    x = torch.randn(4, K, requires_grad=True)
    names = ["default", "b", "__base__", "default"]
    zero = torch.zeros(N, K, dtype=torch.float64)
    if call == "base":
        module, extra, deltas = ql, {}, [zero] * 4
    else:
        module = FusedLoRALinear.from_linear(ql, r=4, lora_alpha=8, init_lora_weights=False)
        module.add_adapter("b", r=2, init_lora_weights=False)
        per_name = {"default": module.delta_weight().double(), "b": module.delta_weight("b").double(),
                    "__base__": zero}
        extra = {} if call == "adapted" else {"adapter_names": names}
        deltas = [per_name["default"]] * 4 if call == "adapted" else [per_name[n] for n in names]
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: module(t, **extra), fullgraph=True)
    for write in (None, lambda t: t.add_(1.0), lambda t: t.mul_(-2.0)):
        if write is not None:
            write(ql.weight.offset)
        y = compiled(x)
        (dx,) = torch.autograd.grad(y.sum(), x)
        W64 = reference_weight(ql.weight)
        for i, delta in enumerate(deltas):
            W = W64 + delta
            torch.testing.assert_close(y[i].double(), x[i].detach().double() @ W.T + ql.bias.double(),
                                       atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(dx[i].double(), W.sum(0), atol=1e-5, rtol=1e-5)


def _count_reads(monkeypatch, tensor) -> list:
    """A list that gets an entry each time `tensor`'s value is read to the host (float(t), t.item()). Patched
    at Python level: it sees reads inside compiled graphs' custom ops and in inference mode, where a dispatch
    mode does not."""
    reads, ptr = [], tensor.data_ptr()
    for name in ("__float__", "item"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original):
            if not self.is_meta and self.data_ptr() == ptr:
                reads.append(1)
            return _original(self, *args)
        monkeypatch.setattr(torch.Tensor, name, counted)
    return reads


@pytest.mark.parametrize("mode", ["eager", "inference_mode", "compiled"])
def test_unchanged_offset_is_not_read_on_every_forward(mode, monkeypatch):
    """The offset's value is read to the host once after each change, not on every forward or backward (on a
    GPU each read is a device-to-host sync): eagerly, in inference mode (whose tensors keep no version counter:
    the weight keeps its offset a tensor that does) and inside a compiled graph. The one read after a write
    shows the count sees the reads there are."""
    context = torch.inference_mode() if mode == "inference_mode" else contextlib.nullcontext()
    with context:
        ql = _quantized_linear()
        x = torch.randn(3, K, requires_grad=mode != "inference_mode")
        torch._dynamo.reset()
        run = torch.compile(ql, fullgraph=True) if mode == "compiled" else ql

        def step():
            y = run(x)
            if x.requires_grad:
                y.sum().backward()
            return y

        step()
        reads = _count_reads(monkeypatch, ql.weight.offset)
        for _ in range(3):
            step()
        assert len(reads) == 0
        ql.weight.offset.add_(1.0)
        for _ in range(3):
            y = step()
        assert len(reads) == 1
    torch.testing.assert_close(y.detach().double(), reference(ql, x.detach()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_offset_write_refused_at_the_next_forward(bad):
    """NaN, or inf, written into the offset: the next forward (and dequantize) refuses by name instead of
    computing NaN (issue 18 item 26: NaN and inf separately)."""
    ql = _quantized_linear()
    x = torch.randn(3, K)
    ql(x)
    ql.weight.offset.fill_(float(bad))
    word = {"nan": "NaN", "inf": "inf"}[bad]
    with pytest.raises(QuantizationError, match=rf"offset holds {word}\b"):
        ql(x)
    with pytest.raises(QuantizationError, match=rf"offset holds {word}\b"):
        ql.weight.dequantize()


def test_custom_ops_take_the_offset_as_a_tensor_opcheck():
    """The compiled form of the layout (the offset buffer as a sixth packed tensor, read when the op runs) passes
    torch.library.opcheck for the base op and the LoRA op, and computes what the float form computes."""
    from dataclasses import replace

    from fused_lora.core import formats as quant
    from fused_lora.ops import quant as quant_ops
    qw = _quantized_linear().weight
    x = torch.randn(5, K, requires_grad=True)
    A, B = torch.randn(4, K, requires_grad=True), torch.randn(N, 4, requires_grad=True)
    as_tensor = quant.op_args(replace(qw.data(), offset=qw.offset))
    as_float = quant.op_args(qw.data())
    assert len(as_tensor[0]) == 6 and as_tensor[0][5] is qw.offset and as_tensor[2] == 0.0
    torch.library.opcheck(quant_ops.quant_linear_fwd, (x, *as_tensor, None))
    lora = (None, A, B, 0.5, 0.0, torch.tensor(3), "torch")
    torch.library.opcheck(quant_ops.lora_linear_quant_fwd, (x, *as_tensor, *lora))
    torch.testing.assert_close(quant_ops.lora_linear_quant_fwd(x, *as_tensor, *lora)[0],
                               quant_ops.lora_linear_quant_fwd(x, *as_float, *lora)[0], atol=0, rtol=0)
