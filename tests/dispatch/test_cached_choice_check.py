"""A winner read from the backend cache runs only after the check rule passed in this process (issue 18
item 10), for every op family with a check rule: the Hopper-path rows (single adapter, forward and
backward), the segment kernels (several adapters), the quantized-base kernels (one adapter, forward and
backward; several adapters), the grouped kernels (expert weights, forward and backward). DoRA's ops have
no check rule (their rows are trusted), so nothing of theirs is here. Real ops on CPU under the interpreter (utils.auto_on_cpu), with a cache entry edited to
name a row whose kernel loses the low-rank term: that row must be recorded as failed, not run."""
import importlib
import json

import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.dispatch import Problem
from utils import auto_on_cpu, make_problem, needs_triton

pytestmark = needs_triton("cpu", torch.float16)

CPU = torch.device("cpu")
SEED = torch.tensor(3, dtype=torch.int64)


def _registry_reading(tmp_path, monkeypatch, problem: Problem, winner: str):
    """A fresh auto registry (a new process, as far as choices go) whose cache file names `winner` for
    `problem`'s key, as an edited file would: never timed nor checked for it."""
    first = auto_on_cpu(tmp_path, monkeypatch)
    # Any tuned key writes the file: a float32 forward (torch against the trusted pointer kernels; the
    # timed callable runs nothing).
    first.select(Problem("fwd", CPU, torch.float32, 16, 16, 16, 4), bench=lambda module: lambda: None)
    (path,) = tmp_path.glob("backends-*.json")
    data = json.loads(path.read_text())
    data["choices"][problem.key()] = {"winner": winner, "ms": {winner: 0.001}, "errors": {}}
    path.write_text(json.dumps(data))
    return auto_on_cpu(tmp_path, monkeypatch), path


def _zero(t):
    return torch.zeros_like(t)


def _hopper_fwd(monkeypatch):
    from fused_lora.kernels.hopper import one_pass
    from fused_lora.ops.lora import lora_linear_fwd
    right = one_pass.forward
    monkeypatch.setattr(one_pass, "forward", lambda x, w, b, A, B, *rest: right(x, w, b, A, _zero(B), *rest))
    x, w, b, a, bb = make_problem(37, 40, 72, 4, torch.float16, "cpu", seed=1, requires_grad=False)
    return (Problem("fwd", CPU, torch.float16, 37, 72, 40, 4), "triton-onepass",
            lambda backend: lora_linear_fwd(x, w, b, a, bb, 0.5, 0.0, SEED, backend)[0])


def _hopper_bwd(monkeypatch):
    from fused_lora.kernels.hopper import tma
    from fused_lora.ops.lora import lora_linear_bwd
    right = tma.backward
    monkeypatch.setattr(tma, "backward", lambda dy, x, w, A, B, *rest: right(dy, x, w, A, _zero(B), *rest))
    x, w, _, a, bb = make_problem(37, 40, 72, 4, torch.float16, "cpu", seed=1, requires_grad=False)
    h = (x.double() @ a.double().t()).to(x.dtype)
    dy = torch.randn(37, 72, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    return (Problem("bwd", CPU, torch.float16, 37, 72, 40, 4, grads=("dx", "lora")), "triton-tma",
            lambda backend: lora_linear_bwd(dy, x, w, a, bb, h, 0.5, 0.0, SEED, backend, True, True, False, False)[:3])


def _multi_fwd(monkeypatch):
    kernels = importlib.import_module("fused_lora.kernels")
    from fused_lora.ops.multi import lora_linear_multi
    right = kernels.multi_forward
    monkeypatch.setattr(kernels, "multi_forward", lambda x, w, b, adapters, *rest: right(
        x, w, b, [(A, _zero(B), s, p) for A, B, s, p in adapters], *rest))
    g = torch.Generator().manual_seed(4)
    x, w, b = torch.randn(6, 40, generator=g), torch.randn(24, 40, generator=g) * 0.2, torch.randn(24, generator=g)
    adapters = [(torch.randn(r, 40, generator=g) * 0.2, torch.randn(24, r, generator=g) * 0.5, 0.5, 0.0)
                for r in (4, 2)]
    rows = torch.tensor([0, 1, -1, 0, 1, 1])
    return (Problem("multi_fwd", CPU, torch.float32, 6, 24, 40, 4), "triton",
            lambda backend: lora_linear_multi(x, w, b, adapters, rows, backend=backend))


def _quant_inputs():
    from fused_lora.modules import quantized as quant
    g = torch.Generator().manual_seed(0)
    qw = quant.quantize_nf4(torch.randn(24, 128, generator=g) * 128 ** -0.5, blocksize=64, double_quant=True)
    x = torch.randn(20, 128, generator=g)
    a, b = torch.randn(4, 128, generator=g) * 0.1, torch.randn(24, 4, generator=g) * 0.5
    return x, qw, a, b


def _quant_fwd(monkeypatch):
    from fused_lora import kernels as kq
    from fused_lora.ops.quant import lora_linear_quant
    right = kq.forward_quant
    monkeypatch.setattr(kq, "forward_quant", lambda x, wq, bias, A, B, *rest: right(x, wq, bias, A, _zero(B), *rest))
    x, qw, a, b = _quant_inputs()
    return (Problem("quant_fwd", CPU, torch.float32, 20, 24, 128, 4, base="nf4-nested", blocksize=64), "triton",
            lambda backend: lora_linear_quant(x, qw, None, a, b, 0.5, backend=backend))


def _quant_bwd(monkeypatch):
    from fused_lora import kernels as kq
    from fused_lora.ops.quant import lora_linear_quant
    right = kq.backward_quant
    monkeypatch.setattr(kq, "backward_quant", lambda dy, x, wq, A, B, *rest: right(dy, x, wq, A, _zero(B), *rest))
    x, qw, a, b = _quant_inputs()
    x.requires_grad_()

    def run(backend):
        a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
        lora_linear_quant(x, qw, None, a1, b1, 0.5, backend=backend).sum().backward()
        grads = (x.grad.clone(), a1.grad, b1.grad)
        x.grad = None
        return grads
    return (Problem("quant_bwd", CPU, torch.float32, 20, 24, 128, 4, grads=("dx", "lora"), base="nf4-nested",
                    blocksize=64), "triton", run)


def _quant_multi_fwd(monkeypatch):
    from fused_lora.modules import quantized as quant
    from fused_lora import kernels as quant_multi
    from fused_lora.ops.quant import lora_linear_quant_multi
    right = quant_multi.quant_multi_forward
    monkeypatch.setattr(quant_multi, "quant_multi_forward", lambda x, wq, b, adapters, *rest: right(
        x, wq, b, [(A, _zero(B), s, p) for A, B, s, p in adapters], *rest))
    g = torch.Generator().manual_seed(5)
    qw = quant.quantize_int8(torch.randn(48, 128, generator=g) * 128 ** -0.5)
    x = torch.randn(6, 128, generator=g)
    adapters = [(torch.randn(r, 128, generator=g) * 0.1, torch.randn(48, r, generator=g) * 0.5, 0.5, 0.0)
                for r in (4, 2)]
    rows = torch.tensor([0, 1, -1, 0, 1, 1])
    return (Problem("quant_multi_fwd", CPU, torch.float32, 6, 48, 128, 4, base="int8"), "triton",
            lambda backend: lora_linear_quant_multi(x, qw, None, adapters, rows, backend=backend))


def _grouped_inputs():
    from test_grouped_op import make_grouped
    x, gs, w, b, a, bb = make_grouped([9, 0, 14, 3], 24, 20, 4, torch.float32, seed=6, transposed=True)
    return x.detach(), gs, w, b.detach(), a.detach(), bb.detach()


def _grouped_fwd(monkeypatch):
    kernels = importlib.import_module("fused_lora.kernels")
    from fused_lora.ops.grouped import lora_linear_grouped
    right = kernels.grouped_forward
    monkeypatch.setattr(kernels, "grouped_forward", lambda x, segs, w, b, A, B, *rest: right(
        x, segs, w, b, A, _zero(B), *rest))
    x, gs, w, b, a, bb = _grouped_inputs()
    return (Problem("grouped_fwd", CPU, torch.float32, 26, 20, 24, 4, base="experts_t", groups=4), "triton",
            lambda backend: lora_linear_grouped(x, gs, w, b, a, bb, 0.5, backend=backend, transposed=True))


def _grouped_bwd(monkeypatch):
    kernels = importlib.import_module("fused_lora.kernels")
    from fused_lora.ops.grouped import lora_linear_grouped
    right = kernels.grouped_backward
    monkeypatch.setattr(kernels, "grouped_backward", lambda dy, x, segs, w, A, B, *rest: right(
        dy, x, segs, w, A, _zero(B), *rest))
    x, gs, w, b, a, bb = _grouped_inputs()

    def run(backend):
        x1, a1, b1 = (t.clone().requires_grad_() for t in (x, a, bb))
        lora_linear_grouped(x1, gs, w, b, a1, b1, 0.5, backend=backend, transposed=True).sum().backward()
        return x1.grad, a1.grad, b1.grad
    return (Problem("grouped_bwd", CPU, torch.float32, 26, 20, 24, 4, grads=("dx", "lora"), base="experts_t",
                    groups=4), "triton", run)


@pytest.mark.parametrize("case", [_hopper_fwd, _hopper_bwd, _multi_fwd, _quant_fwd, _quant_bwd, _quant_multi_fwd,
                                  _grouped_fwd, _grouped_bwd],
                         ids=["hopper fwd", "hopper bwd", "multi fwd", "quant fwd", "quant bwd", "quant multi fwd",
                              "grouped fwd", "grouped bwd"])
def test_a_cached_row_losing_the_low_rank_term_is_not_run(tmp_path, monkeypatch, case):
    """The cache names, for the op's key, a row whose kernel drops the low-rank term: auto checks it on its
    first call in the process (one probe), records it as failed, times the key afresh without it, and the
    op's result is the torch row's; the file then names the new winner. Issue 18 item 10."""
    problem, row, run = case(monkeypatch)
    assert backends.get(row).check_against(problem) is not None  # the case is one the check rule covers
    reg, path = _registry_reading(tmp_path, monkeypatch, problem, row)
    op = problem.op
    before = backends.calls[(op, row)]
    with torch.no_grad() if not op.backward else torch.enable_grad():
        got = run("auto")
    assert backends.calls[(op, row)] == before, f"{row} ran the {op} op"
    choice = reg.known(problem)
    assert choice.winner != row and "differs from the torch row" in choice.errors[row], choice
    want = run("torch")
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2)  # torch or a checked row: within the check's bound
    assert json.loads(path.read_text())["choices"][problem.key()]["winner"] == choice.winner
