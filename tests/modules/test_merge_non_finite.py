"""Merging an adapter that holds non-finite values (issue 18 item 26, the merge part): NaN and inf are
different values, and inf in A times a zero in B makes NaN only inside the product; a float16 weight
can overflow to inf from finite values. merge(safe_merge=True), check_merge, to_linear(safe_merge=True)
and merge_and_unload(safe_merge=True) refuse each, changing nothing; merge() without safe_merge writes
the weight (peft's meaning) and unmerge() then refuses, since the base weight cannot be restored.
A check that looks only at isinf, or only at isnan, fails one of these tests."""
import pytest
import torch
from torch import nn

from fused_lora import FusedLoRALinear, LoraConfig, get_lora_model, quantize_model

KINDS = ["nan", "inf", "inf_times_zero", "fp16_overflow"]
# DoRA rescales W + s B A to its magnitude, so a finite overflow of the sum never reaches its weight; a
# quantized base's merge is computed in float32 from its dequantized rows (no fp16 weight to overflow)
LAYER_CASES = [(kind, False) for kind in KINDS] + [(kind, True) for kind in KINDS if kind != "fp16_overflow"]
MODEL_CASES = [(kind, False) for kind in KINDS] + [(kind, True) for kind in KINDS if kind != "fp16_overflow"]


def poison(lora_A, lora_B, weight, kind):
    """Make one adapter's merged weight non-finite in the way `kind` names (in place, no grad)."""
    with torch.no_grad():
        if kind == "nan":
            lora_A[0, 1] = float("nan")
        elif kind == "inf":  # B's column 0 has no zero: the delta's column 1 is +-inf, never NaN
            lora_A[0, 1] = float("inf")
            lora_B[:, 0] = lora_B[:, 0].abs() + 0.5
        elif kind == "inf_times_zero":  # no NaN in A or B: only inside s B A
            lora_A[0, 1] = float("inf")
            lora_B[:, 0] = 0.0
        else:  # every value finite (s B A = s r 1e4 is too); W + s B A exceeds float16's 65504
            weight[0, 0] = 65000.0
            lora_A.fill_(100.0)
            lora_B.fill_(100.0)


def expected_flavour(kind, merged):
    """The merged weight holds what `kind` says: NaN (and no inf) or inf (and no NaN)."""
    nan, inf = bool(torch.isnan(merged).any()), bool(torch.isinf(merged).any())
    return (nan, inf) == ((False, True) if kind in ("inf", "fp16_overflow") else (True, False))


def same(a, b):
    """Bit-equal, NaN where NaN was (the poisoned adapters hold NaN themselves)."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def poisoned_layer(kind, use_dora=False):
    torch.manual_seed(0)
    dtype = torch.float16 if kind == "fp16_overflow" else torch.float32
    layer = FusedLoRALinear(6, 5, r=2, lora_alpha=4, init_lora_weights=False, dtype=dtype, use_dora=use_dora)
    poison(layer.lora_A, layer.lora_B, layer.weight, kind)
    return layer


@pytest.mark.parametrize("kind, use_dora", LAYER_CASES)
def test_safe_merge_check_merge_and_to_linear_refuse_and_change_nothing(kind, use_dora):
    """Issue 18 item 26: merge(safe_merge=True) (and check_merge, to_linear(safe_merge=True)) refuse a
    merged weight holding NaN, inf, NaN made by inf x 0, or an fp16 overflow; weight and state unchanged."""
    layer = poisoned_layer(kind, use_dora)
    if not use_dora:
        assert expected_flavour(kind, (layer.weight.float() + layer.delta_weight()).to(layer.weight.dtype))
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.merge(safe_merge=True)
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.check_merge()
    with pytest.raises(ValueError, match="NaN or inf"):
        layer.to_linear(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, before)


@pytest.mark.parametrize("kind, use_dora", LAYER_CASES)
def test_plain_merge_writes_and_unmerge_then_refuses(kind, use_dora):
    """Issue 18 item 26: merge() without safe_merge writes the non-finite weight, as peft's does; the
    unmerged weight (W + d) - d is then NaN (nan, inf - inf, inf x 0) or inf (an fp16 overflow, whose
    inf minus a finite delta stays inf), and unmerge() refuses, leaving the layer merged."""
    layer = poisoned_layer(kind, use_dora)
    layer.merge()
    assert layer.merged and not bool(torch.isfinite(layer.weight).all())
    merged = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="cannot be\\s+restored|NaN or inf"):
        layer.unmerge()
    assert layer.merged
    same(layer.weight, merged)


def two_layer_model(kind, quantized=False):
    """A LoraModel over three Linear layers, the last one's adapter poisoned as `kind` says."""
    torch.manual_seed(0)
    dtype = torch.float16 if kind == "fp16_overflow" else torch.float32
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64)).to(dtype)
    if quantized:
        model = quantize_model(model, "int8", target_modules=["3"])
    lm = get_lora_model(model, LoraConfig(r=2, target_modules=["0", "2", "3"], init_lora_weights=False),
                        autocast_adapter_dtype=False)
    layer = lm.model[3]
    poison(layer.lora_A, layer.lora_B, layer.weight if not quantized else torch.empty(1, 1), kind)
    return lm


@pytest.mark.parametrize("kind, quantized", MODEL_CASES)
def test_merge_and_unload_safe_merge_refuses_and_changes_no_layer(kind, quantized):
    """Issue 18 item 26: merge_and_unload(safe_merge=True) refuses NaN, inf, inf x 0 and an fp16
    overflow in any layer (here the last one, over a 16-bit or a quantized base) before any layer is
    merged or replaced; without safe_merge it merges as peft does, and the merged layer is non-finite."""
    lm = two_layer_model(kind, quantized)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(ValueError, match="NaN or inf"):
        lm.merge_and_unload(safe_merge=True)
    assert all(isinstance(lm.model[i], FusedLoRALinear) and not lm.model[i].merged for i in (0, 2, 3))
    after = lm.state_dict()
    assert after.keys() == before.keys()
    for k in after:
        same(after[k], before[k])
    merged = lm.merge_and_unload()
    assert type(merged[3]) is nn.Linear and expected_flavour(kind, merged[3].weight)
    assert bool(torch.isfinite(merged[0].weight).all()) and bool(torch.isfinite(merged[2].weight).all())
