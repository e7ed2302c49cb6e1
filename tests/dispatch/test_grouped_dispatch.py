"""The grouped op in the implementation table (issue 20): ops grouped_fwd / grouped_bwd (base "experts") run on
the torch row and on the triton row's grouped kernels (issue 20 item 2), which auto checks against the torch row
before trusting them; the Hopper-path rows refuse them by name; the tuning key carries the expert stack's layout
and its number of experts."""
import pytest
import torch

from fused_lora import dispatch
from fused_lora.core.op_kinds import GROUPED_BWD, GROUPED_FWD, Op
from fused_lora.ops.grouped import lora_linear_grouped
from test_grouped_op import make_grouped
from utils import auto_on_cpu, needs_triton

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a label for fake-GPU problems; nothing touches a GPU


def test_ops_and_function_names():
    assert (GROUPED_FWD.name, GROUPED_FWD.function) == ("grouped_fwd", "grouped_forward")
    assert (GROUPED_BWD.name, GROUPED_BWD.function) == ("grouped_bwd", "grouped_backward")
    assert Op.named("grouped_bwd") is GROUPED_BWD and GROUPED_BWD.forward_twin() == GROUPED_FWD
    assert GROUPED_FWD.base == "experts"


def test_rows_that_run_the_grouped_ops(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in (GROUPED_FWD, GROUPED_BWD):
        problem = dispatch.Problem(op, CPU, torch.float32, 64, 32, 16, 8, base="experts", groups=8)
        assert dispatch.get("torch").not_supported_reasons(problem) == []
        assert op in dispatch.get("triton").ops
        assert not any(r.startswith("op ") for r in dispatch.get("triton").not_supported_reasons(problem))
        for name in ("triton-tma", "triton-onepass"):
            reasons = dispatch.get(name).not_supported_reasons(problem)
            assert any(r.startswith(f"op {op.name}: ") and "expert" in r for r in reasons), (name, reasons)


def test_what_the_grouped_kernels_refuse(monkeypatch):
    """The grouped kernels are the segment kernels' variants: ranks up to 128, float16 / bfloat16 on a GPU (and
    the triton row's own reasons); rank 0 (the base alone) they run."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch.table, "triton_installed", lambda: True)
    triton = dispatch.get("triton")
    for op in (GROUPED_FWD, GROUPED_BWD):
        for rank in (0, 1, 128):
            assert triton.not_supported_reasons(dispatch.Problem(op, CUDA, torch.bfloat16, 64, 32, 16, rank,
                                                                 base="experts", groups=128)) == []
        big = triton.not_supported_reasons(dispatch.Problem(op, CUDA, torch.float16, 64, 32, 16, 129, base="experts"))
        assert big == ["the expert-weight (grouped) kernels take ranks up to 128, the largest rank here is 129"]
        fp32 = triton.not_supported_reasons(dispatch.Problem(op, CUDA, torch.float32, 64, 32, 16, 8, base="experts"))
        assert fp32 == ["the expert-weight (grouped) kernels are compiled for float16 and bfloat16 on a GPU, not "
                        "float32"]


def test_the_check_rule_covers_the_grouped_kernels():
    """No GPU has run them: auto checks them against the torch row before timing them, forward with or without
    dropout (the grouped probe turns it off), backward without; a backward with dropout follows its forward's
    row (another mask: torch could not stand in for it), unchecked there."""
    check = dispatch.get("triton").check_against
    for dropout in (False, True):
        assert check(dispatch.Problem(GROUPED_FWD, CUDA, torch.float16, 8, 8, 8, 2, dropout, base="experts")) == "torch"
    assert check(dispatch.Problem(GROUPED_BWD, CUDA, torch.float16, 8, 8, 8, 2, False, ("dx", "lora"),
                                  base="experts")) == "torch"
    assert check(dispatch.Problem(GROUPED_BWD, CUDA, torch.float16, 8, 8, 8, 2, True, ("dx", "lora"),
                                  base="experts")) is None


def _grouped_inputs():
    x, gs, w, b, a, bb = make_grouped([9, 0, 14, 3], 24, 20, 4, torch.float16, seed=2)
    return x.detach().requires_grad_(True), gs, w, b, a.detach().requires_grad_(True), bb.detach().requires_grad_(True)


@needs_triton("cpu", torch.float16)
@pytest.mark.parametrize("transposed", [False, True])
def test_auto_checks_then_times_the_grouped_kernels(tmp_path, monkeypatch, transposed):
    """auto (timing on the CPU under the interpreter, each row timed faster than the one before): the triton
    row's grouped kernels pass the check against torch and are chosen, forward and backward."""
    reg = auto_on_cpu(tmp_path, monkeypatch)
    x, gs, w, b, a, bb = _grouped_inputs()
    if transposed:
        w = w.transpose(1, 2).contiguous()
    before = (dispatch.calls[("grouped_fwd", "triton")], dispatch.calls[("grouped_bwd", "triton")])
    y = lora_linear_grouped(x, gs, w, b, a, bb, 0.5, transposed=transposed)
    y.sum().backward()
    assert (dispatch.calls[("grouped_fwd", "triton")], dispatch.calls[("grouped_bwd", "triton")]) == (
        before[0] + 1, before[1] + 1)
    layout = "experts_t" if transposed else "experts"
    fwd = dispatch.Problem(GROUPED_FWD, CPU, torch.float16, 26, 20, 24, 4, base=layout, groups=4)
    bwd = dispatch.Problem(GROUPED_BWD, CPU, torch.float16, 26, 20, 24, 4, grads=("dx", "lora"), base=layout, groups=4)
    for problem in (fwd, bwd):
        choice = reg.known(problem)
        assert choice.winner == "triton" and set(choice.ms) == {"torch", "triton"} and not choice.errors, choice


@needs_triton("cpu", torch.float16)
def test_auto_records_a_grouped_kernel_that_loses_the_low_rank_term(tmp_path, monkeypatch):
    """A grouped kernel dropping the low-rank term (B zeroed) fails the check on the probe's random factors (a
    fresh adapter's B = 0 would hide it): recorded as failed, never timed nor run; torch runs the op."""
    from fused_lora import kernels
    right = kernels.grouped_forward
    monkeypatch.setattr(kernels, "grouped_forward", lambda x, segs, w, b, A, B, *rest: right(
        x, segs, w, b, A, torch.zeros_like(B), *rest))
    reg = auto_on_cpu(tmp_path, monkeypatch)
    x, gs, w, b, a, bb = _grouped_inputs()
    before = dispatch.calls[("grouped_fwd", "triton")]
    with torch.no_grad():
        y = lora_linear_grouped(x, gs, w, b, a, bb * 0, 0.5, 0.1, 3)  # a fresh adapter: B = 0, and dropout
    assert dispatch.calls[("grouped_fwd", "triton")] == before
    choice = reg.known(dispatch.Problem(GROUPED_FWD, CPU, torch.float16, 26, 20, 24, 4, True, base="experts",
                                        groups=4))
    assert choice.winner == "torch" and "differs from the torch row" in choice.errors["triton"], choice
    torch.testing.assert_close(y, lora_linear_grouped(x, gs, w, b, a, bb * 0, 0.5, 0.1, 3, backend="torch"))


def test_the_key_carries_the_layout_and_the_expert_count(monkeypatch):
    seen = []
    select = dispatch.select

    def spy(problem, *args, **kwargs):
        seen.append(problem.key())
        return select(problem, *args, **kwargs)
    monkeypatch.setattr(dispatch, "select", spy)
    x, gs = torch.randn(10, 6, requires_grad=True), torch.tensor([4, 0, 6])
    for transposed, w in ((False, torch.randn(3, 5, 6)), (True, torch.randn(3, 6, 5))):
        y = lora_linear_grouped(x, gs, w, None, torch.randn(3, 2, 6), torch.randn(3, 5, 2), 0.5, transposed=transposed)
        y.sum().backward()
    assert seen == ["grouped_fwd float32 M16 N5 K6 r16 dropout=off base=experts E3",
                    "grouped_bwd float32 M16 N5 K6 r16 dropout=off grads=dx base=experts E3",
                    "grouped_fwd float32 M16 N5 K6 r16 dropout=off base=experts_t E3",
                    "grouped_bwd float32 M16 N5 K6 r16 dropout=off grads=dx base=experts_t E3"]
