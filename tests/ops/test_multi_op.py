"""Several adapters in one batch: the op against the float64 reference, the layer's adapter API,
mixed-batch training against training each adapter alone, and peft's mixed-batch inference."""
import math
import warnings

import pytest
import torch
from torch import nn

from fused_lora.core import dropout as core_dropout
from fused_lora.core import segments as core_segments
from fused_lora import BackendUnavailable, FusedLoRALinear
from fused_lora import dispatch as backends
from fused_lora.torch_row import multi as multi_impl
from fused_lora.core.dropout import keep_mask, new_seed
from fused_lora.ops.lora import lora_linear
from fused_lora.ops.multi import lora_linear_multi
from fused_lora.core.reference import lora_linear_multi_ref

from utils import assert_close_rule, compiled_and_eager_mixed, mixed_batch_keeps

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_multi(M, K, N, ranks, dtype=torch.float64, seed=0, bias=True):
    """x, W, b and per-adapter (A, B) with O(1) outputs, all requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).requires_grad_(True)

    x, w = rnd(M, K), rnd(N, K, scale=K ** -0.5)
    b = rnd(N) if bias else None
    loras = [(rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)) for r in ranks]
    return x, w, b, loras


def full_keeps(row_adapter, K, specs, seed):
    """The M x K keep masks the op's documented rule gives on the torch backend."""
    return mixed_batch_keeps(row_adapter, K, specs, seed, keep_mask)


def run_and_grads(fn, tensors, dy):
    y = fn(*tensors)
    wanted = [t for t in tensors if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, wanted, dy, allow_unused=True)
    return y.detach(), grads


def op_and_ref(x, w, b, loras, specs, row_adapter, seed):
    """Functions of (x, w, b, A0, B0, ...) for the op and the reference (same masks)."""
    keeps = full_keeps(row_adapter, x.shape[1], specs, seed)

    def adapters(flat):
        return [(flat[2 * a], flat[2 * a + 1], s, p) for a, (s, p) in enumerate(specs)]

    def op(x, w, b, *flat):
        return lora_linear_multi(x, w, b, adapters(flat), row_adapter, seed, backend="torch")

    def ref(x, w, b, *flat):
        return lora_linear_multi_ref(x, w, b, adapters(flat), row_adapter, keeps)
    return op, ref


ASSIGNMENTS = {
    # random rows over 3 adapters and the base; adapter 3 gets no row (an empty segment)
    "scattered": lambda M: torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(3)),
    # one contiguous run per adapter (per-sample adapters with samples grouped): the view path
    "contiguous": lambda M: torch.tensor(sorted(torch.randint(-1, 4, (M,), generator=torch.Generator().manual_seed(4))
                                                .tolist()), dtype=torch.int64),
    "all_base": lambda M: torch.full((M,), -1, dtype=torch.int64),
    "one_adapter": lambda M: torch.full((M,), 1, dtype=torch.int64),
}
SPECS = [(0.5, 0.0), (2.0, 0.0), (-1.25, 0.0), (0.75, 0.0)]  # (scaling, dropout_p) per adapter
RANKS = [3, 5, 1, 8]


@pytest.fixture(params=["dense", "per_run"])
def path(request, monkeypatch):
    """Each of multi_impl's two paths (the adapters stacked, or run by run), forced through DENSE_MAX_RANK."""
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", 10**9 if request.param == "dense" else 0)
    return request.param


def per_run_path(monkeypatch):
    """Tests of the per-run path's own mechanics (chunks, runs, gathers) force it."""
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", 0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("assign", list(ASSIGNMENTS))
@pytest.mark.parametrize("M,K,N", [(37, 13, 11), (70, 33, 17)])
@pytest.mark.parametrize("trainable_base", [False, True])
def test_op_matches_reference(dtype, assign, M, K, N, trainable_base, path):
    row_adapter = ASSIGNMENTS[assign](M)
    x, w, b, loras = make_multi(M, K, N, RANKS, dtype)
    if not trainable_base:
        w.requires_grad_(False)
        b.requires_grad_(False)
    tensors = [x, w, b] + [t for pair in loras for t in pair]
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    op, ref = op_and_ref(x, w, b, loras, SPECS, row_adapter, 0)
    y, grads = run_and_grads(op, tensors, dy.to(dtype))
    y_eager, g_eager = run_and_grads(ref, tensors, dy.to(dtype))
    t64 = [t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    y64, g64 = run_and_grads(ref, t64, dy)
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close_rule(y, y_eager, y64, dtype, "y")
    for i, (g, ge, g6) in enumerate(zip(grads, g_eager, g64)):
        assert g is not None and g.dtype == dtype
        assert_close_rule(g, ge, g6, dtype, f"gradient {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_op_chunked_scattered_rows(monkeypatch, dtype):
    """Scattered segments longer than CHUNK_ROWS go through several chunks (float32 accumulation)."""
    per_run_path(monkeypatch)
    monkeypatch.setattr(multi_impl, "CHUNK_ROWS", 7)
    M, K, N = 61, 10, 9
    row_adapter = torch.randint(-1, 2, (M,), generator=torch.Generator().manual_seed(5))
    specs = [(0.5, 0.3), (1.5, 0.0)]
    x, w, b, loras = make_multi(M, K, N, [4, 2], dtype)
    tensors = [x, w.detach(), b.detach()] + [t for pair in loras for t in pair]
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    op, ref = op_and_ref(x, w, b, loras, specs, row_adapter, 11)
    y, grads = run_and_grads(op, tensors, dy.to(dtype))
    y_eager, g_eager = run_and_grads(ref, tensors, dy.to(dtype))
    y64, g64 = run_and_grads(ref, [t.detach().double().requires_grad_(t.requires_grad) for t in tensors], dy)
    assert_close_rule(y, y_eager, y64, dtype, "y")
    for i, (g, ge, g6) in enumerate(zip(grads, g_eager, g64)):
        assert_close_rule(g, ge, g6, dtype, f"gradient {i}")


def test_gradcheck_float64_with_dropout(path):
    M, K, N = 9, 5, 4
    row_adapter = torch.tensor([1, -1, 0, 1, 1, 0, -1, 2, 0])
    specs = [(0.5, 0.25), (2.0, 0.0), (-1.0, 0.5)]
    x, w, b, loras = make_multi(M, K, N, [2, 3, 1])
    op, ref = op_and_ref(x, w, b, loras, specs, row_adapter, 5)
    tensors = (x, w, b) + tuple(t for pair in loras for t in pair)
    torch.testing.assert_close(op(*tensors), ref(*tensors))
    assert torch.autograd.gradcheck(op, tensors)
    assert torch.autograd.gradgradcheck(op, tensors)  # double backward: recomputed, same masks


def test_dropout_masks_match_single_adapter_op_on_own_rows(path):
    """The documented rule: a mixed batch with seed S computes, per adapter, exactly the single-adapter
    op on that adapter's rows with seed adapter_seed(S, a); dA, dB come from those rows alone."""
    M, K, N, seed = 40, 16, 12, 77
    row_adapter = torch.randint(-1, 3, (M,), generator=torch.Generator().manual_seed(1))
    specs = [(0.5, 0.3), (2.0, 0.1), (1.0, 0.0)]
    x, w, b, loras = make_multi(M, K, N, [4, 2, 3], torch.float32)
    w, b = w.detach(), b.detach()
    adapters = [(A, B, s, p) for (A, B), (s, p) in zip(loras, specs)]
    dy = torch.randn(M, N)
    y = lora_linear_multi(x, w, b, adapters, row_adapter, seed)
    grads = torch.autograd.grad(y, [x] + [t for pair in loras for t in pair], dy)
    dx = torch.zeros(M, K)
    for a, (A, B, s, p) in enumerate(adapters):
        rows = (row_adapter == a).nonzero().squeeze(1)
        xa = x.detach()[rows].requires_grad_(True)
        ya = lora_linear(xa, w, b, A, B, s, p, core_dropout.adapter_seed(seed, a), backend="torch")
        torch.testing.assert_close(y[rows], ya)
        dxa, dA, dB = torch.autograd.grad(ya, [xa, A, B], dy[rows])
        torch.testing.assert_close(grads[1 + 2 * a], dA)
        torch.testing.assert_close(grads[2 + 2 * a], dB)
        dx[rows] = dxa
    base = (row_adapter == -1).nonzero().squeeze(1)
    dx[base] = dy[base] @ w
    torch.testing.assert_close(grads[0], dx)


def test_deterministic_and_counted(path):
    M, K, N = 50, 12, 10
    row_adapter = torch.randint(-1, 2, (M,), generator=torch.Generator().manual_seed(2))
    x, w, b, loras = make_multi(M, K, N, [3, 2], torch.float32)
    adapters = [(A, B, 0.5, 0.2) for A, B in loras]
    dy = torch.randn(M, N)
    before = (backends.calls[("multi_fwd", "torch")], backends.calls[("multi_bwd", "torch")])
    runs = []
    for _ in range(2):
        y = lora_linear_multi(x, w.detach(), b.detach(), adapters, row_adapter, 3)
        runs.append([y] + list(torch.autograd.grad(y, [x] + [t for pair in loras for t in pair], dy)))
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    assert backends.calls[("multi_fwd", "torch")] == before[0] + 2
    assert backends.calls[("multi_bwd", "torch")] == before[1] + 2


def test_empty_batch_and_no_adapters(path):
    x, w, b, loras = make_multi(0, 6, 5, [2], torch.float32)
    y = lora_linear_multi(x, w, b, [(loras[0][0], loras[0][1], 1.0, 0.0)], torch.zeros(0, dtype=torch.int64))
    assert y.shape == (0, 5)
    y.sum().backward()
    assert loras[0][0].grad.shape == (2, 6) and not loras[0][0].grad.any()
    x, w, b, _ = make_multi(4, 6, 5, [], torch.float32)
    y = lora_linear_multi(x, w, b, [], torch.full((4,), -1))
    torch.testing.assert_close(y, nn.functional.linear(x, w, b))


def test_triton_refused_with_reason():
    x, w, b, loras = make_multi(4, 6, 5, [200], torch.float32)  # the segment kernels take ranks up to 128
    with pytest.raises(BackendUnavailable, match="ranks up to 128"):
        lora_linear_multi(x, w, b, [(loras[0][0], loras[0][1], 1.0, 0.0)], torch.zeros(4, dtype=torch.int64),
                          backend="triton")


def test_bad_inputs_name_the_problem():
    x, w, b, loras = make_multi(4, 6, 5, [2, 3], torch.float32)
    good = [(A, B, 1.0, 0.0) for A, B in loras]
    rows = torch.tensor([0, 1, -1, 0])
    cases = [
        (ValueError, "row_adapter has shape", dict(row_adapter=rows[:3])),
        (ValueError, r"holds 2, outside \[-1, 2\)", dict(row_adapter=torch.tensor([0, 2, 1, 0]))),
        (ValueError, r"holds -2", dict(row_adapter=torch.tensor([0, -2, 1, 0]))),
        (TypeError, "int64", dict(row_adapter=rows.int())),
        (TypeError, "row_adapter must be", dict(row_adapter=[0, 1, -1, 0])),
        (ValueError, "adapter 1: lora_B has shape", dict(adapters=[good[0], (loras[1][0], loras[0][1], 1.0, 0.0)])),
        (TypeError, "adapter 0: lora_A has dtype", dict(adapters=[(loras[0][0].double(), loras[0][1], 1.0, 0.0)])),
        (TypeError, "adapter 1: must be a", dict(adapters=[good[0], (loras[1][0], loras[1][1], 1.0)])),
        (ValueError, r"adapter 0: dropout_p must be in \[0, 1\)", dict(adapters=[(*loras[0], 1.0, 1.0)])),
        (ValueError, "adapter 0: scaling must be finite", dict(adapters=[(*loras[0], math.inf, 0.0)])),
        (TypeError, "adapters must be a list", dict(adapters=loras[0][0])),
        (ValueError, "seed", dict(adapters=[(*loras[0], 1.0, 0.1)], row_adapter=torch.zeros(4, dtype=torch.int64))),
    ]
    for error, message, change in cases:
        kw = dict(adapters=good, row_adapter=rows) | change
        with pytest.raises(error, match=message):
            lora_linear_multi(x, w, b, kw["adapters"], kw["row_adapter"])
    with pytest.raises(ValueError, match="weight has shape"):
        lora_linear_multi(x, w[:, :5], b, [], torch.full((4,), -1))


# ------------------------------------------------------------------------------ the layer

def make_layer(K=12, N=10):
    torch.manual_seed(0)
    layer = FusedLoRALinear(K, N, r=4, lora_alpha=8, init_lora_weights=False)
    layer.add_adapter("b", r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False)
    layer.add_adapter("c", r=3, lora_alpha=1, lora_dropout=0.2, init_lora_weights=False)
    return layer


def ref_layer(layer, x, names):
    """The reference on the layer's weights: per-sample names expanded to rows."""
    lead = x.shape[:-1]
    order = list(layer.available_adapters)
    per_sample = torch.tensor([order.index(n) if n != "__base__" else -1 for n in names])
    rows = per_sample.repeat_interleave(math.prod(lead[1:]))
    adapters = [(*layer.adapter_weights(n), layer.adapter_settings(n).scaling, 0.0) for n in order]
    y = lora_linear_multi_ref(x.reshape(-1, x.shape[-1]), layer.weight, layer.bias, adapters, rows)
    return y.reshape(*lead, -1)


def test_one_adapter_layer_keys_and_modules_unchanged():
    layer = FusedLoRALinear(6, 5, r=2)
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert [n for n, _ in layer.named_modules()] == [""]
    assert layer.active_adapter == "default" and layer.available_adapters == ("default",)
    assert layer.lora_A is layer.adapter_weights("default")[0]
    layer.add_adapter("other", r=3)
    layer.delete_adapter("other")
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert [n for n, _ in layer.named_modules()] == [""]


def test_state_dict_keys_by_name_not_by_active():
    layer = make_layer()
    keys = list(layer.state_dict())
    assert keys == ["weight", "bias", "lora_A", "lora_B", "lora_adapters.b.lora_A", "lora_adapters.b.lora_B",
                    "lora_adapters.c.lora_A", "lora_adapters.c.lora_B"]
    saved = {k: v.clone() for k, v in layer.state_dict().items()}
    layer.set_adapter("b")
    assert list(layer.state_dict()) == keys
    fresh = FusedLoRALinear(12, 10, r=4, lora_alpha=8)
    fresh.add_adapter("b", r=2, lora_alpha=4, use_rslora=True)
    fresh.add_adapter("c", r=3, lora_alpha=1)
    fresh.set_adapter("c")
    fresh.load_state_dict(saved)
    for name in ("default", "b", "c"):
        for mine, theirs in zip(fresh.adapter_weights(name), layer.adapter_weights(name)):
            assert torch.equal(mine, theirs)


def test_set_adapter_switches_view_and_trainability():
    layer = make_layer()
    assert not any(t.requires_grad for n in ("b", "c") for t in layer.adapter_weights(n))  # peft: new ones frozen
    layer.set_adapter("b")
    assert layer.active_adapter == "b" and layer.active_adapters == ["b"]
    assert layer.lora_A is layer.adapter_weights("b")[0] and layer.lora_A.shape == (2, 12)
    assert layer.r == 2 and layer.scaling == 4 / math.sqrt(2) and layer.use_rslora and layer.lora_alpha == 4
    assert layer.lora_A.requires_grad and not layer.adapter_weights("default")[0].requires_grad
    x = torch.randn(3, 12)
    torch.testing.assert_close(layer(x), ref_layer(layer, x, ["b"] * 3))
    replacement = nn.Parameter(torch.zeros(2, 12))
    layer.lora_A = replacement  # assignment replaces the active adapter's A
    assert layer.adapter_weights("b")[0] is replacement and layer.adapter_weights("default")[0].shape == (4, 12)
    layer.set_adapter(["c"], inference_mode=True)
    assert layer.active_adapter == "c" and not layer.lora_A.requires_grad
    layer.set_requires_grad(["b", "c"])
    assert layer.adapter_weights("b")[1].requires_grad and layer.lora_B.requires_grad


def test_bad_adapter_calls_raise_and_change_nothing():
    layer = make_layer()
    before = ({k: v.clone() for k, v in layer.state_dict().items()}, layer.active_adapter, layer.available_adapters)

    def unchanged():
        state = layer.state_dict()
        assert list(state) == list(before[0]) and all(torch.equal(state[k], v) for k, v in before[0].items())
        assert layer.active_adapter == before[1] and layer.available_adapters == before[2]
    x = torch.randn(2, 3, 12)
    for call, error, message in [
        (lambda: layer.delete_adapter("default"), ValueError, "active adapter"),
        (lambda: layer.delete_adapter("nope"), ValueError, "no adapter named 'nope'"),
        (lambda: layer.set_adapter("nope"), ValueError, "no adapter named"),
        (lambda: layer.set_adapter(["b", "c"]), ValueError, "one active adapter"),
        (lambda: layer.add_adapter("b"), ValueError, "already exists"),
        (lambda: layer.add_adapter("__base__"), ValueError, "cannot name an adapter"),
        (lambda: layer.add_adapter("a.b"), ValueError, "cannot name an adapter"),
        (lambda: layer.add_adapter("keys"), ValueError, "cannot name an adapter"),
        (lambda: layer.add_adapter("training"), ValueError, "cannot name an adapter"),
        (lambda: layer.add_adapter(""), ValueError, "non-empty string"),
        (lambda: layer.add_adapter("d", r=0), ValueError, "r must be"),
        (lambda: layer.add_adapter("d", lora_dropout=1.0), ValueError, "lora_dropout"),
        (lambda: layer.add_adapter("d", init_lora_weights="pissa"), ValueError, "init_lora_weights"),
        (lambda: layer.add_adapter("d", lora_alpha=math.nan), ValueError, "lora_alpha"),
        (lambda: layer(x, adapter_names=["b"]), ValueError, "1 adapter_names for an input of shape"),
        (lambda: layer(x, adapter_names=["b", "zz"]), ValueError, "unknown adapter name"),
        (lambda: layer(x, adapter_names="b"), TypeError, "list of adapter names"),
        (lambda: layer(x[0, 0], adapter_names=["b"]), ValueError, "one per sample"),
        (lambda: layer.merge(adapter_names=["nope"]), ValueError, "no adapter named"),
    ]:
        with pytest.raises(error, match=message):
            call()
        unchanged()
    layer.merge(adapter_names=["b"])
    with pytest.raises(ValueError, match="merged"):
        layer.delete_adapter("b")
    with pytest.raises(ValueError, match="merged"):
        layer(x, adapter_names=["b", "c"])
    layer.unmerge()
    layer.delete_adapter("c")
    assert layer.available_adapters == ("default", "b") and "lora_adapters.c.lora_A" not in layer.state_dict()


@pytest.mark.parametrize("shape", [(5, 12), (4, 3, 12)])
def test_mixed_forward_matches_reference(shape):
    layer = make_layer().eval()
    x = torch.randn(*shape)
    names = (["c", "__base__", "default", "c", "b"])[:shape[0]]
    torch.testing.assert_close(layer(x, adapter_names=names), ref_layer(layer, x, names))
    with layer.disable_adapter():  # peft: a disabled adapter wins over adapter_names
        torch.testing.assert_close(layer(x, adapter_names=names), nn.functional.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mixed_forward_autocast_and_fp32_adapters(dtype):
    layer = make_layer()
    x = torch.randn(4, 3, 12)
    names = ["b", "default", "__base__", "b"]
    with torch.autocast("cpu", dtype=dtype):
        y = layer.eval()(x, adapter_names=names)
    assert y.dtype == dtype
    y64 = ref_layer(layer.double(), x.double(), names)
    assert (y.double() - y64).abs().max() < 0.05


def test_mixed_training_equals_training_each_adapter_alone():
    """Dropout 0: one mixed batch gives each adapter the gradients it gets from its own samples alone."""
    layer = make_layer()
    layer.adapter_settings("c").lora_dropout = 0.0
    layer.set_requires_grad(["default", "b", "c"])
    layer.train()
    x = torch.randn(6, 5, 12)
    names = ["b", "c", "__base__", "b", "default", "c"]
    dy = torch.randn(6, 5, 10)
    xm = x.clone().requires_grad_(True)
    (layer(xm, adapter_names=names) * dy).sum().backward()
    mixed = {n: [t.grad.clone() for t in layer.adapter_weights(n)] for n in ("default", "b", "c")}
    alone_dx = torch.zeros_like(x)
    for name in ("default", "b", "c"):
        layer.zero_grad()
        layer.set_adapter(name)
        idx = [i for i, n in enumerate(names) if n == name]
        xs = x[idx].clone().requires_grad_(True)
        (layer(xs) * dy[idx]).sum().backward()
        for got, want in zip(mixed[name], layer.adapter_weights(name)):
            torch.testing.assert_close(got, want.grad)
        alone_dx[idx] = xs.grad
    alone_dx[2] = dy[2] @ layer.weight
    torch.testing.assert_close(xm.grad, alone_dx)


def test_mixed_training_with_dropout_uses_per_adapter_masks():
    """Dropout on: each adapter's output and gradients equal the single-adapter op on its rows with the
    seed adapter_seed(S, a) (S: the layer's seed, drawn from torch's generator; a: index among used adapters)."""
    layer = make_layer()
    layer.adapter_settings("b").lora_dropout = 0.5
    layer.set_requires_grad(["b", "c"])
    layer.train()
    x = torch.randn(4, 3, 12)
    names = ["c", "b", "c", "__base__"]
    torch.manual_seed(123)
    seed = int(new_seed())
    torch.manual_seed(123)
    y = layer(x, adapter_names=names)
    dy = torch.randn_like(y)
    y.backward(dy)
    for a, name in enumerate(["b", "c"]):  # the used adapters, in the layer's order
        idx = [i for i, n in enumerate(names) if n == name]
        A, B = layer.adapter_weights(name)
        s = layer.adapter_settings(name)
        A2, B2 = A.detach().clone().requires_grad_(True), B.detach().clone().requires_grad_(True)
        ya = lora_linear(x[idx].reshape(-1, 12), layer.weight, layer.bias, A2, B2, s.scaling, s.lora_dropout,
                         core_dropout.adapter_seed(seed, a))
        torch.testing.assert_close(y[idx].reshape(-1, 10), ya)
        ya.backward(dy[idx].reshape(-1, 10))
        torch.testing.assert_close(A.grad, A2.grad)
        torch.testing.assert_close(B.grad, B2.grad)


def test_merge_with_several_adapters():
    layer = make_layer().eval()
    x = torch.randn(3, 12)
    layer.set_adapter("b")
    unmerged = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged_adapters == ["b"] and layer.merged
    torch.testing.assert_close(layer(x), unmerged)
    with pytest.warns(UserWarning, match="unmerging"):
        layer.set_adapter("default")
    assert not layer.merged
    torch.testing.assert_close(layer.weight, w0)
    layer.merge(adapter_names=["b", "c"])
    delta = sum(((layer.adapter_weights(n)[1] @ layer.adapter_weights(n)[0]) * layer.adapter_settings(n).scaling
                 for n in ("b", "c")))
    torch.testing.assert_close(layer.weight, w0 + delta)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge(adapter_names=["c"])
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0)


def test_matches_peft_mixed_batch_inference():
    peft = pytest.importorskip("peft")
    from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(0)
    K, N = 24, 18
    base = nn.Linear(K, N)
    theirs = PeftLinear(base, "default", config=peft.LoraConfig(r=4, lora_alpha=16), r=4, lora_alpha=16)
    theirs.update_layer("b", 2, lora_alpha=4, config=peft.LoraConfig(r=2, lora_alpha=4, use_rslora=True))
    ours = FusedLoRALinear.from_linear(nn.Linear(K, N), r=4, lora_alpha=16, init_lora_weights=False)
    ours.add_adapter("b", r=2, lora_alpha=4, use_rslora=True, init_lora_weights=False)
    with torch.no_grad():
        ours.weight.copy_(base.weight)
        ours.bias.copy_(base.bias)
        for name in ("default", "b"):
            theirs.lora_A[name].weight.copy_(ours.adapter_weights(name)[0])
            theirs.lora_B[name].weight.copy_(ours.adapter_weights(name)[1])
            assert theirs.scaling[name] == ours.adapter_settings(name).scaling
    theirs.eval(), ours.eval()
    x = torch.randn(5, 7, K)
    names = ["b", "default", "__base__", "b", "default"]
    with torch.no_grad():
        torch.testing.assert_close(ours(x, adapter_names=names), theirs(x, adapter_names=names))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.set_adapter("b")
    ours.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x))


def test_layout_groups_rows_by_adapter(monkeypatch):
    """vLLM-style layout: stable sort + offsets; long runs of rows as slices, scattered ones in chunks."""
    monkeypatch.setattr(multi_impl, "MIN_RUN_ROWS", 2)
    row_adapter = torch.tensor([1, 1, -1, 0, 1, 0, 0, 2, 2, -1])
    segs = core_segments.segments(row_adapter, 4)
    assert segs.offsets == (0, 2, 5, 8, 10, 10)
    assert segs.rows(-1).tolist() == [2, 9] and segs.rows(0).tolist() == [3, 5, 6] and segs.rows(3).numel() == 0
    assert [p.rows for p in multi_impl.pieces(segs, 2)] == [slice(7, 9)]
    assert multi_impl.pieces(segs, 3) == []
    (piece,) = multi_impl.pieces(segs, 1)
    assert piece.rows.tolist() == [0, 1, 4] and (piece.lo, piece.hi) == (0, 3)
    runs = multi_impl.pieces(core_segments.segments(torch.tensor([0, 0, 0, 1, 1, 0, 0, -1, 0, 0]), 2), 0)
    assert [(p.rows, p.lo, p.hi) for p in runs] == [(slice(0, 3), 0, 3), (slice(5, 7), 3, 5), (slice(8, 10), 5, 7)]


@pytest.mark.parametrize("min_run", [1, 10**9])
def test_op_runs_and_gathers_agree_with_reference(monkeypatch, min_run):
    """The same per-sample layout through views (every run) and through gathers (never)."""
    per_run_path(monkeypatch)
    monkeypatch.setattr(multi_impl, "MIN_RUN_ROWS", min_run)
    row_adapter = torch.tensor([0, 2, 1, 0, -1, 2, 0]).repeat_interleave(5)
    specs = [(0.5, 0.2), (1.5, 0.0), (-1.0, 0.4)]
    x, w, b, loras = make_multi(35, 9, 7, [2, 3, 4])
    op, ref = op_and_ref(x, w, b, loras, specs, row_adapter, 21)
    tensors = (x, w, b) + tuple(t for pair in loras for t in pair)
    torch.testing.assert_close(op(*tensors), ref(*tensors))
    assert torch.autograd.gradcheck(op, tensors)


def test_adapters_draw_independent_masks():
    """Two identical adapters over identical rows still drop different elements (one seed per adapter)."""
    K, N = 64, 8
    x = torch.randn(1, K).expand(6, K).contiguous()
    w, b = torch.zeros(N, K), None
    A, B = torch.randn(4, K), torch.randn(N, 4)
    y = lora_linear_multi(x, w, b, [(A, B, 1.0, 0.5), (A, B, 1.0, 0.5)], torch.tensor([0, 0, 0, 1, 1, 1]), seed=9)
    assert not torch.allclose(y[:3], y[3:])


def test_meta_device_gives_shapes():
    layer = FusedLoRALinear(12, 10, r=4, device="meta")
    layer.add_adapter("b", r=2)
    y = layer(torch.empty(4, 3, 12, device="meta"), adapter_names=["b", "default", "__base__", "b"])
    assert y.shape == (4, 3, 10) and y.is_meta


def test_compiled_layer_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) traces the multi-adapter custom ops: same output and gradients."""
    layer = make_layer()
    layer.set_requires_grad(["default", "b", "c"])
    layer.adapter_settings("c").lora_dropout = 0.0
    x = torch.randn(4, 3, 12)
    names = ["b", "default", "__base__", "c"]
    dy = torch.randn(4, 3, 10)
    outs = compiled_and_eager_mixed(layer, x, names, dy, ("default", "b", "c"), backend="aot_eager")
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want)


def test_multi_custom_ops_opcheck():
    M, K, N = 11, 6, 5
    x, w, b, loras = make_multi(M, K, N, [2, 3], torch.float32)
    row_adapter = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1, 1, 0, 1])
    args = (x, w.detach(), b.detach(), [A for A, _ in loras], [B for _, B in loras], [0.5, 2.0], [0.0, 0.3],
            row_adapter, torch.tensor(5), "torch")
    torch.library.opcheck(torch.ops.fused_lora.lora_linear_multi_fwd.default, args)
    _, h = torch.ops.fused_lora.lora_linear_multi_fwd(*args)
    dy = torch.randn(M, N)
    for needs in [(True, [True, True], False, False), (False, [False, True], True, True)]:
        lists = [[t.detach() for t in ts] for ts in args[3:5]]  # the backward op has no autograd of its own
        bwd_args = (dy, x.detach(), w.detach(), *lists, h.detach(), *args[5:10], needs[0], needs[1], *needs[2:])
        torch.library.opcheck(torch.ops.fused_lora.lora_linear_multi_bwd.default, bwd_args)
        dx, dA, dB, dW, db = torch.ops.fused_lora.lora_linear_multi_bwd(*bwd_args)
        assert dx.shape == ((M, K) if needs[0] else (0,)) and dW.shape == ((N, K) if needs[2] else (0,))
        assert [t.shape for t in dA] == [(2, K) if needs[1][0] else (0,), (3, K)]


def test_model_file_holds_the_default_adapter_whatever_a_layer_has_active(tmp_path):
    """A LoraModel's file and config describe its "default" adapter: a layer-level adapter made active
    must not be written under the default's keys."""
    from fused_lora import LoraConfig, LoraModel, get_lora_model

    def mlp():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 4))

    lm = get_lora_model(mlp(), LoraConfig(r=2, target_modules=["0"], init_lora_weights=False))
    x = torch.randn(3, 6)
    with torch.no_grad():
        want = lm(x)
    layer = lm.model[0]
    layer.add_adapter("other", r=3, init_lora_weights=False)
    layer.set_adapter("other")
    lm.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want)


def test_reset_refuses_an_unknown_init():
    layer = FusedLoRALinear(4, 3, r=2)
    before = layer.lora_A.detach().clone()
    with pytest.raises(ValueError, match="init_lora_weights"):
        layer.reset_lora_parameters("bogus")
    assert torch.equal(layer.lora_A, before)
