"""DoRA (use_dora=True): the norm identity, the op against a float64 reference and gradcheck, the
Triton kernels under the interpreter, the layer and models against peft's DoRA (outputs, gradients,
training, adapter files both ways, merging), and the refusals."""
import copy

import peft  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from fused_lora import FusedLoRALinear, LoraConfig, LoraModel, get_lora_model
from fused_lora import dispatch as backends  # noqa: E402
from fused_lora.core import dora_norm
from fused_lora.ops import dora  # noqa: E402
from fused_lora.peft_compat.adapters import AdapterError  # noqa: E402
from fused_lora.core.dora_norm import weight_norm
from fused_lora.ops.dora import dora_linear  # noqa: E402
from fused_lora.cli.finetune import build_llama, counting_batches  # noqa: E402
from fused_lora.core.reference import dora_linear_ref  # noqa: E402

from utils import ATOL, make_problem, one_batch_losses, to64  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"  # the Triton kernels: compiled on a GPU, else through the interpreter
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TRITON_SHAPES = [(37, 45, 53, 5), (70, 33, 40, 17)] + ([(1000, 1100, 900, 16), (517, 2048, 300, 64)] if CUDA else [])


def direct_norm64(w, a, b, s):
    """||W + s B A|| per row, formed in float64: the truth the identity is held to."""
    return torch.linalg.norm(w.detach().double() + s * (b.detach().double() @ a.detach().double()), dim=1)


# ------------------------------------------------------------------ the norm

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_norm_identity_equals_the_direct_norm(dtype):
    x, w, _, a, b = make_problem(4, 96, 80, 8, dtype=dtype, requires_grad=False)
    for s in (0.5, 2.0, 16.0):  # the low-rank term from small to dominant
        got = weight_norm(w, a, b, s)
        assert got.dtype == torch.float32
        # fp32 accumulation of a K-term sum: a few ulps of n^2 (the inputs are exact in either dtype)
        torch.testing.assert_close(got.double(), direct_norm64(w, a, b, s), rtol=2e-6, atol=0)


def test_weight_norm_survives_cancellation_that_breaks_the_plain_identity(monkeypatch):
    # Adversarial rows: W_j = -s B_j A + tiny, so n_j is ~1e-4 of ||W_j||: the identity alone loses
    # n_j^2 to cancellation (relative error ~ eps32 * ||W_j||^2 / n_j^2 ~ 1e1); the guard recomputes them.
    _, w, _, a, b = make_problem(1, 64, 40, 4, requires_grad=False)
    s = 2.0
    w = w.clone()
    w[::3] = -s * (b[::3] @ a) + 1e-4 * torch.randn(len(range(0, 40, 3)), 64)
    truth = direct_norm64(w, a, b, s)
    # Forming W + s B A in fp32 (peft's way) itself cancels (relative error ~ eps32 |s B_j A| / n_j): the
    # identity with its guard is held to twice that error of peft's direct fp32 norm (plus a few ulps).
    peft_err = ((torch.linalg.norm(w + s * (b @ a), dim=1).double() - truth).abs() / truth)
    err = (weight_norm(w, a, b, s).double() - truth).abs() / truth
    assert (err <= 2 * peft_err + 1e-6).all(), (err.max(), peft_err.max())
    monkeypatch.setattr(dora_norm, "CANCELLATION", 0.0)  # the identity alone: far off on the bad rows
    err = ((weight_norm(w, a, b, s).double() - truth).abs() / truth).max()
    assert err > 1e-2


def test_weight_norm_float64():
    _, w, _, a, b = make_problem(1, 33, 21, 3, dtype=torch.float64, requires_grad=False)
    assert weight_norm(w, a, b, 1.5).dtype == torch.float64
    torch.testing.assert_close(weight_norm(w, a, b, 1.5), direct_norm64(w, a, b, 1.5), rtol=1e-12, atol=0)


# ------------------------------------------------------------------ the op

def _op_case(M, K, N, r, dtype, bias, seed=0, zero_m=False, device="cpu"):
    x, w, b, a, bb = make_problem(M, K, N, r, dtype=dtype, bias=bias, seed=seed, device=device)
    w.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    g = torch.Generator().manual_seed(seed + 1)
    m = (torch.rand(N, generator=g, dtype=torch.float64).to(device) + 0.5) * direct_norm64(w, a, bb, 1.3)
    if zero_m:
        m[::4] = 0.0  # c_j = 0: Y holds nothing of Y0 there; dm comes from x directly
    m = m.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype).requires_grad_()
    dy = torch.randn(M, N, generator=g, dtype=torch.float64).to(device)
    return x, w, b, a, bb, m, dy


def _check_op(backend, M, K, N, r, dtype, bias, zero_m=False, device="cpu", weight_in_by_out=False):
    x, w, b, a, bb, m, dy = _op_case(M, K, N, r, dtype, bias, zero_m=zero_m, device=device)
    if weight_in_by_out:  # a Conv1D's layout: the op reads W (N x K) through a transposed view
        w = w.t().contiguous().t()
    y = dora_linear(x, w, b, a, bb, m, 1.3, backend=backend)
    y.backward(dy.to(dtype))
    x64, w64, b64, a64, bb64, m64 = to64(x, w, b, a, bb, m)
    y64 = dora_linear_ref(x64, w64, b64, a64, bb64, m64, 1.3)
    y64.backward(dy)
    # The same formula in the same precision, eagerly (peft's way): the error scale of this dtype.
    xe, we, be, ae, bbe, me = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad)
                               for t in (x, w, b, a, bb, m)]
    ye = dora_linear_ref(xe, we, be, ae, bbe, me.to(dtype), 1.3)
    ye.backward(dy.to(dtype))
    for name, got, eager, want in (("y", y, ye, y64), ("dx", x.grad, xe.grad, x64.grad),
                                   ("dA", a.grad, ae.grad, a64.grad), ("dB", bb.grad, bbe.grad, bb64.grad),
                                   ("dm", m.grad, me.grad, m64.grad)):
        err = (got.double() - want).abs().max().item()
        # fp32 dots on a GPU run as TF32 (Triton's default): fp16-level slack there, as tests/utils.py says
        atol = ATOL["tf32"] if (device == "cuda" and backend == "triton" and dtype == torch.float32) else ATOL[dtype]
        bound = 2 * (eager.double() - want).abs().max().item() + atol * max(1.0, want.abs().max().item())
        assert err <= bound, f"{backend} {dtype} {name}: {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 45, 53, 5), (8, 64, 32, 16), (3, 40, 70, 2)])  # M<K and M>K folds
def test_op_torch_matches_float64_reference(shape, bias, dtype):
    _check_op("torch", *shape, dtype, bias)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_with_a_transposed_weight_view(backend):
    _check_op(backend, 21, 30, 26, 3, torch.float32, True, device=DEVICE if backend == "triton" else "cpu",
              weight_in_by_out=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_op_zero_magnitude_columns_get_their_gradient(backend):
    _check_op(backend, 19, 24, 28, 3, torch.float32, True, zero_m=True, device=DEVICE if backend == "triton" else "cpu")


@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_op_triton_kernels_match_float64_reference(shape, bias, dtype):
    before = (backends.calls[("dora_fwd", "triton")], backends.calls[("dora_bwd", "triton")])
    _check_op("triton", *shape, dtype, bias, device=DEVICE)
    assert (backends.calls[("dora_fwd", "triton")], backends.calls[("dora_bwd", "triton")]) == \
        (before[0] + 1, before[1] + 1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("wanted", [(True, False, False, False), (False, True, True, False), (False, False, False, True)])
def test_op_computes_only_the_gradients_asked_for(backend, wanted):
    x, w, b, a, bb, m, dy = _op_case(13, 20, 18, 3, torch.float32, True, device=DEVICE if backend == "triton" else "cpu")
    for t, want in zip((x, a, bb, m), wanted):
        t.requires_grad_(want)
    dora_linear(x, w, b, a, bb, m, 1.3, backend=backend).backward(dy.float())
    x64, a64, bb64, m64 = to64(x, a, bb, m)
    dora_linear_ref(x64, w.double(), b.double(), a64, bb64, m64, 1.3).backward(dy)
    for t, t64, want in zip((x, a, bb, m), (x64, a64, bb64, m64), wanted):
        assert (t.grad is not None) == want
        if want:
            torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-5, atol=1e-5 if not CUDA else 5e-3)


def test_op_gradcheck_float64():
    x, w, b, a, bb, m, _ = _op_case(6, 7, 5, 2, torch.float64, True)
    f = lambda x, a, bb, m: dora_linear(x, w, b, a, bb, m, 1.3, backend="torch")  # noqa: E731
    # The norm is detached (peft's and the paper's DoRA): gradcheck compares against the numerical
    # derivative of a function whose norm moves with A and B, so A and B are checked through the
    # reference's analytical gradients above and x and m here, where the norm does not depend on them.
    assert torch.autograd.gradcheck(lambda x, m: f(x, a.detach(), bb.detach(), m), (x, m))
    # A and B: against the numerical derivative with the norm frozen at its value (the detach's meaning).
    n = direct_norm64(w, a, bb, 1.3)
    frozen = lambda x, a, bb, m: (m / n) * (x @ w.t() + 1.3 * (x @ a.t()) @ bb.t()) + b  # noqa: E731
    out = f(x, a, bb, m)
    grads = torch.autograd.grad(out, (x, a, bb, m), torch.ones_like(out))
    for i, t in enumerate((x, a, bb, m)):
        num = torch.autograd.functional.jacobian(lambda v: frozen(*[v if j == i else u.detach()
                                                                   for j, u in enumerate((x, a, bb, m))]).sum(),
                                                 t.detach())
        torch.testing.assert_close(grads[i], num, rtol=1e-10, atol=1e-10)


def test_op_saves_no_more_than_lora_plus_one_row():
    # Memory held for backward: LoRA's (x, H, W, A, B, seed) plus the op's output Y itself (the caller's
    # tensor, not a copy), the magnitude parameter itself, and one fp32 vector of N (the norm).
    x, w, b, a, bb, m, _ = _op_case(64, 48, 40, 4, torch.float32, True)
    from fused_lora.ops.lora import lora_linear

    def held(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = fn()
        return out, seen
    y_lora, lora = held(lambda: lora_linear(x, w, b, a, bb, 1.3, backend="torch"))
    y_dora, held_dora = held(lambda: dora_linear(x, w, b, a, bb, m, 1.3, backend="torch"))
    y_ptr = y_dora.untyped_storage().data_ptr()
    assert y_ptr in held_dora  # Y is kept as the caller's tensor, not a copy
    dora_bytes = sum(n for p, n in held_dora.items() if p not in (y_ptr, b.untyped_storage().data_ptr()))
    m_ptr = m.untyped_storage().data_ptr()  # the magnitude parameter itself, not a copy
    dora_bytes -= held_dora.get(m_ptr, 0)
    assert dora_bytes <= sum(lora.values()) + 4 * 40, (held_dora, lora)  # + n: one fp32 row of N


def test_op_refuses_bad_inputs():
    x, w, b, a, bb, m, _ = _op_case(5, 6, 7, 2, torch.float32, True)
    with pytest.raises(ValueError, match="magnitude has shape"):
        dora_linear(x, w, b, a, bb, m[:3], 1.0)
    with pytest.raises(TypeError, match="magnitude must be a tensor"):
        dora_linear(x, w, b, a, bb, [1.0] * 7, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        dora_linear(x, w.detach().requires_grad_(), b, a, bb, m, 1.0)
    with pytest.raises(ValueError, match="lora_B has shape"):
        dora_linear(x, w, b, a, bb[:, :1], m, 1.0)
    with pytest.raises(ValueError, match="empty"):
        dora_linear(x[:0], w, b, a, bb, m, 1.0)
    y = dora_linear(x, w, b, a, bb, m, 1.0)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(y.sum(), x, create_graph=True)


# ------------------------------------------------------------------ against peft's DoRA

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 12)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _peft_dora(base, **cfg):
    """A peft DoRA model with B nonzero and a magnitude moved off its init, so every term matters."""
    cfg = {"r": 4, "lora_alpha": 8, "init_lora_weights": False, "use_dora": True, **cfg}
    torch.manual_seed(1)
    ref = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.rand_like(p) + 0.5)
    return ref


def _ours_from(ref, tmp_path, base, is_trainable=True):
    ref.save_pretrained(tmp_path / "peft")
    return LoraModel.from_pretrained(base, str(tmp_path / "peft"), is_trainable=is_trainable)


def _assert_same_grads(ours, ref):
    got = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    def ours_name(n):
        n = n.replace("base_model.model.", "model.", 1).replace(".default", "").replace("base_layer.", "")
        for t in ("lora_A", "lora_B", "lora_magnitude_vector"):
            n = n.replace(f"{t}.weight", t)
        return n
    want = {ours_name(n): p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and any("lora_magnitude_vector" in k for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_mlp_outputs_and_gradients_equal_peft(tmp_path):
    base = MLP()
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1", "fc2"])
    ours = _ours_from(ref, tmp_path, copy.deepcopy(base))
    assert ours.base_model.model.fc1.use_dora
    x = torch.randn(3, 5, 24)
    y, y_ref = ours(x), ref(x)
    torch.testing.assert_close(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    _assert_same_grads(ours, ref)


def test_dropout_matches_peft_formula_with_the_same_random_stream(tmp_path):
    base = MLP()
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1", "fc2"], lora_dropout=0.3)
    ours = _ours_from(ref, tmp_path, copy.deepcopy(base))
    ours.train()
    ref.train()
    x = torch.randn(4, 24)
    torch.manual_seed(7)
    y = ours(x)
    torch.manual_seed(7)
    y_ref = ref(x)
    torch.testing.assert_close(y, y_ref)  # peft's formula, not the paper's: (c - 1) on the dropped input
    y.sum().backward()
    y_ref.sum().backward()
    _assert_same_grads(ours, ref)


def test_llama_outputs_and_gradients_equal_peft(tmp_path):
    ref = _peft_dora(build_llama("tiny"), target_modules="all-linear")
    ours = _ours_from(ref, tmp_path, build_llama("tiny"))
    tokens = next(counting_batches(256, 2, 12, seed=1))
    loss, loss_ref = ours(input_ids=tokens, labels=tokens).loss, ref(input_ids=tokens, labels=tokens).loss
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    _assert_same_grads(ours, ref)


def test_twenty_adamw_steps_equal_peft_losses(tmp_path):
    ref = _peft_dora(build_llama("tiny"), target_modules=["q_proj", "v_proj", "down_proj"])
    ours = _ours_from(ref, tmp_path, build_llama("tiny"))
    tokens = next(counting_batches(256, 4, 16, seed=3))
    losses = {key: one_batch_losses(model, tokens) for key, model in (("ours", ours), ("ref", ref))}
    assert losses["ours"][-1] < losses["ours"][0]
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["ref"]))


def test_get_lora_model_initialises_the_magnitude_as_peft(tmp_path):
    base = MLP()
    torch.manual_seed(3)
    ref = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["fc1"], use_dora=True))
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["fc1"], use_dora=True))
    m = ours.base_model.model.fc1.lora_magnitude_vector
    assert m.requires_grad and m.shape == (40,)
    torch.testing.assert_close(m, ref.base_model.model.fc1.lora_magnitude_vector["default"].weight)
    x = torch.randn(2, 24)
    assert torch.equal(ours(x), base(x))  # B = 0: the layer starts as its base, bit for bit (issue 18 item 28)
    assert ours.get_nb_trainable_parameters()[0] == ref.get_nb_trainable_parameters()[0]


def test_adapter_files_move_both_ways(tmp_path):
    base = MLP()
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1", "fc2"])
    ours = _ours_from(ref, tmp_path, copy.deepcopy(base), is_trainable=False)
    with torch.no_grad():
        ours.base_model.model.fc2.lora_magnitude_vector.mul_(1.5)  # ours now differs from ref
    ours.save_pretrained(str(tmp_path / "ours"))
    from safetensors.torch import load_file
    keys = set(load_file(str(tmp_path / "ours" / "adapter_model.safetensors")))
    assert keys == set(peft.get_peft_model_state_dict(ref))  # peft's key names exactly
    back = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours"))
    x = torch.randn(3, 24)
    torch.testing.assert_close(back(x), ours(x))
    assert not torch.allclose(back(x), ref(x))


def test_merge_unmerge_and_merge_and_unload_equal_peft(tmp_path):
    base = MLP()
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1", "fc2"])
    ours = _ours_from(ref, tmp_path, copy.deepcopy(base))
    x = torch.randn(3, 24)
    before = ours(x).detach()
    layer, layer_ref = ours.base_model.model.fc1, ref.base_model.model.fc1
    w0 = layer.weight.detach().clone()
    layer.merge()
    layer_ref.merge()
    torch.testing.assert_close(layer.weight, layer_ref.base_layer.weight)
    torch.testing.assert_close(ours(x), before)
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)
    torch.testing.assert_close(ours(x), before)  # the ||W||^2 cache followed the weight back
    layer_ref.unmerge()
    merged = ours.merge_and_unload()
    merged_ref = ref.merge_and_unload()
    torch.testing.assert_close(merged.fc2.weight, merged_ref.fc2.weight)
    torch.testing.assert_close(merged(x), merged_ref(x))
    torch.testing.assert_close(merged(x), before)


def test_layer_to_linear_and_safe_merge():
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 12, r=3, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.3)
    x = torch.randn(4, 16)
    torch.testing.assert_close(layer.to_linear()(x), layer(x))
    layer.merge(safe_merge=True)
    torch.testing.assert_close(layer(x), layer.to_linear()(x))
    assert layer.merged_adapters == ["default"]


def test_patch_peft_fuses_dora_layers():
    from fused_lora import patch_peft
    base = MLP()
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1", "fc2"], lora_dropout=0.2)
    ours = copy.deepcopy(ref)
    patch_peft(ours, verbose=False)
    assert ours.fused_lora_report.patched == ["base_model.model.fc1", "base_model.model.fc2"]
    x = torch.randn(5, 24)
    for mode in ("train", "eval"):
        getattr(ours, mode)()
        getattr(ref, mode)()
        before = backends.calls[("dora_fwd", "torch")]
        torch.manual_seed(2)
        y = ours(x)
        torch.manual_seed(2)
        y_ref = ref(x)
        assert backends.calls[("dora_fwd", "torch")] == before + 2
        torch.testing.assert_close(y, y_ref)
    ours.train()
    ref.train()
    torch.manual_seed(4)
    ours(x).sum().backward()
    torch.manual_seed(4)
    ref(x).sum().backward()
    for (n, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        if q.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, msg=n)


def test_triton_layer_through_the_interpreter(tmp_path):
    base = MLP()
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1", "fc2"])
    ref.save_pretrained(tmp_path / "p")
    ours = LoraModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "p"), is_trainable=True,
                                     backend="triton").to(DEVICE)
    x = torch.randn(7, 24)
    y, y_ref = ours(x.to(DEVICE)).cpu(), ref(x)
    tol = dict(rtol=1e-4, atol=1e-5) if not CUDA else dict(rtol=5e-3, atol=5e-3)  # TF32 on a GPU
    torch.testing.assert_close(y, y_ref, **tol)
    y.sum().backward()
    y_ref.sum().backward()
    g = ours.base_model.model.fc1.lora_magnitude_vector.grad.cpu()
    torch.testing.assert_close(g, ref.base_model.model.fc1.lora_magnitude_vector["default"].weight.grad, **tol)


# ------------------------------------------------------------------ what DoRA refuses

def test_dora_refusals(tmp_path):
    base = MLP()
    model = get_lora_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    with pytest.raises(ValueError, match="only the first adapter"):
        model.add_adapter("more", LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["fc1"]))  # a LoRA beside it is fine
    layer = model.base_model.model.fc1
    with pytest.raises(ValueError, match="not supported with a DoRA adapter"):
        layer(torch.randn(2, 24), adapter_names=["default", "plain"])
    with pytest.raises(ValueError, match="merged alone"):
        layer.merge(adapter_names=["default", "plain"])
    assert not layer.merged and "plain" in layer.available_adapters
    with pytest.raises(NotImplementedError, match="DoRA"):
        model.add_weighted_adapter(["default"], [1.0], "w")
    ref = _peft_dora(copy.deepcopy(base), target_modules=["fc1"])
    ref.save_pretrained(tmp_path / "d")
    with pytest.raises(AdapterError, match="only the first adapter"):
        model.load_adapter(str(tmp_path / "d"), adapter_name="second")
    with pytest.raises(TypeError, match="use_dora"):
        FusedLoRALinear(4, 4, use_dora="yes")


def test_set_adapter_moves_the_magnitudes_trainability():
    model = get_lora_model(MLP(), LoraConfig(r=2, target_modules=["fc1"], use_dora=True))
    model.add_adapter("plain", LoraConfig(r=2, target_modules=["fc1"]))
    layer = model.base_model.model.fc1
    model.set_adapter("plain")
    assert not layer.lora_magnitude_vector.requires_grad and not layer.use_dora
    model.set_adapter("default")
    assert layer.lora_magnitude_vector.requires_grad and layer.use_dora


def test_gpt2_conv1d_outputs_gradients_and_merge_equal_peft(tmp_path):
    import transformers
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    ref = _peft_dora(copy.deepcopy(base), target_modules=["c_attn", "c_fc"])
    ours = _ours_from(ref, tmp_path, copy.deepcopy(base))
    assert ours.model.transformer.h[0].attn.c_attn.fan_in_fan_out
    t = torch.randint(0, 64, (2, 8))
    loss, loss_ref = ours(input_ids=t, labels=t).loss, ref(input_ids=t, labels=t).loss
    torch.testing.assert_close(loss, loss_ref)
    loss.backward()
    loss_ref.backward()
    _assert_same_grads(ours, ref)
    merged, merged_ref = ours.merge_and_unload(), ref.merge_and_unload()
    torch.testing.assert_close(merged.transformer.h[0].attn.c_attn.weight, merged_ref.transformer.h[0].attn.c_attn.weight)


def test_deleting_the_dora_adapter_removes_its_magnitude():
    layer = FusedLoRALinear(8, 6, r=2, use_dora=True, init_lora_weights=False)
    with torch.no_grad():  # off its init: DoRA's output is not the LoRA's (with B = 0 both were the base)
        layer.lora_magnitude_vector.mul_(1.5)
    layer.add_adapter("plain", r=2, init_lora_weights=False)
    layer.set_adapter("plain")
    layer.delete_adapter("default")
    assert "lora_magnitude_vector" not in layer.state_dict() and not layer.use_dora
    x = torch.randn(3, 8)
    A, B = layer.adapter_weights("plain")
    assert B.abs().min() > 0
    torch.testing.assert_close(layer(x), x @ layer.weight.t() + layer.bias + layer.scaling * (x @ A.t()) @ B.t())


def test_the_sync_free_path_used_on_cuda_handles_cancellation_and_zero_magnitudes(monkeypatch):
    # On CUDA the norm and dm never wait for the GPU: a fixed number of rows / columns is always
    # recomputed. Run that path here, on the cases it exists for, against the same truths.
    monkeypatch.setattr(dora_norm, "SYNC_FREE", True)
    monkeypatch.setattr(dora_norm, "DIRECT_ROWS", 16)  # fewer than the 40 rows: the choice of rows matters
    _, w, _, a, b = make_problem(1, 64, 40, 4, requires_grad=False)
    w = w.clone()
    w[::3] = -2.0 * (b[::3] @ a) + 1e-4 * torch.randn(14, 64)  # 14 cancelling rows
    truth = direct_norm64(w, a, b, 2.0)
    peft_err = (torch.linalg.norm(w + 2.0 * (b @ a), dim=1).double() - truth).abs() / truth
    err = (weight_norm(w, a, b, 2.0).double() - truth).abs() / truth
    assert (err <= 2 * peft_err + 1e-6).all(), (err.max(), peft_err.max())
    _check_op("torch", 19, 24, 28, 3, torch.float32, True, zero_m=True)
    monkeypatch.setattr(dora_norm, "DIRECT_ROWS", 4)  # 14 cancelling rows, 4 recomputed: refused, not wrong
    with pytest.raises(RuntimeError, match="rows of one layer cancel"):
        weight_norm(w, a, b, 2.0)
    monkeypatch.setattr(dora, "ZERO_COLUMNS", 2)
    with pytest.raises(RuntimeError, match="magnitudes of one layer are exactly 0"):
        _check_op("torch", 19, 24, 28, 3, torch.float32, True, zero_m=True)


def test_torch_compile_fullgraph_equals_eager_and_opcheck():
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 12, r=2, init_lora_weights=False, use_dora=True)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.2)
    x = torch.randn(3, 5, 16, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    torch._dynamo.reset()
    try:
        y = torch.compile(layer, fullgraph=True)(x)
        grads = torch.autograd.grad(y.sum(), (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    finally:
        # Dynamo's per-frame state would otherwise carry this layer's scaling into later tests that
        # compile FusedLoRALinear.forward: a second float value there becomes a SymFloat, which
        # op_inputs.as_scaling's math.isfinite cannot take under fullgraph (also true of LoRA layers)
        torch._dynamo.reset()
    y_ref = layer(x2)
    grads_ref = torch.autograd.grad(y_ref.sum(), (x2, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector))
    torch.testing.assert_close(y, y_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    x, w, b, a, bb, m, _ = _op_case(6, 7, 5, 2, torch.float32, True)
    torch.library.opcheck(dora.dora_linear_fwd, (x, w, b, a, bb, m, 1.3, "torch"))


def test_dora_over_a_quantized_base_is_refused_and_leaves_the_base_untouched():
    """QDoRA is not implemented: from_linear and get_lora_model say so instead of running LoRA's
    quantized path without the magnitude (a silent wrong answer)."""
    from fused_lora import LoraConfig, get_lora_model, quantize_model
    from fused_lora.modules.quantized import QuantizedLinear
    model = quantize_model(torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(64, 8)), "nf4")
    with pytest.raises(ValueError, match="DoRA.*quantized"):
        FusedLoRALinear.from_linear(model[0], r=4, use_dora=True)
    with pytest.raises(ValueError, match="DoRA.*quantized"):
        get_lora_model(model, LoraConfig(r=4, target_modules=["0"], use_dora=True))
    assert isinstance(model[0], QuantizedLinear)
