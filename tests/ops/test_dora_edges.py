"""Review of DoRA: cases the first tests did not reach, each against an independent truth (the float64
reference formula, or peft's own DoRA layer)."""
import copy

import peft
import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, patch_peft
from fused_lora.core.reference import dora_linear_ref
from fused_lora.ops.dora import dora_linear


def _truth(layer, x):
    """peft's DoRA output of `layer` (no dropout) in float64, from the layer's current tensors."""
    return dora_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                           layer.lora_B.double(), layer.lora_magnitude_vector.double(), layer.scaling)


def _layer(seed=0):
    """A DoRA layer with B nonzero and its magnitude off its init (there m / n = 1: DoRA's column scale unseen)."""
    torch.manual_seed(seed)
    layer = FusedLoRALinear(64, 32, r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, backend="torch")
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.rand(32) + 0.5)
    return layer


def test_base_weight_written_through_data_after_a_forward_is_seen():
    # `.data` writes (HF's _init_weights, many loaders) do not bump the weight's version counter; the
    # norm must follow the weight anyway.
    layer, x = _layer(), torch.randn(5, 64)
    layer(x)
    layer.weight.data.mul_(2.0)
    torch.testing.assert_close(layer(x), _truth(layer, x).float())


def test_base_weight_changed_between_autocast_steps_is_seen():
    # Under autocast the op gets a fresh cast copy of W per forward; the allocator reuses its address,
    # so a cache keyed on the copy hit after an in-place (versioned) write of the layer's own weight.
    layer, x = _layer(), torch.randn(5, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(2):
            layer(x).float().sum().backward()
        with torch.no_grad():
            layer.weight.mul_(3.0)
        y = layer(x)
    truth = _truth(layer, x)
    assert (y.double() - truth).abs().max() <= 0.02 * truth.abs().max()  # bfloat16 rounding, not a stale norm


def test_patched_peft_layer_sees_a_base_weight_written_through_data():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40))
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True,
                                                    target_modules=["0"]))
    ours = copy.deepcopy(ref)
    patch_peft(ours, verbose=False)
    x = torch.randn(3, 24)
    ours(x)
    for model in (ours, ref):
        model.base_model.model[0].base_layer.weight.data.mul_(2.0)
    torch.testing.assert_close(ours(x), ref(x))


def test_dora_on_a_meta_device_base_builds_as_peft():
    # Models built under torch.device("meta") (weights loaded later): peft's DoRA builds a meta magnitude;
    # LoRA here builds too. The norm's cancellation guard read a meta tensor's value (RuntimeError).
    from fused_lora import LoraConfig, get_lora_model
    with torch.device("meta"):
        base, base_ref = nn.Sequential(nn.Linear(24, 40)), nn.Sequential(nn.Linear(24, 40))
    ref = peft.get_peft_model(base_ref, peft.LoraConfig(r=4, target_modules=["0"], use_dora=True))
    ours = get_lora_model(base, LoraConfig(r=4, target_modules=["0"], use_dora=True))
    m = ours.base_model.model[0].lora_magnitude_vector
    m_ref = ref.base_model.model[0].lora_magnitude_vector["default"].weight
    assert m.is_meta and m.shape == m_ref.shape and m.dtype == m_ref.dtype and m.requires_grad


def test_merge_unmerge_then_forward_equals_the_unmerged_output():
    layer, x = _layer(), torch.randn(5, 64)
    before = _truth(layer, x).float()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)  # one more fp32 rounding of W
    layer.unmerge()
    torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_trained_bias_with_dora_equals_peft(bias, tmp_path):
    # peft trains the base bias beside DoRA (the bias is outside the weight norm: its gradient is dY's
    # column sum); get_lora_model accepted the config, then the first forward raised.
    from fused_lora import LoraConfig, get_lora_model
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))
    cfg = dict(r=4, lora_alpha=8, target_modules=["0", "2"], use_dora=True, bias=bias)
    torch.manual_seed(1)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**cfg))
    torch.manual_seed(1)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(**cfg))
    with torch.no_grad():  # B nonzero and A, B the same in both: at B = 0 the outputs are the base's, dA is 0
        for i in ("0", "2"):
            layer, layer_ref = ours.base_model.model.get_submodule(i), ref.base_model.model.get_submodule(i)
            layer.lora_A.copy_(layer_ref.lora_A["default"].weight)
            layer.lora_B.copy_(torch.nn.init.normal_(layer_ref.lora_B["default"].weight))
    x = torch.randn(16, 24)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    y.pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    for i in ("0", "2"):
        layer, layer_ref = ours.base_model.model.get_submodule(i), ref.base_model.model.get_submodule(i)
        assert layer.bias.grad is not None
        torch.testing.assert_close(layer.bias.grad, layer_ref.base_layer.bias.grad)
        torch.testing.assert_close(layer.lora_magnitude_vector.grad,
                                   layer_ref.lora_magnitude_vector["default"].weight.grad)
        torch.testing.assert_close(layer.lora_A.grad, layer_ref.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad, layer_ref.lora_B["default"].weight.grad)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_bias_gradient_and_gradcheck(backend):
    from utils import make_problem
    x, w, b, a, bb = make_problem(7, 12, 9, 3, dtype=torch.float64)
    w.requires_grad_(False)
    m = (torch.rand(9, dtype=torch.float64) + 0.5).requires_grad_()
    from fused_lora.ops.dora import dora_linear
    if backend == "torch":
        # x, b and m only: the norm (a function of A and B) is detached, which gradcheck's numerics do not know
        assert torch.autograd.gradcheck(lambda x, b, m: dora_linear(x, w, b, a.detach(), bb.detach(), m, 1.3,
                                                                    backend="torch"), (x, b, m))
    else:  # the Triton kernels (interpreter on the CPU) in float32, against the float64 reference
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        args = [t.detach().float().to(dev).requires_grad_(t.requires_grad) for t in (x, w, b, a, bb, m)]
        dy = torch.randn(7, 9, dtype=torch.float64)
        dora_linear(*args[:5], args[5], 1.3, backend="triton").backward(dy.float().to(dev))
        b64 = b.detach().clone().requires_grad_()
        dora_linear_ref(x.detach(), w, b64, a.detach(), bb.detach(), m.detach(), 1.3).backward(dy)
        torch.testing.assert_close(args[2].grad.double().cpu(), b64.grad, rtol=1e-5, atol=1e-5)


def test_patch_peft_fuses_dora_with_a_trained_bias():
    from fused_lora import dispatch as backends
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 8))
    ref = peft.get_peft_model(base, peft.LoraConfig(r=4, init_lora_weights=False, use_dora=True, bias="all",
                                                    target_modules=["0", "2"], lora_dropout=0.2))
    with torch.no_grad():  # off their init (m / n = 1 there: DoRA's column scale unseen)
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    ours = copy.deepcopy(ref)
    patch_peft(ours, verbose=False)
    x = torch.randn(5, 24)
    before = backends.calls[("dora_fwd", "torch")]
    torch.manual_seed(4)
    ours(x).pow(2).sum().backward()
    assert backends.calls[("dora_fwd", "torch")] == before + 2  # fused, not peft's forward
    torch.manual_seed(4)
    ref(x).pow(2).sum().backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_unmerge_restores_rows_whose_magnitude_is_zero():
    # c_j = m_j / n_j = 0 zeroes row j of the merged weight: W / c cannot bring it back, and unmerge raised
    # (blaming an overflow) with the layer stuck merged. The rows are kept at merge, as the norm is.
    layer, x = _layer(), torch.randn(5, 64)
    with torch.no_grad():
        layer.lora_magnitude_vector[[2, 7]] = 0.0
    w0, before = layer.weight.detach().clone(), _truth(layer, x).float()
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), before)


def test_in_place_write_into_the_output_raises_or_checkpoints_correctly():
    # The op keeps its output Y for dm (no copy): an in-place write into Y must raise autograd's error,
    # never give a wrong dm; non-reentrant checkpointing (recomputes Y) gives peft's dm.
    from torch.utils.checkpoint import checkpoint
    layer, x, res = _layer(), torch.randn(5, 64), torch.randn(5, 32)

    def f(x):
        y = layer(x)
        y += res
        return y
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        f(x).pow(2).sum().backward()
    layer.zero_grad()
    checkpoint(f, x, use_reentrant=False).pow(2).sum().backward()
    m = layer.lora_magnitude_vector.detach().double().requires_grad_()
    y = dora_linear_ref(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                        layer.lora_B.double(), m, layer.scaling)
    (y + res.double()).pow(2).sum().backward()
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, m.grad.float())


@pytest.mark.parametrize("shape", [(0, 64), (2, 0, 64)])
def test_empty_batch_as_peft(shape):
    # An MoE expert that receives no tokens calls its linears on 0 rows: peft's DoRA (and LoRA here)
    # return an empty output with zero gradients; the DoRA layer raised ValueError.
    layer = _layer()
    layer.train()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x)
    assert y.shape == (*shape[:-1], 32)
    y.sum().backward()
    for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector):
        assert p.grad is not None and not p.grad.any()
    assert x.grad.shape == x.shape


def test_unmerge_restores_zero_magnitude_rows_of_a_conv1d_base():
    from transformers.pytorch_utils import Conv1D  # in x out weight: the rows are its columns
    torch.manual_seed(0)
    layer = FusedLoRALinear.from_linear(Conv1D(32, 64), r=4, use_dora=True, init_lora_weights=False,
                                        backend="torch")
    with torch.no_grad():
        layer.lora_magnitude_vector[[1, 5]] = 0.0
    x = torch.randn(3, 64)
    w0, before = layer.weight.detach().clone(), layer(x).detach()
    layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(layer(x), before)


@pytest.mark.parametrize("weight_sq, error, match", [
    ([1.0] * 6, TypeError, "weight_sq must be a tensor"),
    (torch.ones(3), ValueError, r"weight_sq has shape \(3,\), expected \(6,\)"),
    (torch.ones(6, 1), ValueError, r"weight_sq has shape \(6, 1\), expected \(6,\)"),
    (torch.ones(6, dtype=torch.int64), TypeError, "weight_sq has dtype torch.int64"),
    (torch.ones(6, device="meta"), ValueError, "weight_sq is on meta but weight is on cpu"),
])
def test_a_bad_weight_sq_is_refused_by_name(weight_sq, error, match):
    """dora_linear's weight_sq (||W_j||^2 the caller knows): its kind, shape, dtype and device are checked before
    anything runs (a deep RuntimeError, an AttributeError or a silently wrong result before; found by fuzzing)."""
    g = torch.Generator().manual_seed(0)
    x, w, a, b = (torch.randn(*s, generator=g) for s in ((4, 5), (6, 5), (2, 5), (6, 2)))
    with pytest.raises(error, match=match):
        dora_linear(x, w, None, a, b, torch.linalg.norm(w, dim=1), 1.0, backend="torch", weight_sq=weight_sq)

