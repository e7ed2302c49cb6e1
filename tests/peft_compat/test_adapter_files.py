"""Adapters on disk: our files load in peft, peft's load here, bad files are refused cleanly."""
import copy
import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model
from fused_lora.cli.demo import MLP
from utils import REPO_ROOT  # noqa: E402

peft = pytest.importorskip("peft")

X = torch.rand(8, 20, generator=torch.Generator().manual_seed(3))


def base_mlp():
    torch.manual_seed(0)
    return MLP()


def trained_lora(**cfg):
    lm = get_lora_model(base_mlp(), LoraConfig(r=3, target_modules=["seq.0", "seq.2"], **cfg))
    opt = torch.optim.SGD([p for p in lm.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = lm(X).exp().pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return lm


@pytest.mark.parametrize("cfg", [{}, {"modules_to_save": ["seq.4"]}, {"bias": "lora_only"}, {"use_rslora": True}])
def test_roundtrip_and_peft_loads_ours(tmp_path, cfg):
    lm = trained_lora(**cfg)
    with torch.no_grad():
        want = lm(X)
    lm.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    ours = LoraModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)
    pm = peft.PeftModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(pm(X), want)


@pytest.mark.parametrize("cfg", [{}, {"modules_to_save": ["seq.4"]}, {"bias": "all"}])
def test_we_load_peft_adapters(tmp_path, cfg):
    pm = peft.get_peft_model(base_mlp(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["seq.0", "seq.2"],
                                                         init_lora_weights=False, **cfg))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        want = pm(X)
    pm.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(base_mlp(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)


def test_is_trainable_flag(tmp_path):
    trained_lora().save_pretrained(tmp_path)
    frozen = LoraModel.from_pretrained(base_mlp(), tmp_path)
    assert frozen.get_nb_trainable_parameters()[0] == 0 and not frozen.training
    live = LoraModel.from_pretrained(base_mlp(), tmp_path, is_trainable=True)
    assert live.get_nb_trainable_parameters()[0] == 12_660


def untouched(model, state):
    return (all(type(m).__name__ in ("MLP", "Sequential", "Linear", "ReLU", "LogSoftmax") for m in model.modules())
            and all(torch.equal(t, state[k]) for k, t in model.state_dict().items()))


def check_refused(directory, match):
    model = base_mlp()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(AdapterError, match=match):
        LoraModel.from_pretrained(model, directory)
    assert untouched(model, state)


def saved(tmp_path):
    trained_lora(modules_to_save=["seq.4"]).save_pretrained(tmp_path)
    return tmp_path, load_file(tmp_path / "adapter_model.safetensors")


def test_missing_files(tmp_path):
    check_refused(tmp_path, "adapter_config.json not found")
    d, _ = saved(tmp_path)
    os.remove(d / "adapter_model.safetensors")
    check_refused(d, "adapter_model.safetensors not found")


def test_pickle_is_refused(tmp_path):
    d, tensors = saved(tmp_path)
    os.remove(d / "adapter_model.safetensors")
    torch.save(tensors, d / "adapter_model.bin")
    check_refused(d, "pickle")


def test_wrong_shape(tmp_path):
    d, tensors = saved(tmp_path)
    tensors["base_model.model.seq.2.lora_B.weight"] = torch.zeros(200, 4)
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, r"seq.2.lora_B.weight' has shape \(200, 4\), the model needs \(200, 3\)")


def test_key_for_missing_module(tmp_path):
    d, tensors = saved(tmp_path)
    tensors["base_model.model.seq.9.lora_A.weight"] = torch.zeros(3, 20)
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, "the weights adapt 'seq.9', which is not a module of this model")


def test_missing_key(tmp_path):
    d, tensors = saved(tmp_path)
    del tensors["base_model.model.seq.4.bias"]
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, "seq.4.bias' is missing")


def test_config_naming_absent_modules_and_corrupt_files(tmp_path):
    d, _ = saved(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    targets = cfg["target_modules"]
    cfg["target_modules"] = ["q_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    check_refused(d, "does not fit this model")
    cfg["target_modules"] = ["seq.0"]
    cfg["use_dora"] = True  # a DoRA config over a file without magnitudes
    cfg["target_modules"] = targets
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    check_refused(d, "lora_magnitude_vector' is missing")
    (d / "adapter_config.json").write_text("{not json")
    check_refused(d, "adapter_config.json")
    d2 = tmp_path / "corrupt"
    saved(d2)
    (d2 / "adapter_model.safetensors").write_bytes(b"\x00" * 20)
    check_refused(d2, "not a readable safetensors")


def test_target_inside_modules_to_save_is_an_adapter_error(tmp_path):
    d, tensors = saved(tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["modules_to_save"] = ["seq.2"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    model = base_mlp()
    for k, t in model.seq[2].state_dict().items():
        tensors[f"base_model.model.seq.2.{k}"] = t
    del tensors["base_model.model.seq.4.weight"], tensors["base_model.model.seq.4.bias"]
    save_file(tensors, d / "adapter_model.safetensors")
    check_refused(d, "both LoRA targets and .inside. modules_to_save")


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    lm = trained_lora()
    lm.save_pretrained(tmp_path)
    before = (tmp_path / "adapter_model.safetensors").read_bytes()
    import fused_lora.peft_compat.adapters as adapters

    def exploding_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        trained_lora(modules_to_save=["seq.4"]).save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]


# ---------------------------------------------------------------- file modes

@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_files_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        trained_lora().save_pretrained(tmp_path / "a")
    finally:
        os.umask(old)
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert oct((tmp_path / "a" / name).stat().st_mode & 0o777) == oct(0o666 & ~umask), name


# ---------------------------------------------------------------- peft inits that change the base weights

@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora"])
def test_base_changing_inits_refused_and_converted_form_loads(tmp_path, init):
    """peft's PiSSA/OLoRA change the base weights: their adapter is refused, naming the init; the
    converted form (a plain LoRA delta on the original base) loads and reproduces peft's model."""
    pm = peft.get_peft_model(base_mlp(), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["seq.0", "seq.2"],
                                                         init_lora_weights=init))
    pm.peft_config["default"].init_lora_weights = True  # peft's recipe for the conversion's reference
    pm.save_pretrained(tmp_path / "initial")
    pm.peft_config["default"].init_lora_weights = init
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        want = pm(X)
    pm.save_pretrained(tmp_path / "raw")
    check_refused(tmp_path / "raw", f"init_lora_weights.*{init}.*path_initial_model_for_weight_conversion")
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    ours = LoraModel.from_pretrained(base_mlp(), tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want, rtol=1e-4, atol=1e-5)


def test_peft_orthogonal_init_adapter_loads(tmp_path):
    """'orthogonal' leaves the base weights alone: the file's A and B are a plain delta, and load."""
    pm = peft.get_peft_model(base_mlp(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["seq.0", "seq.2"],
                                                         init_lora_weights="orthogonal"))
    with torch.no_grad():
        want = pm(X)
    pm.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(base_mlp(), tmp_path)
    assert ours.peft_config["default"].init_lora_weights == "orthogonal"
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)
    with pytest.raises(ValueError, match="orthogonal.*cannot initialise"):
        get_lora_model(base_mlp(), LoraConfig(r=4, target_modules=["seq.0"], init_lora_weights="orthogonal"))


@pytest.mark.parametrize("init", ["corda", "loftq", "lora_ga", "mica"])
def test_other_refused_inits_in_config(tmp_path, init):
    trained_lora().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = init
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    check_refused(tmp_path, f"init_lora_weights.*{init}")


def test_loftq_config_refused(tmp_path):
    trained_lora().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["loftq_config"] = {"loftq_bits": 4, "loftq_iter": 1}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    check_refused(tmp_path, "loftq_config")


# ---------------------------------------------------------------- every peft field has a rule

def test_every_peft_lora_field_has_a_rule_and_the_doc_mirrors_it():
    import dataclasses
    from pathlib import Path

    from fused_lora.peft_compat.config import PEFT_FIELD_RULES
    fields = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    assert fields - set(PEFT_FIELD_RULES) == set(), "peft LoraConfig fields with no rule in config.py"
    doc = (Path(REPO_ROOT) / "docs" / "ADAPTERS.md").read_text()
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| `") and len(cells) >= 3:
            rows[cells[0].strip("`")] = cells[1]
    assert rows == {name: rule.status for name, rule in PEFT_FIELD_RULES.items()}


def test_honoured_fields_are_the_ones_read():
    from fused_lora.peft_compat.config import HONOURED, PEFT_FIELD_RULES, PEFT_FIELDS
    honoured = {name for name, rule in PEFT_FIELD_RULES.items() if rule.status == HONOURED}
    assert honoured - {"peft_type"} <= set(PEFT_FIELDS)  # peft_type is checked, not kept
    assert set(PEFT_FIELDS) <= set(PEFT_FIELD_RULES)


def test_refused_fields_are_refused_when_set(tmp_path):
    from fused_lora.peft_compat.config import PEFT_FIELD_RULES, REFUSED
    trained_lora().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for name, rule in PEFT_FIELD_RULES.items():
        if rule.status != REFUSED:
            continue
        for value in (True, {"x": 1}, [1], "on"):
            (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, name: value}))
            check_refused(tmp_path, name)


def test_unknown_fields(tmp_path):
    lm = trained_lora()
    with torch.no_grad():
        want = lm(X)
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "some_future_field": True}))
    check_refused(tmp_path, "some_future_field")
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "some_future_field": None,
                                                              "peft_version": "9.9", "revision": "main"}))
    with torch.no_grad():
        torch.testing.assert_close(LoraModel.from_pretrained(base_mlp(), tmp_path)(X), want)


# ---------------------------------------------------------------- hostile regex

class LongNames(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder_layers_with_long_names = torch.nn.ModuleDict({
            "attention_query_projection": torch.nn.Linear(6, 6),
            "attention_value_projection": torch.nn.Linear(6, 6)})

    def forward(self, x):
        return sum(m(x) for m in self.encoder_layers_with_long_names.values())


def test_hostile_regex_in_config_does_not_stall_loading(tmp_path):
    """The targets come from the weights file's keys; the config's regex is not run on names.
    Run in a forked child with a generous timeout, so a regression fails instead of hanging."""
    lm = get_lora_model(LongNames(), LoraConfig(r=2, target_modules=["attention_query_projection"],
                                                init_lora_weights=False))
    x = torch.rand(3, 6)
    with torch.no_grad():
        want = lm(x)
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg["target_modules"] = "(.|.)*X"
    cfg["exclude_modules"] = "(.|.)*Y"
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    finishes_in_child(lambda: torch.testing.assert_close(LoraModel.from_pretrained(LongNames(), tmp_path)(x), want))


def finishes_in_child(fn, limit_s=60):
    """Run fn in a forked child; fail (not hang) if it raises or has not finished after limit_s."""
    pid = os.fork()
    if not pid:
        code = 1
        try:
            with torch.no_grad():
                fn()
            code = 0
        finally:
            os._exit(code)
    for _ in range(int(limit_s / 0.05)):  # a load takes milliseconds; the limit only stops a regression
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail(f"did not finish in {limit_s} s")
    assert os.waitstatus_to_exitcode(status) == 0, "the child failed (its traceback is above)"


class ManyLayers(torch.nn.Module):
    def __init__(self, n=300):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"proj": torch.nn.Linear(2, 2)}) for _ in range(n))

    def forward(self, x):
        return sum(b["proj"](x) for b in self.blocks)


def test_huge_name_lists_in_config_do_not_stall_loading(tmp_path):
    """Name lists cost each module its depth, not the list's length (a 300k-entry list against
    hundreds of modules took minutes)."""
    lm = get_lora_model(ManyLayers(), LoraConfig(r=1, target_modules=["proj"], init_lora_weights=False))
    x = torch.rand(3, 2)
    with torch.no_grad():
        want = lm(x)
    lm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    junk = [f"no_such_module_{i}" for i in range(300_000)]
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["proj"] + junk}))
    finishes_in_child(lambda: torch.testing.assert_close(LoraModel.from_pretrained(ManyLayers(), tmp_path)(x), want))

    def refused():
        with pytest.raises(AdapterError, match="modules_to_save entries 'no_such_module_0', .* and 299995 more"):
            LoraModel.from_pretrained(ManyLayers(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "modules_to_save": junk}))
    finishes_in_child(refused)


def test_config_targets_must_agree_with_the_weights(tmp_path):
    """A list of targets is checked against the file's adapted modules (both ways)."""
    trained_lora().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    for targets in (["seq.0"], ["seq.0", "seq.2", "seq.4"]):
        (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": targets}))
        check_refused(tmp_path, "target_modules")


# ---------------------------------------------------------------- buffers in modules_to_save

def bn_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(20, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def trained_bn(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for _ in range(steps):
        loss = model(X).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model


def test_batchnorm_in_modules_to_save_round_trips(tmp_path):
    lm = trained_bn(get_lora_model(bn_model(), LoraConfig(r=2, target_modules=["0", "3"], modules_to_save=["1"])))
    with torch.no_grad():
        want = lm(X)
    lm.save_pretrained(tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert tensors["base_model.model.1.num_batches_tracked"].dtype == torch.int64
    assert tensors["base_model.model.1.num_batches_tracked"].item() == 3
    ours = LoraModel.from_pretrained(bn_model(), tmp_path / "ours")
    assert ours.model[1].trainable.num_batches_tracked.item() == 3
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)
        pm = peft.PeftModel.from_pretrained(bn_model(), tmp_path / "ours").eval()
        torch.testing.assert_close(pm(X), want)
    # peft's own file
    pm = trained_bn(peft.get_peft_model(bn_model(), peft.LoraConfig(r=2, target_modules=["0", "3"],
                                                                    modules_to_save=["1"], init_lora_weights=False)))
    with torch.no_grad():
        want = pm(X)
    pm.save_pretrained(tmp_path / "peft")
    ours = LoraModel.from_pretrained(bn_model(), tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(X), want)
    assert ours.model[1].trainable.num_batches_tracked.item() == 3


def test_buffer_dtype_must_match(tmp_path):
    trained_bn(get_lora_model(bn_model(), LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
               ).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.1.num_batches_tracked"] = torch.tensor(3.0)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = bn_model()
    with pytest.raises(AdapterError, match="num_batches_tracked.*dtype"):
        LoraModel.from_pretrained(model, tmp_path)
    tensors["base_model.model.1.num_batches_tracked"] = torch.tensor(3)
    tensors["base_model.model.1.running_mean"] = tensors["base_model.model.1.running_mean"].long()
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="running_mean.*dtype"):
        LoraModel.from_pretrained(model, tmp_path)


# ---------------------------------------------------------------- saving after merge / unload

@pytest.mark.parametrize("how", ["merge_and_unload", "unload"])
def test_save_after_unload_is_refused(tmp_path, how):
    lm = trained_lora()
    getattr(lm, how)()
    with pytest.raises(RuntimeError, match=f"no LoRA layers.*{how}"):
        lm.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
