"""The dense ("stacked adapters") path of multi_impl against its per-run path: the same outputs, packed H,
gradients and dropout masks whichever path runs, each path's backward on the other's H, and the choice
between them (the adapters' total rank against DENSE_MAX_RANK)."""
import pytest
import torch

from fused_lora.core import segments as core_segments
from fused_lora.torch_row import multi as multi_impl
from fused_lora.ops.multi import lora_linear_multi
from fused_lora.core.reference import lora_linear_multi_ref

from test_multi_op import ASSIGNMENTS, full_keeps, make_multi
from utils import assert_close_rule

PATHS = {"dense": 10**9, "per_run": 0}  # DENSE_MAX_RANK forcing each path
RANKS = [3, 5, 1, 8]
SPECS = {"no_dropout": [(0.5, 0.0), (2.0, 0.0), (-1.25, 0.0), (0.75, 0.0)],
         "dropout": [(0.5, 0.3), (2.0, 0.0), (-1.25, 0.5), (0.75, 0.1)]}
TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
# The paths' agreement in 16 bits, in max norm against the largest entry: the per-run path applies s_a inside
# each GEMM (alpha), the stacked one rounds B_a s_a / peak once to the dtype for adapters whose |s_a| is not the
# largest (torch_row.multi._Stacked), so they differ by a few units of the dtype's epsilon (measured: 2 in
# float16, 2 in bfloat16), and element-wise comparisons fail where sums cancel. 4 eps. Each path is checked
# against the float64 reference on its own (test_dense_path_against_float64_reference below, tests/ops).
AGREE_16 = {torch.float16: 4 * 2.0 ** -11, torch.bfloat16: 4 * 2.0 ** -8}


def assert_agree(got, want, dtype, name):
    if dtype not in AGREE_16:
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{name}: {m}")
        return
    assert got.shape == want.shape and got.dtype == want.dtype, name
    err = (got.double() - want.double()).abs().max()
    assert err <= AGREE_16[dtype] * want.double().abs().max(), f"{name}: {err}"


def run_path(monkeypatch, path, x, w, b, adapters, row_adapter, seed, dy, need_lora=None):
    """multi_impl's forward then backward on one path: (y, packed H, dx, [(dA, dB)], dW, db)."""
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS[path])
    segs = core_segments.segments(row_adapter, len(adapters))
    y, h = multi_impl.forward(x, w, b, adapters, segs, seed)
    need_lora = [True] * len(adapters) if need_lora is None else need_lora
    dx, pairs, dW, db = multi_impl.backward(dy, x, w, adapters, h, segs, seed, True, need_lora, True, True)
    return y, h, dx, pairs, dW, db


def problem(M, K, N, dtype, specs, seed=0):
    x, w, b, loras = make_multi(M, K, N, RANKS, dtype, seed=seed)
    adapters = [(A.detach(), B.detach(), s, p) for (A, B), (s, p) in zip(loras, specs)]
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype)
    return x.detach(), w.detach(), b.detach(), adapters, dy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("assign", list(ASSIGNMENTS))
@pytest.mark.parametrize("drop", list(SPECS))
def test_dense_and_per_run_paths_agree(monkeypatch, dtype, assign, drop):
    """Outputs, the packed H (the custom op's second output, zero where no adapter's column is) and every
    gradient agree between the paths, with and without dropout (the same masks)."""
    M, K, N = 70, 33, 17
    row_adapter = ASSIGNMENTS[assign](M)
    x, w, b, adapters, dy = problem(M, K, N, dtype, SPECS[drop])
    dense = run_path(monkeypatch, "dense", x, w, b, adapters, row_adapter, 7, dy)
    per_run = run_path(monkeypatch, "per_run", x, w, b, adapters, row_adapter, 7, dy)
    assert dense[1].shape == per_run[1].shape == core_segments.packed_h_shape(M, adapters)
    assert torch.equal(dense[1] == 0, per_run[1] == 0)  # the same zero padding (base rows, columns past r_a)
    for name, got, want in zip(["y", "h", "dx"], dense[:3], per_run[:3]):
        assert got.dtype == dtype
        assert_agree(got, want, dtype, name)
    for a, (got, want) in enumerate(zip(dense[3], per_run[3])):
        assert got[0].shape == want[0].shape and got[1].shape == want[1].shape
        assert_agree(got[0], want[0], dtype, f"dA_{a}")
        assert_agree(got[1], want[1], dtype, f"dB_{a}")
    for got, want in zip(dense[4:], per_run[4:]):
        assert_agree(got, want, dtype, "dW / db")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("drop", list(SPECS))
def test_dense_path_against_float64_reference(monkeypatch, dtype, drop):
    """Through the op (autograd): the dense path within the low-precision rule of the float64 reference,
    with the documented masks (adapter a's own rows in increasing order, its own seed)."""
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS["dense"])
    M, K, N, seed = 61, 29, 23, 13
    specs = SPECS[drop]
    row_adapter = ASSIGNMENTS["scattered"](M)
    x, w, b, loras = make_multi(M, K, N, RANKS, dtype, seed=4)
    keeps = full_keeps(row_adapter, K, specs, seed)
    tensors = [x, w, b] + [t for pair in loras for t in pair]

    def adapters(flat):
        return [(flat[2 * a], flat[2 * a + 1], s, p) for a, (s, p) in enumerate(specs)]

    def grads(fn, ts, dy):
        y = fn(*ts)
        return [y.detach()] + list(torch.autograd.grad(y, ts, dy))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    got = grads(lambda x, w, b, *f: lora_linear_multi(x, w, b, adapters(f), row_adapter, seed, backend="torch"),
                tensors, dy.to(dtype))
    eager = grads(lambda x, w, b, *f: lora_linear_multi_ref(x, w, b, adapters(f), row_adapter, keeps),
                  tensors, dy.to(dtype))
    t64 = [t.detach().double().requires_grad_(True) for t in tensors]
    want = grads(lambda x, w, b, *f: lora_linear_multi_ref(x, w, b, adapters(f), row_adapter, keeps), t64, dy)
    for i, (g, ge, g6) in enumerate(zip(got, eager, want)):
        assert_close_rule(g, ge, g6, dtype, f"output {i}")


@pytest.mark.parametrize("forward_path,backward_path", [("dense", "per_run"), ("per_run", "dense")])
def test_backward_on_the_other_paths_packed_h(monkeypatch, forward_path, backward_path):
    """The packed H is one contract: backward on either path takes the H the other path's forward made
    (auto may run forward and backward apart; the quantized base shares add_lora / lora_backward)."""
    M, K, N = 45, 20, 15
    row_adapter = ASSIGNMENTS["scattered"](M)
    x, w, b, adapters, dy = problem(M, K, N, torch.float32, SPECS["dropout"], seed=3)
    want = run_path(monkeypatch, backward_path, x, w, b, adapters, row_adapter, 5, dy)
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS[forward_path])
    segs = core_segments.segments(row_adapter, len(adapters))
    y = torch.addmm(b, x, w.t())
    h = multi_impl.add_lora(y, x, adapters, segs, 5)  # the low-rank half alone (the quantized base's entry)
    torch.testing.assert_close(y, want[0])
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS[backward_path])
    dx = torch.mm(dy, w)
    pairs = multi_impl.lora_backward(dx, dy, x, adapters, h, segs, 5, [True, False, True, True])
    torch.testing.assert_close(dx, want[2])
    assert pairs[1] is None
    for a in (0, 2, 3):
        torch.testing.assert_close(pairs[a][0], want[3][a][0])
        torch.testing.assert_close(pairs[a][1], want[3][a][1])


def test_each_adapter_gets_gradients_from_its_own_rows_only(monkeypatch):
    """Rows of other adapters and base rows contribute nothing to an adapter's dA, dB on the dense path:
    zeroing dY on every row but adapter 2's leaves adapter 2's gradients unchanged and the others' zero."""
    M, K, N = 40, 12, 9
    row_adapter = ASSIGNMENTS["scattered"](M)
    x, w, b, adapters, dy = problem(M, K, N, torch.float64, SPECS["dropout"], seed=6)
    full = run_path(monkeypatch, "dense", x, w, b, adapters, row_adapter, 3, dy)
    only = run_path(monkeypatch, "dense", x, w, b, adapters, row_adapter, 3, dy * (row_adapter == 2).unsqueeze(1))
    torch.testing.assert_close(only[3][2][0], full[3][2][0])
    torch.testing.assert_close(only[3][2][1], full[3][2][1])
    for a in (0, 1, 3):
        assert not only[3][a][0].any() and not only[3][a][1].any()


def test_dense_path_is_deterministic_and_reads_no_host_offsets_without_dropout(monkeypatch):
    """Without dropout the dense path needs neither the host-side offsets (a device-to-host sync on a
    GPU) nor any host work per run; two runs are bit-identical."""
    M, K, N = 64, 16, 12
    row_adapter = ASSIGNMENTS["scattered"](M)
    x, w, b, adapters, dy = problem(M, K, N, torch.float32, SPECS["no_dropout"])
    monkeypatch.setattr(multi_impl, "DENSE_MAX_RANK", PATHS["dense"])
    runs = []
    for _ in range(2):
        segs = core_segments.segments(row_adapter, len(adapters))
        y, h = multi_impl.forward(x, w, b, adapters, segs, 0)
        out = multi_impl.backward(dy, x, w, adapters, h, segs, 0, True, [True] * 4, False, False)
        assert "offsets" not in vars(segs)  # never computed (a cached property)
        runs.append([y, h, out[0]] + [t for pair in out[1] for t in pair])
    for first, second in zip(*runs):
        assert torch.equal(first, second)


def test_the_path_follows_the_total_rank(monkeypatch):
    """dense() while the ranks sum to at most DENSE_MAX_RANK (not for rank 0), and the forward then
    stacks the adapters once (counted through the stacking class)."""
    def adapters(*ranks):
        return [(torch.zeros(r, 4), torch.zeros(3, r), 1.0, 0.0) for r in ranks]
    limit = multi_impl.DENSE_MAX_RANK
    assert multi_impl.dense(adapters(limit)) and multi_impl.dense(adapters(limit - 1, 1))
    assert not multi_impl.dense(adapters(limit, 1)) and not multi_impl.dense(adapters()) \
        and not multi_impl.dense(adapters(0))
    stacked = []
    real = multi_impl._Stacked

    def counting(*args):
        stacked.append(1)
        return real(*args)
    monkeypatch.setattr(multi_impl, "_Stacked", counting)
    x, w = torch.randn(6, 4), torch.randn(3, 4)
    row_adapter = torch.tensor([0, 1, -1, 1, 0, 0])
    for ranks, want in [((2, 3), 1), ((limit, 1), 0)]:
        stacked.clear()
        multi_impl.forward(x, w, None, adapters(*ranks), core_segments.segments(row_adapter, 2), 0)
        assert len(stacked) == want
