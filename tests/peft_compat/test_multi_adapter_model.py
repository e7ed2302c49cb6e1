"""Several adapters on one LoraModel (peft's API), against real peft: files in peft's multi-adapter
layout both ways, set_adapter, mixed batches (eval against peft, training against each adapter alone),
generate, merge_and_unload(adapter_names=...), parameter counts, and bad input that changes nothing."""
import copy

import peft
import pytest
import torch

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model
from fused_lora.cli.finetune import build_llama
from utils import peft_llama_with_head

TOKENS = torch.arange(30).reshape(3, 10) * 7 % 128
TARGETS = ["q_proj", "v_proj"]


def peft_two_adapters(tmp_path):
    """A peft model with adapters "default" (r=4) and "other" (r=8, rsLoRA), random B, saved by peft
    in its multi-adapter layout (default at the top, other in other/)."""
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=False))
    ref.add_adapter("other", peft.LoraConfig(r=8, lora_alpha=4, use_rslora=True, target_modules=TARGETS,
                                             init_lora_weights=False))
    ref.save_pretrained(tmp_path / "peft")
    ref.eval()
    return ref


def load_ours(directory):
    lm = LoraModel.from_pretrained(build_llama("tiny"), directory)
    lm.load_adapter(directory / "other", adapter_name="other")
    return lm


def logits(model, **kwargs):
    with torch.no_grad():
        return model(input_ids=TOKENS, **kwargs).logits


def test_peft_multi_adapter_directory_loads_and_switches_as_in_peft(tmp_path):
    ref = peft_two_adapters(tmp_path)
    assert (tmp_path / "peft" / "other" / "adapter_model.safetensors").exists()
    lm = load_ours(tmp_path / "peft")
    assert list(lm.peft_config) == ["default", "other"] and lm.peft_config["other"].r == 8
    assert lm.active_adapter == "default" and lm.active_adapters == ["default"]
    torch.testing.assert_close(logits(lm), logits(ref))
    first = logits(lm)
    ref.set_adapter("other")
    lm.set_adapter("other")
    assert not torch.allclose(logits(lm), first)  # the adapters differ: the comparisons can fail
    assert lm.active_adapters == ["other"]
    torch.testing.assert_close(logits(lm), logits(ref))
    with lm.disable_adapter(), ref.disable_adapter():
        torch.testing.assert_close(logits(lm), logits(ref))


def test_mixed_batch_inference_equals_peft(tmp_path):
    ref = peft_two_adapters(tmp_path)
    lm = load_ours(tmp_path / "peft")
    names = ["other", "__base__", "default"]
    want = logits(ref, adapter_names=names)
    torch.testing.assert_close(logits(lm, adapter_names=names), want)
    # and each row is that adapter alone
    lm.set_adapter("other")
    torch.testing.assert_close(logits(lm)[0], want[0])


def test_our_multi_adapter_directory_loads_in_peft_and_back(tmp_path):
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lm.add_adapter("other", LoraConfig(r=6, lora_alpha=3, target_modules=TARGETS, init_lora_weights=False))
    lm.add_adapter("third", peft.LoraConfig(r=2, target_modules=TARGETS, init_lora_weights=False))
    lm.save_pretrained(tmp_path / "ours")
    for sub in ("other", "third"):
        assert (tmp_path / "ours" / sub / "adapter_config.json").exists()
    ref = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "ours")
    ref.load_adapter(tmp_path / "ours" / "other", adapter_name="other")
    ref.load_adapter(tmp_path / "ours" / "third", adapter_name="third")
    ref.eval()
    names = ["third", "default", "other"]
    torch.testing.assert_close(logits(ref, adapter_names=names), logits(lm, adapter_names=names))
    for name in ("default", "other", "third"):
        ref.set_adapter(name)
        lm.set_adapter(name)
        torch.testing.assert_close(logits(ref), logits(lm))
    # peft's save of what it loaded comes back here equal
    ref.save_pretrained(tmp_path / "again")
    back = load_ours(tmp_path / "again")
    back.load_adapter(tmp_path / "again" / "third", adapter_name="third")
    torch.testing.assert_close(logits(back, adapter_names=names), logits(lm, adapter_names=names))
    # selected_adapters writes only those
    lm.save_pretrained(tmp_path / "sel", selected_adapters=["other"])
    assert (tmp_path / "sel" / "other" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "sel" / "adapter_model.safetensors").exists()


def test_counts_and_trainability_follow_peft():
    def build_peft():
        ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, target_modules=TARGETS))
        ref.add_adapter("other", peft.LoraConfig(r=8, target_modules=TARGETS))
        return ref
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS))
    lm.add_adapter("other", LoraConfig(r=8, target_modules=TARGETS))
    ref = build_peft()
    assert lm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    ref.set_adapter("other")
    lm.set_adapter("other")
    assert lm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_and_set_adapter_trainability_as_peft(tmp_path, is_trainable):
    peft_two_adapters(tmp_path)
    lm = LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "peft", is_trainable=is_trainable)
    lm.load_adapter(tmp_path / "peft" / "other", "other", is_trainable=is_trainable)
    ref = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "peft", is_trainable=is_trainable)
    ref.load_adapter(tmp_path / "peft" / "other", "other", is_trainable=is_trainable)
    assert lm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    assert lm.peft_config["other"].inference_mode is (not is_trainable)
    lm.set_adapter("other")
    ref.set_adapter("other")  # peft: the active adapter becomes trainable, however it was loaded
    assert lm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()
    lm.set_adapter("default", inference_mode=True)
    ref.set_adapter("default", inference_mode=True)
    assert lm.get_nb_trainable_parameters() == ref.get_nb_trainable_parameters()


def test_mixed_batch_training_gives_each_adapter_its_own_gradients():
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lm.add_adapter("other", LoraConfig(r=6, lora_alpha=12, target_modules=TARGETS, init_lora_weights=False))
    lm.set_requires_grad(["default", "other"])
    lm.train()
    names = ["other", "default", "other"]
    lm(input_ids=TOKENS, adapter_names=names).logits.sum().backward()
    layer = lm.model.model.layers[0].self_attn.q_proj
    got = {n: [t.grad.clone() for t in layer.adapter_weights("default" if n == "default" else n)]
           for n in ("default", "other")}
    for name in ("default", "other"):
        alone = copy.deepcopy(lm)
        alone.zero_grad(set_to_none=True)
        alone.set_adapter(name)
        rows = [i for i, n in enumerate(names) if n == name]
        alone(input_ids=TOKENS[rows]).logits.sum().backward()
        want = alone.model.model.layers[0].self_attn.q_proj.adapter_weights(name)
        for g, w in zip(got[name], want):
            torch.testing.assert_close(g, w.grad, rtol=1e-4, atol=1e-5)


def test_generate_with_adapter_names_equals_peft(tmp_path):
    ref = peft_two_adapters(tmp_path)
    lm = load_ours(tmp_path / "peft")
    lm.eval()
    names = ["other", "default", "__base__"]
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    want = ref.generate(input_ids=TOKENS, adapter_names=names, **kw)
    torch.testing.assert_close(lm.generate(input_ids=TOKENS, adapter_names=names, **kw), want)


def test_merge_and_unload_of_several_adapters_equals_peft(tmp_path):
    ref = peft_two_adapters(tmp_path)
    lm = load_ours(tmp_path / "peft")
    want = ref.merge_and_unload(adapter_names=["default", "other"])
    got = lm.merge_and_unload(adapter_names=["default", "other"])
    torch.testing.assert_close(logits(got), logits(want))


def test_delete_adapter(tmp_path):
    peft_two_adapters(tmp_path)
    lm = load_ours(tmp_path / "peft")
    lm.delete_adapter("other")
    assert list(lm.peft_config) == ["default"]
    assert not any("lora_adapters" in k for k in lm.state_dict())
    lm.load_adapter(tmp_path / "peft" / "other", adapter_name="other")  # the name is free again
    assert list(lm.peft_config) == ["default", "other"]


def snapshot(lm):
    return (list(lm.peft_config), lm.active_adapter, {k: v.clone() for k, v in lm.state_dict().items()},
            [p.requires_grad for p in lm.parameters()])


def assert_unchanged(lm, before):
    names, active, state, flags = before
    assert list(lm.peft_config) == names and lm.active_adapter == active
    assert lm.state_dict().keys() == state.keys()
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    assert [p.requires_grad for p in lm.parameters()] == flags


@pytest.mark.parametrize("call, error, match", [
    (lambda lm, d: lm.set_adapter("nope"), ValueError, "no adapter named 'nope'"),
    (lambda lm, d: lm(input_ids=TOKENS, adapter_names=["default", "other"]), ValueError, "2 names for a batch of 3"),
    (lambda lm, d: lm(input_ids=TOKENS, adapter_names=["default", "nope", "other"]), ValueError, "unknown adapter"),
    (lambda lm, d: lm(input_ids=TOKENS, adapter_names="default"), TypeError, "list of adapter names"),
    (lambda lm, d: lm.delete_adapter("default"), ValueError, "active adapter"),
    (lambda lm, d: lm.delete_adapter("nope"), ValueError, "no adapter named"),
    (lambda lm, d: lm.add_adapter("other", LoraConfig(target_modules=TARGETS)), ValueError, "already exists"),
    (lambda lm, d: lm.load_adapter(d / "other", "other"), ValueError, "already exists"),
    (lambda lm, d: lm.add_adapter("x", LoraConfig(target_modules=["q_proj"])), ValueError, "same|modules"),
    (lambda lm, d: lm.add_adapter("x", LoraConfig(target_modules=TARGETS, modules_to_save=["lm_head"])),
     ValueError, "modules_to_save"),
    (lambda lm, d: lm.add_adapter("x", LoraConfig(target_modules=TARGETS, lora_dropout=2.0)), ValueError,
     "dropout"),
    (lambda lm, d: lm.merge_and_unload(adapter_names=["default", "nope"]), ValueError, "no adapter named"),
    (lambda lm, d: lm.save_pretrained(d / "s", selected_adapters=["nope"]), ValueError, "no adapter named"),
])
def test_bad_input_is_refused_and_changes_nothing(tmp_path, call, error, match):
    peft_two_adapters(tmp_path)
    lm = load_ours(tmp_path / "peft")
    before = snapshot(lm)
    with pytest.raises(error, match=match):
        call(lm, tmp_path / "peft")
    assert_unchanged(lm, before)
    assert not (tmp_path / "peft" / "s").exists()


def test_load_adapter_of_other_targets_is_refused_and_changes_nothing(tmp_path):
    peft_two_adapters(tmp_path)
    peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(target_modules=["q_proj"])).save_pretrained(
        tmp_path / "q_only")
    lm = load_ours(tmp_path / "peft")
    before = snapshot(lm)
    with pytest.raises(AdapterError, match="modules the first adapter targets"):
        lm.load_adapter(tmp_path / "q_only", "q")
    assert_unchanged(lm, before)


def peft_pair(tmp_path, r_other, use_rslora=False):
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                                   init_lora_weights=False))
    ref.add_adapter("other", peft.LoraConfig(r=r_other, lora_alpha=3, target_modules=TARGETS,
                                             use_rslora=use_rslora, init_lora_weights=False))
    ref.save_pretrained(tmp_path / "pair")
    return ref.eval(), load_ours(tmp_path / "pair").eval()


@pytest.mark.parametrize("combination_type, r_other, kwargs", [
    ("linear", 4, {}),
    ("cat", 8, {}),
    ("svd", 8, {}),
    ("svd", 8, {"svd_rank": 3}),
    ("svd", 4, {"svd_rank": 5, "svd_clamp": 0.9}),
])
def test_add_weighted_adapter_equals_peft(tmp_path, combination_type, r_other, kwargs):
    ref, lm = peft_pair(tmp_path, r_other, use_rslora=combination_type == "cat")
    weights = [0.7, -1.3]
    counts = []
    for m in (ref, lm):
        before = m.get_nb_trainable_parameters()
        m.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination_type, **kwargs)
        after = m.get_nb_trainable_parameters()
        counts.append((after[0] - before[0], after[1] - before[1]))
    assert counts[0] == counts[1] and counts[0][0] == 0  # the same new parameters, frozen, as in peft
    assert lm.peft_config["mix"].r == ref.peft_config["mix"].r
    assert lm.peft_config["mix"].lora_alpha == ref.peft_config["mix"].lora_alpha
    theirs = ref.base_model.model.model.layers[0].self_attn.v_proj
    ours = lm.model.model.layers[0].self_attn.v_proj
    torch.testing.assert_close(ours.delta_weight("mix"), theirs.get_delta_weight("mix"), rtol=1e-4, atol=1e-6)
    if combination_type != "svd":  # an SVD's factors are unique only up to signs: compared through the delta
        torch.testing.assert_close(ours.adapter_weights("mix")[0], theirs.lora_A["mix"].weight)
        torch.testing.assert_close(ours.adapter_weights("mix")[1], theirs.lora_B["mix"].weight)
    ref.set_adapter("mix")
    lm.set_adapter("mix")
    torch.testing.assert_close(logits(lm), logits(ref), rtol=1e-4, atol=1e-5)
    # the combination differs from its sources: the comparison can fail
    lm.set_adapter("default")
    assert not torch.allclose(logits(lm), logits(ref))


def test_cat_of_two_adapters_is_their_weighted_sum(tmp_path):
    # independent truth: cat is exact, the delta is sum_i w_i s_i B_i A_i (float64)
    _, lm = peft_pair(tmp_path, 8)
    lm.add_weighted_adapter(["default", "other"], [2.0, 0.5], "mix", combination_type="cat")
    layer = lm.model.model.layers[1].self_attn.q_proj
    want = sum(w * layer.adapter_settings(n).scaling * (layer.adapter_weights(n)[1].double()
                                                          @ layer.adapter_weights(n)[0].double())
               for n, w in (("default", 2.0), ("other", 0.5)))
    torch.testing.assert_close(layer.delta_weight("mix").double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda lm: lm.add_weighted_adapter(["default", "nope"], [1, 1], "mix"), ValueError, "no adapter named"),
    (lambda lm: lm.add_weighted_adapter(["default", "other"], [1], "mix"), ValueError, "2 weights"),
    (lambda lm: lm.add_weighted_adapter(["default", "other"], [1, 1], "other"), ValueError, "already exists"),
    (lambda lm: lm.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="linear"),
     ValueError, "one rank"),
    (lambda lm: lm.add_weighted_adapter(["default", "other"], [1, 1], "mix", combination_type="ties"),
     NotImplementedError, "ties"),
    (lambda lm: lm.add_weighted_adapter(["default", "other"], [1, 1], "mix", svd_rank=10 ** 6), ValueError,
     "exceeds"),
    # an int beyond any float (before: OverflowError from float()); issue 18, attacker re-trial, finding 6
    (lambda lm: lm.add_weighted_adapter(["default", "other"], [10 ** 400, 1], "mix"), ValueError,
     "weights must be finite"),
])
def test_add_weighted_adapter_bad_input_changes_nothing(tmp_path, call, error, match):
    _, lm = peft_pair(tmp_path, 8)
    before = snapshot(lm)
    with pytest.raises(error, match=match):
        call(lm)
    assert_unchanged(lm, before)


def fp16_two_adapters(autocast):
    """An fp16 MLP with two random adapters (s = 1), fp16 or fp32 (autocast_adapter_dtype)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).half()
    config = dict(r=2, lora_alpha=2, target_modules=["0", "2"], init_lora_weights=False)
    lm = get_lora_model(model, LoraConfig(**config), autocast_adapter_dtype=autocast)
    lm.add_adapter("other", LoraConfig(**config))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            for name in ("default", "other"):
                for t in layer.adapter_weights(name):
                    t.copy_(torch.randn(t.shape, generator=g))
    return lm


@pytest.mark.parametrize("combination_type", ["linear", "cat", "svd"])
@pytest.mark.parametrize("weights, autocast, problem", [
    ([1e30, 1.0], False, r"the combined lora_[AB] has NaN or inf in torch.float16"),
    ([3e4, 3e4], False, r"the combined lora_[AB] has NaN or inf in torch.float16"),
    ([1e30, 1.0], True, r"the combined adapter's lora_[AB] holds .* beyond the range of torch.float16"),
], ids=["fp16-1e30", "fp16-3e4", "fp32-adapters-1e30"])
def test_add_weighted_adapter_beyond_the_dtype_is_refused_by_name(combination_type, weights, autocast, problem):
    """Finite weights whose combination overflows the new adapter's fp16 (or, with fp32 adapters, the fp16
    the model computes in): refused naming the layer, nothing added (before: an adapter holding inf / NaN
    in 6 of 24 cases). [3e4, 3e4] overflows "cat" and "svd" only (linear takes sqrt(w s) per factor).
    Issue 18, attacker re-trial, finding 6."""
    lm = fp16_two_adapters(autocast)
    before = snapshot(lm)
    if weights == [3e4, 3e4] and combination_type == "linear":
        lm.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination_type)
        assert all(torch.isfinite(t).all() for _, layer in lm.lora_layers() for t in layer.adapter_weights("mix"))
        return
    with pytest.raises(ValueError, match=rf"add_weighted_adapter\('mix'\): layer '[02]': {problem}.*nothing was "
                                         "added"):
        lm.add_weighted_adapter(["default", "other"], weights, "mix", combination_type=combination_type)
    assert_unchanged(lm, before)


def test_weighted_adapter_saved_here_loads_in_peft(tmp_path):
    ref, lm = peft_pair(tmp_path, 8)
    for m in (ref, lm):
        m.add_weighted_adapter(["default", "other"], [0.5, 1.5], "mix", combination_type="cat")
    lm.save_pretrained(tmp_path / "ours", selected_adapters=["mix"])
    back = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "ours" / "mix", adapter_name="mix").eval()
    ref.set_adapter("mix")
    torch.testing.assert_close(logits(back), logits(ref), rtol=1e-4, atol=1e-5)


def gpt2(seed=0):
    import transformers
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=128, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def test_gpt2_conv1d_mixed_batch_and_svd_equal_peft(tmp_path):
    # Conv1D bases (weight stored in x out, fan_in_fan_out): the per-sample path and the SVD's layout
    ref = peft.get_peft_model(gpt2(), peft.LoraConfig(r=4, target_modules=["c_attn", "c_proj"],
                                                      init_lora_weights=False, fan_in_fan_out=True))
    ref.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=5, target_modules=["c_attn", "c_proj"],
                                             init_lora_weights=False, fan_in_fan_out=True))
    ref.save_pretrained(tmp_path / "g")
    ref.eval()
    lm = LoraModel.from_pretrained(gpt2(), tmp_path / "g")
    lm.load_adapter(tmp_path / "g" / "other", "other")
    names = ["other", "default", "__base__"]
    torch.testing.assert_close(logits(lm, adapter_names=names), logits(ref, adapter_names=names))
    for m in (ref, lm):
        m.add_weighted_adapter(["default", "other"], [1.0, -0.5], "mix", combination_type="svd", svd_rank=3)
        m.set_adapter("mix")
    torch.testing.assert_close(logits(lm), logits(ref), rtol=1e-4, atol=1e-5)


def test_adapter_names_for_a_first_adapter_not_named_default(tmp_path):
    peft_two_adapters(tmp_path)
    lm = LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "peft", adapter_name="first")
    with pytest.raises(ValueError, match="'default' names the first adapter's slot"):
        lm.load_adapter(tmp_path / "peft" / "other", "default")
    assert list(lm.peft_config) == ["first"]
    lm.load_adapter(tmp_path / "peft" / "other", "second")
    ref = load_ours(tmp_path / "peft")
    torch.testing.assert_close(logits(lm, adapter_names=["second", "first", "__base__"]),
                               logits(ref, adapter_names=["other", "default", "__base__"]))
    lm.save_pretrained(tmp_path / "named")  # peft's layout: neither is "default", both in sub-directories
    assert sorted(p.name for p in (tmp_path / "named").iterdir()) == ["first", "second"]
    with pytest.raises(AdapterError, match="only in sub-directories \\(first, second"):
        LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "named")
    again = LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "named" / "first", adapter_name="first")
    again.load_adapter(tmp_path / "named" / "second", "second")
    torch.testing.assert_close(logits(again, adapter_names=["second", "first", "__base__"]),
                               logits(lm, adapter_names=["second", "first", "__base__"]))


def test_add_adapter_all_linear_means_peft_all_linear():
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules=TARGETS))
    with pytest.raises(ValueError, match="modules the first adapter targets"):
        lm.add_adapter("x", LoraConfig(target_modules="all-linear"))
    assert list(lm.peft_config) == ["default"]
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules="all-linear"))
    lm.add_adapter("x", LoraConfig(r=2, target_modules="all-linear"))
    lm.add_adapter("y", peft.LoraConfig(r=2, target_modules="all-linear"))
    assert list(lm.peft_config) == ["default", "x", "y"]


def test_generate_with_beams_and_adapter_names_equals_peft(tmp_path):
    ref = peft_two_adapters(tmp_path)
    lm = load_ours(tmp_path / "peft").eval()
    names = ["__base__", "other", "default"]
    kw = dict(max_new_tokens=3, do_sample=False, num_beams=2, pad_token_id=0)
    torch.testing.assert_close(lm.generate(input_ids=TOKENS, adapter_names=names, **kw),
                               ref.generate(input_ids=TOKENS, adapter_names=names, **kw))


def test_mixed_batch_with_modules_to_save_equals_peft(tmp_path):
    # peft's rule: a modules_to_save copy serves its adapter's samples; others get the original module
    ref = peft_llama_with_head(r_other=8, targets=TARGETS)
    ref.save_pretrained(tmp_path / "m")
    ref.eval()
    lm = load_ours(tmp_path / "m")
    names = ["other", "default", "__base__"]
    got = logits(lm, adapter_names=names)
    # peft 0.21's own mixed batch raises KeyError here (no copy for "other"): compare each row with
    # peft running that sample's adapter alone
    torch.testing.assert_close(got[1], logits(ref)[1])
    with ref.disable_adapter():
        torch.testing.assert_close(got[2], logits(ref)[2])
    ref.set_adapter("other")
    torch.testing.assert_close(got[0], logits(ref)[0])
    assert not torch.allclose(logits(ref)[1], got[1])  # the copy matters: the comparison can fail
    assert lm.model.lm_head.sample_uses_trainable is None  # cleared after the call
    # The same rule with the whole batch on one adapter: set_adapter("other") runs the original head,
    # and trains neither the first adapter's copy nor anything of "default".
    lm.set_adapter("other")
    torch.testing.assert_close(logits(lm), logits(ref))
    assert not any(p.requires_grad for p in lm.model.lm_head.parameters())
    lm.set_adapter("default")
    ref.set_adapter("default")
    torch.testing.assert_close(logits(lm), logits(ref))


def test_checkpoint_resume_restores_every_adapter_whichever_is_active(tmp_path):
    # LoraTrainer resumes with load_weights_into; before: the top-level (first) adapter's weights went
    # into the *active* adapter's tensors, and other adapters were not restored.
    from fused_lora.peft_compat.adapters import load_weights_into
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lm.add_adapter("other", LoraConfig(r=6, target_modules=TARGETS, init_lora_weights=False))
    lm.set_adapter("other")
    lm.save_pretrained(tmp_path / "ckpt")
    want = {k: v.clone() for k, v in lm.state_dict().items()}
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.add_(1.0)
    load_weights_into(lm, tmp_path / "ckpt")
    for k, v in lm.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    assert lm.active_adapter == "other"


def _peft_extra_adapter(tmp_path, edit_config=None, edit_tensors=None):
    """A peft adapter directory for the tiny Llama, its config or tensors edited as a file could be."""
    import json

    from safetensors.torch import load_file, save_file
    pm = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    pm.save_pretrained(tmp_path / "x")
    if edit_config:
        path = tmp_path / "x" / "adapter_config.json"
        cfg = json.loads(path.read_text())
        edit_config(cfg)
        path.write_text(json.dumps(cfg))
    if edit_tensors:
        path = tmp_path / "x" / "adapter_model.safetensors"
        tensors = load_file(path)
        edit_tensors(tensors)
        save_file(tensors, path)
    return tmp_path / "x"


def test_load_adapter_never_runs_the_files_regex_and_follows_its_keys(tmp_path):
    """As from_pretrained: the weights' keys decide the targets; a regex in a downloaded config is
    not run on module names (a catastrophic one would stall loading) and does not refuse a file
    whose keys fit."""
    def regex(cfg):
        cfg["target_modules"] = r"([\w.]|[\w.])*!"  # exponential backtracking on ordinary names
    directory = _peft_extra_adapter(tmp_path, edit_config=regex)
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS))
    import signal

    def stalled(*_):
        raise TimeoutError("load_adapter ran the config's regex on module names")
    old = signal.signal(signal.SIGALRM, stalled)
    signal.alarm(20)
    try:
        lm.load_adapter(directory, "x")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    assert "x" in lm.peft_config


def test_load_adapter_refuses_non_finite_tensors_as_from_pretrained_does(tmp_path):
    def nan(tensors):
        key = next(k for k in tensors if k.endswith("lora_B.weight"))
        tensors[key].fill_(float("nan"))
    directory = _peft_extra_adapter(tmp_path, edit_tensors=nan)
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(AdapterError, match="NaN or inf"):
        lm.load_adapter(directory, "x")
    assert list(lm.peft_config) == ["default"]


def test_add_weighted_adapter_of_a_classification_adapter(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification
    from fused_lora.cli.finetune import LLAMA_SIZES

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(**LLAMA_SIZES["tiny"], num_labels=3, pad_token_id=0))
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=TARGETS, task_type="SEQ_CLS", init_lora_weights=False))
    lm.add_weighted_adapter(["default"], [1.0], "w", combination_type="linear")
    assert lm.peft_config["w"].modules_to_save is None


@pytest.mark.parametrize("name", ["__base__", "../escaped", "a.b", "training"])
def test_adapter_names_follow_one_rule_for_the_first_adapter_too(tmp_path, name):
    with pytest.raises(ValueError, match="cannot name an adapter"):
        LoraModel(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS), adapter_name=name)
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS))
    with pytest.raises(ValueError, match="cannot name an adapter"):
        lm.add_adapter(name, LoraConfig(r=4, target_modules=TARGETS))
    assert list(lm.peft_config) == ["default"]


@pytest.mark.parametrize("is_trainable", [False, True])
def test_load_adapter_leaves_train_mode_as_peft_does(tmp_path, is_trainable):
    directory = _peft_extra_adapter(tmp_path)
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, target_modules=TARGETS))
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS))
    for m in (ref, lm):
        m.train()
        m.load_adapter(directory, "x", is_trainable=is_trainable)
    assert lm.training == ref.training == is_trainable
