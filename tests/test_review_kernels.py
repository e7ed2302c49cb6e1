"""Regression tests from a review of the Hopper-path rows and the segment kernels: each one failed
on the code before its fix."""
import pytest
import torch

from fused_lora import backends
from fused_lora.backends import Problem
from test_backends_hopper import REF, Bench, fake_registry

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
    new = reg.get("new").loader()
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
