"""fused_lora.patch_peft against real peft: a patched peft model computes peft's function through
fused_lora's op, and everything of peft (save/load, merge, adapter switching, trainers) keeps working.

Every comparison is patched peft against an unpatched twin (a deepcopy made before patching), so
the truth is peft's own forward and autograd. fp32 on CPU: the same math in another order
(fused_lora accumulates the base GEMM onto the rank-r term), so results agree to fp32 rounding;
torch.testing's fp32 defaults (rtol 1.3e-6, atol 1e-5) are used unless a test says otherwise.
Each test also checks, through backends.calls, that the fused op really ran (or really did not,
where the patched forward must defer to peft).
"""
import copy
import os
import pickle

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from peft.tuners import lora as peft_lora  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import dispatch as backends
from fused_lora import patch_peft, unpatch_peft  # noqa: E402
from fused_lora.core.dropout import keep_mask, new_seed  # noqa: E402
from fused_lora.cli.finetune import build_llama, counting_batches  # noqa: E402
from fused_lora.peft_compat.patch import PatchedForward, PatchReport  # noqa: E402
from fused_lora.core.reference import lora_linear_ref  # noqa: E402
from utils import one_batch_losses  # noqa: E402  (tests/ is on sys.path: conftest.py)

PEFT_LINEAR_FORWARD = peft_lora.Linear.forward  # never modified: patching is per instance


class MLP(nn.Module):
    def __init__(self, K=24, H=40, N=18):
        super().__init__()
        self.fc1 = nn.Linear(K, H)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(H, N)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def fused_calls(op="fwd", backend="torch"):
    return backends.calls[(op, backend)]


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, peft_lora.LoraLayer)]


def mlp_twins(seed=0, **config):
    """(patched, reference): two peft MLPs with identical weights, B nonzero so the adapter matters."""
    torch.manual_seed(seed)
    cfg = dict(r=4, lora_alpha=8, target_modules=["fc1", "fc2"], lora_dropout=0.0, init_lora_weights=False)
    cfg.update(config)
    ref = peft.get_peft_model(MLP(), peft.LoraConfig(**cfg))
    ours = copy.deepcopy(ref)
    patch_peft(ours, verbose=False)
    return ours, ref


def gpt2(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def model_twins(base, **config):
    cfg = dict(r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False)
    cfg.update(config)
    torch.manual_seed(1)
    ref = peft.get_peft_model(base, peft.LoraConfig(**cfg))
    ours = copy.deepcopy(ref)
    patch_peft(ours, verbose=False)
    return ours, ref


def trainable_grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours, ref):
    g_ours, g_ref = trainable_grads(ours), trainable_grads(ref)
    assert g_ours.keys() == g_ref.keys() and g_ref
    for name in g_ref:
        assert g_ref[name] is not None, name
        torch.testing.assert_close(g_ours[name], g_ref[name], msg=name)


# ------------------------------------------------------------------ outputs and gradients


@pytest.mark.parametrize("trainable_base", [False, True])
def test_mlp_outputs_and_gradients_equal_peft(trainable_base):
    # bias="all" is peft's way to train the base biases; a trainable base weight is set by hand.
    ours, ref = mlp_twins(bias="all" if trainable_base else "none")
    if trainable_base:
        for m in (ours, ref):
            m.base_model.model.fc1.base_layer.weight.requires_grad_(True)
    x1 = torch.randn(3, 5, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    before, before_bwd = fused_calls(), fused_calls("bwd")
    y_ours, y_ref = ours(x2), ref(x1)
    assert fused_calls() == before + 2
    torch.testing.assert_close(y_ours, y_ref)
    dy = torch.randn_like(y_ref)
    y_ours.backward(dy)
    y_ref.backward(dy)
    assert fused_calls("bwd") == before_bwd + 2
    torch.testing.assert_close(x2.grad, x1.grad)
    assert_same_grads(ours, ref)
    if trainable_base:
        assert ours.base_model.model.fc1.base_layer.weight.grad is not None
        assert ours.base_model.model.fc2.base_layer.bias.grad is not None


def test_llama_outputs_and_gradients_equal_peft():
    ours, ref = model_twins(build_llama("tiny"), target_modules="all-linear")
    tokens = next(counting_batches(256, 2, 16))
    before = fused_calls()
    out_ours = ours(input_ids=tokens, labels=tokens)
    out_ref = ref(input_ids=tokens, labels=tokens)
    assert fused_calls() == before + 14  # 7 projections x 2 layers
    torch.testing.assert_close(out_ours.logits, out_ref.logits)
    out_ours.loss.backward()
    out_ref.loss.backward()
    assert_same_grads(ours, ref)


def test_gpt2_conv1d_outputs_and_gradients_equal_peft():
    # Conv1D stores its weight in x out (peft's fan_in_fan_out); bias="all" trains the base biases too.
    ours, ref = model_twins(gpt2(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                            bias="all")
    layers = lora_layers(ours)
    assert len(layers) == 8 and all(isinstance(m.base_layer, transformers.pytorch_utils.Conv1D) for m in layers)
    tokens = next(counting_batches(128, 2, 12))
    before = fused_calls()
    out_ours = ours(input_ids=tokens, labels=tokens)
    out_ref = ref(input_ids=tokens, labels=tokens)
    assert fused_calls() == before + 8
    torch.testing.assert_close(out_ours.logits, out_ref.logits)
    out_ours.loss.backward()
    out_ref.loss.backward()
    assert_same_grads(ours, ref)
    assert any("bias" in n for n in trainable_grads(ours))


def test_dropout_uses_the_ops_mask():
    """With dropout, the patched layer equals the reference formula with the mask fused_lora's torch
    backend draws for the seed it took from the CPU generator (the same draw new_seed makes)."""
    p, K = 0.3, 24
    ours, _ = mlp_twins(lora_dropout=p, target_modules=["fc1"])
    ours.train()
    layer = ours.base_model.model.fc1
    x = torch.randn(4, 6, K, requires_grad=True)
    torch.manual_seed(123)
    y = layer(x)
    torch.manual_seed(123)
    seed = int(new_seed())
    keep = keep_mask(seed, (24, K), p, "cpu")
    assert 0 < int((~keep).sum()) < keep.numel()  # the mask drops some elements, not all
    W, b = layer.base_layer.weight, layer.base_layer.bias
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = lora_linear_ref(x_ref.reshape(-1, K), W, b, A, B, layer.scaling["default"], keep, p).reshape(y.shape)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, A, B), dy)
    grads_ref = torch.autograd.grad(y_ref, (x_ref, A, B), dy)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)
    # Without the mask the outputs would differ: the check above is not vacuous.
    y_nodrop = lora_linear_ref(x.detach().reshape(-1, K), W, b, A, B, layer.scaling["default"]).reshape(y.shape)
    assert not torch.allclose(y, y_nodrop)


def test_dropout_follows_the_dropout_modules_training_flag():
    ours, ref = mlp_twins(lora_dropout=0.5)
    x = torch.randn(7, 24)
    ours.eval()
    ref.eval()
    torch.testing.assert_close(ours(x), ref(x))
    ours.train()
    a, b = ours(x), ours(x)
    assert not torch.equal(a, b)  # fresh masks per call in training mode


def test_gradient_checkpointing_with_dropout_recomputes_the_same_masks():
    """Recomputation in backward draws the same seeds (checkpointing restores the CPU generator), so
    a patched model with dropout gets the same gradients with checkpointing on and off (with
    preserve_rng_state=False this test fails: the masks differ)."""
    torch.manual_seed(1)
    model = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, lora_dropout=0.2, target_modules="all-linear",
                                                                     init_lora_weights=False))
    patch_peft(model, verbose=False)
    ckpt = copy.deepcopy(model)
    ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ckpt.train()
    tokens = next(counting_batches(256, 2, 16))
    grads = []
    for m in (model, ckpt):
        torch.manual_seed(7)
        m(input_ids=tokens, labels=tokens).loss.backward()
        grads.append(trainable_grads(m))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_twenty_adamw_steps_equal_peft_losses():
    ours, ref = model_twins(build_llama("tiny"), target_modules="all-linear")
    tokens = next(counting_batches(256, 4, 16, seed=3))  # one batch, learned over 20 steps
    # lr 1e-3 (one_batch_losses'): at 1e-2 this random model's training is chaotic (fp32 peft itself departs from
    # an fp64 run by 6e-3 in the loss by step 19), so any change of summation order would show.
    losses = {key: one_batch_losses(model, tokens) for key, model in (("ours", ours), ("ref", ref))}
    assert losses["ours"][-1] < losses["ours"][0]  # it learned something
    torch.testing.assert_close(torch.tensor(losses["ours"]), torch.tensor(losses["ref"]))
    for name, p in ours.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, ref.get_parameter(name), msg=name)


def test_triton_backend_through_the_interpreter():
    ours, ref = mlp_twins()
    patch_peft(ours, backend="triton", verbose=False)
    x1 = torch.randn(2, 9, 24, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    before, before_bwd = fused_calls("fwd", "triton"), fused_calls("bwd", "triton")
    y_ours, y_ref = ours(x2), ref(x1)
    assert fused_calls("fwd", "triton") == before + 2
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)  # another summation order (tiled K)
    y_ours.sum().backward()
    y_ref.sum().backward()
    assert fused_calls("bwd", "triton") == before_bwd + 2
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-5)
    for name, g in trainable_grads(ref).items():
        torch.testing.assert_close(trainable_grads(ours)[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_bf16_model_with_fp32_adapters_within_peft_error():
    """peft keeps fp32 adapters on a bf16 model by default; the patched layer casts them to bf16 (as
    FusedLoRALinear does) where peft computes the branch in fp32: both against a float64 run of the
    same weights, the patched error stays within twice peft's own plus bf16 slack."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(MLP().to(torch.bfloat16), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"],
                                                                        init_lora_weights=False))
    assert ref.base_model.model.fc1.lora_A["default"].weight.dtype == torch.float32
    ours, ref64 = copy.deepcopy(ref), copy.deepcopy(ref).double()
    patch_peft(ours, verbose=False)
    x = torch.randn(16, 24)
    before = fused_calls()
    y_ours = ours(x.bfloat16())
    assert fused_calls() == before + 2 and y_ours.dtype == torch.bfloat16
    y64 = ref64(x.double())
    err_ours = (y_ours.double() - y64).abs().max().item()
    err_peft = (ref(x.bfloat16()).double() - y64).abs().max().item()
    assert err_ours <= 2 * err_peft + 1.6e-2 * max(1.0, y64.abs().max().item())
    y_ours.float().square().sum().backward()
    grad = ours.base_model.model.fc1.lora_A["default"].weight.grad
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()


def test_an_fp32_adapter_beyond_fp16_hands_the_call_to_peft():
    """fp16 model, fp32 adapters (peft's default): |B| = 1e5 with s = 1e-4 fits fp32 (peft computes the
    branch there: finite output) and not fp16, the dtype the fused op computes in. The patched layer hands
    the call to peft, so it gives peft's output exactly (before: NaN); an adapter inside the range still
    fuses. Issue 18, attacker re-trial, finding 1."""
    torch.manual_seed(0)
    ref = peft.get_peft_model(MLP().half(), peft.LoraConfig(r=2, lora_alpha=2e-4, target_modules=["fc1"],
                                                            init_lora_weights=False))
    layer = ref.base_model.model.fc1
    assert layer.lora_A["default"].weight.dtype == torch.float32
    with torch.no_grad():
        layer.lora_A["default"].weight.fill_(0.1)
        layer.lora_B["default"].weight.fill_(1e5)
    ours = copy.deepcopy(ref)
    patch_peft(ours, verbose=False)
    x = torch.randn(4, 24).half()
    before = fused_calls()
    with torch.no_grad():
        y, want = ours(x), ref(x)
    assert fused_calls() == before and torch.isfinite(want).all()
    assert torch.equal(y, want)
    with torch.no_grad():
        for m in (ours, ref):
            m.base_model.model.fc1.lora_B["default"].weight.fill_(1e3)
        y = ours(x)
    assert fused_calls() == before + 1 and torch.isfinite(y).all()


def test_torch_compile_fullgraph_equals_peft():
    ours, ref = mlp_twins()
    x = torch.randn(6, 24)
    compiled = torch.compile(ours, fullgraph=True)  # fullgraph: a graph break would raise
    before = fused_calls()
    torch.testing.assert_close(compiled(x), ref(x))
    assert fused_calls() == before + 2


# ------------------------------------------------------------------ peft keeps working


def test_save_load_unchanged(tmp_path):
    ours, ref = model_twins(build_llama("tiny"), target_modules=["q_proj", "v_proj"])
    assert ours.state_dict().keys() == ref.state_dict().keys()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    for tokens, _ in zip(counting_batches(256, 2, 16), range(3)):
        ours(input_ids=tokens, labels=tokens).loss.backward()
        opt.step()
        opt.zero_grad()
    ours.save_pretrained(tmp_path / "ours")
    ref.save_pretrained(tmp_path / "ref")
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    state = peft.get_peft_model_state_dict(ours)
    assert saved.keys() == state.keys() == load_file(tmp_path / "ref" / "adapter_model.safetensors").keys()
    for k in state:
        assert torch.equal(saved[k], state[k]), k
    # peft loads it into a fresh base and computes what the trained, patched model computes.
    loaded = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "ours")
    tokens = next(counting_batches(256, 2, 16, seed=9))
    torch.testing.assert_close(loaded(input_ids=tokens).logits, ours(input_ids=tokens).logits)


def test_merge_unmerge_and_merge_and_unload_equal_peft():
    ours, ref = mlp_twins()
    x = torch.randn(5, 24)
    for m in (ours, ref):
        m.base_model.merge_adapter()
    before = fused_calls()
    torch.testing.assert_close(ours(x), ref(x))
    assert fused_calls() == before  # merged: peft's forward (the base layer alone) ran
    for m in (ours, ref):
        m.base_model.unmerge_adapter()
    torch.testing.assert_close(ours(x), ref(x))
    assert fused_calls() == before + 2  # unmerged: fused again
    merged_ours, merged_ref = ours.merge_and_unload(), ref.merge_and_unload()
    assert not lora_layers(merged_ours)
    torch.testing.assert_close(merged_ours(x), merged_ref(x))


def test_second_adapter_disable_adapter_and_adapter_names():
    ours, ref = mlp_twins()
    for m in (ours, ref):
        torch.manual_seed(5)
        m.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"],
                                                init_lora_weights=False))
    x = torch.randn(4, 24)

    def check(fused_expected, **kwargs):
        before = fused_calls()
        torch.testing.assert_close(ours(x, **kwargs), ref(x, **kwargs))
        assert fused_calls() == before + (2 if fused_expected else 0)

    check(True)
    for m in (ours, ref):
        m.set_adapter("second")  # one active adapter: fused_lora runs it
    check(True)
    for m in (ours, ref):
        m.base_model.set_adapter(["default", "second"])  # two active adapters: peft's forward
    check(False)
    for m in (ours, ref):
        m.base_model.set_adapter("default")
    with ours.disable_adapter(), ref.disable_adapter():
        check(False)
    check(True)
    layer_ours, layer_ref = ours.base_model.model.fc1, ref.base_model.model.fc1
    before = fused_calls()
    torch.testing.assert_close(layer_ours(x, adapter_names=None), layer_ref(x, adapter_names=None))
    assert fused_calls() == before + 1  # None: no mixed batch, as peft reads it
    with pytest.raises(TypeError):  # what peft does with an argument its base layer does not take
        layer_ours(x, scale=None)
    for m in (ours, ref):
        m.eval()  # peft takes adapter_names in eval mode only
    check(False, adapter_names=["default", "second", "__base__", "default"])  # mixed batch: peft's


def test_dora_added_later_is_fused_and_a_dora_it_cannot_run_is_kept(capsys):
    ours, ref = mlp_twins()
    for m in (ours, ref):
        torch.manual_seed(6)
        m.add_adapter("dora", peft.LoraConfig(r=2, target_modules=["fc1"], use_dora=True, init_lora_weights=False))
        m.set_adapter("dora")
        with torch.no_grad():  # the magnitude off its init (m / n = 1 there: DoRA computes LoRA's output)
            m.base_model.model.fc1.lora_magnitude_vector["dora"].weight.mul_(1.5)
    x = torch.randn(3, 24)
    before = fused_calls("dora_fwd")
    torch.testing.assert_close(ours(x), ref(x))
    assert fused_calls("dora_fwd") == before + 1  # fc1: DoRA, fused; fc2 has no "dora" adapter: peft's
    patch_peft(ours)
    assert ours.fused_lora_report.kept == {}
    assert "fused_lora: 2 of 2 LoRA layers patched" in capsys.readouterr().out
    # A DoRA layer fused_lora cannot compute as peft does (here a hook on its magnitude module) is kept.
    ours.base_model.model.fc1.lora_magnitude_vector["dora"].register_forward_hook(lambda *a: None)
    patch_peft(ours)
    assert ours.fused_lora_report.kept == {"base_model.model.fc1": "DoRA layer of another kind, or hooked"}
    assert "forward" not in ours.base_model.model.fc1.__dict__
    before = fused_calls("dora_fwd")
    torch.testing.assert_close(ours(x), ref(x))
    assert fused_calls("dora_fwd") == before


def test_variant_and_lora_bias_layers_are_kept_with_reasons(capsys):
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["fc1"], lora_bias=True))
    patch_peft(model)
    assert model.fused_lora_report.kept == {"base_model.model.fc1": "lora_bias"}
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    # A variant object on one layer (as peft's variants keep them) is refused by name.
    layer = model.base_model.model.fc2
    layer.lora_variant["default"] = peft_lora.variants.KasaLinearVariant()
    patch_peft(model)
    assert model.fused_lora_report.kept == {"base_model.model.fc2": "LoRA variant KasaLinearVariant"}
    assert model.fused_lora_report.patched == ["base_model.model.fc1"]
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == ("fused_lora: 1 of 2 LoRA layers patched; 1 kept peft's forward: "
                       "base_model.model.fc2 (LoRA variant KasaLinearVariant)")


def test_non_linear_lora_layers_are_kept():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 24)
            self.fc1 = nn.Linear(24, 8)

        def forward(self, ids):
            return self.fc1(self.emb(ids))

    torch.manual_seed(0)
    model = peft.get_peft_model(WithEmbedding(), peft.LoraConfig(r=2, target_modules=["emb", "fc1"]))
    patch_peft(model, verbose=False)
    assert model.fused_lora_report.patched == ["base_model.model.fc1"]
    assert model.fused_lora_report.kept == {"base_model.model.emb": "peft Embedding layer, not lora.Linear"}
    model(torch.tensor([[1, 2, 3]]))


def test_hooks_on_the_base_layer_make_it_defer():
    ours, ref = mlp_twins()
    seen = []
    handle = ours.base_model.model.fc1.base_layer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x = torch.randn(2, 24)
    before = fused_calls()
    torch.testing.assert_close(ours(x), ref(x))
    assert seen == [torch.Size([2, 40])] and fused_calls() == before + 1  # fc2 still fused
    handle.remove()
    ours(x)
    assert fused_calls() == before + 3


def test_input_peft_would_reject_goes_to_peft():
    ours, ref = mlp_twins()
    with pytest.raises(RuntimeError) as ours_err:
        ours(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(RuntimeError) as ref_err:
        ref(torch.randn(3, 24, dtype=torch.float64))
    assert str(ours_err.value) == str(ref_err.value)


def test_patch_twice_is_idempotent_and_unpatch_restores_peft():
    ours, ref = mlp_twins()
    first = copy.deepcopy(ours.fused_lora_report)
    patch_peft(ours, verbose=False)
    assert ours.fused_lora_report == first == PatchReport(
        patched=["base_model.model.fc1", "base_model.model.fc2"], kept={}, backend="auto")
    layers = lora_layers(ours)
    assert all(isinstance(m.__dict__["forward"], PatchedForward) and m.forward.layer is m for m in layers)
    assert unpatch_peft(ours) is ours
    assert all("forward" not in m.__dict__ for m in layers)
    assert not hasattr(ours, "fused_lora_report")
    assert peft_lora.Linear.forward is PEFT_LINEAR_FORWARD
    x = torch.randn(3, 24)
    before = fused_calls()
    torch.testing.assert_close(ours(x), ref(x))
    assert fused_calls() == before
    unpatch_peft(ours)  # unpatching an unpatched model does nothing


def test_patched_model_deepcopies_and_pickles():
    ours, ref = mlp_twins()
    x = torch.randn(3, 24)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        layer = clone.base_model.model.fc1
        assert layer.forward.layer is layer  # the copy's forward runs the copy's parameters
        with torch.no_grad():
            layer.lora_B["default"].weight.zero_()
        before = fused_calls()
        clone(x)
        assert fused_calls() == before + 2
    torch.testing.assert_close(ours(x), ref(x))  # the original is untouched


def test_clear_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        patch_peft("model")
    with pytest.raises(TypeError, match="nn.Module"):
        unpatch_peft("model")
    torch.manual_seed(0)
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=2, target_modules=["fc1"]))
    with pytest.raises(ValueError, match="unknown backend"):
        patch_peft(model, backend="cuda")
    assert "forward" not in model.base_model.model.fc1.__dict__  # nothing half-applied


def test_injected_model_without_peftmodel():
    torch.manual_seed(0)
    ref = peft.inject_adapter_in_model(peft.LoraConfig(r=2, target_modules=["fc1", "fc2"], init_lora_weights=False),
                                       MLP())
    ours = copy.deepcopy(ref)
    assert patch_peft(ours, verbose=False) is ours
    x = torch.randn(3, 24)
    before = fused_calls()
    torch.testing.assert_close(ours(x), ref(x))
    assert fused_calls() == before + 2


# ------------------------------------------------------------------ trainers


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n=16, seq=16, vocab=256):
        batches = counting_batches(vocab, n, seq, seed=4)
        self.ids = next(batches)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_transformers_trainer_trains_and_saves_a_peft_adapter(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))
    patch_peft(model, verbose=False)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, report_to=[])
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset())
    before = fused_calls("bwd")
    trainer.train()
    assert fused_calls("bwd") == before + 3 * 4  # 3 steps x 4 patched layers
    trainer.save_model(str(tmp_path / "saved"))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "saved"))
    assert not (tmp_path / "saved" / "model.safetensors").exists()
    loaded = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "saved")
    trained = peft.get_peft_model_state_dict(model)
    assert any(not torch.all(v == 0) for k, v in trained.items() if "lora_B" in k)  # training moved B
    for k, v in peft.get_peft_model_state_dict(loaded).items():
        assert torch.equal(v, trained[k]), k


def test_trl_sft_trainer_on_a_patched_model(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    torch.manual_seed(0)
    model = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                                     task_type="CAUSAL_LM"))
    patch_peft(model, verbose=False)
    ids = counting_batches(256, 16, 16, seed=4)
    data = datasets.Dataset.from_dict({"input_ids": next(ids).tolist()})
    tokenizer = _offline_tokenizer()
    args = trl.SFTConfig(output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], per_device_train_batch_size=4,
                         bf16=False)  # SFTConfig defaults to bf16, which a CPU cannot train in
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    before = fused_calls("bwd")
    trainer.train()
    assert fused_calls("bwd") == before + 2 * 4
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "adapter_model.safetensors").exists()


def _offline_tokenizer():
    """A word-level tokenizer over the Llama config's 256 ids, built in memory (no download)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    vocab = {f"t{i}": i for i in range(256)}
    vocab["<pad>"], vocab["<eos>"] = 0, 1
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_a_layer_without_its_own_active_adapter_is_patched_and_fuses_after_set_adapter():
    """Which adapter is active is a passing state: a layer that the active adapter does not reach at
    patch time is patched all the same, defers to peft meanwhile, and fuses once set_adapter gives it
    an adapter of its own."""
    import peft as peft_lib
    model = peft_lib.get_peft_model(MLP(), peft_lib.LoraConfig(r=2, target_modules=["fc1"], init_lora_weights=False))
    model.add_adapter("x", peft_lib.LoraConfig(r=2, target_modules=["fc2"], init_lora_weights=False))
    reference = copy.deepcopy(model)
    patch_peft(model, verbose=False)
    assert model.fused_lora_report.patched == ["base_model.model.fc1", "base_model.model.fc2"]
    x = torch.randn(4, MLP().fc1.in_features)
    for m in (model, reference):
        m.set_adapter("x")
    before = backends.calls[("fwd", "torch")]
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert backends.calls[("fwd", "torch")] == before + 1  # fc2 fused; fc1 (no adapter "x") deferred


def test_a_forced_backend_that_cannot_run_fails_at_patch_time(monkeypatch):
    _, model = mlp_twins()  # the unpatched twin
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU tensors without the interpreter
    with pytest.raises(fused_lora.BackendUnavailable, match="triton"):
        patch_peft(model, backend="triton", verbose=False)
    assert not any("forward" in m.__dict__ for m in model.modules())
    assert not hasattr(model, "fused_lora_report")


def test_a_forced_backend_checks_every_adapters_rank_at_patch_time():
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["fc1"]))
    model.add_adapter("big", peft.LoraConfig(r=300, target_modules=["fc1"]))  # above the Triton kernels' 256
    with pytest.raises(fused_lora.BackendUnavailable, match="rank 300"):
        patch_peft(model, backend="triton", verbose=False)
    assert not any("forward" in m.__dict__ for m in model.modules())


def without_lora(kind):
    """A peft model of another method than LoRA (no peft LoRA layer anywhere), over a tiny Llama."""
    base = build_llama("tiny")
    if kind == "prefix":
        return peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    if kind == "ia3":
        return peft.get_peft_model(base, peft.IA3Config(task_type="CAUSAL_LM"))
    if kind == "vblora":
        return peft.get_peft_model(base, peft.VBLoRAConfig(r=2, num_vectors=8, vector_length=16,
                                                          target_modules=["q_proj", "v_proj"]))
    if kind == "plain":
        return MLP()
    assert kind == "ours"
    return fused_lora.get_lora_model(MLP(), fused_lora.LoraConfig(r=2, target_modules=["fc1"]))


@pytest.mark.parametrize("kind", ["prefix", "ia3", "vblora", "plain", "ours"])
def test_a_model_without_peft_lora_layers_is_returned_unchanged_with_a_warning(kind, capsys):
    """Issue 18 item 29: patch_peft raised on a peft model without LoRA layers (prefix tuning, IA3,
    VB-LoRA: nine of peft's own tests broke), so a script patching whatever peft model it is given
    failed; it returns the model unchanged, reports `0 LoRA layers: nothing to patch` and warns
    (naming fused_lora's own layers where those are why). unpatch_peft does nothing there either."""
    model = without_lora(kind)
    forwards = {n: m.__dict__.get("forward") for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="no peft LoRA layers" + (".*FusedLoRALinear" if kind == "ours" else "")):
        assert patch_peft(model) is model
    assert capsys.readouterr().out == "fused_lora: 0 LoRA layers: nothing to patch\n"
    assert str(model.fused_lora_report) == "fused_lora: 0 LoRA layers: nothing to patch"
    assert model.fused_lora_report.patched == [] and model.fused_lora_report.kept == {}
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert unpatch_peft(model) is model
    assert {n: m.__dict__.get("forward") for n, m in model.named_modules()} == forwards
