"""Bad input for LoRA on expert stacks (issue 20 item 6) gives a clear error and changes nothing: an unknown
parameter name, a parameter that is no expert stack, a 3-D stack of the wrong shape, an expert count that does not
match, what fused_lora does not compute on expert stacks (DoRA, trained biases, mixed batches, weighted
combinations), peft's transformers-4 names it would rewrite, and adapter files that do not fit."""
import copy
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model
from fused_lora.modules import experts as X
from fused_lora.peft_compat.targets import PEFT_MOE_FAMILY, PEFT_MOE_RENAMED
from moe_models import PARAMS, experts_of, tiny_moe, token_ids

peft = pytest.importorskip("peft")


def snapshot(model):
    """Everything adapting could change: the module tree, parameter values and flags, train mode, the experts
    implementation, hooks on the experts modules."""
    return ([(n, type(m)) for n, m in model.named_modules()],
            [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
            model.training, model.config._experts_implementation,
            [len(m._forward_pre_hooks) for m in model.modules() if X.is_experts_module(m)])


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after[0] == before[0] and after[2:] == before[2:]
    assert [(n, g) for n, _, g in after[1]] == [(n, g) for n, _, g in before[1]]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(after[1], before[1]))


def refused(model, config, match, error=ValueError):
    before = snapshot(model)
    with pytest.raises(error, match=match):
        get_lora_model(model, config)
    assert_unchanged(model, before)


def test_unknown_parameter_name():
    refused(tiny_moe("qwen3_moe"), LoraConfig(target_modules=[], target_parameters=["mlp.experts.gate_proj"]),
            r"entries \['mlp.experts.gate_proj'\] match no parameter; the model's expert stacks are: "
            r"model.layers.0.mlp.experts.gate_up_proj")


def test_a_parameter_that_is_no_expert_stack():
    refused(tiny_moe("mixtral"), LoraConfig(target_modules=[], target_parameters=["self_attn.q_proj.weight"]),
            "q_proj.weight \\(a parameter of Linear, not of a transformers experts module")
    refused(tiny_moe("gpt_oss"), LoraConfig(target_modules=[], target_parameters=["mlp.experts.gate_up_proj_bias"]),
            "'gate_up_proj_bias' is not one of this GptOssExperts's expert projections")


def test_a_stack_of_the_wrong_shape():
    model = tiny_moe("qwen3_moe")
    experts_of(model).down_proj = torch.nn.Parameter(torch.randn(4, 16, 7))  # intermediate 7, gate_up gives 2 x 8
    refused(model, LoraConfig(target_modules=[], target_parameters=PARAMS), "do not chain")
    experts_of(model).down_proj = torch.nn.Parameter(torch.randn(16, 8))
    refused(model, LoraConfig(target_modules=[], target_parameters=PARAMS[1:]), "must be a 3-D stack")


def test_an_expert_count_that_does_not_match():
    model = tiny_moe("mixtral")
    experts_of(model).num_experts = 5
    refused(model, LoraConfig(target_modules=[], target_parameters=PARAMS),
            r"gate_up_proj has shape \(4, 16, 16\): 4 experts, but the module has num_experts = 5")


def test_what_is_not_computed_on_expert_stacks():
    refused(tiny_moe("qwen3_moe"), LoraConfig(target_modules=[], target_parameters=PARAMS, use_dora=True), "DoRA")
    refused(tiny_moe("gpt_oss"), LoraConfig(target_modules=[], target_parameters=PARAMS, bias="all"), "bias='all'")
    with pytest.raises(TypeError, match="target_parameters must be None or a list"):
        LoraConfig(target_parameters="mlp.experts.down_proj")
    model = get_lora_model(tiny_moe("qwen3_moe"), LoraConfig(r=2, target_modules=["q_proj"], target_parameters=PARAMS))
    model.add_adapter("b", LoraConfig(r=2, target_modules=["q_proj"], target_parameters=PARAMS))
    with pytest.raises(ValueError, match="adapter_names .* not supported on expert weights"):
        model(token_ids(), adapter_names=["default", "b"])
    with pytest.raises(ValueError, match="add_weighted_adapter.*target_parameters"):
        model.add_weighted_adapter(["default", "b"], [1.0, 1.0], "mix", combination_type="cat")
    assert sorted(model.peft_config) == ["b", "default"]


@pytest.mark.parametrize("kind,target_modules,named", [
    ("qwen3_moe", ["q_proj", "gate_proj", "down_proj"], "['gate_proj', 'down_proj']"),
    ("mixtral", ["w1"], "['w1']"),
    ("qwen3_moe", "all-linear", "['gate', 'gate_proj', 'up_proj', 'down_proj']"),
    ("olmoe", r".*\.experts\.(gate|up)_proj", "['gate_proj', 'up_proj']"),
])
def test_peft_s_transformers_4_names_are_refused_by_name(kind, target_modules, named):
    says = "includes, in peft," if target_modules == "all-linear" else "names"  # the user named none of them there
    refused(tiny_moe(kind), LoraConfig(target_modules=target_modules, target_parameters=PARAMS),
            re.escape(f"{says} {named}: peft (on transformers 5) rewrites these transformers-4 names"))


@pytest.mark.parametrize("kind,regex,named", [
    ("qwen3_moe_dense0", r".*layers\.0\.mlp\.(gate|up|down)_proj", "['gate_proj', 'up_proj', 'down_proj']"),  # dense
    ("qwen3_moe", r".*mlp\.gate", "['gate']"),  # the router module
])
def test_a_regex_matching_real_modules_with_renamed_names_is_refused(kind, regex, named):
    """peft resolves a regex to the leaf names of every real module and parameter it matches (besides the experts'
    transformers-4 keys), and where one of them is a renamed name it rewrites the config into expert targets,
    whatever module matched: a dense layer's Linears, the router (a module, not a Linear). Checked against peft,
    then refused as the list form is (fused_lora adapting the matched modules wrote files peft loads elsewhere)."""
    theirs = peft.get_peft_model(tiny_moe(kind), peft.LoraConfig(target_modules=regex))
    assert theirs.peft_config["default"].target_modules == set()  # peft rewrote the regex away
    refused(tiny_moe(kind), LoraConfig(target_modules=regex), re.escape(f"names {named}: peft"))


def test_the_carried_tables_are_peft_s():
    from peft.utils import transformers_weight_conversion as conv
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    renamed = {family: tuple(sorted(names)) for family, names in conv._MOE_TARGET_MODULE_MAPPING.items()}
    assert {f: tuple(sorted(n)) for f, n in PEFT_MOE_RENAMED.items()} == renamed
    families = {mt: f for mt, f in conv._MODEL_TO_CONVERSION_PATTERN.items()
                if f in renamed and get_checkpoint_conversion_mapping(mt) is not None}
    assert PEFT_MOE_FAMILY == families


def test_files_that_do_not_fit_are_refused_and_change_nothing(tmp_path):
    base = tiny_moe("qwen3_moe")
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules=[],
                                                                      target_parameters=PARAMS))
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"  # gate_up_proj's (r E, in)
    assert tensors[key].shape == (8, 16)
    for bad, match in [({**tensors, key: torch.zeros(6, 16)}, r"has shape \(6, 16\), the model needs \(8, 16\)"),
                       ({k: v for k, v in tensors.items() if k != key}, "is missing"),
                       ({**tensors, key: torch.full((8, 16), float("nan"))}, "NaN"),
                       # refused after the adapters were attached (the cast): taken off again, implementation back
                       ({**tensors, key: torch.full((8, 16), 1e300, dtype=torch.float64)}, "beyond the range")]:
        save_file(bad, weights)
        before = snapshot(base)
        with pytest.raises(AdapterError, match=match):
            LoraModel.from_pretrained(base, tmp_path)
        assert_unchanged(base, before)
    other = tiny_moe("qwen3_moe", experts=8)  # an expert count that does not match the file's
    save_file(tensors, weights)
    before = snapshot(other)
    with pytest.raises(AdapterError, match=r"lora_A.weight' has shape \(8, 16\), the model needs \(16, 16\) "
                                           r"\(an expert stack's adapter holds r x experts there: 8 is r = 2 for 4 "
                                           r"experts, this model's stack has 8\)"):
        LoraModel.from_pretrained(other, tmp_path)
    assert_unchanged(other, before)


def test_a_file_beyond_the_compute_dtype_is_refused_for_expert_stacks_too(tmp_path):
    """An fp32 expert adapter whose lora_B (1e5) an fp16 model cannot hold: the stacks' keys are peft's layout, not
    a Linear layer's, and the load's compute-dtype rule (modules.adapter_range) checks them as it checks a
    Linear's, naming the keys; nothing changes (issue 18's finding 1 on issue 20's stacks). Within the range the
    same file loads."""
    base = tiny_moe("qwen3_moe", dtype=torch.float16)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=2e-4, target_modules=[],
                                                                      target_parameters=PARAMS))
    theirs.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = "base_model.model.model.layers.0.mlp.experts.lora_B.weight"  # down_proj's (out, r E)
    assert tensors[key].dtype == torch.float32
    save_file({**tensors, key: torch.full_like(tensors[key], 1e5)}, weights)
    before = snapshot(base)
    with pytest.raises(AdapterError, match=re.escape(f"'{key}'") + r".*lora_B holds 100000, beyond the range of "
                                           r"torch.float16"):
        LoraModel.from_pretrained(base, tmp_path)
    assert_unchanged(base, before)
    save_file({**tensors, key: torch.full_like(tensors[key], 6e4)}, weights)
    loaded = LoraModel.from_pretrained(base, tmp_path)
    layer = next(layer for _, param, layer in loaded.expert_layers() if param == "down_proj")
    assert bool((layer.lora_B == 6e4).all())
