"""LoRA on expert stacks with peft's vocabulary (issue 20 items 4-6), against the real peft on tiny Qwen3-MoE,
Mixtral and GPT-OSS models built from configs (top-2 of 4 experts): LoraConfig(target_parameters=[...]) adapts the
same stacks as peft; the same adapter gives the same logits and gradients; 20 AdamW steps give the same losses;
adapter files move both ways (peft's ParamWrapper keys, shapes and expert order); merge / unmerge /
merge_and_unload; trainable counts as peft prints them; several adapters; dropout as fused_lora's extension."""
import copy

import pytest
import torch

from fused_lora import LoraConfig, LoraModel, get_lora_model
from fused_lora.peft_compat.experts import file_prefixes, to_peft_A, to_peft_B
from moe_models import PARAMS, experts_of, tiny_moe, token_ids, train_side_by_side

peft = pytest.importorskip("peft")

LOGITS = dict(rtol=1e-5, atol=1e-5)
GRADS = dict(rtol=1e-4, atol=1e-6)
KINDS = ["qwen3_moe", "mixtral", "gpt_oss"]


def peft_config(params=PARAMS, **kw):
    kw.setdefault("r", 2)
    kw.setdefault("lora_alpha", 4)
    return peft.LoraConfig(target_modules=kw.pop("target_modules", []), target_parameters=list(params), **kw)


def ours_from_peft(kind, tmp_path, params=PARAMS, **kw):
    """peft's adapter (random A and B) on a tiny model, saved, and loaded by fused_lora into a copy of the base."""
    base = tiny_moe(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(params, init_lora_weights=False, **kw))
    theirs.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    return base, ours, theirs


def peft_grads(model):
    """Adapter gradients of a peft model, by the key its file would use."""
    return {n.replace(".default", "").replace("base_model.model.", ""): p.grad for n, p in model.named_parameters()
            if p.requires_grad}


def our_grads(lora_model):
    """Ours, in peft's layout and keys."""
    targets = {}
    for module, param, _ in lora_model.expert_layers():
        targets.setdefault(module, []).append(param)
    prefixes = file_prefixes(targets)
    out = {}
    for module, param, layer in lora_model.expert_layers():
        prefix = prefixes[(module, param)]
        out[f"{prefix}.lora_A.weight"] = to_peft_A(layer.lora_A.grad)
        out[f"{prefix}.lora_B.weight"] = to_peft_B(layer.lora_B.grad)
    for name, layer in lora_model.linear_layers():
        out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = layer.lora_A.grad, layer.lora_B.grad
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("params", [PARAMS, PARAMS[:1], PARAMS[1:]], ids=["both", "gate_up", "down"])
def test_peft_file_loads_and_computes_peft_logits_and_gradients(kind, params, tmp_path):
    base, ours, theirs = ours_from_peft(kind, tmp_path, params)
    assert base.config._experts_implementation == "grouped_mm"  # a copy was adapted: the base is untouched
    assert ours.model.config._experts_implementation == "fused_lora"
    assert sorted(p for _, p, _ in ours.expert_layers()) == sorted(p.rpartition(".")[2] for p in params)
    ids = token_ids()
    y_ours, y_theirs = ours(ids, labels=ids), theirs(ids, labels=ids)
    torch.testing.assert_close(y_ours.logits, y_theirs.logits, **LOGITS)
    y_ours.loss.backward()
    y_theirs.loss.backward()
    g_ours, g_theirs = our_grads(ours), peft_grads(theirs)
    assert sorted(g_ours) == sorted(g_theirs)
    for key in g_theirs:
        assert g_theirs[key].abs().max() > 0, key
        torch.testing.assert_close(g_ours[key], g_theirs[key], **GRADS, msg=key)


@pytest.mark.parametrize("kind", KINDS)
def test_our_file_loads_in_peft(kind, tmp_path):
    base = tiny_moe(kind)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=["q_proj"],
                                                          target_parameters=PARAMS, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    ours.eval()
    ids = token_ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **LOGITS)
    # and back: peft's save of what it loaded gives the same adapter
    theirs.save_pretrained(tmp_path / "again")
    again = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path / "again")
    torch.testing.assert_close(again(ids).logits, theirs(ids).logits, **LOGITS)


def test_twenty_adamw_steps_match_peft(tmp_path):
    base, ours, theirs = ours_from_peft("qwen3_moe", tmp_path)
    theirs.train()
    ours.train()
    train_side_by_side(ours, theirs, seed=3)
    ids = token_ids()
    torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_merge_unmerge_and_merge_and_unload_as_peft(kind, tmp_path):
    base, ours, theirs = ours_from_peft(kind, tmp_path)
    ours.eval()
    ids = token_ids()
    y = ours(ids).logits.detach()
    experts = experts_of(ours.model)
    before = {p: getattr(experts, p).detach().clone() for p in ("gate_up_proj", "down_proj")}
    for _, _, layer in ours.expert_layers():
        layer.merge()
    torch.testing.assert_close(ours(ids).logits, y, **LOGITS)
    for _, _, layer in ours.expert_layers():
        layer.unmerge()
    for p, w in before.items():
        torch.testing.assert_close(getattr(experts, p), w, rtol=0, atol=1e-6)
    plain = ours.merge_and_unload()
    merged_theirs = theirs.merge_and_unload()
    assert not any("lora" in n for n, _ in plain.named_modules())
    assert plain.config._experts_implementation == "grouped_mm"  # what the model had before
    for p in before:
        torch.testing.assert_close(getattr(experts_of(plain), p), getattr(experts_of(merged_theirs), p), **LOGITS)
    torch.testing.assert_close(plain(ids).logits, y, **LOGITS)


@pytest.mark.parametrize("kind", KINDS)
def test_trainable_counts_print_as_peft(kind, capsys):
    base = tiny_moe(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(r=4, target_modules=["q_proj"]))
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj"], target_parameters=PARAMS))
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    theirs.print_trainable_parameters()
    line = capsys.readouterr().out
    ours.print_trainable_parameters()
    assert capsys.readouterr().out == line


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_no_target_modules_beside_target_parameters_adapts_what_peft_adapts(kind):
    """peft's default modules for the model type are not taken here: mixtral has defaults (q_proj, v_proj), but
    peft's transformers-5 rewrite of MoE configs empties target_modules first; the others have none."""
    base = tiny_moe(kind)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_parameters=PARAMS))
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=2, target_parameters=PARAMS))
    assert not list(ours.linear_layers()) and len(list(ours.expert_layers())) == 2
    assert ours.get_nb_trainable_parameters() == theirs.get_nb_trainable_parameters()
    assert ours.peft_config["default"].target_modules is None


def test_several_adapters_both_ways(tmp_path):
    base = tiny_moe("qwen3_moe")
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=[], target_parameters=PARAMS,
                                                          init_lora_weights=False))
    ours.add_adapter("second", LoraConfig(r=3, lora_alpha=3, target_modules=[], target_parameters=PARAMS,
                                          init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.load_adapter(tmp_path / "second", "second")
    ids = token_ids()
    for name in ("default", "second"):
        ours.set_adapter(name)
        theirs.set_adapter(name)
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **LOGITS)
    # peft's second adapter loads as a further adapter of ours
    again = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    theirs.save_pretrained(tmp_path / "peft")
    again.load_adapter(tmp_path / "peft" / "second", "second")
    again.set_adapter("second")
    torch.testing.assert_close(again(ids).logits, theirs(ids).logits, **LOGITS)
    with pytest.raises(ValueError, match="same parameters"):
        again.add_adapter("third", LoraConfig(r=2, target_modules=[], target_parameters=PARAMS[:1]))


def test_dropout_is_our_extension_and_refused_by_name_on_save(tmp_path):
    with pytest.raises(ValueError, match="lora_dropout"):  # what peft says of such a config
        peft.get_peft_model(tiny_moe("qwen3_moe"), peft_config(lora_dropout=0.25))
    with pytest.warns(UserWarning, match=r"lora_dropout=0.25 on expert stacks.*save_pretrained refuses"):
        ours = get_lora_model(tiny_moe("qwen3_moe"), LoraConfig(r=2, lora_dropout=0.25, target_modules=[],
                                                                target_parameters=PARAMS, init_lora_weights=False))
    ids = token_ids()
    ours.train()
    torch.manual_seed(0)
    a, b = ours(ids).logits, ours(ids).logits
    assert not torch.allclose(a, b)  # a fresh mask per call
    (a.sum() + b.sum()).backward()  # the masks are drawn again in backward, never stored
    assert all(layer.lora_A.grad.abs().max() > 0 for _, _, layer in ours.expert_layers())
    ours.eval()
    torch.testing.assert_close(ours(ids).logits, ours(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"lora_dropout=0.25 on expert stacks \(target_parameters\).*peft.*"
                                         r"lora_dropout=0.*load_state_dict"):
        ours.save_pretrained(tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
    # the way out the message gives: the trained weights into a model built without dropout, saved, loaded by peft
    plain = get_lora_model(tiny_moe("qwen3_moe"), LoraConfig(r=2, target_modules=[], target_parameters=PARAMS))
    plain.load_state_dict(ours.state_dict())
    plain.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_moe("qwen3_moe"), tmp_path).eval()
    torch.testing.assert_close(theirs(ids).logits, ours(ids).logits, **LOGITS)


def test_disable_adapter_and_unload_as_peft(tmp_path):
    base, ours, theirs = ours_from_peft("gpt_oss", tmp_path)
    ours.eval()
    ids = token_ids()
    with ours.disable_adapter(), theirs.disable_adapter():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, **LOGITS)
        torch.testing.assert_close(ours(ids).logits, base(ids).logits, **LOGITS)
    before = {n: p.detach().clone() for n, p in experts_of(ours.model).named_parameters(recurse=False)}
    plain = ours.unload()
    assert not any("lora" in n for n, _ in plain.named_modules())
    assert plain.config._experts_implementation == "grouped_mm"
    experts = experts_of(plain)
    assert not experts._forward_pre_hooks  # the guard is gone with the adapters
    for n, w in before.items():
        assert torch.equal(getattr(experts, n), w), n  # unload merges nothing
    torch.testing.assert_close(plain(ids).logits, base(ids).logits, **LOGITS)
