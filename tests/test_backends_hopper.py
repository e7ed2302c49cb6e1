"""The Hopper-path rows of the backends table ("triton-tma", "triton-onepass"): their reasons, explicit
requests by name, and auto's rule that a row with `check_against` is checked against its reference
row's output before it may be timed (so a kernel no GPU has run cannot win silently)."""
import pytest
import torch

from fused_lora import backends
from fused_lora.backends import BackendUnavailable, Implementation, Problem, Registry, outputs_mismatch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a label for fake-GPU problems; nothing touches a GPU


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_table_lists_the_hopper_rows_after_the_pointer_kernels():
    names = [impl.name for impl in backends.IMPLEMENTATIONS]
    assert names[:2] == ["torch", "triton"] and {"triton-tma", "triton-onepass"} <= set(names)
    assert names.index("triton-tma") > names.index("triton") and names.index("triton-onepass") > names.index("triton")
    assert set(backends.BACKENDS) == set(names)
    assert "triton-tma" in backends.report() and "triton-onepass" in backends.report()


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
def test_hopper_rows_reasons_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok = Problem("fwd", CPU, torch.float16, 37, 72, 40, 16)
    for name in ("triton-tma", "triton-onepass"):
        assert backends.select(ok, name).name == name
        with pytest.raises(BackendUnavailable, match="float16 and bfloat16 only"):
            backends.select(Problem("fwd", CPU, torch.float32, 4, 8, 8, 2), name)
        with pytest.raises(BackendUnavailable, match="rank 100 is above 64"):
            backends.select(Problem("fwd", CPU, torch.float16, 4, 8, 8, 100), name)
        with pytest.raises(BackendUnavailable, match="rank 300 is above 256"):
            backends.select(Problem("fwd", CPU, torch.float16, 4, 8, 8, 300), name)
        with pytest.raises(BackendUnavailable, match="bfloat16 is not supported by Triton's interpreter"):
            backends.select(Problem("fwd", CPU, torch.bfloat16, 4, 8, 8, 2), name)
        with pytest.raises(BackendUnavailable, match="several adapters in one batch run on the triton row"):
            backends.select(Problem("multi_fwd", CPU, torch.float16, 4, 8, 8, 2), name)
    # TMA rows need K and N rows of 16-byte multiples; the single pass does not.
    odd = Problem("fwd", CPU, torch.float16, 7, 5, 13, 3)
    with pytest.raises(BackendUnavailable, match=r"16-byte multiples: K=13, N=5 in float16"):
        backends.select(odd, "triton-tma")
    assert backends.select(odd, "triton-onepass").name == "triton-onepass"
    monkeypatch.setenv(backends.ENV_VAR, "triton-tma")
    assert backends.select(ok).name == "triton-tma"


def test_hopper_rows_refuse_the_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    for name in ("triton-tma", "triton-onepass"):
        with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
            backends.select(Problem("fwd", CPU, torch.float16, 4, 8, 8, 2), name)


@pytest.mark.parametrize("capability, allowed", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), False)])
def test_hopper_rows_run_on_sm90_only(monkeypatch, capability, allowed):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(backends, "triton_installed", lambda: True)
    problem = Problem("fwd", CUDA, torch.bfloat16, 8192, 4096, 4096, 16)
    for name in ("triton-tma", "triton-onepass"):
        reasons = backends.get(name).not_supported_reasons(problem)
        if allowed:
            assert reasons == []
        else:
            assert any(f"sm_{capability[0]}{capability[1]}" in r and "sm_90 only" in r for r in reasons), reasons
    assert backends.get("triton").not_supported_reasons(problem) == []


def test_checked_against_torch_without_dropout_and_the_pointer_kernels_with_it():
    for name in ("triton-tma", "triton-onepass"):
        impl = backends.get(name)
        assert impl.check_against(Problem("fwd", CUDA, torch.float16, 8, 8, 8, 2)) == "torch"
        assert impl.check_against(Problem("fwd", CUDA, torch.float16, 8, 8, 8, 2, dropout=True)) == "triton"
    assert backends.get("torch").check_against is None
    # The triton row: its segment kernels (multi ops) are checked against torch without dropout only.
    triton = backends.get("triton").check_against
    assert triton(Problem("fwd", CUDA, torch.float16, 8, 8, 8, 2)) is None
    assert triton(Problem("multi_fwd", CUDA, torch.float16, 8, 8, 8, 2)) == "torch"
    assert triton(Problem("multi_bwd", CUDA, torch.float16, 8, 8, 8, 2, grads=("dx",))) == "torch"
    assert triton(Problem("multi_fwd", CUDA, torch.float16, 8, 8, 8, 2, dropout=True)) is None


# ---- the check rule, with fake rows: each returns a fixed output, the timer reads the row's ms

class Bench:
    def __init__(self, module):
        self.module = module

    def __call__(self):
        if isinstance(self.module.out, Exception):
            raise self.module.out
        return self.module.out


class Row:
    def __init__(self, name, out):
        self.name, self.out = name, out


def fake_registry(tmp_path, outputs, ms, checked=("new",)):
    rows = [Implementation(name, name, (lambda row=Row(name, out): row),
                           check_against=backends._checked_against if name in checked else None)
            for name, out in outputs.items()]
    timed = []

    def timer(fn):
        timed.append(fn.module.name)
        fn()
        return ms[fn.module.name]

    reg = Registry(rows, timer=timer, cache_directory=str(tmp_path), name_of=lambda d: "Fake GPU",
                   versions_of=lambda: {"v": 1})
    return reg, timed


REF = torch.linspace(-2, 3, 40).reshape(5, 8)


def _fwd(dropout=False):
    return Problem("fwd", CUDA, torch.bfloat16, 64, 8, 8, 4, dropout)


def test_a_wrong_row_is_not_timed_nor_chosen(tmp_path):
    wrong = REF.clone()
    wrong[4, 7] += 1.0  # one wrong element (a lost tile edge, say)
    reg, timed = fake_registry(tmp_path, {"torch": REF, "triton": REF, "new": wrong},
                               {"torch": 3.0, "triton": 2.0, "new": 1.0})
    assert reg.select(_fwd(), bench=Bench).name == "triton"
    choice = reg.known(_fwd())
    assert "new" not in timed and "new" not in choice.ms
    assert "differs from the torch row" in choice.errors["new"]


def test_a_right_row_is_timed_and_can_win(tmp_path):
    close = REF * (1 + 1e-3)  # a different summation order
    reg, timed = fake_registry(tmp_path, {"torch": REF, "triton": REF, "new": (close, None)},
                               {"torch": 3.0, "triton": 2.0, "new": 1.0})
    reg.implementations[0].loader().out = (REF, None)
    reg.implementations[1].loader().out = (REF, None)
    assert reg.select(_fwd(), bench=Bench).name == "new"
    assert timed == ["torch", "triton", "new"] and reg.known(_fwd()).errors == {}


def test_with_dropout_the_reference_is_the_pointer_kernels(tmp_path):
    # torch draws another mask: its output differs; the pointer kernels share the new row's mask.
    reg, _ = fake_registry(tmp_path, {"torch": REF + 5, "triton": REF, "new": REF},
                           {"torch": 3.0, "triton": 2.0, "new": 1.0})
    assert reg.select(_fwd(dropout=True), bench=Bench).name == "new"


def test_a_row_whose_reference_fails_is_not_chosen(tmp_path):
    reg, timed = fake_registry(tmp_path, {"torch": RuntimeError("no memory"), "triton": REF, "new": REF},
                               {"torch": 3.0, "triton": 2.0, "new": 1.0})
    assert reg.select(_fwd(), bench=Bench).name == "triton"
    assert "new" in reg.known(_fwd()).errors and "new" not in timed


@pytest.mark.parametrize("got, want, dtype, expect", [
    (REF, REF, torch.float32, None),
    (REF + 0.02, REF, torch.bfloat16, None),  # 0.02 <= 3e-2 x max|REF| (3)
    (REF + 0.2, REF, torch.bfloat16, "max error"),
    (REF + 0.02, REF, torch.float32, None),
    (REF + 0.05, REF, torch.float32, "max error"),
    ((REF, None), (REF, None), torch.float32, None),
    ((REF, None), (REF, REF), torch.float32, "missing"),
    ((REF, REF), (REF, None), torch.float32, "not expected"),
    (REF[:4], REF, torch.float32, "shape"),
    (torch.where(REF > 2, float("nan"), REF), REF, torch.float32, "non-finite"),
    ((REF,), (REF, REF), torch.float32, "1 outputs against 2"),
])
def test_outputs_mismatch(got, want, dtype, expect):
    result = outputs_mismatch(got, want, dtype)
    assert (result is None) if expect is None else (expect in result), result


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
@pytest.mark.parametrize("broken", [None, "triton-tma", "triton-onepass"])
def test_auto_checks_the_real_hopper_rows_before_timing(tmp_path, monkeypatch, broken):
    """The real table under the interpreter, auto timing on the CPU, a timer that finds each row
    faster than the one before (so the last row timed wins): the Hopper rows' real outputs pass
    the check against torch; a row made to return a wrong Y is never timed nor chosen."""
    import importlib

    from fused_lora.ops import lora_linear_fwd
    from utils import auto_on_cpu, make_problem, with_a_wrong_element
    if broken:
        module = importlib.import_module({"triton-tma": "fused_lora.kernels.tma",
                                          "triton-onepass": "fused_lora.kernels.one_pass"}[broken])
        monkeypatch.setattr(module, "forward", with_a_wrong_element(module.forward, at=(0, 0), by=10.0))
    reg = auto_on_cpu(tmp_path, monkeypatch)
    x, w, b, a, bb = make_problem(37, 40, 72, 4, torch.float16, "cpu", seed=1, requires_grad=False)
    lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, torch.tensor(3, dtype=torch.int64), "auto")
    (choice,) = reg.choices.values()
    rows = ["torch", "triton", "triton-tma", "triton-onepass"]
    assert set(choice.ms) == set(rows) - {broken}
    if broken:
        assert "differs from the torch row" in choice.errors[broken]
    else:
        assert choice.errors == {}
    assert choice.winner == ("triton-onepass" if broken != "triton-onepass" else "triton-tma")
