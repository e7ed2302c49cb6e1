"""The backends table and auto's timed choice, on CPU: fake rows and an injected timer stand in for a GPU."""
import json
import os
from types import SimpleNamespace

import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.dispatch import registry as dispatch_registry
from fused_lora.dispatch import cache as dispatch_cache
from fused_lora.ops import lora as ops
from fused_lora import torch_row
from fused_lora.torch_row import dense as torch_impl
from fused_lora.dispatch import BackendUnavailable, Implementation, Problem, Registry
from fused_lora.ops.lora import lora_linear
from utils import make_problem

CUDA = torch.device("cuda")  # only a label here: nothing touches a GPU
VERSIONS = {"fused_lora": "test", "torch": "x"}


def fake_row(name, reasons=()):
    """A row whose benched callable returns its own name, so the fake timer knows whose run it times."""
    return Implementation(name, f"fake {name}", lambda: SimpleNamespace(name=name), lambda p: list(reasons))


class FakeTimer:
    def __init__(self, ms):
        self.ms, self.timed = dict(ms), []

    def __call__(self, fn):
        name = fn()
        self.timed.append(name)
        if isinstance(self.ms[name], Exception):
            raise self.ms[name]
        return self.ms[name]


def bench(module):
    return lambda: module.name


def make_registry(tmp_path, ms, rows=None, **kw):
    timer = FakeTimer(ms)
    reg = Registry(rows or [fake_row("torch"), fake_row("triton")], timer=timer, cache_directory=str(tmp_path),
                   name_of=lambda d: f"Fake GPU ({d.type})", versions_of=lambda: VERSIONS, **kw)
    return reg, timer


def fwd(M=8192, N=4096, K=4096, r=16, dropout=False, dtype=torch.bfloat16):
    return Problem("fwd", CUDA, dtype, M, N, K, r, dropout)


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.mark.parametrize("ms, winner", [({"torch": 2.0, "triton": 1.0}, "triton"),
                                        ({"torch": 1.0, "triton": 2.0}, "torch"),
                                        ({"torch": 1.5, "triton": 1.5}, "torch")])  # a tie: the earlier row
def test_the_faster_row_wins(tmp_path, ms, winner):
    reg, timer = make_registry(tmp_path, ms)
    assert reg.select(fwd(), bench=bench).name == winner
    assert sorted(timer.timed) == ["torch", "triton"]
    assert reg.known(fwd()).ms == ms


def test_cache_hit_does_not_time_again(tmp_path):
    reg, timer = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    assert reg.select(fwd(M=8192), bench=bench).name == "triton"
    assert reg.select(fwd(M=5000), bench=bench).name == "triton"  # same power-of-two bucket of M
    assert reg.select(fwd(r=9), bench=bench).name == "triton"  # same rank bucket
    assert len(timer.timed) == 2
    for other in (fwd(M=9000), fwd(N=1024), fwd(K=1024), fwd(r=64), fwd(dropout=True), fwd(dtype=torch.float16),
                  Problem("bwd", CUDA, torch.bfloat16, 8192, 4096, 4096, 16, False, ("dx", "lora"))):
        before = len(timer.timed)
        reg.select(other, bench=bench)
        assert len(timer.timed) == before + 2, f"{other.key()} should be a new key"
    # which gradients are asked for is part of a backward's key
    before = len(timer.timed)
    reg.select(Problem("bwd", CUDA, torch.bfloat16, 8192, 4096, 4096, 16, False, ("lora",)), bench=bench)
    assert len(timer.timed) == before + 2


def test_disk_cache_is_written_and_read_back_by_a_new_registry(tmp_path):
    reg, _ = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    reg.select(fwd(), bench=bench)
    files = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    assert len(files) == 1 and not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    data = json.loads((tmp_path / files[0]).read_text())
    assert data["device"] == "Fake GPU (cuda)" and data["versions"] == VERSIONS
    assert data["choices"][fwd().key()]["winner"] == "triton"

    fresh, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 5.0})  # timings that would pick torch
    assert fresh.select(fwd(), bench=bench).name == "triton"
    assert timer.timed == []
    assert "from disk" in fresh.report()


def test_other_versions_do_not_reuse_the_cache(tmp_path):
    reg, _ = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    reg.select(fwd(), bench=bench)
    other = Registry([fake_row("torch"), fake_row("triton")], timer=FakeTimer({"torch": 1.0, "triton": 2.0}),
                     cache_directory=str(tmp_path), name_of=lambda d: "Fake GPU (cuda)",
                     versions_of=lambda: {**VERSIONS, "torch": "y"})
    assert other.select(fwd(), bench=bench).name == "torch"


@pytest.mark.parametrize("content", ["{not json", json.dumps({"format": 1, "choices": []}), json.dumps([1, 2]),
                                     json.dumps({"format": 1, "choices": {"k": "bad entry"}}), ""])
def test_corrupt_cache_is_ignored_and_replaced(tmp_path, content):
    reg, _ = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    reg.select(fwd(N=1024), bench=bench)  # learns the file name
    path = next(tmp_path.glob("backends-*.json"))
    path.write_text(content)
    fresh, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 2.0})
    with pytest.warns(UserWarning, match="ignored the cache file"):
        assert fresh.select(fwd(), bench=bench).name == "torch"  # timed afresh, no crash
    assert len(timer.timed) == 2
    assert json.loads(path.read_text())["choices"][fwd().key()]["winner"] == "torch"
    assert "Fake GPU" in fresh.report()


def test_unwritable_cache_keeps_the_choice_in_memory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    reg, timer = make_registry(blocker / "cache", {"torch": 2.0, "triton": 1.0})
    assert reg.select(fwd(), bench=bench).name == "triton"
    assert reg.select(fwd(), bench=bench).name == "triton"
    assert len(timer.timed) == 2
    assert any("could not write" in n for n in reg.notes)
    assert "could not write" in reg.report()


def test_env_override_and_forced_rows(tmp_path, monkeypatch):
    reg, timer = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert reg.select(fwd(), bench=bench).name == "torch"
    assert reg.select(fwd(), "triton", bench=bench).name == "triton"  # the argument beats the environment
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="bogus"):
        reg.select(fwd(), bench=bench)
    assert timer.timed == []


def test_forcing_an_unsupported_row_raises_with_its_reasons(tmp_path, monkeypatch):
    reg, timer = make_registry(tmp_path, {"torch": 2.0}, rows=[fake_row("torch"), fake_row("triton", ["no GPU here"])])
    with pytest.raises(BackendUnavailable, match="no GPU here"):
        reg.select(fwd(), "triton", bench=bench)
    monkeypatch.setenv(backends.ENV_VAR, "triton")
    with pytest.raises(BackendUnavailable, match="no GPU here"):
        reg.select(fwd(), bench=bench)
    monkeypatch.delenv(backends.ENV_VAR)
    assert reg.select(fwd(), bench=bench).name == "torch"  # auto: the only row that can run, untimed
    assert timer.timed == []


def test_real_table_reasons(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET"):
        backends.select(Problem("fwd", cpu, torch.float32, 4, 4, 4, 2), "triton")
    with pytest.raises(BackendUnavailable, match="rank 300"):
        backends.select(Problem("fwd", cpu, torch.float32, 4, 4, 4, 300), "triton")
    with pytest.raises(BackendUnavailable, match="float64"):
        backends.select(Problem("fwd", cpu, torch.float64, 4, 4, 4, 2), "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if backends.triton_installed():
        with pytest.raises(BackendUnavailable, match="bfloat16 is not supported by Triton's interpreter"):
            backends.select(Problem("fwd", cpu, torch.bfloat16, 4, 4, 4, 2), "triton")
        assert backends.select(Problem("fwd", cpu, torch.float16, 4, 4, 4, 2), "triton").name == "triton"
    assert backends.get("torch").load() is torch_row
    with pytest.raises(ValueError, match="unknown backend"):
        backends.get("cuda")


def test_no_timing_while_compiling_or_capturing(tmp_path, monkeypatch):
    reg, timer = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert reg.select(fwd(), bench=bench).name == "torch"  # unknown key: the deterministic default
    assert timer.timed == []
    monkeypatch.undo()
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert reg.select(fwd(), bench=bench).name == "triton"  # timed once allowed
    monkeypatch.setattr(dispatch_registry, "timing_allowed", lambda: False)
    assert reg.select(fwd(), bench=bench).name == "triton"  # known winner, still no timing
    assert reg.select(fwd(N=1024), bench=bench).name == "torch"
    assert len(timer.timed) == 2


def test_cpu_auto_is_torch_untimed(tmp_path):
    reg, timer = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    assert reg.select(Problem("fwd", torch.device("cpu"), torch.float32, 64, 64, 64, 4), bench=bench).name == "torch"
    assert timer.timed == [] and not list(tmp_path.iterdir())


def test_empty_sizes_are_not_timed(tmp_path):
    reg, timer = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    assert reg.select(fwd(M=0), bench=bench).name == "torch"
    assert timer.timed == []


def test_a_failing_row_is_not_chosen(tmp_path):
    reg, _ = make_registry(tmp_path, {"torch": 2.0, "triton": RuntimeError("out of shared memory")})
    assert reg.select(fwd(), bench=bench).name == "torch"
    assert "out of shared memory" in reg.known(fwd()).errors["triton"]
    assert "out of shared memory" in reg.report()


def test_when_every_row_fails_the_default_runs_and_nothing_is_cached_on_disk(tmp_path):
    reg, _ = make_registry(tmp_path, {"torch": MemoryError("timing"), "triton": RuntimeError("x")})
    assert reg.select(fwd(), bench=bench).name == "torch"
    assert not list(tmp_path.glob("*.json"))


def test_dropout_backward_follows_the_forward_choice(tmp_path):
    """The rows draw different masks from one seed: forward and backward must run on the same one."""
    reg, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 2.0})
    bwd = Problem("bwd", CUDA, torch.bfloat16, 8192, 4096, 4096, 16, True, ("dx", "lora"))
    assert reg.select(bwd, bench=bench).name == "torch"  # forward not chosen yet: the default
    reg.choices[("Fake GPU (cuda)", bwd.forward_twin().key())] = backends.Choice("triton", {"torch": 2, "triton": 1})
    assert reg.select(bwd, bench=bench).name == "triton"
    assert timer.timed == []


def test_report_lists_keys_and_timings(tmp_path):
    reg, _ = make_registry(tmp_path, {"torch": 1.25, "triton": 0.75})
    reg.select(fwd(), bench=bench)
    text = reg.report()
    assert fwd().key() in text and "triton 0.750 ms" in text and "torch 1.250 ms" in text
    assert "cpu float32" in text
    assert isinstance(backends.report(), str)


def test_ops_dispatch_times_real_implementations_through_the_registry(tmp_path, monkeypatch):
    """lora_linear in auto goes through the registry: the candidates are timed on the actual inputs
    and the winner runs forward and backward (here on CPU, declared tunable for the test)."""
    ran = []

    def counting(name):
        def load():
            return SimpleNamespace(
                forward=lambda *a: (ran.append((name, "fwd")), torch_impl.forward(*a))[1],
                backward=lambda *a: (ran.append((name, "bwd")), torch_impl.backward(*a))[1])
        return Implementation(name, name, load)

    durations = {"slow": 3.0, "fast": 1.0}
    current = {}

    def timer(fn):
        before = len(ran)
        fn()
        name = ran[before][0]
        current.setdefault(name, 0)
        current[name] += 1
        return durations[name]

    reg = Registry([counting("slow"), counting("fast")], timer=timer, cache_directory=str(tmp_path),
                   name_of=lambda d: "cpu-test", tuned_devices=("cpu",), versions_of=lambda: VERSIONS)
    monkeypatch.setattr(dispatch_registry, "REGISTRY", reg)
    x, w, b, a, bb = make_problem(6, 10, 8, 3)
    w.requires_grad_(False)
    b.requires_grad_(False)
    y = lora_linear(x, w, b, a, bb, 0.5)
    y.sum().backward()
    assert current == {"slow": 2, "fast": 2}  # each timed once forward and once backward
    assert ran == [("slow", "fwd"), ("fast", "fwd"), ("fast", "fwd"),  # timed, timed, the real forward
                   ("slow", "bwd"), ("fast", "bwd"), ("fast", "bwd")]
    assert backends.calls[("fwd", "fast")] >= 1 and backends.calls[("bwd", "fast")] >= 1
    ref = torch_impl.forward(x.detach(), w, b, a.detach(), bb.detach(), 0.5, 0.0, 0)[0]
    torch.testing.assert_close(y.detach(), ref)
    assert backends.get("fast").load().forward is not None


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_auto_on_the_real_rows(tmp_path, monkeypatch, p):
    """The real table (torch, triton: on CPU through the interpreter) behind lora_linear, with a timer
    that always finds torch faster, and the forward of the dropout key already tuned to triton:
    without dropout both passes are timed and run torch; with dropout the backward must follow the
    forward onto triton (its mask), which the gradients against the reference check."""
    from utils import assert_close_rule, ref_forward_backward, to64
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert backends.triton_not_supported_reasons(torch.device(device), torch.float32, 4) == []
    order = []

    def torch_first_is_faster(fn):
        fn()
        order.append(len(order) % 2)
        return 1.0 + order[-1]  # candidates are timed in table order: torch, then triton

    reg = Registry(timer=torch_first_is_faster, cache_directory=str(tmp_path), tuned_devices=(device,),
                   name_of=lambda d: "test-device")
    monkeypatch.setattr(dispatch_registry, "REGISTRY", reg)
    M, K, N, r = 12, 20, 16, 4
    x, w, b, a, bb = make_problem(M, K, N, r, torch.float32, device, seed=3)
    w.requires_grad_(False)
    b.requires_grad_(False)
    seed = torch.tensor(321, dtype=torch.int64)
    fwd_problem = Problem("fwd", torch.device(device), torch.float32, M, N, K, r, p > 0)
    if p > 0:
        reg.choices[("test-device", fwd_problem.key())] = backends.Choice("triton", {"torch": 2.0, "triton": 1.0})
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(4)).to(device)
    before = dict(backends.calls)
    y = lora_linear(x, w, b, a, bb, 0.5, p, seed)
    got = torch.autograd.grad(y, (x, a, bb), dy)
    ran = {op: [n for n in reg.names if backends.calls[(op, n)] > before.get((op, n), 0)] for op in ("fwd", "bwd")}
    want = "triton" if p > 0 else "torch"
    assert ran == {"fwd": [want], "bwd": [want]}
    assert len(order) == (0 if p > 0 else 4)  # with dropout: nothing timed (forward known, backward follows)
    keep = backends.get(want).load().keep_mask(321, (M, K), p, device) if p > 0 else None
    y_e, g_e = ref_forward_backward(x, w, b, a, bb, 0.5, dy, keep, p)
    y64, g64 = ref_forward_backward(*to64(x, w, b, a, bb), 0.5, dy.double(), keep, p)
    tf32 = "tf32" if device == "cuda" else None
    assert_close_rule(y, y_e, y64, torch.float32, "y", tf32)
    for name, g, ge, g6 in zip(("dx", "dA", "dB"), got, (g_e[0], g_e[3], g_e[4]), (g64[0], g64[3], g64[4])):
        assert_close_rule(g, ge, g6, torch.float32, name, tf32)


def test_tuned_choices_are_keyed_by_every_implementation_and_the_rules(tmp_path):
    """The tuned-choice cache's digest covers every implementation file by folder (the kernels, the PyTorch
    row, the core math and formats they read, the selection rules), not a list kept by hand: editing any
    one of those files, or adding one, changes the digest (a hand-kept list missed the DoRA PyTorch path and
    the quantized torch code, so editing them reused stale choices; issue 19 item 3)."""
    import os
    import shutil
    root = os.path.dirname(os.path.dirname(backends.__file__))
    copy = tmp_path / "pkg"
    for folder in backends.DIGESTED_FOLDERS:
        shutil.copytree(os.path.join(root, folder), copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    files = backends.digested_sources(str(copy))
    rel = {os.path.relpath(p, copy) for p in files}
    assert {"torch_row/dense.py", "torch_row/dora.py", "torch_row/quant.py", "dispatch/registry.py",
            "core/dropout.py", "kernels/lora/forward.py"} <= rel
    assert len(files) == len(rel) > 30
    before = backends.sources_digest(str(copy))
    assert backends.sources_digest(str(copy)) == before  # a pure function of the files
    for path in files:
        original = open(path, "rb").read()
        with open(path, "ab") as f:
            f.write(b"\n# edited\n")
        assert backends.sources_digest(str(copy)) != before, os.path.relpath(path, copy)
        with open(path, "wb") as f:
            f.write(original)
    assert backends.sources_digest(str(copy)) == before
    (copy / "torch_row" / "new_path.py").write_text("# a new implementation file\n")
    assert backends.sources_digest(str(copy)) != before


# ---- issue 18 items 8 and 9: a cache file that parses but is not a cache, or is not a regular file

def _cache_path(tmp_path):
    """The cache file's path for make_registry's device and versions (learned by tuning one key)."""
    reg, _ = make_registry(tmp_path, {"torch": 2.0, "triton": 1.0})
    reg.select(fwd(N=1024), bench=bench)
    return next(tmp_path.glob("backends-*.json"))


def _good_file(key_winner="triton"):
    return {"format": 1, "device": "Fake GPU (cuda)", "versions": VERSIONS,
            "choices": {fwd().key(): {"winner": key_winner, "ms": {"torch": 2.0, "triton": 1.0}, "errors": {}}}}


def _with_entry(**fields):
    data = _good_file()
    data["choices"][fwd().key()].update(fields)
    return data


WRONG_TYPES = {
    "errors is a number": _with_entry(errors=5),
    "errors holds a number": _with_entry(errors={"torch": 5}),
    "ms is a list": _with_entry(ms=[1.0]),
    "ms holds a string": _with_entry(ms={"triton": "fast"}),
    "ms holds a bool": _with_entry(ms={"triton": True}),
    "winner is a list": _with_entry(winner=["triton"]),
    "versions is a list": {**_good_file(), "versions": [1]},
    "versions holds a dict": {**_good_file(), "versions": {"torch": {"x": 1}}},
    "device is a list": {**_good_file(), "device": ["Fake GPU (cuda)"]},
    "choices is a list": {**_good_file(), "choices": [1]},
    "format is a string": {**_good_file(), "format": "1"},
    # JSON's integers are unbounded: a 401-digit ms crashed every auto forward and `info` with OverflowError
    # (math.isfinite); issue 18, attacker re-trial, finding 4
    "ms holds an integer beyond any float": _with_entry(ms={"triton": 10 ** 400}),
    "ms holds a negative integer beyond any float": _with_entry(ms={"triton": -10 ** 400}),
}


@pytest.mark.parametrize("content", [json.dumps(v) for v in WRONG_TYPES.values()] + ["[" * 100_000 + "]" * 100_000,
                                     json.dumps({"a": "b" * 10}) + " " * 100],
                         ids=list(WRONG_TYPES) + ["nested 100000 deep", "not a cache"])
def test_a_cache_of_wrong_types_is_ignored_with_one_warning(tmp_path, content):
    """A cache file that parses as JSON but is not a backend cache (wrong types, nesting deeper than the
    parser's recursion) is ignored with one warning naming the file, however many calls follow: auto
    times afresh (no TypeError/RecursionError), the report (what `python -m fused_lora info` prints)
    says it was ignored, and the next store replaces it with a good file. Issue 18 item 8."""
    path = _cache_path(tmp_path)
    path.write_text(content)
    fresh, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 2.0})
    with pytest.warns(UserWarning, match="ignored the cache file") as caught:
        assert fresh.select(fwd(), bench=bench).name == "torch"  # timed afresh
    assert len([w for w in caught if "cache file" in str(w.message)]) == 1
    assert str(path) in str(caught[0].message)
    assert len(timer.timed) == 2
    path.write_text(content)  # bad again: later calls of this process neither crash nor warn again
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fresh.select(fwd(M=64), bench=bench).name == "torch"
        assert fresh.select(fwd(), bench=bench).name == "torch"
        text = fresh.report()
    assert "ignored" in text and path.name in text
    data = json.loads(path.read_text())  # replaced by a good file holding this process's choice
    assert data["format"] == 1 and data["choices"][fwd(M=64).key()]["winner"] == "torch"


@pytest.mark.parametrize("what", ["versions is a list", "device is a list", "errors is a number",
                                  "ms holds an integer beyond any float", "fifo"])
def test_info_reports_a_bad_cache_file(tmp_path, monkeypatch, capsys, what):
    """`python -m fused_lora info` with the default cache directory holding a bad cache file (named after
    any device and versions): wrong types, or a FIFO, are listed as ignored, neither a crash nor a hang.
    Issue 18 items 8 and 9."""
    from fused_lora.cli.main import main
    monkeypatch.setenv(backends.CACHE_ENV_VAR, str(tmp_path))
    path = tmp_path / "backends-Other_GPU-0123456789ab.json"
    if what == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("needs os.mkfifo (POSIX)")
        os.mkfifo(path)
    else:
        path.write_text(json.dumps(WRONG_TYPES[what]))
    assert _in_a_thread(lambda: main(["info"])) == 0
    assert f"{path.name}: unreadable, ignored" in capsys.readouterr().out


def _in_a_thread(fn, seconds=20.0):
    """fn() run in a daemon thread: its result, or a failure naming the hang if it has not returned in time
    (a blocked open or an endless read would otherwise hang the test run)."""
    import threading
    out = {}

    def run():
        try:
            out["result"] = fn()
        except BaseException as err:  # handed to the test
            out["error"] = err
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        pytest.fail(f"still running after {seconds} s: hangs")
    if "error" in out:
        raise out["error"]
    return out["result"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo (POSIX)")
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "/dev/urandom", "directory"])
def test_a_cache_path_that_is_not_a_regular_file_is_ignored(tmp_path, kind):
    """A FIFO, a link to an endless device or a directory at the cache file's path: the first call neither
    hangs nor reads without end; the file is ignored with one warning (auto times afresh), the report
    (`python -m fused_lora info`) lists it as ignored without blocking, and a FIFO or link is replaced by a
    good file (the device itself untouched). Issue 18 item 9."""
    path = _cache_path(tmp_path)
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        if not os.path.exists(kind):
            pytest.skip(f"{kind} not on this system")
        path.symlink_to(kind)
    fresh, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 2.0})
    text = _in_a_thread(fresh.report)
    assert f"{path.name}: unreadable, ignored" in text and "not a regular file" in text
    with pytest.warns(UserWarning, match="not a regular file") as caught:
        assert _in_a_thread(lambda: fresh.select(fwd(), bench=bench)).name == "torch"
    assert len([w for w in caught if "cache file" in str(w.message)]) == 1
    assert len(timer.timed) == 2
    if kind != "directory":  # a directory is not replaced by a file: the choice holds in memory
        assert path.is_file() and not path.is_symlink()
        assert json.loads(path.read_text())["choices"][fwd().key()]["winner"] == "torch"
    else:
        assert "could not write" in fresh.report()


def test_an_oversized_cache_file_is_ignored(tmp_path, monkeypatch):
    """A cache file over the size bound is not read (a hostile file costs at most the bound): ignored with
    one warning, timed afresh. Issue 18 item 9."""
    path = _cache_path(tmp_path)
    path.write_text(json.dumps(_good_file()) + " " * 2000)
    monkeypatch.setattr(dispatch_cache, "MAX_CACHE_BYTES", 1000)
    fresh, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 2.0})
    with pytest.warns(UserWarning, match="too large"):
        assert fresh.select(fwd(), bench=bench).name == "torch"
    assert len(timer.timed) == 2
    monkeypatch.setattr(dispatch_cache, "MAX_CACHE_BYTES", 1 << 20)  # within the bound, the same file is read
    path.write_text(json.dumps(_good_file()) + " " * 2000)
    again, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 2.0})
    assert again.select(fwd(), bench=bench).name == "triton" and timer.timed == []


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_a_timing_that_is_not_a_duration_is_a_failure_not_a_choice(tmp_path, bad):
    """A timer answering NaN, inf or a negative time (a broken clock) makes that row fail on the key, as an
    exception would: it cannot win (NaN compares false both ways), and the file written holds only
    finite timings, so the next process reads it instead of ignoring it as malformed. Issue 18 item 8
    (a sibling: the writer keeps to the schema the reader checks)."""
    reg, _ = make_registry(tmp_path, {"torch": 2.0, "triton": bad})
    assert reg.select(fwd(), bench=bench).name == "torch"
    assert "triton" in reg.known(fwd()).errors and "triton" not in reg.known(fwd()).ms
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the file is well formed: no "ignored the cache file" warning
        again, timer = make_registry(tmp_path, {"torch": 1.0, "triton": 1.0})
        assert again.select(fwd(), bench=bench).name == "torch" and timer.timed == []
