"""`quantize_model`: a plain model's nn.Linear layers quantized in place (NF4 or int8), as transformers'
BitsAndBytesConfig does at load time, without bitsandbytes."""
from __future__ import annotations

from torch import nn

from ..core.formats import FORMATS, QuantizationError
from ..modules.convert_bnb import is_quantized_base
from ..modules.quantized import QuantizedLinear, QuantizedWeight
from .targets import name_matches, output_layer_name


def holds_quantized(module: nn.Module) -> bool:
    """A module whose frozen weight is quantized: QuantizedLinear, a layer adapted over one,
    bitsandbytes' Linear4bit / Linear8bitLt, or an nn.Linear holding torchao's NF4Tensor."""
    return isinstance(module._modules.get("weight"), QuantizedWeight) or is_quantized_base(module)


def default_skip(model: nn.Module) -> set:
    """What default targets leave unquantized, as transformers' bitsandbytes loading does
    (get_keys_to_not_convert): the output layer and, in a transformers model (one with
    get_output_embeddings), the module holding its last parameter (a classification head: `score`)."""
    skip = {output_layer_name(model)}
    if callable(getattr(model, "get_output_embeddings", None)):
        last = next(reversed(list(model.named_parameters())), None)
        if last is not None:
            skip.add(last[0].rpartition(".")[0])
    return skip - {None}


def quantize_model(model: nn.Module, quant_type: str = "nf4", target_modules=None, blocksize: int = 64,
                   double_quant: bool = True, exclude_modules=None) -> nn.Module:
    """Quantize `model`'s nn.Linear layers in place to NF4 or int8 (fused_lora's counterpart of loading
    with transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=double_quant) / load_in_8bit=True), without bitsandbytes.

    target_modules: peft's matching (a regex over full names, or a list of names / dotted suffixes);
    default: every nn.Linear but the output layer and a transformers model's last module (its classification
    head), which transformers' bitsandbytes loading keeps unquantized too.
    Every layer is quantized before any is replaced: an error leaves the model as it was. Returns the model.
    """
    if quant_type not in FORMATS:
        raise ValueError(f"quantize_model: unknown quant_type {quant_type!r}; expected one of {', '.join(FORMATS)}")
    skip = default_skip(model) if target_modules is None else set()
    every = list(model.named_modules(remove_duplicate=False))  # a shared Linear is replaced under all its names
    chosen = {id(m) for n, m in every if type(m) is nn.Linear and n not in skip and not holds_quantized(m)
              and (target_modules is None or name_matches(n, target_modules))
              and not name_matches(n, exclude_modules)}
    names = [n for n, m in model.named_modules() if id(m) in chosen]
    if not names:
        done = [n for n, m in model.named_modules() if holds_quantized(m)
                and (target_modules is None or name_matches(n, target_modules))]
        hint = f" (already quantized: {', '.join(map(repr, done[:4]))}{', ...' if len(done) > 4 else ''})" \
            if done else ""
        raise ValueError(f"quantize_model: target_modules {target_modules!r} matches no nn.Linear{hint}")
    # the format's own options among quantize_model's (transformers' BitsAndBytesConfig names them alike)
    kwargs = {k: v for k, v in dict(blocksize=blocksize, double_quant=double_quant).items()
              if k in FORMATS[quant_type].OPTIONS}
    new = {}
    for name in names:
        try:
            new[name] = QuantizedLinear.from_linear(model.get_submodule(name), quant_type, **kwargs)
        except (QuantizationError, TypeError) as err:
            raise type(err)(f"quantize_model: layer {name!r}: {err}") from None
    by_module = {id(model.get_submodule(name)): module for name, module in new.items()}
    for name, old in every:
        if id(old) in by_module:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, by_module[id(old)])
    return model
