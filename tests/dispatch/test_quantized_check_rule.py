"""Auto never picks the triton row for a quantized base (ops quant_fwd / quant_bwd) before its kernels'
output on the key's inputs matched the torch row's: they have run on no GPU yet (fused_lora.dispatch.registry,
rule 5). On CPU, auto's timing is enabled under the interpreter (utils.auto_on_cpu)."""
import torch

from fused_lora import dispatch as backends
from fused_lora.dispatch import Problem
from test_quantized_kernels import pytestmark  # noqa: F401  (Triton must be able to run here)
from utils import auto_on_cpu, with_a_wrong_element

CUDA = torch.device("cuda")


def test_quant_ops_are_checked_against_torch():
    check = backends.get("triton").check_against
    assert check(Problem("quant_fwd", CUDA, torch.bfloat16, 64, 8, 8, 4)) == "torch"
    assert check(Problem("quant_bwd", CUDA, torch.bfloat16, 64, 8, 8, 4, grads=("dx", "lora"))) == "torch"
    # With dropout the forward is checked on a dropout-free probe; its backward follows the forward's row
    # (torch, another mask, could not stand in for it), unchecked.
    assert check(Problem("quant_fwd", CUDA, torch.bfloat16, 64, 8, 8, 4, dropout=True)) == "torch"
    assert check(Problem("quant_bwd", CUDA, torch.bfloat16, 64, 8, 8, 4, dropout=True, grads=("dx",))) is None


def _layer_inputs():
    from fused_lora.modules import quantized as quant
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 128, generator=g) * 128 ** -0.5
    qw = quant.quantize_nf4(w, blocksize=64, double_quant=True)
    x = torch.randn(20, 128, generator=g)
    a = torch.randn(4, 128, generator=g) * 0.1
    b = torch.randn(24, 4, generator=g) * 0.1
    return x, qw, a, b


def test_a_wrong_quant_kernel_is_not_chosen_by_auto(tmp_path, monkeypatch):
    from fused_lora import kernels as kq
    from fused_lora.ops.quant import lora_linear_quant
    reg = auto_on_cpu(tmp_path, monkeypatch)
    monkeypatch.setattr(kq, "forward_quant", with_a_wrong_element(kq.forward_quant))
    x, qw, a, b = _layer_inputs()
    want = lora_linear_quant(x, qw, None, a, b, 0.5, backend="torch")
    got = lora_linear_quant(x, qw, None, a, b, 0.5, backend="auto")
    problem = Problem("quant_fwd", x.device, x.dtype, x.shape[0], 24, 128, 4, False, base="nf4-nested", blocksize=64)
    choice = reg.known(problem)
    # not triton; the next fastest right row (the timer finds each row faster than the one before: dequant-once)
    assert choice.winner == "dequant-once" and set(choice.ms) == {"torch", "dequant-once"}, choice
    assert "differs from the torch row" in choice.errors["triton"]
    torch.testing.assert_close(got, want)


def test_a_right_quant_kernel_can_win(tmp_path, monkeypatch):
    from fused_lora.ops.quant import lora_linear_quant
    reg = auto_on_cpu(tmp_path, monkeypatch)
    x, qw, a, b = _layer_inputs()
    lora_linear_quant(x, qw, None, a, b, 0.5, backend="auto")
    choice = reg.known(Problem("quant_fwd", x.device, x.dtype, x.shape[0], 24, 128, 4, False, base="nf4-nested",
                               blocksize=64))
    assert choice.winner == "triton" and not choice.errors, choice


def _weights_of_one_shape():
    from fused_lora.modules import quantized as quant
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 128, generator=g) * 128 ** -0.5
    return {"nf4": quant.quantize_nf4(w, blocksize=64, double_quant=True),
            "nf4-32": quant.quantize_nf4(w, blocksize=32, double_quant=True),
            "int8": quant.quantize_int8(w)}


def test_formats_of_one_shape_are_tuned_apart(tmp_path, monkeypatch):
    # A choice made for an int8 base must not be reused for an NF4 base of the same shape (other kernels),
    # nor one made for 64-element NF4 blocks for 32-element ones (which the triton row cannot run).
    from fused_lora.ops.quant import lora_linear_quant
    reg = auto_on_cpu(tmp_path, monkeypatch)
    x, _, a, b = _layer_inputs()
    for name, qw in _weights_of_one_shape().items():
        backends.calls.clear()
        got = lora_linear_quant(x, qw, None, a, b, 0.5, backend="auto")
        # NF4 blocks of 32: triton refuses them, dequant-once (timed faster) runs them
        want = "dequant-once" if name == "nf4-32" else "triton"
        assert backends.calls[("quant_fwd", want)] == 1, (name, backends.calls)
        torch.testing.assert_close(got, lora_linear_quant(x, qw, None, a, b, 0.5, backend="torch"))
    keys = sorted(k for (_, k) in reg.choices if k.startswith("quant_fwd"))
    assert [k.split("base=")[1] for k in keys] == ["int8", "nf4-nested/32", "nf4-nested/64"], keys


def test_the_triton_row_refuses_nf4_blocks_under_64_by_name():
    from fused_lora.ops.quant import lora_linear_quant
    import pytest
    x, _, a, b = _layer_inputs()
    with pytest.raises(backends.BackendUnavailable, match="NF4 blocksize 32"):
        lora_linear_quant(x, _weights_of_one_shape()["nf4-32"], None, a, b, 0.5, backend="triton")


def test_a_kernel_losing_the_low_rank_term_is_caught_on_a_fresh_adapter(tmp_path, monkeypatch):
    # At the first step B = 0: on the real inputs every low-rank term is zero, so the check must run on
    # random adapter weights (the probe), or a kernel dropping s H B^T would be chosen for good.
    from fused_lora import kernels as kq
    from fused_lora.ops.quant import lora_linear_quant
    reg = auto_on_cpu(tmp_path, monkeypatch)
    right = kq.forward_quant
    monkeypatch.setattr(kq, "forward_quant", lambda x, data, bias, A, B, *rest: right(x, data, bias, A, B * 0, *rest))
    x, qw, a, b = _layer_inputs()
    lora_linear_quant(x, qw, None, a, torch.zeros_like(b), 0.5, backend="auto")
    choice = reg.known(Problem("quant_fwd", x.device, x.dtype, x.shape[0], 24, 128, 4, False, base="nf4-nested",
                               blocksize=64))
    assert choice.winner == "dequant-once" and "triton" in choice.errors, choice  # not triton (the next fastest)


def test_a_wrong_kernel_is_caught_with_dropout_too(tmp_path, monkeypatch):
    # Training keys have dropout on: the check compares the rows with the dropout off (their masks differ).
    from fused_lora import kernels as kq
    from fused_lora.ops.quant import lora_linear_quant
    reg = auto_on_cpu(tmp_path, monkeypatch)
    monkeypatch.setattr(kq, "forward_quant", with_a_wrong_element(kq.forward_quant))
    x, qw, a, b = _layer_inputs()
    lora_linear_quant(x, qw, None, a, b, 0.5, dropout_p=0.1, seed=3, backend="auto")
    choice = reg.known(Problem("quant_fwd", x.device, x.dtype, x.shape[0], 24, 128, 4, True, base="nf4-nested",
                               blocksize=64))
    assert choice.winner == "dequant-once" and "triton" in choice.errors, choice  # not triton (the next fastest)


def test_a_wrong_backward_kernel_is_not_run(tmp_path, monkeypatch):
    from fused_lora import kernels as kq
    from fused_lora.ops.quant import lora_linear_quant
    auto_on_cpu(tmp_path, monkeypatch)
    right = kq.backward_quant

    def wrong(*args):
        dx, dA, dB, db = right(*args)
        return dx, None if dA is None else dA * 0, dB, db  # loses dA

    monkeypatch.setattr(kq, "backward_quant", wrong)
    x, qw, a, b = _layer_inputs()
    # B = 0 (a fresh adapter): dA = s (dY B)^T x is zero on the real inputs, so only the probe can tell.
    b = torch.randn_like(b)
    a1, b1 = a.clone().requires_grad_(), b.clone().requires_grad_()
    lora_linear_quant(x, qw, None, a1, b1, 0.5, backend="auto").sum().backward()
    a2, b2 = a.clone().requires_grad_(), b.clone().requires_grad_()
    lora_linear_quant(x, qw, None, a2, b2, 0.5, backend="torch").sum().backward()
    torch.testing.assert_close(a1.grad, a2.grad)
    torch.testing.assert_close(b1.grad, b2.grad)
