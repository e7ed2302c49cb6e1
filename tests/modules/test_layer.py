"""FusedLoRALinear: construction, init, forward semantics, dropout, merging, errors."""
import math
import warnings

import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear
from fused_lora.core.reference import lora_linear_ref
from utils import TRITON_DEVICE, needs_triton


def make_layer(K=12, N=10, r=4, **kw):
    torch.manual_seed(0)
    kw.setdefault("init_lora_weights", False)
    return FusedLoRALinear(K, N, r=r, lora_alpha=8, **kw)


def test_attributes_and_scaling():
    layer = FusedLoRALinear(20, 30, r=4, lora_alpha=16)
    assert layer.lora_A.shape == (4, 20) and layer.lora_B.shape == (30, 4)
    assert layer.scaling == 4.0 and layer.r == 4 and layer.lora_alpha == 16 and not layer.merged
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert FusedLoRALinear(20, 30, r=4, lora_alpha=16, use_rslora=True).scaling == 8.0


@pytest.mark.parametrize("init", [True, "gaussian"])
def test_init_starts_at_base(init):
    torch.manual_seed(0)
    layer = FusedLoRALinear(400, 30, r=4, init_lora_weights=init)
    assert torch.count_nonzero(layer.lora_B @ layer.lora_A) == 0
    assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
    x = torch.randn(5, 400)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    if init == "gaussian":  # std 1/r = 0.25; 1,600 samples: standard error ~0.0045
        assert abs(layer.lora_A.std().item() - 1 / 4) < 0.03
    else:  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)), std 1/sqrt(3 fan_in)
        assert layer.lora_A.abs().max().item() <= 1 / math.sqrt(400)
        assert abs(layer.lora_A.std().item() - 1 / math.sqrt(3 * 400)) < 0.003


def test_from_linear_shares_storage_and_freezes():
    lin = nn.Linear(8, 6)
    layer = FusedLoRALinear.from_linear(lin, r=2)
    assert layer.weight is lin.weight and layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.bias.data_ptr() == lin.bias.data_ptr()
    assert not lin.weight.requires_grad
    with pytest.raises(TypeError, match="nn.Linear"):
        FusedLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


@pytest.mark.parametrize("shape", [(7, 12), (2, 3, 12), (0, 12), (12,)])
def test_leading_shapes_match_reference(shape):
    layer = make_layer()
    x = torch.randn(*shape)
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    y = layer(x)
    assert y.shape == shape[:-1] + (10,)
    torch.testing.assert_close(y, ref)


def test_frozen_base_gets_no_gradient():
    layer = make_layer()
    layer(torch.randn(4, 12, requires_grad=True)).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    assert layer.lora_A.grad is not None and layer.lora_B.grad is not None


def test_eval_and_zero_dropout_are_exact():
    layer = make_layer(lora_dropout=0.5)
    x = torch.randn(6, 12)
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    layer.eval()
    torch.testing.assert_close(layer(x), ref)
    layer.train()
    assert not torch.allclose(layer(x), ref)


def test_dropout_same_mask_forward_and_backward():
    """dA = G^T (D x) and H = (D x) A^T must use one mask: check grads against the reference with it."""
    from fused_lora.torch_row import dense as torch_impl
    layer = make_layer(lora_dropout=0.4)
    x = torch.randn(9, 12, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    keep = torch_impl.keep_mask(seed, x.shape, 0.4, "cpu")
    ref = lora_linear_ref(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, keep, 0.4)
    torch.testing.assert_close(y, ref)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, layer.lora_A, layer.lora_B), dy)
    want = torch.autograd.grad(ref, (x, layer.lora_A, layer.lora_B), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_dropout_keep_rate_within_bounds():
    from fused_lora.torch_row import dense as torch_impl
    n, p = 200_000, 0.1
    keep = torch_impl.keep_mask(42, (n,), p, "cpu")
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rate - (1 - p)) < 5 * sigma


def test_merge_unmerge_roundtrip_and_outputs():
    layer = make_layer()
    x = torch.randn(5, 12)
    before_w = layer.weight.detach().clone()
    y = layer(x)
    layer.merge(safe_merge=True)
    assert layer.merged
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(layer.weight, before_w + layer.scaling * layer.lora_B @ layer.lora_A)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    torch.testing.assert_close(layer(x), y)  # no double add
    layer.unmerge()
    torch.testing.assert_close(layer.weight, before_w)
    with pytest.warns(UserWarning, match="not merged"):
        layer.unmerge()


def test_merged_forward_is_base_matmul_only():
    layer = make_layer()
    layer.merge()
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)


def test_safe_merge_refuses_non_finite_and_leaves_weight():
    layer = make_layer()
    with torch.no_grad():
        layer.lora_B[0, 0] = float("inf")
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, w) and not layer.merged


def test_to_linear_and_disable_adapter():
    layer = make_layer()
    x = torch.randn(4, 12)
    lin = layer.to_linear()
    assert type(lin) is nn.Linear
    torch.testing.assert_close(lin(x), layer(x))
    with layer.disable_adapter():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    assert not torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        with layer.disable_adapter():
            pass


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_autocast(dtype):
    layer = make_layer(dtype=dtype)
    x = torch.randn(6, 12, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    ref = lora_linear_ref(*(t.double() for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)), layer.scaling)
    assert (y.double() - ref).abs().max() < 0.05
    layer32 = make_layer()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer32(torch.randn(6, 12))
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert layer32.lora_A.grad.dtype == torch.float32


def test_fp32_adapter_on_bf16_base():
    lin = nn.Linear(12, 10).to(torch.bfloat16)
    layer = FusedLoRALinear.from_linear(lin, r=4, init_lora_weights=False, adapter_dtype=torch.float32)
    x = torch.randn(5, 12, dtype=torch.bfloat16)
    y = layer(x)
    y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and layer.lora_A.grad.dtype == torch.float32


def test_bad_inputs_have_clear_errors():
    layer = make_layer()
    with pytest.raises(ValueError, match="in_features is 12"):
        layer(torch.randn(3, 11))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 12, dtype=torch.int64))
    with pytest.raises(TypeError, match="does not match"):
        layer(torch.randn(3, 12, dtype=torch.float64))
    with pytest.raises(ValueError, match="on meta"):
        layer(torch.randn(3, 12, device="meta"))
    with pytest.raises(ValueError, match="r must be"):
        FusedLoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear(4, 4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="lora_dropout"):
        FusedLoRALinear(4, 4, lora_dropout=-0.1)
    with pytest.raises(ValueError, match="backend"):
        FusedLoRALinear(4, 4, backend="cuda-please")


def test_repr_names_sizes_and_backend():
    text = repr(FusedLoRALinear(20, 30, r=4, lora_alpha=16, lora_dropout=0.1))
    for part in ("in_features=20", "out_features=30", "r=4", "lora_alpha=16", "lora_dropout=0.1", "backend=torch"):
        assert part in text


def test_compiles_fullgraph_without_breaks():
    layer = make_layer(lora_dropout=0.1)
    x = torch.randn(5, 12, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    torch.testing.assert_close(y, layer(x))
    y.sum().backward()
    assert layer.lora_A.grad is not None


def test_from_linear_with_bad_settings_leaves_the_linear_alone():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="r must be"):
        FusedLoRALinear.from_linear(lin, r=0)
    assert lin.weight.requires_grad and lin.bias.requires_grad


# ---------------------------------------------------------------- merging in the weight's own dtype

def _overflowing_fp16_layer():
    """A float16 layer whose merged weight is finite in float32 (~7e4) but overflows float16 (max 65504)."""
    layer = make_layer(K=4, N=3, r=2, dtype=torch.float16)
    with torch.no_grad():
        layer.weight.fill_(6e4)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)  # (B @ A)[n, k] = r = 2
    layer.scaling = 5000.0  # delta 1e4: 6e4 + 1e4 = 7e4 > 65504
    return layer


def test_safe_merge_checks_in_the_weight_dtype():
    layer = _overflowing_fp16_layer()
    w = layer.weight.detach().clone()
    assert torch.isfinite(layer.weight.float() + layer.delta_weight()).all()  # finite before rounding
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, w) and not layer.merged
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.to_linear(safe_merge=True)
    assert torch.equal(layer.weight, w) and not layer.merged


def test_safe_merge_bfloat16_rounding_overflow():
    """bfloat16's max (3.39e38) is below float32's: a sum in between is finite only before rounding."""
    layer = make_layer(K=2, N=2, r=1, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.fill_(3.3895e38)
        layer.lora_A.fill_(1.0)
        layer.lora_B.fill_(1.0)
    # delta 1e36 (r = 1): W + delta = 3.3995e38 lies between bfloat16's rounding limit (3.3963e38)
    # and float32's max (3.4028e38)
    layer.scaling = 1e36
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.weight, w) and not layer.merged


def test_unmerge_after_an_overflowing_merge_refuses():
    """merge() without safe_merge writes inf (peft's behaviour); unmerge cannot restore W from it and says so."""
    layer = _overflowing_fp16_layer()
    layer.merge()
    assert layer.merged and not torch.isfinite(layer.weight).all()
    w = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot be restored"):
        layer.unmerge()
    assert layer.merged and torch.equal(layer.weight, w)


def test_merge_of_a_float64_layer_keeps_float64_precision():
    layer = make_layer(dtype=torch.float64)
    want = layer.weight.detach().clone() + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    lin = layer.to_linear()
    layer.merge(safe_merge=True)
    assert (layer.weight - want).abs().max() < 1e-13
    assert (lin.weight - want).abs().max() < 1e-13


# ---------------------------------------------------------------- meta device and empty sizes, as nn.Linear

@pytest.mark.parametrize("train", [False, True])
def test_meta_device_forward_propagates_shapes(train):
    layer = FusedLoRALinear(12, 10, r=4, lora_dropout=0.1, device="meta").train(train)
    lin = nn.Linear(12, 10, device="meta")
    x = torch.empty(2, 3, 12, device="meta", requires_grad=True)
    y = layer(x)
    assert y.device.type == "meta" and y.shape == lin(x).shape == (2, 3, 10)
    y.sum().backward()  # shapes of the gradients too
    assert layer.lora_A.grad.shape == (4, 12) and layer.lora_A.grad.is_meta and x.grad.shape == x.shape


def test_meta_layer_to_empty_then_loaded_matches():
    source = make_layer()
    layer = FusedLoRALinear(12, 10, r=4, lora_alpha=8, device="meta")
    layer.to_empty(device="cpu")
    layer.load_state_dict(source.state_dict())
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), source(x), rtol=0, atol=0)
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer(x), source(x))


BACKEND_DEVICES = [("torch", "cpu"), pytest.param("triton", TRITON_DEVICE, marks=needs_triton(TRITON_DEVICE, rank=2))]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
def test_in_features_zero_behaves_as_linear(bias, backend, device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's "Initializing zero-element tensors is a no-op", as for nn.Linear
        layer = FusedLoRALinear(0, 5, r=2, bias=bias, backend=backend, init_lora_weights=False, device=device)
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.arange(5.0))
    x = torch.empty(3, 0, requires_grad=True, device=device)
    y = layer(x)
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias), rtol=0, atol=0)
    y.sum().backward()
    assert layer.lora_A.grad.shape == (2, 0) and torch.count_nonzero(layer.lora_B.grad) == 0


@pytest.mark.parametrize("backend, device", BACKEND_DEVICES)
@pytest.mark.parametrize("shape", [(0, 12), (2, 0, 12), (0, 0, 12)])
def test_zero_size_batches_and_out_features(backend, device, shape):
    layer = make_layer(backend=backend, lora_dropout=0.2, device=device)
    x = torch.randn(*shape, requires_grad=True, device=device)
    y = layer(x)
    assert y.shape == shape[:-1] + (10,)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.count_nonzero(layer.lora_A.grad) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-element init, as for nn.Linear(12, 0)
        empty_out = FusedLoRALinear(12, 0, r=2, backend=backend, device=device)
    assert empty_out(torch.randn(*shape, device=device)).shape == shape[:-1] + (0,)
    x = torch.randn(3, 12, requires_grad=True, device=device)
    out = empty_out(x)
    assert out.shape == (3, 0)
    out.sum().backward()
    assert torch.count_nonzero(x.grad) == 0


def test_attribute_names_follow_the_active_adapter_parameter_names_never_do():
    """Issue 18 item 24: after set_adapter("task_b"), `layer.lora_A` is task_b's tensor while the
    parameter named "lora_A" is still the "default" adapter's. Which is which, as documented in the
    class docstring and docs/ADAPTERS.md: attributes are the active adapter's view, names are storage
    (a one-adapter layer keeps exactly its keys; keys never depend on the active adapter), and
    the active adapter is what an optimizer built from the trainable parameters trains."""
    layer = make_layer(K=6, N=5, r=2)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]  # a one-adapter layer's keys
    layer.add_adapter("task_b", r=3, init_lora_weights=False)  # B != 0: both of task_b's tensors get gradients
    layer.set_adapter("task_b")
    named = dict(layer.named_parameters())
    assert layer.lora_A is named["lora_adapters.task_b.lora_A"] and layer.lora_B is named["lora_adapters.task_b.lora_B"]
    assert named["lora_A"] is layer.adapter_weights("default")[0] and named["lora_A"] is not layer.lora_A
    assert layer.lora_A.shape == (3, 6) and layer.r == 3  # every attribute is the active adapter's
    trainable = [n for n, p in layer.named_parameters() if p.requires_grad]
    assert trainable == ["lora_adapters.task_b.lora_A", "lora_adapters.task_b.lora_B"]
    assert [n for n in named if "lora_A" in n] == ["lora_A", "lora_adapters.task_b.lora_A"]  # a name filter: all
    keys = list(layer.state_dict())
    layer.set_adapter("default")
    assert list(layer.state_dict()) == keys and layer.lora_A is dict(layer.named_parameters())["lora_A"]
    layer.set_adapter("task_b")
    opt = torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=1.0)
    before = {n: p.detach().clone() for n, p in layer.named_parameters()}
    layer(torch.randn(4, 6)).square().sum().backward()
    opt.step()
    changed = sorted(n for n, p in layer.named_parameters() if not torch.equal(p, before[n]))
    assert changed == ["lora_adapters.task_b.lora_A", "lora_adapters.task_b.lora_B"]
