"""The values in adapter files, through every loader (from_pretrained, load_adapter,
load_weights_into: LoraTrainer's resume) and in save_pretrained: NaN and inf each on its own, values
that are finite in the file but not in the dtype they are loaded in, and dtypes (integers, float8,
packed float4). Issue 18 items 1, 3, 13 and the save/load part of 26."""
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from fused_lora import AdapterError, LoraConfig, LoraModel, get_lora_model
from fused_lora.peft_compat.adapters import load_weights_into

PREFIX = "base_model.model."
# One key per kind of tensor an adapter file holds.
KEYS = {"lora_A": "a.lora_A.weight", "lora_B": "b.lora_B.weight", "magnitude": "a.lora_magnitude_vector",
        "head": "head.weight", "bias": "a.base_layer.bias"}
# load_adapter takes a further adapter, which holds lora_A and lora_B only (fused_lora's limit).
LOADERS_AND_KINDS = [("from_pretrained", k) for k in KEYS] + [("load_adapter", k) for k in ("lora_A", "lora_B")] \
    + [("load_weights_into", k) for k in KEYS]
X = torch.rand(5, 8, generator=torch.Generator().manual_seed(1))


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 4), nn.Linear(4, 3)
        self.to(dtype)

    def forward(self, x):
        return self.head(self.b(self.a(x)))


def config(kind, lora_alpha=8):
    """A config whose file holds the tensor of `kind` (a DoRA magnitude, a modules_to_save head, a bias)."""
    return LoraConfig(r=2, lora_alpha=lora_alpha, target_modules=["a", "b"], init_lora_weights=False,
                      use_dora=kind == "magnitude",
                      modules_to_save=["head"] if kind == "head" else None,
                      bias="lora_only" if kind == "bias" else "none")


def adapted(kind, dtype=torch.float32, autocast=True, lora_alpha=8):
    return get_lora_model(Net(dtype), config(kind, lora_alpha), autocast_adapter_dtype=autocast)


def plant(directory, kind, value=None, file_dtype=None):
    """Rewrite the file's tensor of `kind` in `file_dtype`, its first element `value`; the header is kept."""
    path = directory / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = PREFIX + KEYS[kind]
    t = tensors[key].to(file_dtype or tensors[key].dtype).clone()
    if value is not None:
        t.view(-1)[0] = value
    tensors[key] = t
    save_file(tensors, path, metadata=metadata)
    return key


def tensor_of(lm, kind, slot="default"):
    """The model's tensor the file's tensor of `kind` is loaded into (adapter `slot` for LoRA's)."""
    layer = lm.model.get_submodule(KEYS[kind].split(".")[0])
    return {"lora_A": lambda: layer.adapter_weights(slot)[0], "lora_B": lambda: layer.adapter_weights(slot)[1],
            "magnitude": lambda: layer.adapter_parameters(slot)[2], "head": lambda: layer.trainable.weight,
            "bias": lambda: layer.bias}[kind]()


def snapshot(model):
    return ([type(m) for m in model.modules()], {k: v.clone() for k, v in model.state_dict().items()},
            [p.requires_grad for p in model.parameters()])


def assert_same(model, snap):
    types, state, flags = snapshot(model)
    assert types == snap[0] and flags == snap[2] and state.keys() == snap[1].keys()
    assert all(torch.equal(state[k], snap[1][k]) for k in state)


def slot_of(loader):
    return "x" if loader == "load_adapter" else "default"


def saved(tmp_path, kind, dtype=torch.float32, autocast=True, lora_alpha=8):
    """An adapter holding a tensor of `kind`, saved in tmp_path/"s"."""
    adapted(kind, dtype, autocast, lora_alpha).save_pretrained(tmp_path / "s")
    return tmp_path / "s"


def load(loader, directory, kind, dtype=torch.float32, autocast=True, lora_alpha=8):
    """Load `directory` with `loader` onto a fresh model; raises as the loader does, after checking
    that a refusal left the model as it was."""
    if loader == "from_pretrained":
        model = Net(dtype)
        snap = snapshot(model)
        try:
            return LoraModel.from_pretrained(model, directory, autocast_adapter_dtype=autocast)
        except BaseException:
            assert_same(model, snap)
            raise
    lm = adapted(kind if loader == "load_weights_into" else "lora_A", dtype, autocast, lora_alpha)
    snap, names = snapshot(lm), list(lm.peft_config)
    try:
        if loader == "load_adapter":
            lm.load_adapter(directory, "x")
        else:
            load_weights_into(lm, directory)
        return lm
    except BaseException:
        assert_same(lm, snap)
        assert list(lm.peft_config) == names
        raise


# ---------------------------------------------------------------- NaN and inf, each on its own

@pytest.mark.parametrize("loader, kind", LOADERS_AND_KINDS)
@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN, 0 inf"), (float("inf"), "0 NaN, 1 inf"),
                                           (float("-inf"), "0 NaN, 1 inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_value_in_a_file_is_refused_by_every_loader(tmp_path, loader, kind, value, counts):
    """NaN, inf and -inf each refused by name (the counts tell them apart, so a check that sees only
    inf fails the NaN case), for every kind of tensor and every loader, the model unchanged.
    Issue 18 items 3 (load_weights_into) and 26."""
    directory = saved(tmp_path, kind)
    key = plant(directory, kind, value)
    with pytest.raises(AdapterError, match=rf"key '{key}' holds NaN or inf \({counts} "):
        load(loader, directory, kind)


@pytest.mark.parametrize("kind", KEYS)
@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN, 0 inf"), (float("inf"), "0 NaN, 1 inf"),
                                           (float("-inf"), "0 NaN, 1 inf")], ids=["nan", "inf", "-inf"])
def test_an_adapter_holding_a_non_finite_value_is_not_saved(tmp_path, kind, value, counts):
    """save_pretrained refuses NaN and inf alike, in every kind of tensor, writing nothing (issue 18
    item 26: the old test planted only an inf)."""
    lm = adapted(kind)
    with torch.no_grad():
        tensor_of(lm, kind).view(-1)[0] = value
    with pytest.raises(ValueError, match=rf"'{PREFIX}{KEYS[kind]}' holds NaN or inf \({counts} "):
        lm.save_pretrained(tmp_path / "s")
    assert not (tmp_path / "s").exists()


# ---------------------------------------------------------------- finite in the file, not after the cast

# (model dtype, autocast_adapter_dtype, file dtype, value): a value finite in the file's dtype and beyond
# the range of the dtype the tensor is loaded in. With autocast, LoRA tensors of a 16-bit model are
# float32 while modules_to_save and biases keep the model's dtype.
OVERFLOWS = {
    "fp64-into-fp32": (torch.float32, True, torch.float64, 1e300),
    "fp32-into-fp16": (torch.float16, False, torch.float32, 1e6),
    "fp64-into-bf16": (torch.bfloat16, False, torch.float64, 1e300),
    "fp32-into-fp16-autocast": (torch.float16, True, torch.float32, 1e6),
}


def loaded_dtype(kind, dtype, autocast):
    return torch.float32 if autocast and kind in ("lora_A", "lora_B", "magnitude") else dtype


def overflow_cases():
    for loader, kind in LOADERS_AND_KINDS:
        for case, (dtype, autocast, file_dtype, value) in OVERFLOWS.items():
            if loaded_dtype(kind, dtype, autocast) == torch.float32 and file_dtype == torch.float32:
                value, file_dtype = 1e300, torch.float64  # an fp32 value always fits fp32: plant a float64 one
            yield pytest.param(loader, kind, dtype, autocast, file_dtype, value, id=f"{loader}-{kind}-{case}")


@pytest.mark.parametrize("loader, kind, dtype, autocast, file_dtype, value", list(overflow_cases()))
def test_a_value_that_overflows_the_loaded_dtype_is_refused(tmp_path, loader, kind, dtype, autocast, file_dtype,
                                                             value):
    """Finite in the file, inf once cast to the dtype the model holds it in: refused naming the key
    and that dtype (before: loaded as inf, every output NaN). Issue 18 items 1 and 3."""
    directory = saved(tmp_path, kind, dtype, autocast)
    key = plant(directory, kind, value, file_dtype)
    target = str(loaded_dtype(kind, dtype, autocast))
    with pytest.raises(AdapterError, match=rf"key '{key}' holds .* beyond the range of {target}"):
        load(loader, directory, kind, dtype, autocast)


@pytest.mark.parametrize("loader, kind", LOADERS_AND_KINDS)
def test_the_check_is_made_on_the_cast_values(tmp_path, loader, kind):
    """fp16's largest finite value is 65504: float32 65519 rounds to it and loads, 65520 rounds to inf
    and is refused. A range check on the file's values (|x| <= 65504) would refuse the first, and a
    check before the cast would let the second through (issue 18 item 1). The scale is 1 here: with s > 1,
    s * lora_B = 65504 s is beyond float16 as well (the compute-dtype rule, tested on its own)."""
    directory = saved(tmp_path, kind, torch.float16, autocast=False, lora_alpha=2)
    key = plant(directory, kind, 65519.0, torch.float32)
    got = tensor_of(load(loader, directory, kind, torch.float16, autocast=False, lora_alpha=2), kind,
                    slot_of(loader))
    assert got.dtype == torch.float16 and got.view(-1)[0].item() == 65504.0
    plant(directory, kind, 65520.0, torch.float32)
    with pytest.raises(AdapterError, match=rf"key '{key}' holds .* beyond the range of torch.float16"):
        load(loader, directory, kind, torch.float16, autocast=False, lora_alpha=2)


# ---------------------------------------------------------------- fits the stored dtype, not the compute dtype

@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter", "load_weights_into"])
@pytest.mark.parametrize("kind, value, lora_alpha, problem", [
    ("lora_B", 1e5, 2e-4, r"lora_B holds 100000"),
    ("lora_A", 1e5, 2e-4, r"lora_A holds 100000"),
    ("lora_B", 1e4, 16, r"s \* lora_B reaches 80000")], ids=["B", "A", "sB"])
def test_an_adapter_beyond_the_compute_dtype_is_refused_by_every_loader(tmp_path, loader, kind, value, lora_alpha,
                                                                        problem):
    """An fp16 model holds its adapters in fp32 (autocast_adapter_dtype, peft's default), and the fused ops
    cast them to fp16 on every call: 1e5 fits the stored fp32 and not the compute dtype (s = 1e-4 keeps
    s B = 10 harmless), and 1e4 with s = 8 makes s B = 8e4. Refused by every loader naming the keys, the
    problem and the dtype, the model unchanged (before: loaded, then every forward gave NaN). Issue 18,
    attacker re-trial, finding 1."""
    directory = saved(tmp_path, kind, torch.float16, autocast=True, lora_alpha=lora_alpha)
    plant(directory, kind, value)
    layer = KEYS[kind].split(".")[0]
    with pytest.raises(AdapterError, match=rf"keys '{PREFIX}{layer}.lora_A.weight' / '{PREFIX}{layer}.lora_B.weight': {problem}.* "
                                           rf"beyond the range of torch.float16 .* computes the adapter's LoRA"):
        load(loader, directory, kind, torch.float16, autocast=True, lora_alpha=lora_alpha)
    lm = load(loader, directory, kind, torch.float32, autocast=True, lora_alpha=lora_alpha)  # fp32 holds it
    assert tensor_of(lm, kind, slot_of(loader)).view(-1)[0].item() == value


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("loader, kind, file_dtype", [(loader, kind, torch.int32) for loader, kind in LOADERS_AND_KINDS]
                         + [(loader, "lora_B", d) for loader in ("from_pretrained", "load_adapter", "load_weights_into")
                            for d in (torch.int64, torch.bool, torch.complex64)])
def test_a_tensor_that_is_not_floating_point_is_refused(tmp_path, loader, kind, file_dtype):
    """An int32 lora_B (or any non-float tensor where the model holds floats) is refused, not cast
    (before: load_weights_into cast it silently). Issue 18 item 3."""
    directory = saved(tmp_path, kind)
    key = plant(directory, kind, file_dtype=file_dtype)
    with pytest.raises(AdapterError, match=rf"key '{key}' has dtype {file_dtype}, not floating point"):
        load(loader, directory, kind)


def test_an_integer_buffer_must_keep_its_dtype_on_resume(tmp_path):
    """A BatchNorm's int64 num_batches_tracked in modules_to_save must be int64 in a checkpoint too,
    as from_pretrained requires (issue 18 item 3: load_weights_into cast it)."""
    def bn():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 4), nn.BatchNorm1d(4))
    lm = get_lora_model(bn(), LoraConfig(r=2, target_modules=["0"], modules_to_save=["1"]))
    lm.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[PREFIX + "1.num_batches_tracked"] = tensors[PREFIX + "1.num_batches_tracked"].float()
    save_file(tensors, path, metadata=metadata)
    for loading in (lambda: LoraModel.from_pretrained(bn(), tmp_path), lambda: load_weights_into(lm, tmp_path)):
        with pytest.raises(AdapterError, match="num_batches_tracked' has dtype torch.float32, the model's tensor is "
                                               "torch.int64"):
            loading()


FLOAT8 = [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.float8_e8m0fnu]


@pytest.mark.parametrize("loader, kind, file_dtype",
                         [(loader, kind, torch.float8_e4m3fn) for loader, kind in LOADERS_AND_KINDS]
                         + [(loader, "lora_B", d) for loader in ("from_pretrained", "load_adapter", "load_weights_into")
                            for d in FLOAT8[1:]], ids=str)
def test_float8_tensors_are_cast_exactly(tmp_path, loader, kind, file_dtype):
    """float8 tensors load as peft loads them: cast to the model's dtype, which holds every float8
    value exactly (before: NotImplementedError from isfinite). Issue 18 item 13."""
    directory = saved(tmp_path, kind)
    plant(directory, kind, file_dtype=file_dtype)
    with safe_open(directory / "adapter_model.safetensors", framework="pt") as f:
        want = f.get_tensor(PREFIX + KEYS[kind]).to(torch.float64)
    got = tensor_of(load(loader, directory, kind), kind, slot_of(loader))
    assert got.dtype == torch.float32 and torch.equal(got.to(torch.float64), want)


@pytest.mark.parametrize("loader, kind", [("from_pretrained", "lora_B"), ("load_adapter", "lora_B"),
                                          ("load_weights_into", "lora_B"), ("from_pretrained", "head")])
@pytest.mark.parametrize("file_dtype, bits, counts", [(torch.float8_e4m3fn, 0x7F, "1 NaN, 0 inf"),
                                                      (torch.float8_e5m2, 0x7C, "0 NaN, 1 inf"),
                                                      (torch.float8_e5m2, 0x7F, "1 NaN, 0 inf")],
                         ids=["e4m3fn-nan", "e5m2-inf", "e5m2-nan"])
def test_non_finite_float8_values_are_refused(tmp_path, loader, kind, file_dtype, bits, counts):
    """A NaN or inf stored as float8 is refused as any other (issue 18 items 13 and 26)."""
    directory = saved(tmp_path, kind)
    path = directory / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = PREFIX + KEYS[kind]
    raw = tensors[key].to(file_dtype).view(torch.uint8).clone()
    raw.view(-1)[0] = bits
    tensors[key] = raw.view(file_dtype)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(AdapterError, match=rf"key '{key}' holds NaN or inf \({counts} "):
        load(loader, directory, kind)


@pytest.mark.parametrize("loader", ["from_pretrained", "load_adapter", "load_weights_into"])
def test_packed_float4_is_refused_by_name(tmp_path, loader):
    """float4_e2m1fn_x2 packs two values a byte and has no cast: refused naming the dtype, even with a
    shape that matches (issue 18 item 13)."""
    directory = saved(tmp_path, "lora_B")
    key = plant(directory, "lora_B", file_dtype=torch.uint8)
    path = directory / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    tensors[key] = tensors[key].view(torch.float4_e2m1fn_x2)
    save_file(tensors, path, metadata=metadata)
    with pytest.raises(AdapterError, match=rf"key '{key}' has dtype torch.float4_e2m1fn_x2, which fused_lora does "
                                           "not load"):
        load(loader, directory, "lora_B")


def test_a_peft_written_file_gets_the_same_cast_check(tmp_path):
    """A file peft wrote (no fused_lora header): a float32 modules_to_save head holding 1e6, loaded onto
    a float16 model, is refused as ours is (issue 18 item 1: peft loads it as inf)."""
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(Net(), peft.LoraConfig(r=2, target_modules=["a", "b"], modules_to_save=["head"],
                                                    init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    key = plant(tmp_path, "head", 1e6)
    with pytest.raises(AdapterError, match=rf"key '{key}' holds 1e\+06, beyond the range of torch.float16"):
        load("from_pretrained", tmp_path, "head", torch.float16)
    assert load("from_pretrained", tmp_path, "head").model.head.trainable.weight[0, 0].item() == 1e6


@pytest.mark.parametrize("loader", ["from_pretrained", "load_weights_into"])
def test_a_cast_that_saturates_is_refused_too(tmp_path, loader):
    """A model tensor in float8_e4m3fn (here a modules_to_save head): torch's cast saturates there
    instead of giving inf, so 1000 would load as 448 without any inf to see. Refused as beyond the
    range; 460 (within half a unit of 448) rounds to 448 and loads (issue 18 items 1 and 13)."""
    def net():
        model = Net()
        model.head.to(torch.float8_e4m3fn)
        return model
    lm = get_lora_model(net(), config("head"))
    lm.save_pretrained(tmp_path)

    def loaded():
        if loader == "from_pretrained":
            return LoraModel.from_pretrained(net(), tmp_path).model.head.trainable.weight
        load_weights_into(lm, tmp_path)
        return lm.model.head.trainable.weight
    key = plant(tmp_path, "head", 460.0, torch.float32)
    assert loaded().view(-1)[0].float().item() == 448.0
    plant(tmp_path, "head", 1000.0, torch.float32)
    with pytest.raises(AdapterError, match=rf"key '{key}' holds 1000, beyond the range of torch.float8_e4m3fn"):
        loaded()


def test_resume_checks_every_adapter_before_copying_any(tmp_path):
    """A checkpoint of two adapters whose second holds NaN: load_weights_into refuses it and leaves
    the first adapter as it was too (nothing half-applied; issue 18 item 3)."""
    lm = adapted("lora_B")
    lm.add_adapter("other", LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    lm.save_pretrained(tmp_path)
    key = plant(tmp_path / "other", "lora_B", float("nan"))
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if "lora_" in name:
                p.add_(1.0)  # differs from the checkpoint: a copy of the first adapter would show
    snap = snapshot(lm)
    with pytest.raises(AdapterError, match=rf"other: key '{key}' holds NaN or inf \(1 NaN, 0 inf "):
        load_weights_into(lm, tmp_path)
    assert_same(lm, snap)
