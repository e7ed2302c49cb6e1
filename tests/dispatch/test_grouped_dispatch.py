"""The grouped op in the implementation table (issue 20 item 1): ops grouped_fwd / grouped_bwd (base "experts")
run on the torch row; the Triton rows refuse them by name until their kernels exist; the tuning key carries the
expert stack's layout and its number of experts."""
import torch

from fused_lora import dispatch
from fused_lora.core.op_kinds import GROUPED_BWD, GROUPED_FWD, Op
from fused_lora.ops.grouped import lora_linear_grouped

CPU = torch.device("cpu")


def test_ops_and_function_names():
    assert (GROUPED_FWD.name, GROUPED_FWD.function) == ("grouped_fwd", "grouped_forward")
    assert (GROUPED_BWD.name, GROUPED_BWD.function) == ("grouped_bwd", "grouped_backward")
    assert Op.named("grouped_bwd") is GROUPED_BWD and GROUPED_BWD.forward_twin() == GROUPED_FWD
    assert GROUPED_FWD.base == "experts"


def test_rows_that_run_the_grouped_ops():
    for op in (GROUPED_FWD, GROUPED_BWD):
        problem = dispatch.Problem(op, CPU, torch.float32, 64, 32, 16, 8, base="experts", groups=8)
        assert dispatch.get("torch").not_supported_reasons(problem) == []
        for name in ("triton", "triton-tma", "triton-onepass"):
            reasons = dispatch.get(name).not_supported_reasons(problem)
            assert any(r.startswith(f"op {op.name}: ") and "expert" in r for r in reasons), (name, reasons)


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
