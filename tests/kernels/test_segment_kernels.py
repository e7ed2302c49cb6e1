"""The segment kernels (several adapters in one batch, fused_lora/kernels/segments/) through the op
with backend="triton": against the float64 multi-adapter reference, against the torch backend,
against the Triton single-adapter op on each adapter's rows alone, and run to run.

On CPU they run under TRITON_INTERPRET=1 (small shapes, fp32/fp16); on CUDA also bf16.
"""
import numpy as np
import pytest
import torch

from fused_lora.core import dropout as core_dropout
from fused_lora.core import segments as core_segments
from fused_lora import BackendUnavailable
from fused_lora import dispatch as backends
from fused_lora.torch_row import multi as multi_impl
from fused_lora.ops.lora import lora_linear
from fused_lora.ops.multi import lora_linear_multi
from fused_lora.core.reference import lora_linear_multi_ref
from test_multi_op import make_multi
from utils import assert_close_rule, mixed_batch_keeps, needs_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = needs_triton(DEVICE, torch.float16)

DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [torch.float32])


def triton_keeps(row_adapter, K, specs, seed):
    """The documented masks of the Triton backend: adapter a's rows in increasing order, drawn by the
    Triton keep_mask(adapter_seed(seed, a), (m_a, K), p_a), as M x K masks for the reference."""
    from fused_lora.kernels import keep_mask
    return mixed_batch_keeps(row_adapter, K, specs, seed, keep_mask)


def to_device(x, w, b, loras):
    def move(t):
        return None if t is None else t.detach().to(DEVICE).requires_grad_(t.requires_grad)
    return move(x), move(w), move(b), [(move(A), move(B)) for A, B in loras]


def run(backend, x, w, b, loras, specs, row_adapter, seed, dy):
    """(y, gradients of every tensor that requires grad, in the order x, w, b, A0, B0, ...)."""
    adapters = [(A, B, s, p) for (A, B), (s, p) in zip(loras, specs)]
    if backend == "reference":
        keeps = triton_keeps(row_adapter, x.shape[1], specs, seed)
        y = lora_linear_multi_ref(x, w, b, adapters, row_adapter, keeps)
    else:
        y = lora_linear_multi(x, w, b, adapters, row_adapter, seed, backend=backend)
    tensors = [t for t in [x, w, b] + [t for pair in loras for t in pair] if t is not None and t.requires_grad]
    return y.detach(), list(torch.autograd.grad(y, tensors, dy))


def layout(kind, M, n, seed=0):
    """Per-row adapter indices: "scattered" (random over the base and the adapters, the last adapter
    left without rows when n > 1), or "contiguous" (one run per adapter, the base in between)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "scattered":
        return torch.randint(-1, max(n - 1, 1), (M,), generator=g)
    bounds = sorted(torch.randint(0, M, (n + 1,), generator=g).tolist())
    out = torch.full((M,), -1, dtype=torch.int64)
    for a in range(n):
        out[bounds[a]:bounds[a + 1]] = a
    return out.roll(3)


CASES = {  # ranks and (scaling, dropout_p) per adapter
    "one": ([1], [(0.75, 0.2)]),
    "three": ([3, 1, 6], [(0.5, 0.0), (2.0, 0.3), (-1.25, 0.1)]),
    "five": ([2, 7, 1, 16, 5], [(1.0, 0.1), (0.5, 0.0), (3.0, 0.5), (-0.5, 0.0), (0.25, 0.2)]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind", ["scattered", "contiguous"])
def test_matches_reference_all_gradients(dtype, case, kind):
    ranks, specs = CASES[case]
    M, K, N = (75, 37, 29) if not CUDA else (1000, 520, 300)
    row_adapter = layout(kind, M, len(ranks)).to(DEVICE)
    x, w, b, loras = to_device(*make_multi(M, K, N, ranks, torch.float64, seed=len(ranks)))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    y64, g64 = run("reference", x, w, b, loras, specs, row_adapter, 21, dy)
    low = to_device(x.to(dtype), w.to(dtype), b.to(dtype), [(A.to(dtype), B.to(dtype)) for A, B in loras])
    y_eager, g_eager = run("reference", *low, specs, row_adapter, 21, dy.to(dtype))
    y, grads = run("triton", *low, specs, row_adapter, 21, dy.to(dtype))
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close_rule(y, y_eager, y64, dtype, "y")
    assert len(grads) == len(g64)
    for i, (g, ge, g6) in enumerate(zip(grads, g_eager, g64)):
        assert g.dtype == dtype and g.shape == g6.shape
        assert_close_rule(g, ge, g6, dtype, f"gradient {i}")


@pytest.mark.parametrize("kind,ranks", [("scattered", [3, 5, 1]), ("contiguous", [3, 5, 1]),
                                        ("scattered", [40, 2, 128])], ids=["scattered", "contiguous", "rank_over_32"])
def test_matches_torch_backend_without_dropout(kind, ranks):
    specs = [(0.5, 0.0), (2.0, 0.0), (-1.0, 0.0)]
    M, K, N = 66, 21, 19
    row_adapter = layout(kind, M, 3, seed=4).to(DEVICE)
    x, w, b, loras = to_device(*make_multi(M, K, N, ranks, torch.float32, seed=3))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    y_t, g_t = run("torch", x, w, b, loras, specs, row_adapter, 0, dy)
    y, g = run("triton", x, w, b, loras, specs, row_adapter, 0, dy)
    tol = dict(atol=2e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)  # TF32 on a GPU
    torch.testing.assert_close(y, y_t, **tol)
    for a, b_ in zip(g, g_t):
        torch.testing.assert_close(a, b_, **tol)


def test_each_adapter_equals_training_it_alone_with_the_triton_backend():
    """The mixed batch computes, per adapter, what the Triton single-adapter op computes on that
    adapter's rows alone with the seed adapter_seed(seed, a): same outputs, same dA and dB (same
    dropout masks), and dx row by row; base rows get x W^T + b and dY W."""
    M, K, N, seed = 83, 24, 20, 1234
    ranks, specs = [4, 2, 7], [(0.5, 0.3), (2.0, 0.0), (1.5, 0.15)]
    row_adapter = layout("scattered", M, 4, seed=8).clamp(max=2).to(DEVICE)
    x, w, b, loras = to_device(*make_multi(M, K, N, ranks, torch.float32, seed=5))
    w.requires_grad_(False)
    b.requires_grad_(False)
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    y, grads = run("triton", x, w, b, loras, specs, row_adapter, seed, dy)
    dx = torch.empty_like(x)
    for a, ((A, B), (s, p)) in enumerate(zip(loras, specs)):
        rows = (row_adapter == a).nonzero().squeeze(1)
        assert rows.numel() > 0
        xa = x.detach()[rows].requires_grad_(True)
        ya = lora_linear(xa, w, b, A, B, s, p, core_dropout.adapter_seed(seed, a), backend="triton")
        dxa, dA, dB = torch.autograd.grad(ya, [xa, A, B], dy[rows])
        torch.testing.assert_close(y[rows], ya.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[1 + 2 * a], dA, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads[2 + 2 * a], dB, atol=1e-5, rtol=1e-5)
        dx[rows] = dxa
    base = (row_adapter == -1).nonzero().squeeze(1)
    dx[base] = dy[base] @ w
    torch.testing.assert_close(grads[0], dx, atol=1e-5, rtol=1e-5)


def test_deterministic_run_to_run():
    """Adapters with many row tiles (several partial slots per dA / dB): two runs bit-identical."""
    M, K, N = 150, 40, 36
    ranks, specs = [5, 3], [(0.5, 0.2), (1.0, 0.0)]
    row_adapter = layout("scattered", M, 3, seed=6).to(DEVICE)
    x, w, b, loras = to_device(*make_multi(M, K, N, ranks, torch.float16, seed=7))
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).half().to(DEVICE)
    first = run("triton", x, w, b, loras, specs, row_adapter, 9, dy)
    second = run("triton", x, w, b, loras, specs, row_adapter, 9, dy)
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


def test_base_only_no_adapters_and_empty_batch():
    x, w, b, loras = to_device(*make_multi(9, 12, 7, [3], torch.float32))
    dy = torch.randn(9, 7).to(DEVICE)
    y, grads = run("triton", x, w, b, loras, [(1.0, 0.5)], torch.full((9,), -1).to(DEVICE), 1, dy)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b).detach())
    assert not grads[3].any() and not grads[4].any()  # the adapter saw no rows: zero gradients
    torch.testing.assert_close(grads[0], dy @ w.detach())
    y = lora_linear_multi(x, w, b, [], torch.full((9,), -1).to(DEVICE), backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b))
    x0 = x[:0].detach().requires_grad_(True)
    y0 = lora_linear_multi(x0, w, b, [(loras[0][0], loras[0][1], 1.0, 0.0)], torch.zeros(0, dtype=torch.int64,
                           device=DEVICE), backend="triton")
    assert y0.shape == (0, 7)


def test_double_backward_uses_the_triton_masks():
    """create_graph=True recomputes the forward with differentiable ops: with the Triton backend's
    masks, so the first-order gradients equal the kernels' ones."""
    M, K, N = 30, 16, 12
    ranks, specs = [3, 2], [(0.5, 0.4), (1.5, 0.25)]
    row_adapter = layout("scattered", M, 3, seed=2).to(DEVICE)
    x, w, b, loras = to_device(*make_multi(M, K, N, ranks, torch.float32, seed=8))
    dy = torch.randn(M, N).to(DEVICE)
    adapters = [(A, B, s, p) for (A, B), (s, p) in zip(loras, specs)]
    tensors = [x] + [t for pair in loras for t in pair]
    y = lora_linear_multi(x, w, b, adapters, row_adapter, 5, backend="triton")
    plain = torch.autograd.grad(y, tensors, dy, retain_graph=True)
    with_graph = torch.autograd.grad(y, tensors, dy, create_graph=True)
    for g1, g2 in zip(plain, with_graph):
        torch.testing.assert_close(g1, g2.detach(), atol=1e-5, rtol=1e-5)
    assert backends.calls[("multi_bwd_differentiable", "triton")] >= 1


@pytest.mark.parametrize("block_m", [1, 4, 32])
def test_tile_table_covers_each_adapter_without_crossing(block_m):
    """The device-built tile table against the host layout (multi_impl.segments): every sorted position
    in exactly one tile of its own adapter, the LoRA tiles first and within the LoRA grid bound, then
    the base tiles, then empty tiles up to the table's size; bounds give each adapter's tiles."""
    from fused_lora.kernels.segments.launchers import tile_count_bounds, tile_table
    row_adapter = torch.tensor([2, -1, 0, 0, 2, 2, 2, 0, -1, 2, 0, 2, 2, 2, 2, 2, 2])
    segs = core_segments.segments(row_adapter, 4)  # adapters 1 and 3 have no rows
    tiles, bounds = tile_table(row_adapter, 4, block_m)
    n_all, n_lora = tile_count_bounds(row_adapter.numel(), 4, block_m)
    assert tiles.dtype == bounds.dtype == torch.int32 and tiles.shape == (n_all, 4) and bounds.shape == (5,)
    covered = np.zeros(row_adapter.numel(), dtype=int)
    kinds = []  # per tile: "lora", "base" or "empty", in table order
    for t, (a, first, end, local) in enumerate(tiles.tolist()):
        if first == end:
            assert (a, first, local) == (-1, 0, 0)
            kinds.append("empty")
            continue
        lo, hi = segs.offsets[a + 1], segs.offsets[a + 2]
        assert lo <= first < end <= hi and end - first <= block_m and local == first - lo
        covered[first:end] += 1
        kinds.append("lora" if a >= 0 else "base")
        assert a < 0 or t < n_lora
    assert (covered == 1).all()
    assert kinds == sorted(kinds, key=["lora", "base", "empty"].index)
    assert kinds.count("base") == -(-segs.count(-1) // block_m)
    for a in range(4):
        mine = tiles[bounds[a]:bounds[a + 1]]
        assert (mine[:, 0] == a).all() and int((mine[:, 2] - mine[:, 1]).sum()) == segs.count(a)


def test_tile_table_reads_no_row_count_on_the_host():
    """Built from row_adapter by device ops alone: on the meta device (no values at all) it still gives
    the table's shapes, so nothing waits for the device's counts (no sync on a GPU)."""
    from fused_lora.kernels.segments.launchers import tile_count_bounds, tile_table
    tiles, bounds = tile_table(torch.empty(300, dtype=torch.int64, device="meta"), 5, 64)
    assert tiles.is_meta and tiles.shape == (tile_count_bounds(300, 5, 64)[0], 4) and bounds.shape == (6,)


def test_refusals_name_the_reason():
    x, w, b, loras = make_multi(4, 6, 5, [129], torch.float32)
    with pytest.raises(BackendUnavailable, match="ranks up to 128"):
        lora_linear_multi(x, w, b, [(loras[0][0], loras[0][1], 1.0, 0.0)], torch.zeros(4, dtype=torch.int64),
                          backend="triton")
    gpu_fp32 = backends.Problem("multi_fwd", torch.device("cuda"), torch.float32, 8, 8, 8, 16)
    assert any("float32" in r for r in backends.triton_multi_reasons(gpu_fp32))
    single = backends.Problem("fwd", torch.device("cuda"), torch.float32, 8, 8, 8, 300)
    assert backends.triton_multi_reasons(single) == []


def test_auto_backward_with_dropout_follows_the_forward_choice():
    """Each backend draws its own masks: with dropout, multi_bwd runs on the backend timed fastest
    for the matching multi_fwd key (never timed on its own)."""
    times = {"torch": 2.0, "triton": 1.0}
    timed = []

    def timer(fn):
        name = fn()
        timed.append(name)
        return times[name]
    reg = backends.Registry(timer=timer, tuned_devices=(DEVICE,), cache_directory="/nonexistent/never-written",
                            name_of=lambda device: "device", versions_of=lambda: {})
    fwd = backends.Problem("multi_fwd", torch.device(DEVICE), torch.float16, 64, 8, 8, 4, dropout=True)
    bwd = backends.Problem("multi_bwd", torch.device(DEVICE), torch.float16, 64, 8, 8, 4, dropout=True)
    bench = lambda module: (lambda: "triton" if module.__name__.endswith("kernels") else "torch")  # noqa: E731
    assert reg.select(fwd, bench=bench).name == "triton"
    timed.clear()
    times.update(torch=0.5)  # were backward timed, torch would now win
    assert reg.select(bwd, bench=bench).name == "triton" and timed == []


def test_layer_mixed_batch_on_the_triton_backend():
    """FusedLoRALinear(x, adapter_names=...) with backend="triton": the segment kernels run (counted)
    and agree with the torch backend, outputs and every adapter's gradients."""
    from fused_lora import FusedLoRALinear
    torch.manual_seed(0)
    layer = FusedLoRALinear(24, 20, r=4, lora_alpha=8, init_lora_weights=False, backend="triton").to(DEVICE)
    layer.add_adapter("b", r=3, lora_alpha=3, init_lora_weights=False)
    layer.set_requires_grad(["default", "b"])
    x = torch.randn(5, 7, 24, device=DEVICE)
    names = ["b", "__base__", "default", "b", "default"]
    runs = {}
    for backend in ("torch", "triton"):
        layer.backend = backend
        for p in layer.parameters():
            p.grad = None
        before = backends.calls[("multi_bwd", backend)]
        y = layer(x, adapter_names=names)
        y.square().sum().backward()
        assert backends.calls[("multi_bwd", backend)] == before + 1
        runs[backend] = [y.detach()] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    assert len(runs["triton"]) == 5  # y and A, B of both adapters
    for got, want in zip(runs["triton"], runs["torch"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_custom_ops_opcheck_on_the_triton_backend():
    """The custom ops (what torch.compile traces) with backend="triton": fake shapes, schema, and
    the kernels' results for both gradient patterns (dx with dA/dB; dA/dB only, dW and db)."""
    M, K, N = 45, 12, 10
    x, w, b, loras = to_device(*make_multi(M, K, N, [2, 3], torch.float16))
    row_adapter = layout("scattered", M, 3, seed=1).to(DEVICE)
    args = (x, w.detach(), b.detach(), [A for A, _ in loras], [B for _, B in loras], [0.5, 2.0], [0.0, 0.3],
            row_adapter, torch.tensor(5), "triton")
    torch.library.opcheck(torch.ops.fused_lora.lora_linear_multi_fwd.default, args)
    _, h = torch.ops.fused_lora.lora_linear_multi_fwd(*args)
    assert h.shape == core_segments.packed_h_shape(M, [(A, B, 0.0, 0.0) for A, B in loras])
    dy = torch.randn(M, N).half().to(DEVICE)
    for needs in [(True, [True, True], False, False), (False, [False, True], True, True)]:
        lists = [[t.detach() for t in ts] for ts in args[3:5]]
        bwd_args = (dy, x.detach(), w.detach(), *lists, h.detach(), *args[5:10], needs[0], needs[1], *needs[2:])
        torch.library.opcheck(torch.ops.fused_lora.lora_linear_multi_bwd.default, bwd_args)
        dx, dA, dB, dW, db = torch.ops.fused_lora.lora_linear_multi_bwd(*bwd_args)
        assert dx.shape == ((M, K) if needs[0] else (0,)) and dW.shape == ((N, K) if needs[2] else (0,))
        assert [t.shape for t in dA] == [(2, K) if needs[1][0] else (0,), (3, K)]
        assert [t.shape for t in dB] == [(N, 2) if needs[1][0] else (0,), (N, 3)]


def test_packed_h_is_shared_by_both_backends():
    """Without dropout auto may time forward and backward apart, so a backward may receive the other
    backend's packed H: the layouts agree (H itself, and each backward on the other's H)."""
    from fused_lora import kernels
    from fused_lora import torch_row as torch_impl
    M, K, N = 53, 18, 14
    ranks, specs = [4, 1, 6], [0.5, 2.0, -1.0]
    row_adapter = layout("scattered", M, 4, seed=5).to(DEVICE)
    x, w, b, loras = to_device(*make_multi(M, K, N, ranks, torch.float32, seed=2))
    x, w, b = x.detach(), w.detach(), b.detach()
    adapters = [(A.detach(), B.detach(), s, 0.0) for (A, B), s in zip(loras, specs)]
    segs = core_segments.segments(row_adapter, len(adapters))
    dy = torch.randn(M, N).to(DEVICE)
    tol = dict(atol=2e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)
    h = {name: impl.multi_forward(x, w, b, adapters, segs, 0)[1] for name, impl in
         (("torch", torch_impl), ("triton", kernels))}
    assert h["triton"].shape == core_segments.packed_h_shape(M, adapters)
    torch.testing.assert_close(h["triton"], h["torch"], **tol)
    want = torch_impl.multi_backward(dy, x, w, adapters, h["torch"], segs, 0, True, [True] * 3, False, False)
    got = kernels.multi_backward(dy, x, w, adapters, h["torch"], segs, 0, True, [True] * 3, False, False)
    torch.testing.assert_close(got[0], want[0], **tol)
    for pair, pair_want in zip(got[1], want[1]):
        torch.testing.assert_close(pair[0], pair_want[0], **tol)
        torch.testing.assert_close(pair[1], pair_want[1], **tol)
