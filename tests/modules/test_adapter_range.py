"""An adapter's values against the dtype its LoRA branch is computed in (fused_lora.modules.adapter_range):
issue 18, attacker re-trial, finding 1 (and the scale of finding 7).

The fused ops compute in one dtype, the input's; fp32 adapters on an fp16 model (peft's default,
autocast_adapter_dtype=True) are cast to fp16 on every call. With lora_alpha = 2e-4, r = 2 (s = 1e-4) and
|B| = 1e5, s B = 10 is harmless and peft's output and the float64 reference are finite, but B itself is
beyond fp16 (65504): the cast made it inf and every forward path gave NaN. Now every path refuses by name;
an adapter inside the range runs and matches the float64 reference; and where a gradient still overflows
the compute dtype it is inf / NaN (what GradScaler skips), never finite and wrong.
"""
import pytest
import torch
from torch import nn

from fused_lora import AdapterRangeError, FusedLoRALinear, LoraConfig, get_lora_model, quantize_model
from utils import TRITON_DEVICE, assert_close_rule, needs_triton

S_ALPHA, R = 2e-4, 2  # s = 1e-4
BEYOND_FP16 = "lora_B holds 100000, beyond the range of torch.float16"


class Net(nn.Module):
    def __init__(self, dtype=torch.float16, width=64):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(width, 16).to(dtype)
        self.b = nn.Linear(16, 4).to(dtype)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def adapted(dtype=torch.float16, use_dora=False, quantized=False, b_value=1e5, lora_alpha=S_ALPHA, **kw):
    """Net with an fp32 adapter (get_lora_model's default) on `a`: A = 0.1, B = b_value."""
    model = Net(dtype)
    if quantized:
        model = quantize_model(model, target_modules=["a"])
    lm = get_lora_model(model, LoraConfig(r=R, lora_alpha=lora_alpha, target_modules=["a"], init_lora_weights=False,
                                          use_dora=use_dora, backend="torch"), **kw)
    layer = dict(lm.lora_layers())["a"]
    with torch.no_grad():
        layer.lora_A.fill_(0.1)
        layer.lora_B.fill_(b_value)
    return lm.eval(), layer


def x16(dtype=torch.float16, rows=4):
    return torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("path", ["lora", "dora", "mixed", "one-named", "quantized", "training"])
def test_an_fp32_adapter_beyond_fp16_is_refused_by_every_forward_path(path):
    """Each path casting the adapter to fp16 refuses it naming the adapter, the tensor and the dtype (before:
    NaN outputs where peft and the float64 reference are finite)."""
    lm, layer = adapted(use_dora=path == "dora", quantized=path == "quantized")
    assert layer.lora_B.dtype == torch.float32 and layer.scaling == pytest.approx(1e-4)
    kwargs = {}
    if path in ("mixed", "one-named"):
        lm.add_adapter("other", LoraConfig(r=R, target_modules=["a"], backend="torch"))
        kwargs["adapter_names"] = ["default", "other", "default", "__base__"] if path == "mixed" else ["default"] * 4
    if path == "training":
        lm.train()
    with pytest.raises(AdapterRangeError, match=f"adapter 'default': {BEYOND_FP16}"):
        lm(x16(), **kwargs)


def test_the_adapter_is_refused_under_autocast_too():
    """An fp32 model and adapter under torch.autocast(float16): the compute dtype is the autocast dtype."""
    lm, _ = adapted(dtype=torch.float32)
    assert torch.isfinite(lm(x16(torch.float32))).all()  # fp32 holds it
    with torch.autocast("cpu", dtype=torch.float16), pytest.raises(AdapterRangeError, match=BEYOND_FP16):
        lm(x16(torch.float32))


def test_a_write_torch_does_not_count_is_still_seen_on_the_cpu():
    """On the CPU the values are read on every such call: a write through .data (no version bump) is caught."""
    lm, layer = adapted(b_value=1.0)
    lm(x16())
    layer.lora_B.data.fill_(1e5)
    with pytest.raises(AdapterRangeError, match=BEYOND_FP16):
        lm(x16())


def reference64(lm, layer, x):
    """The model's function in float64 (the adapter's values as they are, fp32)."""
    m = lm.get_base_model()
    h = x.double() @ layer.weight.double().t() + layer.bias.double()
    h = h + layer.scaling * (x.double() @ layer.lora_A.double().t()) @ layer.lora_B.double().t()
    return torch.relu(h) @ m.b.weight.double().t() + m.b.bias.double()


def eager(lm, layer, x):
    """The same function in x's dtype, the adapter cast to it: the same-precision error the rule allows twice."""
    m = lm.get_base_model()
    A, B = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)
    h = x @ layer.weight.t() + layer.bias + layer.scaling * (x @ A.t()) @ B.t()
    return m.b(torch.relu(h))


IN_RANGE = [pytest.param("torch", torch.float16, 6e4, id="torch-fp16-6e4"),
            pytest.param("torch", torch.bfloat16, 1e5, id="torch-bf16-1e5"),
            pytest.param("triton", torch.float16, 6e4, id="triton-fp16-6e4", marks=needs_triton(TRITON_DEVICE,
                                                                                                   torch.float16))]


@pytest.mark.parametrize("backend, dtype, b_value", IN_RANGE)
def test_an_adapter_inside_the_range_runs_and_matches_float64(backend, dtype, b_value):
    """The rule refuses nothing the compute dtype holds: |B| = 6e4 in fp16 and 1e5 in bf16 run, within the
    project's tolerance of the float64 reference (bf16 on the torch row: the interpreter's bf16 dot is wrong)."""
    lm, layer = adapted(dtype=dtype, b_value=b_value)
    layer.backend = backend
    x = x16(dtype).to(TRITON_DEVICE if backend == "triton" else "cpu")
    lm.to(x.device)
    with torch.no_grad():
        y = lm(x)
    assert torch.isfinite(y).all()
    assert_close_rule(y, eager(lm, layer, x), reference64(lm, layer, x), dtype, "fp32 adapter in range")


def test_s_times_b_beyond_the_compute_dtype_is_refused():
    """An fp16 adapter (no cast) whose s B does not fit fp16: the PyTorch rows form s B in the compute dtype."""
    lm, _ = adapted(b_value=1e4, lora_alpha=16, autocast_adapter_dtype=False)  # s = 8: s B = 8e4
    with pytest.raises(AdapterRangeError, match=r"s \* lora_B reaches 80000 \(s = 8, \|lora_B\| up to 10000\), "
                                                r"beyond the range of torch.float16"):
        lm(x16())


# ---------------------------------------------------------------- the scale itself (finding 7)

def test_a_scale_beyond_float32_is_refused_naming_lora_alpha():
    """lora_alpha = 1e39 with r = 2 (s = 5e38 > float32's 3.4e38): refused by LoraConfig, the layer and
    add_adapter (before: accepted, then every forward raised torch's "value cannot be converted")."""
    with pytest.raises(ValueError, match=r"LoraConfig: lora_alpha=1e\+39 gives the scale lora_alpha / r = 5e\+38, "
                                         r"beyond the range of torch.float32"):
        LoraConfig(r=2, lora_alpha=1e39, target_modules=["a"])
    with pytest.raises(ValueError, match=r"lora_alpha=1e\+39 .* beyond the range of torch.float32"):
        FusedLoRALinear(8, 4, r=2, lora_alpha=1e39)
    layer = FusedLoRALinear(8, 4, r=2)
    with pytest.raises(ValueError, match=r"lora_alpha / sqrt\(r\) = 5e\+38"):
        layer.add_adapter("big", r=4, lora_alpha=1e39, use_rslora=True)
    assert layer.available_adapters == ("default",)


def test_a_scale_beyond_the_layer_s_dtype_is_refused_when_the_layer_is_built():
    """s = 5e5 over an fp16 base (the mixed-batch row multiplies fp16 tensors by s): refused when the layer
    is built; a model cast to fp16 afterwards is refused at its forward, naming the scale."""
    with pytest.raises(ValueError, match=r"lora_alpha=1e\+06 gives the scale lora_alpha / r = 500000, beyond the "
                                         r"range of torch.float16 .* this layer computes in"):
        get_lora_model(Net(torch.float16), LoraConfig(r=2, lora_alpha=1e6, target_modules=["a"]))
    lm = get_lora_model(Net(torch.float32), LoraConfig(r=2, lora_alpha=1e6, target_modules=["a"]))
    lm.half()
    with pytest.raises(AdapterRangeError, match=r"its scale s = 500000 \(lora_alpha / r\) is beyond the range of "
                                                r"torch.float16"):
        lm(x16())


# ---------------------------------------------------------------- gradients

GRADIENT_CASES = {  # (lora_alpha, B, |x|, |dY|): s |H| or |dY| s |B| beyond fp16 in the gradients' products
    "large-scale": (1.2e5, 1e-5, 4.0, 1.0),
    "loss-scaled-dy": (2.0, 1.0, 1.0, 1.5e4),
    "in-range": (2.0, 1.0, 1.0, 1e3),
}


@pytest.mark.parametrize("case", GRADIENT_CASES)
@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_triton(TRITON_DEVICE, torch.float16))])
def test_a_gradient_is_right_or_not_finite_never_finite_and_wrong(backend, case):
    """fp16 compute, fp32 adapters: every gradient entry is either within the rule's tolerance of the float64
    reference or inf / NaN (which GradScaler skips); the overflowing cases do overflow somewhere (so the
    test can fail) and the in-range one is finite everywhere."""
    alpha, b_value, x_scale, dy_scale = GRADIENT_CASES[case]
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 12, r=2, lora_alpha=alpha, init_lora_weights=False, dtype=torch.float16,
                            adapter_dtype=torch.float32, backend=backend).to(TRITON_DEVICE if backend == "triton"
                                                                             else "cpu")
    with torch.no_grad():
        layer.lora_A.fill_(0.1)
        layer.lora_B.fill_(b_value)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 16, generator=g) * x_scale).half().to(layer.weight.device)
    dy = (torch.randn(64, 12, generator=g) * dy_scale).half().to(layer.weight.device)
    layer(x).backward(dy)
    A64, B64 = (t.detach().double().requires_grad_() for t in (layer.lora_A, layer.lora_B))
    y64 = x.double() @ layer.weight.double().t() + layer.bias.double() + layer.scaling * (x.double() @ A64.t()) @ B64.t()
    y64.backward(dy.double())
    non_finite = 0
    for name, got, want in (("dA", layer.lora_A.grad, A64.grad), ("dB", layer.lora_B.grad, B64.grad)):
        assert got.dtype == torch.float32
        finite = torch.isfinite(got)
        non_finite += int((~finite).sum())
        err = (got.double() - want).abs()[finite]
        bound = 2e-3 * want.abs().max().item()  # fp16 products, fp32 accumulation: ~1e-3 relative
        assert err.numel() == 0 or err.max().item() <= bound, f"{name}: a finite gradient {err.max():.3g} off"
    assert (non_finite > 0) == (case != "in-range")


def test_gradscaler_skips_the_step_of_an_overflowing_gradient():
    """What the documentation promises for the overflowing case: torch's GradScaler finds the inf and skips
    the optimizer step (the adapter is unchanged) and lowers its scale."""
    alpha, b_value, x_scale, dy_scale = GRADIENT_CASES["loss-scaled-dy"]
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 12, r=2, lora_alpha=alpha, init_lora_weights=False, dtype=torch.float16,
                            adapter_dtype=torch.float32, backend="torch")
    with torch.no_grad():
        layer.lora_B.fill_(b_value)
    before = [t.detach().clone() for t in (layer.lora_A, layer.lora_B)]
    opt = torch.optim.SGD([layer.lora_A, layer.lora_B], lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=dy_scale)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(64, 16, generator=g) * x_scale).half()
    pattern = torch.randn(64, 12, generator=g)  # dY = the loss scale times this
    scaler.scale((layer(x).float() * pattern).sum()).backward()
    assert not all(torch.isfinite(t.grad).all() for t in (layer.lora_A, layer.lora_B))
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(t, b) for t, b in zip((layer.lora_A, layer.lora_B), before))
    assert scaler.get_scale() < dy_scale


def test_an_fp32_adapter_beyond_fp16_is_refused_on_an_expert_stack():
    """The expert-stack base kind casts its adapter to the stack's dtype as the others do: the same rule refuses
    |B| = 1e5 into fp16 by name (before: the cast gave inf and the output NaN), and runs it in fp32."""
    from fused_lora.modules.bases import ExpertStack
    torch.manual_seed(0)
    stack = torch.randn(2, 6, 8).half()
    layer = FusedLoRALinear.from_linear(ExpertStack(stack), r=R, lora_alpha=S_ALPHA, adapter_dtype=torch.float32)
    with torch.no_grad():
        layer.lora_A.fill_(1e-3)
        layer.lora_B.fill_(1e5)
    x, group_sizes = torch.randn(5, 8).half(), torch.tensor([3, 2])
    with pytest.raises(AdapterRangeError, match=f"adapter 'default': {BEYOND_FP16}"):
        layer(x, group_sizes=group_sizes)
    wide = FusedLoRALinear.from_linear(ExpertStack(stack.float()), r=R, lora_alpha=S_ALPHA)
    with torch.no_grad():
        wide.lora_A.fill_(1e-3)
        wide.lora_B.fill_(1e5)
    assert torch.isfinite(wide(x.float(), group_sizes=group_sizes)).all()
