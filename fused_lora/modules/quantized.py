"""A frozen quantized base weight (any format of `fused_lora.core.formats`: NF4 with or without nested
absmax, int8 with one scale per output row) and the module that runs it as a Linear.

    QuantizedWeight     the packed tensors as buffers (never a 16-bit copy), or as frozen Parameters
                        for FSDP2 (`hold_as_parameters`); `data()` gives the format's layout
                        (NF4Data / Int8Data) the PyTorch path and the kernels read
    quantize_nf4, quantize_int8, quantize
                        our own quantizers, no bitsandbytes needed: NF4 gives bitsandbytes'
                        quantize_4bit codes and absmax (nested: its quantize_blockwise of the absmax)
    QuantizedLinear     a frozen Linear over a QuantizedWeight (fused_lora's Linear4bit): what
                        `quantize_model` puts in place of nn.Linear, and what the adapted layer holds
    shardable_quantized every QuantizedWeight of a model held as Parameters, before FSDP2's fully_shard
    held_quantized_nbytes
                        the bytes of quantized base one process holds (an FSDP2 shard: its own part)

Why our own container and not bitsandbytes' Params4bit: the CPU path and tests must run without
bitsandbytes, and the kernels need one layout they can rely on (`core.formats`); converters from
bitsandbytes' modules share their packed tensors (`convert_bnb`). The container knows no format: the
format module gives its buffers, attributes and layout (`core.formats` lists that interface).

Choices written down:
- A weight is frozen: nothing asks for its gradient. Its tensors are buffers, except under FSDP2:
  `fully_shard` shards Parameters only (buffers stay whole on every process), so before sharding
  `shardable_quantized` (`cli.distributed.wrap` calls it) turns each weight's tensors of at least one
  dimension (the packed codes, the scales and the small code tables) into Parameters with
  requires_grad False, as bitsandbytes' `quant_storage` does for Answer.AI's FSDP QLoRA; FSDP2 then
  shards them with the block's parameters, gathers them for the block's forward and backward, and frees
  the gathered copy after. 0-dim tensors (NF4's nested offset) stay buffers: FSDP2 cannot shard them,
  and the offset is read once per change of its buffer (`nf4.offset_value`), not at every gather.
  Parameters only when sharding, not always: as buffers, a quantized model's `parameters()` hold no
  integer tensors, which is what code walking them expects (peft's own
  get_nb_trainable_parameters would count the packed bytes as elements, `model.requires_grad_(True)`
  raises on an integer Parameter, optimizers and `sum(p.numel() ...)` would list the packed bytes);
  only FSDP2 needs the other holding, so only its wrap converts. Both holdings give the same state_dict
  keys and values, and load, check and move alike; our own counts are the same under both.
- NF4 needs in_features to be a multiple of the block size (every row is a whole number of
  blocks, so a row chunk never splits a block and a kernel tile reads whole blocks); bitsandbytes
  accepts any size, so a bitsandbytes layer of another shape is refused by name.
- `dtype` is the compute dtype the base was in (its 16-bit dtype): the default dtype of the adapter
  weights and of a merged weight. Inputs of any float dtype run in their own dtype.
- `.to(dtype)`/`.half()` change that compute dtype but never the stored tensors (casting the fp32
  absmax would change the dequantized values); `.to(device)` moves them.
- No weight that dequantizes to NaN or inf, in float32 or in its compute dtype, is made or loaded: the
  quantizers refuse such a weight (a float64 one beyond float32's range included), the container and the
  bitsandbytes / torchao converters refuse such scales (`value_problem`), and load_state_dict checks a
  checkpoint's entries, cast to float32, before copying any of them (`QuantizedWeight.load_refusal`).
- The nested offset is a buffer and the one truth; the kernels and custom ops take it as a Python float,
  read from the buffer once per change of it (`nf4.offset_value`), and under torch.compile the buffer itself
  travels into the custom ops (`op_args`), so no write to it is missed and no forward syncs to read it.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..core import formats
from ..core.formats import FLOAT_DTYPES, QuantData, QuantizationError, nf4, row_chunks
from ..ops.quant import quant_linear
from .autocast import autocast_input_and_bias


@torch.no_grad()
def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
    """NF4 of an out x in float weight in bitsandbytes' layout: the codes and absmax
    bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant) gives (nested: its quantize_blockwise of absmax - mean, blocks
    of 256). `compute_dtype` defaults to the weight's dtype. in_features must be a multiple of
    `blocksize` (QuantizationError otherwise). Rows are quantized a chunk at a time (rows are whole
    blocks), so the temporaries stay bounded whatever the weight's size."""
    data = nf4.quantize(weight, blocksize, double_quant, compute_dtype)
    return QuantizedWeight(data, compute_dtype or weight.dtype)


@torch.no_grad()
def quantize_int8(weight: Tensor, compute_dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
    """int8 weight-only, one scale per output row: q = round(W * 127 / absmax_row), scale = absmax_row / 127
    (bitsandbytes' int8_vectorwise_quant codes, threshold 0). A zero row gets scale 0."""
    return QuantizedWeight(formats.int8.quantize(weight, compute_dtype), compute_dtype or weight.dtype)


def quantize(weight: Tensor, quant_type: str, **kwargs) -> "QuantizedWeight":
    """Quantize `weight` in the format named `quant_type` ("nf4" | "int8"), with that format's options."""
    fmt = formats.format_named(quant_type)
    return QuantizedWeight(fmt.quantize(weight, **kwargs), kwargs.get("compute_dtype") or weight.dtype)


class QuantizedWeight(nn.Module):
    """A frozen N x K weight held quantized (NF4 or int8); behaves enough like a weight tensor for the
    layer: `shape`, `dtype` (the compute dtype), `device`, `requires_grad` (False).

    Build it with `quantize_nf4` / `quantize_int8`, or from bitsandbytes' packed tensors
    (`convert_bnb`). The tensors are buffers (state_dict keys `packed`, `code`, `absmax` or
    `qabsmax`/`code2`/`absmax2`/`offset` for NF4; `qweight`, `scale` for int8), or, after
    `hold_as_parameters` (for FSDP2), frozen Parameters under the same names (0-dim ones stay buffers)."""

    @property
    def requires_grad(self) -> bool:
        return False

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        self.requires_grad_(value)

    def requires_grad_(self, requires_grad: bool = True) -> "QuantizedWeight":
        """Only False: the quantized weight is frozen (no float values a gradient could update)."""
        if requires_grad:
            raise TypeError("QuantizedWeight: the quantized base weight is frozen and cannot require gradients "
                            "(train the LoRA adapter; to train the base, dequantize it: FusedLoRALinear.to_linear() "
                            "or LoraModel.merge_and_unload())")
        return self

    def __init__(self, data: QuantData, dtype: torch.dtype = torch.float32):
        super().__init__()
        formats.check_data(data)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"QuantizedWeight: compute dtype {dtype} is not a floating-point dtype")
        formats.check_values(data, dtype)
        fmt = formats.format_of(data)
        self.format = fmt.NAME
        self._shape = tuple(int(s) for s in data.shape)
        self.compute_dtype = dtype
        self._attributes = fmt.attributes(data)
        self.__dict__.update(self._attributes)  # e.g. NF4's blocksize, blocksize2
        for name, t in fmt.buffers(data).items():
            self.register_buffer(name, t)

    @property
    def _format(self):
        return formats.FORMATS[self.format]

    # ---- where the tensors are held: buffers, or Parameters for FSDP2

    def _held(self) -> dict:
        """The weight's tensors by name, wherever they are held (buffers, and Parameters after
        `hold_as_parameters`). A new dict when there are Parameters: write through `_put`."""
        return {**self._parameters, **self._buffers} if self._parameters else self._buffers

    def _put(self, name: str, t: Tensor) -> None:
        """Hold `t` as the tensor `name`, where the tensor of that name is held (a Parameter stays one,
        frozen)."""
        if name in self._parameters:
            self._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            self._buffers[name] = t

    def _settle(self) -> None:
        """The format's `settle` over the tensors wherever they are held."""
        held = dict(self._held())
        self._format.settle(held)
        for name, t in held.items():
            if t is not self._parameters.get(name, self._buffers.get(name)):
                self._put(name, t)

    @property
    def held_as_parameters(self) -> bool:
        """Whether the tensors are held as Parameters (`hold_as_parameters`), for FSDP2 to shard."""
        return bool(self._parameters)

    def hold_as_parameters(self) -> "QuantizedWeight":
        """Hold every tensor of at least one dimension (packed codes, scales, code tables) as a Parameter with
        requires_grad False instead of a buffer, so that FSDP2's `fully_shard`, which shards Parameters only,
        shards them (call it before `fully_shard`; `shardable_quantized` does it for a whole model). The same
        tensors (no copy), under the same state_dict names; 0-dim tensors (NF4's nested offset) stay buffers.
        Drops the reference to a bitsandbytes / torchao layer the weight was read from (it would keep the
        whole packed weight on every process): `unload()` then gives a QuantizedLinear. Returns self."""
        self.__dict__.pop("_bnb_source", None)
        for name, t in list(self._buffers.items()):
            if t is not None and t.dim() > 0:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(t, requires_grad=False))
        return self

    def hold_as_buffers(self) -> "QuantizedWeight":
        """The inverse of `hold_as_parameters` (on an unsharded weight): every tensor a buffer again. Returns self."""
        for name, p in list(self._parameters.items()):
            del self._parameters[name]
            self.register_buffer(name, p.detach())
        return self

    def __getstate__(self):
        # copies (deepcopy, pickle) leave out the bitsandbytes layer the weight was read from (convert_bnb):
        # a reference for unload(), whose copy would store the packed data twice
        state = self.__dict__.copy()
        state.pop("_bnb_source", None)
        return state

    # ---- the weight-like view the layer reads

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self._shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.compute_dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self._held().values())).device

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    @property
    def nested(self) -> bool:
        return self._format.is_nested(self._held())

    def data(self) -> QuantData:
        """The format's layout of the current buffers (follows .to(device), load_state_dict and in-place
        writes). The nested offset is the buffer's value (`nf4.offset_value`: read from the device only when
        the buffer changed); under torch.compile it is the buffer itself, which `op_args` hands to the custom
        ops, read when they run (a float taken while tracing would be a constant of the graph, blind to later
        writes). Held as Parameters (for FSDP2), one made to require a gradient is refused (TypeError: the
        weight is frozen), and so are float tables not in float32 (FSDP2's MixedPrecisionPolicy(param_dtype)
        casts floating-point Parameters when it gathers them: the weight would dequantize to other values)."""
        for name, p in self._parameters.items():
            if p.requires_grad:
                raise TypeError(f"QuantizedWeight: {name} requires a gradient, but the quantized base weight is "
                                "frozen (a model's requires_grad_(True) set it: set it back with "
                                "requires_grad_(False) and train the LoRA adapter)")
            if name in self._format.FLOAT_BUFFERS and p.dtype != torch.float32:
                raise TypeError(f"QuantizedWeight: {name} is {p.dtype}, not float32: FSDP2's MixedPrecisionPolicy("
                                "param_dtype=...) cast it when gathering it, which would change the weight's "
                                "values: shard a quantized model without param_dtype (put the model in its 16-bit "
                                "dtype before sharding instead)")
        return self._format.layout(self._shape, self._held(), self._attributes,
                                   "tensor" if torch.compiler.is_compiling() else "value")

    def load_refusal(self, state_dict: dict, prefix: str = "", strict: bool = True,
                     assign: bool = False) -> Optional[str]:
        """Why load_state_dict(state_dict) would refuse this weight's entries (the keys `prefix` + buffer name),
        or None when they load. Checked before anything is copied, so a refused load leaves the weight as it
        was: every entry a tensor of this weight's shape, the packed layout whole (`check_data`, integer codes of
        their exact dtype), and no value that dequantizes to NaN or inf in float32 or in the compute dtype
        (`value_problem`), judged after the float entries are cast to float32 as loading casts them (a float64
        1e300 is inf in the buffer). A strict load missing an entry is refused too (no half of a checkpoint
        over the other half of this weight); a non-strict one keeps the buffer there is."""
        merged, missing = {}, []
        for name, current in self._held().items():
            key = prefix + name
            if key not in state_dict:
                missing.append(key)
                merged[name] = current
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor):
                return f"{name}: expected a tensor in the checkpoint, got {type(value).__name__}"
            if current.dim() == 0 and tuple(value.shape) == (1,):  # as nn.Module loads it (old 1-element files)
                value = value[0]
            if value.shape != current.shape:
                return (f"size mismatch for {name}: shape {tuple(value.shape)} in the checkpoint, "
                        f"{tuple(current.shape)} in this weight")
            if name in self._format.FLOAT_BUFFERS and value.dtype != torch.float32:  # loading casts them to float32
                cast = value.float()
                if formats.common.nonfinite(cast) and not (value.is_floating_point() and formats.common.nonfinite(value)):
                    return (f"{name} holds a value beyond float32's range (largest "
                            f"{float(value.abs().max()):g}; inf once cast to float32, the buffers' dtype)")
                value = cast
            merged[name] = value
        if strict and missing:
            return f"missing {', '.join(missing)}"
        try:  # with assign=True the checkpoint's tensors become the buffers: they must share one device
            formats.check_data(self._layout(merged), "QuantizedWeight", same_device=assign)
        except (QuantizationError, TypeError) as err:
            return str(err).removeprefix("QuantizedWeight: ")
        if any(t.is_meta for t in merged.values()):
            return None
        # The values are read where the checkpoint's scales are (not necessarily this weight's device yet); the
        # packed codes only where the format's value check reads them (int8: rows a scale could overflow; NF4:
        # never, an empty stand-in).
        codes = self._format.CODES
        small = [n for n in merged if n != codes]
        device = next((state_dict[prefix + n].device for n in small if prefix + n in state_dict),
                      merged[small[0]].device)
        moved = {n: t.to(device) for n, t in merged.items() if n != codes}
        moved[codes] = (merged[codes] if self._format.CODES_READ_BY_VALUE_CHECK
                        else torch.empty(0, dtype=merged[codes].dtype, device=device))
        return formats.value_problem(self._layout(moved), self.compute_dtype)

    def _layout(self, tensors: dict) -> QuantData:
        """The layout of buffers given by name (the nested offset as its value, read as it is)."""
        return self._format.layout(self._shape, tensors, self._attributes, "float")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Everything is checked before anything is copied (load_refusal): a refused load leaves every buffer
        # as it was. A strict load missing entries reports them as nn.Module does, loading none of the others.
        missing = [prefix + n for n in self._held() if prefix + n not in state_dict]
        if strict and missing:
            missing_keys.extend(missing)
            return
        refusal = self.load_refusal(state_dict, prefix, strict,
                                    bool(local_metadata.get("assign_to_params_buffers", False)))
        if refusal is not None:
            error_msgs.append(f"{prefix.rstrip('.') or '(root)'}: {refusal}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # assign=True takes the checkpoint's tensors as they are: keep the layout contract (fp32 tables, a
        # tensor with a version counter for the offset, Parameters frozen)
        held = self._held()
        for name in self._format.FLOAT_BUFFERS:
            t = held.get(name)
            if t is not None and t.dtype != torch.float32:
                self._put(name, t.detach().float())
        for p in self._parameters.values():
            p.requires_grad_(False)
        self._settle()

    def packed_codes(self) -> Tensor:
        """The tensor of packed codes (the format's CODES: NF4's `packed`, int8's `qweight`)."""
        return self._held()[self._format.CODES]

    def nbytes(self) -> int:
        """Bytes of every tensor of this weight (packed data, scales, code tables), the whole weight's also
        when FSDP2 shards it (`held_quantized_nbytes` counts what one process holds)."""
        return sum(t.numel() * t.element_size() for t in self._held().values())

    def bytes_per_param(self) -> float:
        return self.nbytes() / max(1, math.prod(self._shape))

    # ---- dequantization

    def dequantize_rows(self, start: int, stop: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Rows start..stop-1 of W (computed in fp32, as bitsandbytes does, then cast to `dtype`)."""
        rows = formats.dequantize_rows(self.data(), start, stop)
        return rows if dtype in (None, torch.float32) else rows.to(dtype)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The whole N x K weight in `dtype` (default: the compute dtype). Allocates the full weight:
        for merging and export, never on the training path."""
        dtype = dtype or self.compute_dtype
        out = torch.empty(self._shape, dtype=dtype, device=self.device)
        for start, stop in row_chunks(*self._shape):
            out[start:stop] = self.dequantize_rows(start, stop, dtype)
        return out

    # ---- moving

    def _apply(self, fn, recurse=True):
        # A float cast (.half(), .to(dtype)) changes the compute dtype only; a device move moves the
        # buffers with their dtypes kept (an fp32 absmax cast to fp16 would change every value).
        # fn runs on each buffer (so to_empty, which cannot copy out of meta, works); a result of
        # another dtype is replaced by the buffer moved as it is.
        # Parameters (held for FSDP2) stay the same Parameter objects where nn.Module keeps them (their data
        # replaced), and stay frozen.
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        self.compute_dtype = probe.dtype
        for name, t in self._buffers.items():
            if t is not None:
                new = fn(t)
                self._buffers[name] = new if new.dtype == t.dtype else t.to(new.device)
        for name, p in self._parameters.items():
            if p is not None:
                new = fn(p)
                new = new if new.dtype == p.dtype else p.to(new.device)
                if new is p:
                    continue
                if torch._has_compatible_shallow_copy_type(p, new):  # nn.Module's rule (not so: meta <-> cpu)
                    with torch.no_grad():
                        p.data = new
                else:
                    self._parameters[name] = nn.Parameter(new, requires_grad=False)
        self._settle()  # e.g. moved in inference mode: the offset keeps a version counter
        return self

    def extra_repr(self) -> str:
        N, K = self._shape
        return (f"{N}x{K}, {self._format.describe(self._attributes, self._held())}, "
                f"dtype={str(self.compute_dtype).replace('torch.', '')}, {self.bytes_per_param():.3f} bytes/param")


def is_quantized_weight(weight) -> bool:
    return isinstance(weight, QuantizedWeight)


# ------------------------------------------------------------------------------ the Linear

class QuantizedLinear(nn.Module):
    """y = x W^T + b with W a frozen QuantizedWeight (fused_lora's counterpart of bitsandbytes'
    Linear4bit / Linear8bitLt): the base `get_lora_model` adapts, and what `unload()` gives back.

    The forward dequantizes W in row chunks (never the whole weight at once) in x's dtype."""

    def __init__(self, weight: QuantizedWeight, bias: Optional[Tensor] = None):
        super().__init__()
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"QuantizedLinear: weight must be a QuantizedWeight, got {type(weight).__name__}")
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        if bias is not None:
            if tuple(bias.shape) != (self.out_features,):
                raise ValueError(f"QuantizedLinear: bias has shape {tuple(bias.shape)}, expected ({self.out_features},)")
            bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)
            bias.requires_grad_(False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, quant_type: str = "nf4", **kwargs) -> "QuantizedLinear":
        """Quantize an nn.Linear's weight (`quantize_nf4` / `quantize_int8` arguments in kwargs); the bias
        is shared."""
        if type(linear) is not nn.Linear:
            raise TypeError(f"QuantizedLinear.from_linear expects an nn.Linear, got {type(linear).__name__}")
        return cls(quantize(linear.weight.detach(), quant_type, **kwargs), linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input's last dimension is {x.shape[-1]} but in_features is "
                             f"{self.in_features}")
        x, bias = autocast_input_and_bias(x, self.bias)  # as nn.Linear under torch.autocast
        lead = x.shape[:-1]
        y = quant_linear(x.reshape(math.prod(lead), self.in_features), self.weight, bias)
        return y.reshape(*lead, self.out_features)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if base_load_refused(self, state_dict, prefix, local_metadata, strict):
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def base_load_refused(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict, strict: bool) -> bool:
    """Whether `module`'s quantized `weight` will refuse its entries of this load (for a module's
    `_load_from_state_dict`). nn.Module loads a module's own parameters (a bias, LoRA weights) before its
    submodules: the weight's entries are checked first, so that nothing is loaded beside a refused weight
    (the weight reports why when its own turn comes)."""
    return module.weight.load_refusal(state_dict, prefix + "weight.", strict,
                                      bool(local_metadata.get("assign_to_params_buffers", False))) is not None


def quantized_parameter_count(model: nn.Module) -> int:
    """The weights held quantized in `model`, counted as peft counts a 4-bit weight: its N x K elements,
    once, however its tensors are held (buffers, or Parameters for FSDP2: `parameters_outside_quantized`
    leaves those out)."""
    return sum(math.prod(m.shape) for m in model.modules() if isinstance(m, QuantizedWeight))


def parameters_outside_quantized(model: nn.Module) -> Iterator[nn.Parameter]:
    """`model.parameters()` without the tensors of its QuantizedWeights (Parameters after
    `hold_as_parameters`): what a parameter count adds `quantized_parameter_count` to."""
    held = {id(p) for m in model.modules() if isinstance(m, QuantizedWeight) for p in m.parameters()}
    return (p for p in model.parameters() if id(p) not in held)


def shardable_quantized(model: nn.Module) -> int:
    """Hold every QuantizedWeight of `model` as Parameters (`QuantizedWeight.hold_as_parameters`), so that
    FSDP2's `fully_shard`, applied after, shards the quantized base with the other parameters: each process
    then holds its share of the packed codes and scales, and the whole weight only while its block runs.
    Returns how many weights `model` holds."""
    weights = [m for m in model.modules() if isinstance(m, QuantizedWeight)]
    for w in weights:
        w.hold_as_parameters()
    return len(weights)


def held_quantized_nbytes(model: nn.Module) -> int:
    """Bytes of the quantized base this process holds in `model`: the storage of every QuantizedWeight's
    tensors, each storage counted once; for an FSDP2 shard (a DTensor) its local storage, padding included,
    and nothing for a gathered copy FSDP2 has freed."""
    seen, total = set(), 0
    for m in model.modules():
        if not isinstance(m, QuantizedWeight):
            continue
        for t in m._held().values():
            local = t.to_local() if callable(getattr(t, "to_local", None)) else t
            storage = local.untyped_storage()
            key = (local.device, storage.data_ptr())
            if storage.nbytes() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total
