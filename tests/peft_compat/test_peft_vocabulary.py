"""peft's words on a LoraModel: task_type heads, inference_mode, save/from_pretrained arguments,
peft_config by adapter name, base_model_name_or_path, base_model; bad adapter names refused clearly."""
import json

import peft
import pytest
import torch
import transformers

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model
from fused_lora.cli.finetune import build_llama

TOKENS = torch.arange(20).reshape(2, 10) * 7 % 128


def gpt2_classifier(seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=128, n_positions=32, num_labels=3,
                                     pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2ForSequenceClassification(config)  # head: "score"


def bert_tagger(seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                     vocab_size=128, max_position_embeddings=32, num_labels=5,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForTokenClassification(config)  # head: "classifier"


CLASSIFIERS = [(gpt2_classifier, "SEQ_CLS", ["c_attn"], "score"), (bert_tagger, "TOKEN_CLS", ["query", "value"],
                                                                     "classifier")]


@pytest.mark.parametrize("build, task, targets, head", CLASSIFIERS)
def test_peft_classification_adapter_loads_with_its_head(tmp_path, build, task, targets, head):
    # Before: refused with a 1,868-character error (peft saves modules_to_save=["classifier", "score"]).
    ref = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=targets, task_type=task,
                                                        init_lora_weights=False))
    with torch.no_grad():
        ref.base_model.model.get_submodule(head).modules_to_save["default"].weight.add_(0.5)  # a trained head
    ref.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved["modules_to_save"]) == {"classifier", "score"}
    ours = LoraModel.from_pretrained(build(), tmp_path)
    assert [n for n, _ in ours.saved_modules()] == [head]
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=TOKENS).logits, ref(input_ids=TOKENS).logits)


@pytest.mark.parametrize("build, task, targets, head", CLASSIFIERS)
def test_task_type_makes_the_head_trainable_and_peft_loads_it(tmp_path, build, task, targets, head):
    lm = get_lora_model(build(), LoraConfig(r=4, target_modules=targets, task_type=task, init_lora_weights=False))
    assert lm.peft_config["default"].modules_to_save == ["classifier", "score"]  # as peft writes it
    assert [n for n, _ in lm.saved_modules()] == [head]
    assert all(p.requires_grad for p in dict(lm.saved_modules())[head].trainable.parameters())
    with torch.no_grad():
        dict(lm.saved_modules())[head].trainable.weight.add_(0.5)
    lm.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(build(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=TOKENS).logits, lm(input_ids=TOKENS).logits)


@pytest.mark.parametrize("build, task, targets, head", CLASSIFIERS[:1])  # peft 0.21 fails on TOKEN_CLS here
def test_all_linear_leaves_the_task_head_to_modules_to_save_as_peft(build, task, targets, head):
    ref = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules="all-linear", task_type=task))
    want = {n.removeprefix("base_model.model.") for n, m in ref.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)}
    lm = get_lora_model(build(), LoraConfig(r=4, target_modules="all-linear", task_type=task))
    assert {n for n, _ in lm.lora_layers()} == want and head not in want
    assert [n for n, _ in lm.saved_modules()] == [head]


def test_all_linear_leaves_a_token_classifier_head_to_modules_to_save(tmp_path):
    lm = get_lora_model(bert_tagger(), LoraConfig(r=4, target_modules="all-linear", task_type="TOKEN_CLS",
                                                  init_lora_weights=False))
    assert "classifier" not in dict(lm.lora_layers()) and [n for n, _ in lm.saved_modules()] == ["classifier"]
    lm.save_pretrained(tmp_path)  # "all-linear" in the file: the loader applies the same rule
    loaded = LoraModel.from_pretrained(bert_tagger(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=TOKENS).logits, lm(input_ids=TOKENS).logits)


def test_unmatched_modules_to_save_error_is_short_and_names_the_entry():
    with pytest.raises(ValueError, match="'classifer'") as err:
        get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"], modules_to_save=["classifer"]))
    assert len(str(err.value)) < 300


def test_task_type_is_checked():
    with pytest.raises(ValueError, match="task_type"):
        LoraConfig(target_modules=["q_proj"], task_type="SEQ_CLASSIFICATION")


def test_inference_mode():
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"], inference_mode=True))
    assert lm.get_nb_trainable_parameters()[0] == 0


def test_is_trainable_sets_inference_mode(tmp_path):
    get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    assert LoraModel.from_pretrained(build_llama("tiny"), tmp_path).peft_config["default"].inference_mode is True
    trainable = LoraModel.from_pretrained(build_llama("tiny"), tmp_path, is_trainable=True)
    assert trainable.peft_config["default"].inference_mode is False
    assert trainable.get_nb_trainable_parameters()[0] > 0


def test_save_pretrained_takes_peft_arguments(tmp_path):
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"]))
    lm.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"], is_main_process=True,
                       save_embedding_layers="auto")
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()
    lm.save_pretrained(tmp_path / "b", is_main_process=False)  # as peft: only the main process writes
    assert not (tmp_path / "b").exists()
    with pytest.raises(ValueError, match="safetensors only"):
        lm.save_pretrained(tmp_path / "c", safe_serialization=False)
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        lm.save_pretrained(tmp_path / "c", selected_adapters=["other"])
    assert not (tmp_path / "c").exists()


def test_from_pretrained_adapter_name_and_peft_config_by_name(tmp_path):
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=["q_proj"]))
    assert isinstance(lm.peft_config["default"], LoraConfig) and lm.peft_config["default"].r == 4
    lm.save_pretrained(tmp_path)
    loaded = LoraModel.from_pretrained(build_llama("tiny"), tmp_path, adapter_name="mine")
    assert list(loaded.peft_config) == ["mine"] and loaded.active_adapter == "mine"
    assert loaded.active_adapters == ["mine"]
    loaded.set_adapter("mine")  # the one it holds: nothing to do
    loaded.save_pretrained(tmp_path / "again")
    # peft's layout: an adapter not named "default" goes in a sub-directory named after it
    assert (tmp_path / "again" / "mine" / "adapter_model.safetensors").exists()
    assert not (tmp_path / "again" / "adapter_model.safetensors").exists()


def test_base_model_name_or_path_is_recorded_so_auto_peft_model_finds_the_base(tmp_path):
    build_llama("tiny").save_pretrained(tmp_path / "base")
    base = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base")
    lm = get_lora_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                         task_type="CAUSAL_LM"))  # AutoPeftModel reads the task
    lm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")
    ref = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(ref(input_ids=TOKENS).logits, lm(input_ids=TOKENS).logits)


def test_base_model_and_get_base_model_as_in_peft():
    model = build_llama("tiny")
    lm = get_lora_model(model, LoraConfig(target_modules=["q_proj"]))
    assert lm.get_base_model() is model
    assert lm.base_model.model is model  # so base_model.model.<name> are the adapter files' keys
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(target_modules=["q_proj"]))
    assert isinstance(ref.base_model.model, transformers.LlamaForCausalLM)


@pytest.mark.parametrize("call, match", [
    (lambda lm: lm.set_adapter("other"), "no adapter named 'other'"),
    (lambda lm: lm.load_adapter("somewhere", adapter_name="default"), "already exists"),
    (lambda lm: lm.delete_adapter("default"), "active adapter"),
    (lambda lm: lm(input_ids=TOKENS, adapter_names=["default", "other"]), "unknown adapter name"),
    (lambda lm: lm.merge_and_unload(adapter_names=["other"]), "no adapter named 'other'"),
])
def test_several_adapters_api_refuses_bad_names_clearly(call, match):
    # Before: forward(adapter_names=...) silently ignored; set_adapter/add_adapter reached transformers
    # ("The version of PEFT you are using is not compatible"). The full API: tests/peft_compat/test_multi_adapter_model.py.
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=match):
        call(lm)


@pytest.mark.parametrize("name", ["enable_adapters", "disable_adapters", "get_adapter_state_dict"])
def test_transformers_adapter_methods_say_what_to_use(name):
    # Before: "The version of PEFT you are using is not compatible" from transformers.
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(NotImplementedError, match="LoraModel"):
        getattr(lm, name)()


def test_forward_with_adapter_names_none_is_the_plain_forward():
    lm = get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"], init_lora_weights=False))
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=TOKENS, adapter_names=None).logits, lm(input_ids=TOKENS).logits)


def test_dora_config_round_trips_and_a_peft_dora_adapter_loads(tmp_path):
    cfg = LoraConfig(target_modules=["q_proj"], use_dora=True)
    assert cfg.to_peft_dict()["use_dora"] is True
    assert LoraConfig.from_peft_dict(cfg.to_peft_dict()).use_dora is True
    assert LoraConfig.from_peft_dict(LoraConfig(target_modules=["q_proj"]).to_peft_dict()).use_dora is False
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(target_modules=["q_proj"], use_dora=True,
                                                                   init_lora_weights=False))
    with torch.no_grad():  # off peft's init (B = 0, m = ||W||: the base model), so the comparison can fail
        for name, p in ref.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1.25)
    ref.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(build_llama("tiny"), tmp_path)
    assert ours.peft_config["default"].use_dora
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=TOKENS).logits, ref(input_ids=TOKENS).logits)

# ---------------------------------------------------------------- issue 18 item 22: peft's words

REFUSED_SETTINGS = {"layers_to_transform": [0], "rank_pattern": {"q_proj": 2}, "lora_bias": True,
                    "use_qalora": True, "layer_replication": [[0, 1]]}


@pytest.mark.parametrize("field", sorted(REFUSED_SETTINGS))
def test_constructor_names_a_refused_peft_field_as_the_loader_does(field):
    """Issue 18 item 22: LoraConfig(layers_to_transform=[0]) gave Python's generic "unexpected keyword
    argument"; the constructor now names the field and why, in the loader's words."""
    value = REFUSED_SETTINGS[field]
    with pytest.raises(ValueError) as loading:
        LoraConfig.from_peft_dict({"target_modules": ["q_proj"], field: value})
    with pytest.raises(ValueError, match=f"{field}=.* is not supported by fused_lora: ") as built:
        LoraConfig(target_modules=["q_proj"], **{field: value})
    assert str(built.value) == f"LoraConfig: {loading.value}"


def test_constructor_takes_every_peft_field_at_peft_s_default():
    """Issue 18 item 22: a config spelled with all of peft's LoraConfig fields (e.g. copied from peft code)
    constructs when every field fused_lora does not implement has its off value, as the loader reads it;
    a name that is no field of peft's either stays Python's TypeError, naming it."""
    import dataclasses
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(peft.LoraConfig)}
    defaults["target_modules"] = ["q_proj"]
    config = LoraConfig(**defaults)
    assert config == LoraConfig(target_modules=["q_proj"])
    assert LoraConfig(target_modules=["q_proj"], revision="v2", peft_type="LORA") == config  # ignored as on load
    with pytest.raises(ValueError, match="peft_type"):
        LoraConfig(target_modules=["q_proj"], peft_type="IA3")
    with pytest.raises(TypeError, match="unexpected keyword argument 'target_module'"):
        LoraConfig(target_module=["q_proj"])


def adapted(peft_model) -> list[str]:
    """The names of the modules peft adapted, as in the base model (without peft's wrapper prefix)."""
    from peft.tuners.lora import LoraLayer
    return [n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)]


def test_get_lora_model_takes_peft_s_lora_config_as_add_adapter_does():
    """Issue 18 item 22: one rule for a peft LoraConfig: get_lora_model (and LoraModel) refused it while
    LoraModel.add_adapter accepted it; both now read it as its adapter_config.json would be read."""
    ours = get_lora_model(build_llama("tiny"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                               init_lora_weights=False))
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    assert isinstance(ours.peft_config["default"], LoraConfig) and ours.peft_config["default"].r == 4
    assert [n for n, _ in ours.lora_layers()] == adapted(ref)
    direct = LoraModel(build_llama("tiny"), peft.LoraConfig(r=2, target_modules=["v_proj"]))
    assert direct.peft_config["default"].target_modules == ["v_proj"]
    for build in (lambda c: get_lora_model(build_llama("tiny"), c), lambda c: ours.add_adapter("x", c)):
        with pytest.raises(ValueError, match=r"layers_to_transform=\[0\] is not supported by fused_lora"):
            build(peft.LoraConfig(r=4, target_modules=["q_proj"], layers_to_transform=[0]))


def tiny_model(kind):
    """A tiny transformers model of `kind` (random weights, built from a config)."""
    torch.manual_seed(0)
    common = dict(vocab_size=128, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  hidden_size=32, intermediate_size=64)
    if kind == "llama":
        return build_llama("tiny")
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=128,
                                                                    n_positions=32))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common))
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(num_hidden_layers=1, hidden_size=32,
                                                              num_attention_heads=4, intermediate_size=64,
                                                              vocab_size=128))
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["llama", "gpt2", "mistral", "qwen2", "bert"])
def test_without_target_modules_peft_s_default_for_the_model_type_is_adapted(kind, tmp_path):
    """Issue 18 item 22: target_modules was required, unlike peft; without it the model type's default
    target modules (peft's table) are adapted, exactly the modules peft adapts, and recorded in the
    config as peft records them (so the saved adapter loads in peft)."""
    ref = peft.get_peft_model(tiny_model(kind), peft.LoraConfig(r=2))
    lm = get_lora_model(tiny_model(kind), LoraConfig(r=2))
    assert [n for n, _ in lm.lora_layers()] == adapted(ref)
    assert lm.peft_config["default"].target_modules == sorted(ref.peft_config["default"].target_modules)
    lm.add_adapter("other", LoraConfig(r=4))  # the same rule for a further adapter
    assert [n for n, _ in lm.lora_layers()] == adapted(ref)
    lm.save_pretrained(tmp_path)
    peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path)


def test_without_target_modules_an_unknown_model_type_is_a_clear_error():
    """Issue 18 item 22: a model peft has no default for (not a transformers model, or a model type
    outside peft's table) gets an error saying target_modules is required and why, model unchanged."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(ValueError, match="target_modules is required.*no transformers config"):
        get_lora_model(model, LoraConfig())
    model.config = transformers.PretrainedConfig()
    model.config.model_type = "my_model"
    with pytest.raises(ValueError, match="target_modules is required: peft has no default target modules for "
                                         "model type 'my_model'"):
        get_lora_model(model, LoraConfig())
    assert type(model[0]) is torch.nn.Linear


def test_default_target_modules_are_peft_s_table():
    """Issue 18 item 22: the table fused_lora carries (so a minimal install without peft has it, and what
    is adapted does not change with the installed peft) is peft's own; this fails when peft changes it."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    from fused_lora.peft_compat.targets import DEFAULT_TARGET_MODULES
    assert DEFAULT_TARGET_MODULES == peft_table


def test_a_file_without_target_modules_loads_by_the_model_type_s_default_as_in_peft(tmp_path):
    """Issue 18 item 22: an adapter_config.json whose target_modules is null means, for peft, the model
    type's default target modules: it loads when the weights adapt exactly those, and is refused
    (AdapterError) when they adapt others, rather than loading modules the config does not name."""
    for targets, directory in ((["q_proj", "v_proj"], tmp_path / "default"), (["q_proj", "k_proj"], tmp_path / "qk")):
        ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=2, target_modules=targets,
                                                                       init_lora_weights=False))
        ref.save_pretrained(directory)
        config = json.loads((directory / "adapter_config.json").read_text())
        config["target_modules"] = None
        (directory / "adapter_config.json").write_text(json.dumps(config))
    lm = LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "default")
    assert {n.rsplit(".", 1)[-1] for n, _ in lm.lora_layers()} == {"q_proj", "v_proj"}
    ref = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "default")
    with torch.no_grad():
        torch.testing.assert_close(lm(input_ids=TOKENS).logits, ref(input_ids=TOKENS).logits)
    with pytest.raises(AdapterError, match="does not agree with the weights"):
        LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "qk")


def _with_random_b(lm, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            layer.lora_B.normal_()
    return lm


@pytest.mark.parametrize("kind", ["llama", "qwen3_moe"])
def test_merge_adapter_and_unmerge_adapter_as_in_peft(kind):
    """peft's merge_adapter() / unmerge_adapter() on the model (BaseTuner's): the adapted layers stay, their base
    weights take the delta in place (the outputs unchanged), and unmerge_adapter takes it out again; expert stacks
    too. Before, both reached the transformers model (AttributeError naming it)."""
    if kind == "llama":
        model, config, ids = build_llama("tiny"), LoraConfig(target_modules=["q_proj", "v_proj"]), TOKENS
    else:
        from moe_models import PARAMS, tiny_moe, token_ids
        model, ids = tiny_moe("qwen3_moe"), token_ids()
        config = LoraConfig(target_modules=["q_proj"], target_parameters=PARAMS, init_lora_weights=False)
    lm = _with_random_b(get_lora_model(model, config))
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with torch.no_grad():
        want = lm(input_ids=ids).logits
        lm.merge_adapter()
        assert all(layer.merged for _, layer in lm.lora_layers())
        changed = [n for n, p in lm.named_parameters() if not torch.equal(p, before[n])]
        assert changed and all("lora_" not in n for n in changed)  # base weights only
        torch.testing.assert_close(lm(input_ids=ids).logits, want, rtol=1e-4, atol=1e-4)
        lm.unmerge_adapter()
        assert not any(layer.merged for _, layer in lm.lora_layers())
        for n, p in lm.named_parameters():
            torch.testing.assert_close(p, before[n], rtol=1e-6, atol=1e-6)
    assert hasattr(peft.tuners.lora.LoraModel, "merge_adapter") and hasattr(peft.tuners.lora.LoraModel,
                                                                             "unmerge_adapter")


def test_merge_adapter_refuses_before_changing_anything():
    lm = _with_random_b(get_lora_model(build_llama("tiny"), LoraConfig(target_modules=["q_proj"])))
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with pytest.raises(ValueError, match="no adapter named 'other'"):
        lm.merge_adapter(adapter_names=["other"])
    with torch.no_grad():
        next(layer for _, layer in lm.lora_layers()).lora_B.fill_(float("inf"))
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    with pytest.raises(ValueError, match="merge_adapter\\(safe_merge=True\\)"):
        lm.merge_adapter(safe_merge=True)
    assert all(torch.equal(p, before[n]) for n, p in lm.named_parameters())
    assert not any(layer.merged for _, layer in lm.lora_layers())


def test_merge_adapter_over_a_quantized_base_is_refused_with_nothing_merged():
    from torch import nn

    from fused_lora import quantize_model
    model = quantize_model(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)), "nf4", target_modules=["2"])
    lm = get_lora_model(model, LoraConfig(target_modules=["0", "2"]))
    with pytest.raises(ValueError, match="merge_adapter: layer '2'.*quantized"):
        lm.merge_adapter()
    assert not any(layer.merged for _, layer in lm.lora_layers())
