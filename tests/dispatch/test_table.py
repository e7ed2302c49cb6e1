"""The one implementation table: every row's module offers, for each op the row declares, the function named
`op.function`, and its dropout mask; an op outside a row's declared ops is refused with a reason naming it
(issue 19 item 2: each implementation exports its ops one declared way)."""
import torch

from fused_lora import dispatch
from fused_lora.core import formats
from fused_lora.core.op_kinds import ALL_OPS, Op
from utils import needs_triton


@needs_triton()
def test_every_row_offers_the_ops_it_declares():
    for row in dispatch.IMPLEMENTATIONS:
        module = row.load()
        assert callable(module.keep_mask), row.name
        for op in row.ops:
            assert callable(getattr(module, op.function, None)), f"{row.name} declares {op} but has no {op.function}"


def test_an_op_a_row_does_not_implement_is_refused_by_name():
    for row in dispatch.IMPLEMENTATIONS:
        for op in set(ALL_OPS) - set(row.ops):
            problem = dispatch.Problem(op, torch.device("cpu"), torch.float16, 8, 8, 8, 4)
            assert any(f"op {op.name}" in r for r in row.not_supported_reasons(problem)), (row.name, op)


def test_op_names_and_functions_round_trip():
    """The op's short name is the tuning key's first word and the calls counter's; Op.named reads it back."""
    names = [op.name for op in ALL_OPS]
    assert len(set(names)) == len(names) == len({op.function for op in ALL_OPS})
    for op in ALL_OPS:
        assert Op.named(op.name) is op
        assert dispatch.Problem(op.name, torch.device("cpu"), torch.float32, 1, 1, 1, 1).key().split()[0] == op.name


@needs_triton()
def test_the_table_and_the_kernels_agree_on_the_quantized_layouts():
    """The dispatch table refuses the triton row for a layout the kernels do not read (core.limits.KERNEL_LAYOUTS,
    read by the table without importing the kernels); the kernels' per-format table and it name the same ones."""
    from fused_lora.core.limits import KERNEL_LAYOUTS
    from fused_lora.kernels.quantized import launchers
    from fused_lora.modules.quantized import quantize_int8, quantize_nf4
    w = torch.randn(8, 64)
    layouts = {formats.layout_name(q.data())[0]: q.data().format
               for q in (quantize_nf4(w, double_quant=False), quantize_nf4(w), quantize_int8(w))}
    assert set(layouts) == set(KERNEL_LAYOUTS)
    assert set(layouts.values()) == set(launchers.FORMATS)
    problem = dispatch.Problem("quant_fwd", torch.device("cpu"), torch.float32, 8, 8, 64, 4, base="fp4", blocksize=64)
    assert any("do not read the fp4 layout" in r for r in dispatch.get("triton").not_supported_reasons(problem))
