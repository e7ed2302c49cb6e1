"""The dequant-once row of the implementation table (fused_lora.dispatch.dequant_once): its module (the
dequant-once computation composed with the device's dequantizer: the one-launch Triton kernel on CUDA, here
checked against the float64 reference under the interpreter), its reasons and check rule, auto choosing it
(fake timers, as test_selection.py) and FUSED_LORA_NO_TRANSIENT_WEIGHT keeping auto off it."""
import pytest
import torch

from fused_lora import dispatch
from fused_lora.core import formats
from fused_lora.core.op_kinds import ALL_OPS, FWD, QUANT_BWD, QUANT_FWD, QUANT_MULTI_BWD, QUANT_MULTI_FWD
from fused_lora.dispatch import Choice, Implementation, Problem, dequant_once, table
from fused_lora.dispatch import registry as dispatch_registry
from fused_lora.torch_row.dequant_once import DequantOnce
from test_dequant_once import check_multi, check_single, weight
from test_selection import CUDA, bench, fake_row, make_registry
from utils import TRITON_DEVICE, needs_triton

ENV = dispatch.NO_TRANSIENT_WEIGHT_ENV_VAR
QUANT_OPS = (QUANT_FWD, QUANT_BWD, QUANT_MULTI_FWD, QUANT_MULTI_BWD)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.delenv(ENV, raising=False)


def quant_problem(op=QUANT_FWD, device=CUDA, dtype=torch.bfloat16, dropout=False, base="nf4-nested", blocksize=64):
    grads = ("dx", "lora") if op.backward else ()
    return Problem(op, device, dtype, 8192, 4096, 4096, 16, dropout, grads, base, blocksize)


# ---- the module: the row's computation with the device's dequantizer

def test_the_rows_module_is_the_dequant_once_computation_with_the_devices_dequantizer(monkeypatch):
    module = dispatch.get("dequant-once").load()
    assert isinstance(module, DequantOnce) and module is dispatch.get("dequant-once").load()  # built once
    assert module.dequantize is dequant_once.dequantize
    data = weight("nf4-nested", 8, 64)
    seen = []
    monkeypatch.setattr(formats, "dequantize", lambda d, dt: seen.append(("cpu", dt)) or d.dequantize_rows(0, 8).to(dt))
    dequant_once.dequantize(data, torch.float16)
    assert seen == [("cpu", torch.float16)]
    # a weight on CUDA goes to the kernels' one-launch dequantization (loaded on first use)
    launcher = pytest.importorskip("fused_lora.kernels.quantized.launchers")
    monkeypatch.setattr(dequant_once, "weight_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr(launcher, "dequantize", lambda d, dt: seen.append(("triton", dt)))
    dequant_once.dequantize(data, torch.bfloat16)
    assert seen[-1] == ("triton", torch.bfloat16)


def _triton_row():
    from fused_lora.kernels.quantized.launchers import dequantize
    return DequantOnce(dequantize)


@needs_triton()
@pytest.mark.parametrize("fmt", ["nf4", "nf4-nested", "nf4-32", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_with_the_triton_dequantization_against_the_float64_reference(fmt, dtype):
    # What the row runs on CUDA (the kernel under the interpreter here): one adapter, with dropout too.
    row, device = _triton_row(), TRITON_DEVICE
    check_single(row, weight(fmt, 40, 320, seed=1, device=device), 33, 4, dtype, p=0.0, device=device)
    check_single(row, weight(fmt, 40, 320, seed=2, device=device), 33, 4, dtype, p=0.2, bias=False, device=device)


@needs_triton()
@pytest.mark.parametrize("fmt", ["nf4-nested", "int8"])
def test_several_adapters_with_the_triton_dequantization(fmt):
    row_adapter = torch.randint(-1, 2, (40,), generator=torch.Generator().manual_seed(2))
    check_multi(_triton_row(), weight(fmt, 24, 192, seed=3, device=TRITON_DEVICE), torch.float16,
                [(4, 0.5, 0.2), (2, 2.0, 0.0)], row_adapter, device=TRITON_DEVICE)


# ---- the table: ops, reasons, the check rule

def test_the_row_runs_the_quantized_ops_only_and_names_the_others():
    row = dispatch.get("dequant-once")
    assert row.ops == frozenset(QUANT_OPS) and row.transient_weight
    for op in set(ALL_OPS) - set(QUANT_OPS):
        reasons = row.not_supported_reasons(Problem(op, CUDA, torch.bfloat16, 8, 8, 8, 4))
        assert any(f"op {op.name}" in r and "quantized base" in r for r in reasons), (op, reasons)


def test_reasons_on_cuda_and_elsewhere(monkeypatch):
    row = dispatch.get("dequant-once")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for base, blocksize in (("nf4", 32), ("nf4-nested", 64), ("nf4", 4096), ("int8", 0)):
            assert row.not_supported_reasons(quant_problem(dtype=dtype, base=base, blocksize=blocksize)) == []
    assert any("float64" in r for r in row.not_supported_reasons(quant_problem(dtype=torch.float64)))
    # off CUDA the dequantization is PyTorch's: any dtype, no Triton needed
    monkeypatch.setattr(table, "triton_installed", lambda: False)
    assert row.not_supported_reasons(quant_problem(device=torch.device("cpu"), dtype=torch.float64)) == []
    assert any("triton is not installed" in r for r in row.not_supported_reasons(quant_problem()))


@pytest.mark.parametrize("op", QUANT_OPS)
@pytest.mark.parametrize("dropout", [False, True])
def test_checked_against_torch_before_auto_trusts_it(op, dropout):
    # No GPU has run its Triton dequantization: every key is checked, dropout too (the torch row's mask).
    assert dispatch.get("dequant-once").check_against(quant_problem(op, dropout=dropout)) == "torch"


# ---- auto: fake rows and timers (the real rows cannot run on a GPU here)

def _rows():
    lean = fake_row("triton")
    transient = Implementation("dequant-once", "fake", lambda: type("M", (), {"name": "dequant-once"})(),
                               transient_weight=True)
    return [fake_row("torch"), transient, lean]


def test_auto_chooses_it_where_it_is_fastest(tmp_path):
    reg, timer = make_registry(tmp_path, {"torch": 3.0, "dequant-once": 1.0, "triton": 2.0}, rows=_rows())
    assert reg.select(fwd_problem(), bench=bench).name == "dequant-once"
    assert sorted(timer.timed) == ["dequant-once", "torch", "triton"]


def fwd_problem(dropout=False):
    return Problem(FWD, CUDA, torch.bfloat16, 8192, 4096, 4096, 16, dropout)


def test_the_setting_keeps_auto_off_rows_allocating_a_transient_weight(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV, "1")
    reg, timer = make_registry(tmp_path, {"torch": 3.0, "dequant-once": 1.0, "triton": 2.0}, rows=_rows())
    assert reg.select(fwd_problem(), bench=bench).name == "triton"
    assert "dequant-once" not in timer.timed  # not even timed: timing it would allocate the buffer
    assert [impl.name for impl in reg.candidates(fwd_problem())] == ["torch", "triton"]
    assert reg.select(fwd_problem(), "dequant-once", bench=bench).name == "dequant-once"  # by name: still runs
    assert f"{ENV}=1" in reg.report() and "dequant-once" in reg.report()
    monkeypatch.setenv(ENV, "0")  # "0" (or empty) is off
    assert [impl.name for impl in reg.candidates(fwd_problem())] == ["torch", "dequant-once", "triton"]


def test_with_the_setting_a_known_transient_winner_gives_way_to_the_next_fastest_timed_row(tmp_path, monkeypatch):
    reg, timer = make_registry(tmp_path, {"torch": 3.0, "dequant-once": 1.0, "triton": 2.0}, rows=_rows())
    assert reg.select(fwd_problem(), bench=bench).name == "dequant-once"
    reg.choices[("Fake GPU (cuda)", fwd_problem(True).key())] = Choice("dequant-once", {"torch": 1.5,
                                                                                        "dequant-once": 1.0})
    timed = list(timer.timed)
    monkeypatch.setenv(ENV, "1")
    assert reg.select(fwd_problem(), bench=bench).name == "triton"  # the fastest other row the timings name
    # only torch was timed besides it: torch; with dropout, backward follows what the forward runs (rule 4)
    assert reg.select(fwd_problem(True), bench=bench).name == "torch"
    bwd = Problem("bwd", CUDA, torch.bfloat16, 8192, 4096, 4096, 16, True, ("dx", "lora"))
    assert reg.select(bwd, bench=bench).name == "torch"
    assert timer.timed == timed  # nothing timed again
    monkeypatch.delenv(ENV)
    assert reg.select(fwd_problem(), bench=bench).name == "dequant-once"  # the key's choice was kept


def test_real_ops_choose_it_by_name_and_by_auto(tmp_path, monkeypatch):
    # The real table on the CPU with auto timing enabled (under the interpreter triton is a candidate too),
    # and a timer that finds the dequant-once row fastest: it is checked against torch, chosen and run.
    from fused_lora.ops.quant import lora_linear_quant
    from fused_lora.modules import quantized as quant
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ran = []
    real = formats.dequantize
    monkeypatch.setattr(formats, "dequantize", lambda d, dt: ran.append(1) or real(d, dt))

    def dequant_once_is_fastest(fn):
        before = len(ran)
        fn()
        return 1.0 if len(ran) > before else 5.0

    reg = dispatch.Registry(timer=dequant_once_is_fastest, cache_directory=str(tmp_path), tuned_devices=("cpu",),
                            name_of=lambda d: "test-device")
    monkeypatch.setattr(dispatch_registry, "REGISTRY", reg)
    g = torch.Generator().manual_seed(0)
    qw = quant.quantize_nf4(torch.randn(24, 128, generator=g) * 0.1, blocksize=64)
    x = torch.randn(20, 128, generator=g).requires_grad_(True)
    a = (torch.randn(4, 128, generator=g) * 0.1).requires_grad_(True)
    b = (torch.randn(24, 4, generator=g) * 0.1).requires_grad_(True)
    runs = {}
    for backend in ("auto", "torch", "dequant-once"):
        out = runs[backend] = {}
        before = dict(dispatch.calls)
        y = lora_linear_quant(x, qw, None, a, b, 0.5, backend=backend)
        out["grads"] = torch.autograd.grad(y.sum(), (x, a, b))
        out["y"] = y.detach()
        out["ran"] = {op: [n for n in reg.names if dispatch.calls[(op, n)] > before.get((op, n), 0)]
                      for op in ("quant_fwd", "quant_bwd")}
    for backend, ran in (("auto", "dequant-once"), ("torch", "torch"), ("dequant-once", "dequant-once")):
        assert runs[backend]["ran"] == {"quant_fwd": [ran], "quant_bwd": [ran]}, backend
    problem = Problem("quant_fwd", x.device, x.dtype, 20, 24, 128, 4, False, base="nf4-nested", blocksize=64)
    assert reg.known(problem).winner == "dequant-once" and not reg.known(problem).errors
    torch.testing.assert_close(runs["auto"]["y"], runs["torch"]["y"])
    for g1, g2 in zip(runs["auto"]["grads"], runs["torch"]["grads"]):
        torch.testing.assert_close(g1, g2)
    monkeypatch.setenv(ENV, "1")  # the same key now runs the next fastest timed row, without the buffer
    before = dict(dispatch.calls)
    lora_linear_quant(x, qw, None, a, b, 0.5, backend="auto")
    assert dispatch.calls[("quant_fwd", "dequant-once")] == before.get(("quant_fwd", "dequant-once"), 0)


def test_a_wrong_dequantization_is_not_chosen_by_auto(tmp_path, monkeypatch):
    # The check rule: a dequant-once row whose W is off is recorded as failed and never chosen.
    from fused_lora.ops.quant import lora_linear_quant
    from fused_lora.modules import quantized as quant
    from utils import auto_on_cpu
    reg = auto_on_cpu(tmp_path, monkeypatch)
    real = formats.dequantize
    monkeypatch.setattr(formats, "dequantize", lambda d, dt: real(d, dt) * 1.5)
    g = torch.Generator().manual_seed(1)
    qw = quant.quantize_int8(torch.randn(24, 128, generator=g) * 0.1)
    x, a, b = torch.randn(20, 128, generator=g), torch.randn(4, 128, generator=g), torch.randn(24, 4, generator=g)
    lora_linear_quant(x, qw, None, a, b, 0.5, backend="auto")
    choice = reg.known(Problem("quant_fwd", x.device, x.dtype, 20, 24, 128, 4, False, base="int8"))
    assert choice.winner != "dequant-once" and "differs from the torch row" in choice.errors["dequant-once"], choice
