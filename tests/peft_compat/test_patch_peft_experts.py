"""patch_peft on peft's ParamWrapper over expert stacks (issue 20 item 4): the outermost wrapper of an experts module
computes the whole module through the grouped op, on peft's own tensors, and equals unpatched peft (outputs,
gradients, 20 AdamW steps); whatever peft's state asks for that it does not compute goes to peft's forward."""
import copy

import pytest
import torch

from fused_lora import dispatch, patch_peft, unpatch_peft
from moe_models import PARAMS, tiny_moe, token_ids, train_side_by_side
from utils import needs_triton

peft = pytest.importorskip("peft")
TOL = dict(rtol=1e-5, atol=1e-5)


def peft_pair(kind, params=PARAMS, target_modules=("q_proj",)):
    """Two identical peft models with random adapters on the stacks (and q_proj)."""
    base = tiny_moe(kind)
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(target_modules), target_parameters=list(params),
                             init_lora_weights=False)
    torch.manual_seed(5)
    model = peft.get_peft_model(base, config)
    return model, copy.deepcopy(model)


def grouped_calls():
    return sum(v for (op, _), v in dispatch.calls.items() if op == "grouped_fwd")


def grads(model):
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kind,params", [("qwen3_moe", PARAMS), ("mixtral", PARAMS[1:]), ("gpt_oss", PARAMS),
                                         ("olmoe", PARAMS[:1])])
def test_patched_equals_peft_and_runs_the_grouped_op(kind, params):
    patched, plain = peft_pair(kind, params)
    patch_peft(patched, verbose=False)
    report = patched.fused_lora_report
    assert not report.kept and len(report.patched) == 1 + len(params)
    ids = token_ids()
    calls = grouped_calls()
    y = patched(ids, labels=ids)
    assert grouped_calls() == calls + 2  # the experts module: gate/up and down through the grouped op
    y_ref = plain(ids, labels=ids)
    torch.testing.assert_close(y.logits, y_ref.logits, **TOL)
    y.loss.backward()
    y_ref.loss.backward()
    g, g_ref = grads(patched), grads(plain)
    assert g.keys() == g_ref.keys()
    for name in g:
        assert g_ref[name].abs().max() > 0, name
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_twenty_adamw_steps_equal_unpatched_peft():
    patched, plain = peft_pair("qwen3_moe")
    patch_peft(patched, verbose=False)
    train_side_by_side(patched, plain, seed=7)


def test_deferred_to_peft_where_its_state_asks_for_something_else():
    patched, plain = peft_pair("mixtral")
    patch_peft(patched, verbose=False)
    ids = token_ids()
    calls = grouped_calls()
    with patched.disable_adapter(), plain.disable_adapter():
        torch.testing.assert_close(patched(ids).logits, plain(ids).logits, **TOL)
    patched.set_experts_implementation("batched_mm")  # same function: still fused
    torch.testing.assert_close(patched(ids).logits, plain(ids).logits, **TOL)
    assert grouped_calls() == calls + 2
    patched.base_model.model.model.layers[0].mlp.experts.merge()  # peft merges the outer wrapper's adapter
    plain.base_model.model.model.layers[0].mlp.experts.merge()
    torch.testing.assert_close(patched(ids).logits, plain(ids).logits, **TOL)
    assert grouped_calls() == calls + 2  # merged: peft's forward


def test_another_adapter_is_followed_and_unpatch_restores():
    patched, plain = peft_pair("qwen3_moe", target_modules=())
    for model in (patched, plain):
        torch.manual_seed(9)
        model.add_adapter("other", peft.LoraConfig(r=3, lora_alpha=3, target_modules=[], target_parameters=PARAMS,
                                                   init_lora_weights=False))
        model.set_adapter("other")
    patch_peft(patched, verbose=False)
    ids = token_ids()
    calls = grouped_calls()
    torch.testing.assert_close(patched(ids).logits, plain(ids).logits, **TOL)
    assert grouped_calls() == calls + 2
    unpatch_peft(patched)
    assert "forward" not in patched.base_model.model.model.layers[0].mlp.experts.__dict__
    patched(ids)
    assert grouped_calls() == calls + 2


@needs_triton()
def test_a_forced_backend_the_grouped_kernels_cannot_run_is_refused_before_anything_changes():
    """backend="triton" at rank 192: the single-adapter kernels take it (up to 256), the grouped kernels do not (up
    to 128). patch_peft checks the expert stacks against the grouped op, so it raises BackendUnavailable naming the
    rank and patches nothing (before: it reported the wrappers patched and every forward raised)."""
    model = peft.get_peft_model(tiny_moe("qwen3_moe"), peft.LoraConfig(r=192, target_modules=[],
                                                                       target_parameters=PARAMS))
    with pytest.raises(dispatch.BackendUnavailable, match="grouped.*ranks up to 128.*is 192"):
        patch_peft(model, backend="triton", verbose=False)
    assert not hasattr(model, "fused_lora_report")
    assert not any("forward" in m.__dict__ for m in model.modules())  # no wrapper patched
