"""The Hopper-path rows of the backends table ("triton-tma", "triton-onepass"): their reasons, explicit
requests by name, and auto's rule that a row with `check_against` is checked against its reference
row's output before it may be timed (so a kernel no GPU has run cannot win silently)."""
import json

import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.dispatch import table as dispatch_table
from fused_lora.dispatch import registry as dispatch_registry
from fused_lora.dispatch import BackendUnavailable, Implementation, Problem, Registry, outputs_mismatch

CPU = torch.device("cpu")
CUDA = torch.device("cuda")  # a label for fake-GPU problems; nothing touches a GPU


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def test_table_lists_the_hopper_rows_after_the_pointer_kernels():
    names = [impl.name for impl in backends.IMPLEMENTATIONS]
    # torch first (auto's untimed default); dequant-once (quantized ops only) may sit between torch and triton
    assert names[0] == "torch" and "triton" in names and {"triton-tma", "triton-onepass"} <= set(names)
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
    monkeypatch.setattr(dispatch_table, "triton_installed", lambda: True)
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
                           check_against=dispatch_table.hopper_checked_against if name in checked else None)
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
    reg.implementations[0].load().out = (REF, None)
    reg.implementations[1].load().out = (REF, None)
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

    from fused_lora.ops.lora import lora_linear_fwd
    from utils import auto_on_cpu, make_problem, with_a_wrong_element
    if broken:
        module = importlib.import_module({"triton-tma": "fused_lora.kernels.hopper.tma",
                                          "triton-onepass": "fused_lora.kernels.hopper.one_pass"}[broken])
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


# ---- issue 18 item 10: a choice read from the cache is checked once per process before it runs

class CountingBench(Bench):
    """Bench counting each computation of a row's output (a probe, a timing) on the row."""
    def __call__(self):
        self.module.runs += 1
        return super().__call__()


def counting_registry(tmp_path, outputs, ms, checked=("new",)):
    rows = {name: Row(name, out) for name, out in outputs.items()}
    for row in rows.values():
        row.runs = 0
    impls = [Implementation(name, name, (lambda row=row: row),
                            check_against=dispatch_table.hopper_checked_against if name in checked else None)
             for name, row in rows.items()]
    timed = []

    def timer(fn):
        timed.append(fn.module.name)
        fn()
        return ms[fn.module.name]

    reg = Registry(impls, timer=timer, cache_directory=str(tmp_path), name_of=lambda d: "Fake GPU",
                   versions_of=lambda: {"v": 1})
    return reg, rows, timed


def _wrong(ref=REF):
    out = ref.clone()
    out[4, 7] += 1.0  # one wrong element
    return out


def _cache_entry(tmp_path, problem):
    (path,) = tmp_path.glob("backends-*.json")
    return json.loads(path.read_text())["choices"][problem.key()]


@pytest.mark.parametrize("dropout", [False, True])
def test_a_cached_row_that_fails_its_check_is_not_run(tmp_path, dropout):
    """A cached winner that needs the check rule (a row with check_against) is checked on this process's
    first call for its key before it runs; one that does not match is recorded as failed, as when timing,
    and the key is timed afresh among the other rows (the file then names the new winner). Issue 18
    item 10."""
    ms = {"torch": 3.0, "triton": 2.0, "new": 1.0}
    ref = {"torch": REF + 5 if dropout else REF, "triton": REF}  # with dropout torch draws another mask
    first, _, _ = counting_registry(tmp_path, {**ref, "new": REF}, ms)
    assert first.select(_fwd(dropout), bench=CountingBench).name == "new"  # checked and timed: it wins, on disk
    assert _cache_entry(tmp_path, _fwd(dropout))["winner"] == "new"

    # A new process, whose "new" kernel is now wrong (a miscompile, another driver, an edited cache).
    reg, rows, timed = counting_registry(tmp_path, {**ref, "new": _wrong()}, ms)
    assert reg.select(_fwd(dropout), bench=CountingBench).name == "triton"
    choice = reg.known(_fwd(dropout))
    expected_ref = "triton" if dropout else "torch"
    assert choice.winner == "triton" and f"differs from the {expected_ref} row" in choice.errors["new"]
    assert "new" not in timed and sorted(timed) == ["torch", "triton"]  # timed afresh, the failed row not
    assert rows["new"].runs == 1  # one probe
    assert _cache_entry(tmp_path, _fwd(dropout))["winner"] == "triton" and "new" in _cache_entry(
        tmp_path, _fwd(dropout))["errors"]
    assert reg.select(_fwd(dropout), bench=CountingBench).name == "triton" and rows["new"].runs == 1
    if dropout:  # the backward follows the forward's row (its mask): the new winner, not the failed row
        bwd = Problem("bwd", CUDA, torch.bfloat16, 64, 8, 8, 4, True, ("dx", "lora"))
        assert reg.select(bwd, bench=CountingBench).name == "triton"


@pytest.mark.parametrize("dropout", [False, True])
def test_a_cached_row_that_passes_its_check_is_probed_once_per_key(tmp_path, dropout):
    """A cached winner that matches its reference runs; it is probed once per key and process (the row
    and its reference once each), never timed, and later calls trust it. Issue 18 item 10."""
    ms = {"torch": 3.0, "triton": 2.0, "new": 1.0}
    ref = {"torch": REF + 5 if dropout else REF, "triton": REF}
    first, _, _ = counting_registry(tmp_path, {**ref, "new": REF}, ms)
    first.select(_fwd(dropout), bench=CountingBench)
    reg, rows, timed = counting_registry(tmp_path, {**ref, "new": REF * (1 + 1e-3)}, ms)
    for _ in range(3):
        assert reg.select(_fwd(dropout), bench=CountingBench).name == "new"
    assert timed == [] and rows["new"].runs == 1
    assert rows["triton" if dropout else "torch"].runs == 1
    assert reg.known(_fwd(dropout)).source == "disk"


def test_a_cached_trusted_row_is_not_probed(tmp_path):
    """Rows without a check rule (torch; the triton row's single-adapter 16-bit kernels) are trusted from
    the cache as before: no probe, no timing."""
    ms = {"torch": 3.0, "triton": 1.0}
    first, _, _ = counting_registry(tmp_path, {"torch": REF, "triton": REF}, ms, checked=())
    assert first.select(_fwd(), bench=CountingBench).name == "triton"
    reg, rows, timed = counting_registry(tmp_path, {"torch": REF, "triton": _wrong()}, ms, checked=())
    assert reg.select(_fwd(), bench=CountingBench).name == "triton"
    assert timed == [] and rows["triton"].runs == 0 and rows["torch"].runs == 0


def test_an_edited_cache_entry_naming_a_checked_row_is_checked(tmp_path):
    """The attack of issue 18 item 10: a cache entry edited to name a row that was never timed for the key
    (here one that loses the low-rank term: its output is the base alone) is checked before it runs."""
    base = REF - 1.0
    first, _, _ = counting_registry(tmp_path, {"torch": REF, "triton": REF, "new": base},
                                    {"torch": 1.0, "triton": 2.0, "new": 3.0})
    assert first.select(_fwd(), bench=CountingBench).name == "torch"
    (path,) = tmp_path.glob("backends-*.json")
    data = json.loads(path.read_text())
    data["choices"][_fwd().key()] = {"winner": "new", "ms": {"new": 0.001}, "errors": {}}
    path.write_text(json.dumps(data))
    reg, rows, _ = counting_registry(tmp_path, {"torch": REF, "triton": REF, "new": base},
                                     {"torch": 1.0, "triton": 2.0, "new": 3.0})
    assert reg.select(_fwd(), bench=CountingBench).name == "torch"
    assert "differs from the torch row" in reg.known(_fwd()).errors["new"]


def test_a_cached_row_is_not_run_unchecked_where_no_check_can_run(tmp_path, monkeypatch):
    """While a CUDA graph is captured (or without a bench to probe with) nothing can be checked: the
    default row runs (as for an unknown key), and the backward with dropout follows it (same mask); the
    first call that can check does so. Issue 18 item 10."""
    ms = {"torch": 3.0, "triton": 2.0, "new": 1.0}
    outs = {"torch": REF, "triton": REF, "new": REF}
    first, _, _ = counting_registry(tmp_path, outs, ms)
    assert first.select(_fwd(True), bench=CountingBench).name == "new"
    reg, rows, timed = counting_registry(tmp_path, outs, ms)
    bwd = Problem("bwd", CUDA, torch.bfloat16, 64, 8, 8, 4, True, ("dx", "lora"))
    monkeypatch.setattr(dispatch_registry, "timing_allowed", lambda: False)
    assert reg.select(_fwd(True), bench=CountingBench).name == "torch"
    assert reg.select(bwd, bench=CountingBench).name == "torch"
    assert reg.select(_fwd(True)).name == "torch"  # no bench: nothing to probe with
    assert rows["new"].runs == 0
    monkeypatch.setattr(dispatch_registry, "timing_allowed", lambda: True)
    assert reg.select(_fwd(True), bench=CountingBench).name == "new"
    assert reg.select(bwd, bench=CountingBench).name == "new"
    assert timed == []
