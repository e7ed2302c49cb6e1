"""The "fused_lora" experts implementation in transformers' ExpertsInterface (issue 20 item 3), on tiny models built
from configs: without adapters it computes what transformers' "eager" and "grouped_mm" compute, for every flag
(`is_transposed` / `has_bias` / interleaved gate: GPT-OSS; `has_gate=False`: NemotronH; `has_post_expert_norm`:
MuseSpark); with adapters on either or both projections it computes the experts with W_e + s B_e A_e folded in
(checked against "eager" on the merged stacks); routing corner cases; torch.compile(fullgraph=True); the guard
against another implementation ignoring the adapters."""
import copy

import pytest
import torch

from fused_lora import FusedLoRALinear, LoraConfig, dispatch, get_lora_model
from fused_lora.modules import experts as X
from moe_models import KINDS, experts_of, routing, standalone_experts, tiny_moe, token_ids

pytest.importorskip("transformers")
FP32 = dict(rtol=2e-6, atol=2e-6)


@pytest.fixture(autouse=True, scope="module")
def registered():
    assert X.register_experts_implementation() == "fused_lora"


def run(module, impl, *args):
    module.config._experts_implementation = impl
    return module(*args)


@pytest.mark.parametrize("kind", KINDS)
def test_without_adapters_equals_eager_and_grouped_mm(kind):
    model = tiny_moe(kind)
    ids = token_ids()
    out = {}
    for impl in ("eager", "grouped_mm", "fused_lora"):
        model.set_experts_implementation(impl)
        out[impl] = model(ids).logits
    assert out["eager"].abs().max() > 0.5  # the experts matter at this scale
    torch.testing.assert_close(out["fused_lora"], out["eager"], **FP32)
    torch.testing.assert_close(out["fused_lora"], out["grouped_mm"], **FP32)


@pytest.mark.parametrize("kind", ["nemotron_h", "muse_spark"])
def test_gate_less_and_post_norm_classes(kind):
    module = standalone_experts(kind)
    assert (module.has_gate, module.has_post_expert_norm) == ({"nemotron_h": (False, False),
                                                               "muse_spark": (True, True)}[kind])
    x, index, weights = routing()
    x.requires_grad_(True)
    want = run(module, "eager", x, index, weights)
    got = run(module, "fused_lora", x, index, weights)
    torch.testing.assert_close(got, want, **FP32)
    torch.testing.assert_close(got, run(module, "grouped_mm", x, index, weights), **FP32)
    dy = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, x, dy)[0], torch.autograd.grad(want, x, dy)[0], **FP32)


def adapt(module, names, r=2, seed=0):
    """Attach fused_lora adapters (random B, so they matter) to `names` of an experts module."""
    torch.manual_seed(seed)
    layers = {n: FusedLoRALinear.from_linear(X.stack_of(module, n), r=r, lora_alpha=2 * r, init_lora_weights=False)
              for n in names}
    return X.attach(module, layers)


def merged_copy(module):
    """A copy of the experts module with each adapter folded into its stack (FusedLoRALinear.merge) and taken off."""
    module = copy.deepcopy(module)
    for layer in X.adapters_of(module).values():
        layer.merge()
    del module._modules[X.ADAPTERS_ATTR]
    module._forward_pre_hooks.clear()
    return module


@pytest.mark.parametrize("kind,names", [("qwen3_moe", ["gate_up_proj", "down_proj"]), ("mixtral", ["down_proj"]),
                                        ("gpt_oss", ["gate_up_proj"]), ("gpt_oss", ["gate_up_proj", "down_proj"]),
                                        ("nemotron_h", ["up_proj", "down_proj"])])
def test_with_adapters_equals_eager_on_the_merged_stacks(kind, names):
    module = standalone_experts(kind) if kind == "nemotron_h" else experts_of(tiny_moe(kind))
    adapt(module, names)
    assert module.config._experts_implementation == "fused_lora"
    x, index, weights = routing(tokens=9)
    before = dispatch.calls.get(("grouped_fwd", "torch"), 0)
    got = module(x, index, weights)
    assert dispatch.calls[("grouped_fwd", "torch")] == before + 2  # both projections through the grouped op
    merged = merged_copy(module)
    torch.testing.assert_close(got, run(merged, "eager", x, index, weights), **FP32)
    with torch.no_grad():
        for layer in X.adapters_of(module).values():
            layer.lora_B.zero_()
    assert (got - module(x, index, weights)).abs().max() > 1e-2  # the adapters mattered


def test_adapter_gradients_and_experts_never_hit():
    module = experts_of(tiny_moe("qwen3_moe"))
    adapt(module, ["gate_up_proj", "down_proj"])
    x, index, weights = routing(tokens=5, only=1)  # every token's first choice is expert 1, second expert 0
    y = module(x, index, weights)
    y.square().sum().backward()
    for layer in X.adapters_of(module).values():
        hit = layer.lora_A.grad.flatten(1).abs().amax(1) > 0
        assert hit.tolist() == [True, True, False, False]  # experts 2 and 3 are never routed to: zero gradients
        assert layer.lora_B.grad[2:].abs().max() == 0


def test_one_expert_takes_the_whole_batch_with_top_1():
    module = experts_of(tiny_moe("mixtral"))
    adapt(module, ["gate_up_proj", "down_proj"])
    x, _, _ = routing(tokens=6)
    index, weights = torch.full((6, 1), 3), torch.ones(6, 1)
    torch.testing.assert_close(module(x, index, weights), run(merged_copy(module), "eager", x, index, weights), **FP32)


def test_routing_weights_applied_as_transformers_does():
    module = experts_of(tiny_moe("qwen3_moe"))
    x, index, weights = routing()
    double = run(module, "fused_lora", x, index, 2 * weights)
    torch.testing.assert_close(double, 2 * run(module, "fused_lora", x, index, weights), **FP32)
    zero_second = weights.clone()
    zero_second[:, 1] = 0
    top1 = run(module, "fused_lora", x, index[:, :1], zero_second[:, :1])
    torch.testing.assert_close(run(module, "fused_lora", x, index, zero_second), top1, **FP32)


def saved_shapes(fn):
    """fn()'s output and the shapes of the tensors autograd saved for backward while it ran."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), shapes


def gradients_of_the_block(kind="qwen3_moe", order=1):
    """(the block's hidden states, the module, and the gradients of x and every adapter factor) for one loss,
    differentiated once or (order=2) through a gradient penalty."""
    module = experts_of(tiny_moe(kind))
    adapt(module, ["gate_up_proj", "down_proj"])
    x, index, weights = routing(tokens=9)
    x.requires_grad_(True)
    params = [x] + [t for layer in X.adapters_of(module).values() for t in (layer.lora_A, layer.lora_B)]
    y = module(x, index, weights)
    loss = (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum()
    if order == 2:
        gx, = torch.autograd.grad(loss, x, create_graph=True)
        loss = gx.square().sum()
    return torch.autograd.grad(loss, params)


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt_oss"])
def test_the_routed_rows_are_gathered_again_not_kept(kind, monkeypatch):
    """The memory target of issue 20: the adapted gate/up projection keeps the hidden states (which the caller
    holds) and the routing index, not the top-k times larger gathered copy the block without LoRA does not
    hold; backward gathers the rows again and gives the gradients keeping the copy gave."""
    module = experts_of(tiny_moe(kind))
    adapt(module, ["gate_up_proj", "down_proj"])
    x, index, weights = routing(tokens=9)
    x.requires_grad_(True)
    _, shapes = saved_shapes(lambda: module(x, index, weights))
    assert (index.numel(), x.shape[1]) not in shapes and tuple(x.shape) in shapes
    got = gradients_of_the_block(kind)
    monkeypatch.setattr(X.gathered, "remember", lambda *args: None)  # keep the copy, as before
    _, shapes = saved_shapes(lambda: module(x, index, weights))
    assert (index.numel(), x.shape[1]) in shapes  # the check above can fail
    for g, w in zip(got, gradients_of_the_block(kind)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_double_backward_gathers_the_rows_again_too(monkeypatch):
    got = gradients_of_the_block(order=2)
    monkeypatch.setattr(X.gathered, "remember", lambda *args: None)
    for g, w in zip(got, gradients_of_the_block(order=2)):
        torch.testing.assert_close(g, w, **FP32)


@pytest.mark.parametrize("written", ["rows", "hidden_states"])
def test_a_write_between_the_gather_and_the_projection_keeps_the_rows(written, monkeypatch):
    """A forward pre-hook on the adapted gate/up that writes its input rows (or the hidden states) in place: the
    rows the forward read are what backward uses (kept as before), not the hidden states gathered again."""
    def gradients():
        module = experts_of(tiny_moe("qwen3_moe"))
        adapt(module, ["gate_up_proj", "down_proj"])
        x, index, weights = routing(tokens=9)
        hidden = x.requires_grad_(True) * 1.0

        def write(layer, args, kwargs):
            with torch.no_grad():
                (args[0] if written == "rows" else hidden).mul_(2.0)
        X.adapters_of(module)["gate_up_proj"].register_forward_pre_hook(write, with_kwargs=True)
        params = [x] + [t for layer in X.adapters_of(module).values() for t in (layer.lora_A, layer.lora_B)]
        return torch.autograd.grad(module(hidden, index, weights).square().sum(), params)
    got = gradients()
    monkeypatch.setattr(X.gathered, "remember", lambda *args: None)
    for g, w in zip(got, gradients()):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_a_write_to_the_hidden_states_before_backward_is_refused():
    """The rows are gathered again from the hidden states, so an in-place write to them between forward and
    backward is refused (autograd's own version check), never read as different rows."""
    module = experts_of(tiny_moe("qwen3_moe"))
    adapt(module, ["gate_up_proj"])
    x, index, weights = routing()
    hidden = x.requires_grad_(True) * 1.0
    y = module(hidden, index, weights)
    with torch.no_grad():
        hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_same_gradients(reentrant):
    """Under transformers' gradient checkpointing the block's forward runs again in backward (the rows are
    remembered again, the same tensors saved): the adapters' gradients are those of the plain run."""
    def gradients(checkpointing):
        model = tiny_moe("qwen3_moe")
        lora = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[], init_lora_weights=False,
                                                target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
        lora.train()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        before = dispatch.calls.get(("grouped_fwd", "torch"), 0)
        lora(token_ids()).logits.square().mean().backward()
        runs.append(dispatch.calls[("grouped_fwd", "torch")] - before)
        return {n: p.grad for n, p in lora.named_parameters() if p.requires_grad}
    runs = []
    plain, checkpointed = gradients(False), gradients(True)
    assert runs[1] == 2 * runs[0] > 0  # checkpointing ran the block's projections again
    assert len(plain) == 4 and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, **FP32)


def test_torch_compile_fullgraph():
    module = experts_of(tiny_moe("gpt_oss"))
    adapt(module, ["gate_up_proj", "down_proj"])
    x, index, weights = routing(tokens=6)
    x.requires_grad_(True)
    eager = module(x, index, weights)
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    got = compiled(x, index, weights)
    torch.testing.assert_close(got, eager, **FP32)
    dy = torch.randn_like(got)
    params = [x] + [t for layer in X.adapters_of(module).values() for t in (layer.lora_A, layer.lora_B)]
    for g, w in zip(torch.autograd.grad(got, params, dy), torch.autograd.grad(eager, params, dy)):
        torch.testing.assert_close(g, w, **FP32)


def test_another_implementation_is_refused_while_adapters_are_on_and_detach_restores():
    model = tiny_moe("qwen3_moe")
    model.set_experts_implementation("grouped_mm")
    module = experts_of(model)
    attachment = adapt(module, ["down_proj"])
    x, index, weights = routing()
    module.config._experts_implementation = "eager"
    with pytest.raises(RuntimeError, match="adapters would be ignored"):
        module(x, index, weights)
    module.config._experts_implementation = "fused_lora"
    X.detach(attachment)
    assert X.adapters_of(module) is None and model.config._experts_implementation == "grouped_mm"
    module(x, index, weights)  # no guard left


def test_expert_parallelism_and_bad_routing_are_refused():
    module = experts_of(tiny_moe("qwen3_moe"))
    x, index, weights = routing()
    with pytest.raises(ValueError, match="top_k_index, top_k_weights"):
        run(module, "fused_lora", x, index[:, :1], weights)
    for bad in (4, -1):  # an expert id outside [0, 4): named (it was a bare IndexError from index_add_)
        wrong = index.clone()
        wrong[2, 1] = bad
        with pytest.raises(ValueError, match=rf"top_k_index holds expert id {bad}; this .* has 4 experts \(0 to 3\)"):
            run(module, "fused_lora", x, wrong, weights)
    with pytest.raises(TypeError, match="top_k_index must hold integers"):
        run(module, "fused_lora", x, index.float(), weights)
    torch.testing.assert_close(run(module, "fused_lora", x, index.int(), weights),  # int32 ids, as int64 ones
                               run(module, "fused_lora", x, index, weights), rtol=0, atol=0)
    module._is_expert_parallel = True
    with pytest.raises(NotImplementedError, match="expert parallelism"):
        run(module, "fused_lora", x, index, weights)


def test_stack_problems_name_what_is_wrong():
    module = experts_of(tiny_moe("qwen3_moe"))
    assert X.stack_problem(module, "gate_up_proj") is None and X.stack_problem(module, "down_proj") is None
    assert "not one of" in X.stack_problem(module, "act_fn")
    module.down_proj = torch.nn.Parameter(torch.zeros(3, 16, 8))
    assert "3 experts, but the module has num_experts = 4" in X.stack_problem(module, "down_proj")
    module.down_proj = torch.nn.Parameter(torch.zeros(4, 16, 7))
    assert "do not chain" in X.stack_problem(module, "gate_up_proj")
