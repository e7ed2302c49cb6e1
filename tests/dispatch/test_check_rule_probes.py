"""Regression tests from a review of the Hopper-path rows and the segment kernels: each one failed
on the code before its fix."""
import pytest
import torch

from fused_lora import dispatch as backends
from fused_lora.dispatch import Problem
from test_hopper_rows import REF, Bench, fake_registry
from utils import auto_on_cpu

CUDA = torch.device("cuda")  # a label for fake-GPU problems; nothing touches a GPU


@pytest.fixture(autouse=True)
def no_env_override(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


def _problems():
    fwd = Problem("fwd", CUDA, torch.bfloat16, 64, 8, 8, 4, True)
    bwd = Problem("bwd", CUDA,
                  torch.bfloat16, 64, 8, 8, 4, True, ("dx", "lora"))
    return fwd, bwd


def test_backward_with_dropout_does_not_run_an_unchecked_row(tmp_path):
    # Rule 4 makes a backward with dropout follow its forward's row; rule 5 says a row with
    # check_against runs nowhere before its output matched its reference's. The forward's check
    # says nothing about the row's backward kernels (another kernel, other variants), so a row whose
    # backward is wrong must not run it: its reference (which draws the same mask) runs instead.
    reg, _ = fake_registry(tmp_path, {"torch": REF + 5, "triton": REF, "new": REF},
                           {"torch": 3.0, "triton": 2.0, "new": 1.0})
    fwd, bwd = _problems()
    assert reg.select(fwd, bench=Bench).name == "new"  # its forward matched the triton row's
    new = reg.get("new").load()
    wrong = REF.clone()
    wrong[0, 0] += 1.0
    new.out = wrong  # the row's backward output: one wrong element
    assert reg.select(bwd, bench=Bench).name == "triton"
    assert reg.select(bwd, bench=Bench).name == "triton"  # and it stays so (the check is remembered)
    new.out = REF
    assert reg.select(bwd, bench=Bench).name == "triton"


def test_backward_with_dropout_runs_a_checked_row(tmp_path):
    reg, _ = fake_registry(tmp_path, {"torch": REF + 5, "triton": REF, "new": REF},
                           {"torch": 3.0, "triton": 2.0, "new": 1.0})
    fwd, bwd = _problems()
    assert reg.select(fwd, bench=Bench).name == "new"
    assert reg.select(bwd, bench=Bench).name == "new"
    # A caller that only needs the row's mask (no bench: the differentiable backward) gets the
    # forward's row: the mask is the same either way.
    assert reg.select(bwd).name == "new"


# ---- the check must see the low-rank terms: a fresh adapter's B is zero (peft's init)



def _without_lora_b(fn, position):
    """fn computing as if lora_B (argument `position`) were zero: a kernel that loses its low-rank term."""
    def broken(*args):
        args = list(args)
        args[position] = torch.zeros_like(args[position])
        return fn(*args)
    return broken


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
def test_forward_check_sees_the_low_rank_term_of_a_fresh_adapter(tmp_path, monkeypatch):
    # At a fine-tune's first step B = 0: a row that drops s H B^T gives the right Y on those inputs.
    # It must still fail the check (and its choice, kept on disk, must not be made on it).
    from fused_lora.kernels.hopper import one_pass
    from fused_lora.ops.lora import lora_linear_fwd
    from utils import make_problem
    reg = auto_on_cpu(tmp_path, monkeypatch)
    monkeypatch.setattr(one_pass, "forward", _without_lora_b(one_pass.forward, 4))
    x, w, b, a, bb = make_problem(37, 40, 72, 4, torch.float16, "cpu", seed=1, requires_grad=False)
    lora_linear_fwd(x, w, b, a, torch.zeros_like(bb), 0.5, 0.0, torch.tensor(3, dtype=torch.int64), "auto")
    (choice,) = reg.choices.values()
    assert "triton-onepass" in choice.errors and choice.winner == "triton-tma", choice


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
def test_backward_check_sees_the_low_rank_terms_of_a_fresh_adapter(tmp_path, monkeypatch):
    # With B = 0, G = s dY B is zero, so dA and the low-rank part of dX are zero whatever a kernel
    # does with them: a dX/dA kernel that loses them passes a check on those inputs.
    from fused_lora.kernels.hopper import tma
    from fused_lora.ops.lora import lora_linear_bwd
    from utils import make_problem
    reg = auto_on_cpu(tmp_path, monkeypatch)
    monkeypatch.setattr(tma, "backward", _without_lora_b(tma.backward, 4))
    x, w, b, a, bb = make_problem(37, 40, 72, 4, torch.float16, "cpu", seed=1, requires_grad=False)
    bb = torch.zeros_like(bb)
    h = (x.double() @ a.double().t()).to(x.dtype)
    dy = torch.randn(37, 72, generator=torch.Generator().manual_seed(2)).to(x.dtype)
    lora_linear_bwd(dy, x, w, a, bb, h, 0.5, 0.0, torch.tensor(3, dtype=torch.int64), "auto",
                    True, True, False, False)
    (choice,) = reg.choices.values()
    assert "triton-tma" in choice.errors, choice


# ---- the TMA dX launcher runs the config the static gate compiled for its dropout variant

@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_tma_dx_launcher_asks_for_the_dropout_variants_config(monkeypatch, p):
    # compile_check compiles lora_dx_tma_kernel with HAS_DROPOUT=True under
    # configs.tma_candidates("dx_tma", ..., dropout=True) (a smaller tile: the large one spills);
    # the launcher must launch that variant with that config, not the dropout-free one.
    from fused_lora.kernels import configs
    from fused_lora.kernels.hopper import tma
    from utils import make_problem
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    asked = []
    real = configs.tma_candidates

    def recording(kernel_name, arch, block_r, elt, dropout=False):
        asked.append((kernel_name, dropout))
        return real(kernel_name, arch, block_r, elt, dropout)
    monkeypatch.setattr(configs, "tma_candidates", recording)
    x, w, b, a, bb = make_problem(37, 40, 72, 5, torch.float16, "cpu", seed=3, requires_grad=False)
    y, h = tma.forward(x, w, b, a, bb, 0.5, p, 11)
    tma.backward(torch.ones_like(y), x, w, a, bb, h, 0.5, p, 11, True, True, False, False)
    assert ("dx_tma", p > 0.0) in asked and ("dx_tma", p == 0.0) not in asked, asked


# ---- the segment kernels (triton row, ops multi_fwd / multi_bwd) have never run on a GPU either

def _multi_inputs():
    from test_multi_op import make_multi
    x, w, b, loras = make_multi(29, 24, 40, [3, 5], torch.float16, seed=4)
    adapters = [(A.detach(), torch.zeros_like(B.detach()), 0.5, 0.0) for A, B in loras]  # fresh: B = 0
    row_adapter = torch.tensor([i % 3 - 1 for i in range(29)])
    return x.detach(), w.detach(), b.detach(), adapters, row_adapter


def _without_b(fn, position):
    """fn computing as if every adapter's B (adapters at argument `position`) were zero."""
    def broken(*args):
        args = list(args)
        args[position] = [(A, torch.zeros_like(B), s, p) for A, B, s, p in args[position]]
        return fn(*args)
    return broken


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
@pytest.mark.parametrize("broken", [False, True])
def test_auto_checks_the_segment_kernels_before_timing(tmp_path, monkeypatch, broken):
    from fused_lora import kernels
    from fused_lora.ops.multi import lora_linear_multi
    reg = auto_on_cpu(tmp_path, monkeypatch)
    if broken:
        monkeypatch.setattr(kernels, "multi_forward", _without_b(kernels.multi_forward, 3))
    x, w, b, adapters, row_adapter = _multi_inputs()
    with torch.no_grad():
        lora_linear_multi(x, w, b, adapters, row_adapter, torch.tensor(5), backend="auto")
    (choice,) = [c for (_, key), c in reg.choices.items() if key.startswith("multi_fwd")]
    if broken:
        assert "differs from the torch row" in choice.errors["triton"] and choice.winner == "torch", choice
    else:
        assert choice.errors == {} and choice.winner == "triton", choice


@pytest.mark.skipif(not backends.triton_installed(), reason="triton not installed")
@pytest.mark.parametrize("broken", [False, True])
def test_auto_checks_the_segment_backward_before_timing(tmp_path, monkeypatch, broken):
    from fused_lora import kernels
    from fused_lora.ops.multi import lora_linear_multi_bwd
    reg = auto_on_cpu(tmp_path, monkeypatch)
    if broken:
        monkeypatch.setattr(kernels, "multi_backward", _without_b(kernels.multi_backward, 3))
    x, w, b, adapters, row_adapter = _multi_inputs()
    h = torch.zeros(29, 5, dtype=x.dtype)
    dy = torch.randn(29, 40, generator=torch.Generator().manual_seed(3)).to(x.dtype)
    lora_linear_multi_bwd(dy, x, w, [a[0] for a in adapters], [a[1] for a in adapters], h, [0.5, 0.5], [0.0, 0.0],
                          row_adapter, torch.tensor(5), "auto", True, [True, True], False, False)
    (choice,) = [c for (_, key), c in reg.choices.items() if key.startswith("multi_bwd")]
    if broken:
        assert "differs from the torch row" in choice.errors["triton"] and choice.winner == "torch", choice
    else:
        assert choice.errors == {} and choice.winner == "triton", choice
