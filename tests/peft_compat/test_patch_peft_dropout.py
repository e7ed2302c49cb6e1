"""What a patched peft model computes, compared with peft, with and without dropout (issue 18 item 17).

The claims (fused_lora/peft_patch.py's module doc, README "You already use peft"):
- eval, and training without dropout: peft's output to rounding;
- training with DoRA and dropout: peft's output to rounding under the same seed (the dropped input
  comes from torch's dropout, the random stream and order peft's nn.Dropout uses);
- training with plain LoRA and dropout: fused_lora's own masks, not peft's under the same seed, but
  the same distribution: each element of the LoRA branch's input kept independently with
  probability 1 - p and, kept, scaled by exactly peft's 1 / (1 - p).

The distribution is observed directly: a probe layer with W = 0, A = B = I (r = in = out) and
scaling 1 returns D x, so with x = 1 each forward returns the scaled mask itself. Bounds are five
binomial standard deviations (plus the mask's documented threshold rounding, 2^-17 on the PyTorch
path, 2^-25 in the kernels); the seeds are fixed, so a run is deterministic, and the bound says
the fixed draw is not a lucky one: unpatched peft's nn.Dropout meets the same bound.
"""
import copy
import math

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

import fused_lora  # noqa: E402
from fused_lora import dispatch as backends  # noqa: E402

from utils import assert_close_rule, needs_triton  # noqa: E402

P = 0.3
Q = 1 - P
Z = 5.0  # standard deviations: a 5-sigma two-sided miss has probability 6e-7
THRESHOLD_ROUNDING = {"torch": 2.0 ** -17, "triton": 2.0 ** -25}  # keep probability vs 1 - p


class Probe(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, n, bias=False)

    def forward(self, x):
        return self.fc(x)


def mask_probe(n, p=P):
    """A peft model whose LoRA layer returns D x: W = 0, A = B = I, scaling alpha / r = 1."""
    model = peft.get_peft_model(Probe(n), peft.LoraConfig(r=n, lora_alpha=n, lora_dropout=p, target_modules=["fc"]))
    layer = model.base_model.model.fc
    with torch.no_grad():
        layer.base_layer.weight.zero_()
        layer.lora_A["default"].weight.copy_(torch.eye(n))
        layer.lora_B["default"].weight.copy_(torch.eye(n))
    return model.train()


def draws(model, n_draws, rows, n, seed=0):
    torch.manual_seed(seed)
    x = torch.ones(rows, n)
    with torch.no_grad():
        return torch.stack([model(x) for _ in range(n_draws)])


def twins(n, backend="auto"):
    peft_model = mask_probe(n)
    ours = fused_lora.patch_peft(copy.deepcopy(peft_model), backend=backend, verbose=False)
    assert ours.fused_lora_report.patched == ["base_model.model.fc"]
    return ours, peft_model


def keep_statistics(masks, scale):
    """Keep rate, per-position count variance, adjacent-pair keep rate of masks (draws x rows x n);
    every element must be 0 or the dropout scale (1 ulp)."""
    kept = masks != 0
    assert torch.all(~kept | ((masks - scale).abs() <= scale * 2.0 ** -23)), "a kept element not scaled by 1/(1-p)"
    counts = kept.sum(0).double().flatten()  # per position, over the draws
    pairs = kept[..., 0::2] & kept[..., 1::2]  # disjoint neighbours (one 64-bit draw holds 4 of the mask's 16-bit draws)
    return kept.double().mean().item(), counts.var().item(), pairs.double().mean().item()


@pytest.mark.parametrize("backend,n_draws,rows,n", [
    ("torch", 100, 64, 64),
    pytest.param("triton", 20, 64, 32, marks=needs_triton(rank=32)),  # the interpreter: fewer, smaller draws
])
def test_patched_dropout_has_peft_dropout_distribution(backend, n_draws, rows, n):
    """Over many draws the patched layer's dropout keeps elements at rate 1 - p, scales them by
    exactly peft's 1/(1-p), varies per position as independent Bernoulli draws would (no position
    favoured, no mask repeated across calls) and keeps neighbours independently; peft's nn.Dropout
    passes the same checks (issue 18 item 17)."""
    ours, peft_model = twins(n, backend)
    before = backends.calls[("fwd", backend)]
    ours_masks = draws(ours, n_draws, rows, n)
    assert backends.calls[("fwd", backend)] - before == n_draws  # fused_lora's op drew them, not peft
    peft_masks = draws(peft_model, n_draws, rows, n)
    peft_scale = peft_masks.max().item()  # torch's nn.Dropout: the kept value of x = 1
    assert peft_scale == pytest.approx(1 / Q, rel=2 ** -23)

    total, positions, pairs = n_draws * rows * n, rows * n, n_draws * rows * n // 2
    rate_sd = math.sqrt(P * Q / total)
    var_rel_sd = math.sqrt(2 / (positions - 1))  # sample variance of ~normal counts: relative sd sqrt(2/(P-1))
    pair_sd = math.sqrt(Q * Q * (1 - Q * Q) / pairs)
    delta = THRESHOLD_ROUNDING[backend]
    for who, masks in (("fused_lora", ours_masks), ("peft", peft_masks)):
        rate, count_var, pair_rate = keep_statistics(masks, peft_scale)
        assert abs(rate - Q) <= Z * rate_sd + delta, (who, rate)
        assert abs(count_var / (n_draws * P * Q) - 1) <= Z * var_rel_sd, (who, count_var, n_draws * P * Q)
        assert abs(pair_rate - Q * Q) <= Z * pair_sd + 2 * delta, (who, pair_rate)


def test_the_checks_catch_a_wrong_distribution():
    """The statistics above fail on masks of the wrong keep rate, a mask repeated across draws and
    pairwise-correlated elements: they can fail (issue 18 item 17)."""
    g = torch.Generator().manual_seed(0)
    n_draws, rows, n = 100, 64, 64
    scale = 1 / Q

    def rate_ok(masks):
        rate, var, pair = keep_statistics(masks, scale)
        total = n_draws * rows * n
        return (abs(rate - Q) <= Z * math.sqrt(P * Q / total)
                and abs(var / (n_draws * P * Q) - 1) <= Z * math.sqrt(2 / (rows * n - 1))
                and abs(pair - Q * Q) <= Z * math.sqrt(Q * Q * (1 - Q * Q) / (total // 2)))

    good = (torch.rand(n_draws, rows, n, generator=g) < Q) * scale
    assert rate_ok(good)
    assert not rate_ok((torch.rand(n_draws, rows, n, generator=g) < Q - 0.01) * scale)  # keep rate 1 - p - 1%
    assert not rate_ok(good[:1].expand(n_draws, -1, -1))  # one mask for every call
    paired = good.clone()
    paired[..., 1::2] = paired[..., 0::2]  # neighbours dropped together
    assert not rate_ok(paired)


def test_patched_lora_dropout_masks_are_not_peft_masks_under_the_same_seed():
    """The documented limit: under one torch.manual_seed the patched layer's mask is its own draw,
    reproducible from the seed, agreeing with peft's mask only as two independent masks agree
    (on a fraction q^2 + p^2 of elements), so training losses differ from unpatched peft's
    (issue 18 item 17)."""
    ours, peft_model = twins(64)
    a, b = draws(ours, 20, 64, 64, seed=3), draws(peft_model, 20, 64, 64, seed=3)
    assert torch.equal(a, draws(ours, 20, 64, 64, seed=3))  # reproducible from the seed
    agree = ((a != 0) == (b != 0)).double().mean().item()
    expected, n = Q * Q + P * P, a.numel()
    assert abs(agree - expected) <= Z * math.sqrt(expected * (1 - expected) / n), agree


def random_twins(dora=False, p=P):
    torch.manual_seed(0)
    model = peft.get_peft_model(Probe(32), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["fc"],
                                                           use_dora=dora, init_lora_weights=False))
    if dora:  # a magnitude away from the norm, so that the dropped base term (m/n - 1) (D x) W^T counts
        with torch.no_grad():
            model.base_model.model.fc.lora_magnitude_vector["default"].weight.mul_(3)
    ours = fused_lora.patch_peft(copy.deepcopy(model), verbose=False)
    return ours, model


@pytest.mark.parametrize("case", ["eval with dropout", "training without dropout", "DoRA training with dropout"])
def test_where_the_patched_model_equals_peft_to_rounding(case):
    """eval (dropout off), training with p = 0, and DoRA with dropout in training (torch's dropout, the
    stream and order peft's nn.Dropout uses): under the same seed the patched model's output and
    gradients are peft's to fp32 rounding, held to the suite's rule against peft in float64 (whose
    dropout draws the same mask from the same seed) (issue 18 item 17)."""
    ours, ref = random_twins(dora=case.startswith("DoRA"), p=0.0 if case == "training without dropout" else P)
    ref64 = copy.deepcopy(ref).double()
    for m in (ours, ref, ref64):
        m.train(case != "eval with dropout")
    x = torch.randn(48, 32)
    dy = torch.randn(48, 32)
    before = backends.calls[("fwd", "torch")] + backends.calls[("dora_fwd", "torch")]
    outs = []
    for m, dtype in ((ours, torch.float32), (ref, torch.float32), (ref64, torch.float64)):
        torch.manual_seed(11)
        y = m(x.to(dtype))
        y.backward(dy.to(dtype))
        outs.append([y.detach()] + [p.grad for p in m.parameters() if p.requires_grad])
    assert backends.calls[("fwd", "torch")] + backends.calls[("dora_fwd", "torch")] > before  # fused, not deferred
    for i, (got, eager, exact) in enumerate(zip(*outs)):
        assert_close_rule(got, eager, exact, torch.float32, what=f"{case}: {'output' if i == 0 else f'gradient {i}'}")
