"""The grouped kernels (LoRA on expert weights, fused_lora/kernels/grouped/: the segment kernels over an expert
stack, and the stack's own gradients) through the op with backend="triton": against the float64 reference
(`core.reference.lora_linear_grouped_ref`: every expert on every row, rows picked by 0/1 columns) with the
Triton row's documented mask, against the torch row without dropout, run to run; the dropout mask is
`kernels.keep_mask(seed, (M, K), p)` over the whole batch, forward and backward; the tile table over the
experts' row counts.

On CPU they run under TRITON_INTERPRET=1 (small shapes: the interpreter is slow; fp32 and fp16); on CUDA
fp16 and bf16 (the grouped kernels are compiled 16-bit only: float32 is refused there).
"""
import pytest
import torch

from fused_lora import dispatch
from fused_lora.core import segments as core_segments
from fused_lora.core.reference import lora_linear_grouped_ref, lora_linear_grouped_ref_h
from fused_lora.ops.grouped import lora_linear_grouped
from test_grouped_op import make_grouped
from utils import assert_close_rule, needs_triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
pytestmark = needs_triton(DEVICE, torch.float16)

DTYPES = [torch.float16] + ([torch.bfloat16] if CUDA else [torch.float32])


def triton_keep(seed, M, K, p):
    """The Triton row's documented mask of the grouped op: its keep_mask over the whole M x K batch."""
    from fused_lora.kernels import keep_mask
    return keep_mask(seed, (M, K), p, DEVICE) if p else None


def inputs(sizes, K, N, r, dtype=torch.float64, bias=True, transposed=False, seed=0):
    """(x, group_sizes, W, b, A, B) on DEVICE in `dtype`, every tensor requiring grad (the base trained too)."""
    made = make_grouped(sizes, K, N, r, torch.float64, bias, seed, transposed, trainable_base=True)
    return tuple(None if t is None else (t.detach().to(DEVICE, dtype).requires_grad_(True)
                                         if t.is_floating_point() else t.to(DEVICE)) for t in made)


def cast(tensors, dtype):
    return tuple(None if t is None else (t.detach().to(dtype).requires_grad_(True) if t.is_floating_point() else t)
                 for t in tensors)


def run(backend, tensors, scaling, p, seed, dy, transposed):
    """(Y, gradients of x, W, b, A, B (None for an absent bias)); the reference draws the Triton row's mask."""
    x, gs, w, b, a, bb = tensors
    if backend == "reference":
        y = lora_linear_grouped_ref(x, gs, w, b, a, bb, scaling, triton_keep(seed, *x.shape, p), p, transposed)
    else:
        y = lora_linear_grouped(x, gs, w, b, a, bb, scaling, p, seed, backend=backend, transposed=transposed)
    wanted = [t for t in (x, w, b, a, bb) if t is not None]
    grads = iter(torch.autograd.grad(y, wanted, dy))
    return y.detach(), [None if t is None else next(grads) for t in (x, w, b, a, bb)]


CASES = {  # group sizes, K, N, r, transposed, bias, dropout p
    "one_expert": ([23], 19, 17, 1, False, True, 0.0),
    "spread": ([3, 0, 7, 1, 2], 37, 29, 5, True, True, 0.25),
    "one_group_all": ([0, 0, 45, 0], 24, 40, 16, False, False, 0.0),  # several tiles; three experts never hit
    "nine_experts": ([4, 0, 9, 1, 0, 33, 2, 0, 6], 21, 35, 64, True, False, 0.1),
    "ends": ([12, 0, 0, 0, 1], 8, 3, 2, True, True, 0.0),
}
if CUDA:  # the GPU's own tiles (128 rows and more): several full tiles per expert, in both layouts
    CASES.update(gpu_normal=([300, 0, 700, 24, 0, 0, 129, 1], 520, 300, 16, False, True, 0.1),
                 gpu_transposed=([0, 1000, 1, 0], 264, 392, 40, True, False, 0.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_all_gradients(dtype, case):
    """Y and the gradients of x, W, b, A, B against the float64 reference (with the Triton row's mask), within
    twice the same-precision reference's error plus the dtype's slack (tests/utils.assert_close_rule)."""
    sizes, K, N, r, transposed, bias, p = CASES[case]
    t64 = inputs(sizes, K, N, r, bias=bias, transposed=transposed, seed=len(sizes))
    dy = torch.randn(sum(sizes), N, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(DEVICE)
    y64, g64 = run("reference", t64, 0.75, p, 17, dy, transposed)
    low = cast(t64, dtype)
    y_eager, g_eager = run("reference", low, 0.75, p, 17, dy.to(dtype), transposed)
    before = (dispatch.calls[("grouped_fwd", "triton")], dispatch.calls[("grouped_bwd", "triton")])
    y, grads = run("triton", cast(t64, dtype), 0.75, p, 17, dy.to(dtype), transposed)
    assert (dispatch.calls[("grouped_fwd", "triton")], dispatch.calls[("grouped_bwd", "triton")]) == (
        before[0] + 1, before[1] + 1)
    assert y.dtype == dtype and y.shape == (sum(sizes), N)
    assert_close_rule(y, y_eager, y64, dtype, "y")
    for name, g, ge, g6, t in zip(("dx", "dW", "db", "dA", "dB"), grads, g_eager, g64, (t64[0], *t64[2:])):
        if t is None:
            continue
        assert g.dtype == dtype and g.shape == t.shape, name
        assert_close_rule(g, ge, g6, dtype, name)


@pytest.mark.parametrize("transposed", [False, True])
def test_matches_torch_row_without_dropout(transposed):
    """The same op on the torch row (an independent implementation: a loop over the experts hit)."""
    dtype = torch.float16 if CUDA else torch.float32
    tensors = inputs([6, 0, 30, 1, 11, 0, 3], 26, 33, 7, dtype, transposed=transposed, seed=3)
    dy = torch.randn(51, 33, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    y_t, g_t = run("torch", tensors, -1.25, 0.0, 0, dy, transposed)
    y, g = run("triton", tensors, -1.25, 0.0, 0, dy, transposed)
    tol = dict(atol=2e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y, y_t, **tol)
    for name, a, b in zip(("dx", "dW", "db", "dA", "dB"), g, g_t):
        torch.testing.assert_close(a, b, **tol, msg=name)


def test_experts_never_hit_get_zero_gradients():
    x, gs, w, b, a, bb = inputs([5, 0, 4, 0], 12, 10, 3, torch.float32 if not CUDA else torch.float16)
    y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.2, 3, backend="triton")
    dW, db, dA, dB = torch.autograd.grad(y, [w, b, a, bb], torch.ones_like(y))
    for grad in (dW, db, dA, dB):
        assert torch.count_nonzero(grad[1]) == 0 and torch.count_nonzero(grad[3]) == 0
        assert torch.count_nonzero(grad[0]) > 0 and torch.count_nonzero(grad[2]) > 0


def test_dropout_mask_is_keep_mask_over_the_whole_batch():
    """H = (D x) A_e^T with D the Triton row's keep_mask(seed, (M, K), p), whatever the grouping (with one A for
    every expert, H does not depend on the group sizes); backward regenerates it: dA and dx equal the
    reference's with that mask (a different mask would change both)."""
    from fused_lora.kernels import grouped_forward
    dtype = torch.float16 if CUDA else torch.float32
    x, gs, w, b, a, bb = inputs([6, 0, 37, 2], 40, 9, 3, dtype)
    M, K = x.shape
    a_same = a.detach()[:1].expand(4, -1, -1).contiguous()
    h = {}
    for sizes in ([6, 0, 37, 2], [45, 0, 0, 0], [0, 1, 1, 43]):
        g = torch.tensor(sizes, device=DEVICE)
        _, h[tuple(sizes)] = grouped_forward(x.detach(), core_segments.grouped(g, M), w.detach(), None, a_same,
                                             bb.detach(), 0.5, 0.3, 1234, False)
    first, *others = h.values()
    for other in others:
        assert torch.equal(first, other)
    keep = triton_keep(1234, M, K, 0.3)
    assert 0.55 < keep.float().mean().item() < 0.85
    want = lora_linear_grouped_ref_h(x.detach().double(), gs, a_same.double(), keep, 0.3)
    torch.testing.assert_close(first.double(), want, atol=1e-5 if not CUDA else 2e-2, rtol=1e-5 if not CUDA else 1e-2)
    # forward and backward agree on the mask: the kernels' dA / dx are the reference's with keep
    dy = torch.randn(M, 9, generator=torch.Generator().manual_seed(5)).to(DEVICE, dtype)
    tensors = (x, gs, w, b, a, bb)
    _, g_tri = run("triton", tensors, 0.5, 0.3, 1234, dy, False)
    _, g_ref = run("reference", cast(tensors, torch.float64), 0.5, 0.3, 1234, dy.double(), False)
    _, g_other = run("reference", cast(tensors, torch.float64), 0.5, 0.3, 4321, dy.double(), False)
    tol = dict(atol=1e-4, rtol=1e-4) if not CUDA else dict(atol=3e-2, rtol=2e-2)
    for i in (0, 3):  # dx, dA
        torch.testing.assert_close(g_tri[i].double(), g_ref[i], **tol)
        assert not torch.allclose(g_tri[i].double(), g_other[i], **tol)


def test_deterministic_run_to_run():
    """Experts spanning several row tiles (several dA / dB partial slots each), dropout, the base trained: two
    runs bit-identical."""
    dtype = torch.float16
    tensors = inputs([70, 0, 41, 3], 40, 36, 5, dtype, transposed=True, seed=7)
    dy = torch.randn(114, 36, generator=torch.Generator().manual_seed(4)).to(DEVICE, dtype)
    first = run("triton", tensors, 0.5, 0.2, 9, dy, True)
    second = run("triton", tensors, 0.5, 0.2, 9, dy, True)
    assert torch.equal(first[0], second[0])
    for g1, g2 in zip(first[1], second[1]):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("transposed", [False, True])
def test_rank_zero_is_the_base_alone(transposed):
    """lora_A = lora_B = None runs on the triton row (rank 0: no shrink or dY pass, every low-rank load masked):
    Y = x W_e^T + b_e, dx = dY W_e, dW and db per expert."""
    dtype = torch.float16 if CUDA else torch.float32
    x, gs, w, b, _, _ = inputs([4, 0, 13, 5], 18, 11, 2, dtype, transposed=transposed)
    before = dispatch.calls[("grouped_fwd", "triton")]
    y = lora_linear_grouped(x, gs, w, b, None, None, 1.0, backend="triton", transposed=transposed)
    assert dispatch.calls[("grouped_fwd", "triton")] == before + 1
    ref = lora_linear_grouped_ref(x, gs, w, b, None, None, 1.0, transposed=transposed)
    dy = torch.randn_like(y)
    tol = dict(atol=1e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(y, ref, **tol)
    for got, want in zip(torch.autograd.grad(y, [x, w, b], dy), torch.autograd.grad(ref, [x, w, b], dy)):
        torch.testing.assert_close(got, want, **tol)


def test_gradients_asked_for_alone():
    """Each gradient on its own (the custom op's flags): dW alone, db alone, dA / dB without dx."""
    dtype = torch.float16 if CUDA else torch.float32
    x, gs, w, b, a, bb = inputs([7, 0, 12], 14, 10, 4, dtype)
    dy = torch.randn(19, 10, generator=torch.Generator().manual_seed(6)).to(DEVICE, dtype)
    full = dict(zip(("x", "w", "b", "a", "bb"), run("torch", (x, gs, w, b, a, bb), 0.5, 0.0, 0, dy, False)[1]))
    tol = dict(atol=2e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)
    for names in (("w",), ("b",), ("a", "bb")):
        tensors = {n: t.detach().requires_grad_(n in names) for n, t in zip(("x", "w", "b", "a", "bb"),
                                                                           (x, w, b, a, bb))}
        y = lora_linear_grouped(tensors["x"], gs, tensors["w"], tensors["b"], tensors["a"], tensors["bb"], 0.5,
                                backend="triton")
        for n, g in zip(names, torch.autograd.grad(y, [tensors[n] for n in names], dy)):
            torch.testing.assert_close(g, full[n], **tol, msg=n)


def test_tile_table_over_the_experts_counts():
    """The table from the experts' row counts on the device (no row index, no sync): every row in exactly one
    tile of its own expert, each tile's last column its first row in the batch (the dropout mask's row),
    bounds giving each expert's tiles (none for an expert without rows); on the meta device (no values) it
    still gives the table's shapes, so nothing waits for the counts."""
    from fused_lora.kernels.segments.launchers import tile_count_bounds, tile_table_of_counts
    sizes = [5, 0, 9, 0, 1, 32]
    segs = core_segments.grouped(torch.tensor(sizes), sum(sizes))
    for block_m in (1, 4, 32):
        tiles, bounds = tile_table_of_counts(segs.device_counts, sum(sizes), len(sizes), block_m, global_rows=True)
        assert tiles.shape == (tile_count_bounds(sum(sizes), len(sizes), block_m)[0], 4)
        covered = torch.zeros(sum(sizes), dtype=torch.int64)
        for e, first, end, row in tiles.tolist():
            if first == end:
                assert e == -1
                continue
            lo, hi = segs.offsets[e + 1], segs.offsets[e + 2]
            assert lo <= first < end <= hi and end - first <= block_m and row == first
            covered[first:end] += 1
        assert (covered == 1).all()
        for e, size in enumerate(sizes):
            mine = tiles[bounds[e]:bounds[e + 1]]
            assert (mine[:, 0] == e).all() and int((mine[:, 2] - mine[:, 1]).sum()) == size
    meta = torch.empty(6, dtype=torch.int64, device="meta")
    tiles, bounds = tile_table_of_counts(meta, 300, 5, 64, global_rows=True)
    assert tiles.is_meta and tiles.shape == (tile_count_bounds(300, 5, 64)[0], 4)


def test_refusals_name_the_reason():
    x, gs, w, b, a, bb = (t.detach() if t is not None and t.is_floating_point() else t
                          for t in make_grouped([3, 1], 6, 5, 129, torch.float32))
    with pytest.raises(dispatch.BackendUnavailable, match=r"expert-weight \(grouped\) kernels take ranks up to 128"):
        lora_linear_grouped(x, gs, w, b, a, bb, 1.0, backend="triton")
    gpu_fp32 = dispatch.Problem("grouped_fwd", torch.device("cuda"), torch.float32, 8, 8, 8, 16, base="experts",
                                groups=2)
    assert any("float32" in r and "grouped" in r for r in dispatch.triton_multi_reasons(gpu_fp32))
    with pytest.raises(dispatch.BackendUnavailable, match="dtype torch.float64 is not one of"):
        lora_linear_grouped(x.double(), gs, w.double(), b.double(), a[:, :4].double(), bb[..., :4].double(), 1.0,
                            backend="triton")


def test_double_backward_uses_the_triton_mask():
    """create_graph=True recomputes the forward with differentiable ops and the mask of the row that ran it (the
    Triton row's), so the first-order gradients equal the kernels' ones, dropout on."""
    x, gs, w, b, a, bb = inputs([5, 0, 11, 3], 16, 12, 3, torch.float32 if not CUDA else torch.float16)
    dy = torch.randn(19, 12, generator=torch.Generator().manual_seed(8)).to(DEVICE, x.dtype)
    y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, 0.4, 5, backend="triton")
    tensors = [x, w, b, a, bb]
    plain = torch.autograd.grad(y, tensors, dy, retain_graph=True)
    before = dispatch.calls[("grouped_bwd_differentiable", "triton")]
    with_graph = torch.autograd.grad(y, tensors, dy, create_graph=True)
    assert dispatch.calls[("grouped_bwd_differentiable", "triton")] == before + 1
    tol = dict(atol=1e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)
    for g1, g2 in zip(plain, with_graph):
        torch.testing.assert_close(g1, g2.detach(), **tol)


def test_weight_and_factors_read_through_strides():
    """A non-contiguous expert stack (an (E, N, K) view of (E, K, N) storage) and B as peft's ParamWrapper holds
    it (an (N, E * r) matrix seen as (E, N, r): a permuted view) give what their contiguous copies give: the
    kernels read both through their strides."""
    dtype = torch.float16 if CUDA else torch.float32
    x, gs, w, b, a, bb = (t.detach() for t in inputs([6, 0, 9, 4], 20, 14, 3, dtype))
    w_view = w.transpose(1, 2).contiguous().transpose(1, 2)
    b_view = bb.permute(1, 0, 2).reshape(14, 4 * 3).view(14, 4, 3).permute(1, 0, 2)
    assert not w_view.is_contiguous() and not b_view.is_contiguous() and torch.equal(b_view, bb)
    want = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, backend="triton")
    got = lora_linear_grouped(x, gs, w_view, b, a, b_view, 0.5, backend="triton")
    tol = dict(atol=1e-5, rtol=1e-5) if not CUDA else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)
