"""A frozen quantized base weight: NF4 (bitsandbytes' layout, optionally with nested absmax) or int8
with one scale per output row, and the module that runs it as a Linear.

    QuantizedWeight     the packed tensors as buffers (never a 16-bit copy); `data()` gives the
                        `quant_format` view (NF4Data / Int8Data) the PyTorch path and the kernels read
    quantize_nf4, quantize_int8
                        our own quantizers, no bitsandbytes needed: NF4 gives bitsandbytes'
                        quantize_4bit codes and absmax (nested: its quantize_blockwise of the absmax)
    QuantizedLinear     a frozen Linear over a QuantizedWeight (fused_lora's Linear4bit): what
                        `quantize_model` puts in place of nn.Linear, and what the adapted layer holds
    quantize_model      quantize a plain model's targeted nn.Linear layers in place

Why our own container and not bitsandbytes' Params4bit: the CPU path and tests must run without
bitsandbytes, and the kernels need one layout they can rely on (`quant_format`); converters from
bitsandbytes' modules share their packed tensors (`quant_convert`).

Choices written down:
- A weight is frozen: its tensors are buffers, never Parameters; nothing asks for their gradient.
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
  read from the buffer once per change of it (`offset_value`), and under torch.compile the buffer itself
  travels into the custom ops (`op_args`), so no write to it is missed and no forward syncs to read it.
"""
from __future__ import annotations

import math
import numbers
import weakref
from typing import Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ..core.formats.layouts import NF4_LEVELS, Int8Data, NF4Data

FORMATS = ("nf4", "int8")
NF4_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the nested (double) quantization of the absmax
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

QuantData = Union[NF4Data, Int8Data]


class QuantizationError(ValueError):
    """A weight that cannot be quantized or a packed layout that does not hold together."""


def nf4_code(device=None) -> Tensor:
    """The 16 NF4 levels (bitsandbytes' get_4bit_type('nf4')), fp32."""
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def dynamic_code(device=None) -> Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)): the 256-entry
    table that nested quantization indexes the absmax with. Computed as bitsandbytes computes it."""
    data = []
    non_sign_bits, max_exponent_bits = 7, 7
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0, 1.0]
    data += [0] * (256 - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32, device=device)


def _blockwise(flat: Tensor, code: Tensor, blocksize: int) -> tuple[Tensor, Tensor]:
    """(indices into `code`, fp32 absmax per block) of a flat fp32 tensor: scale each block by
    1/absmax, round to the nearest code value (bitsandbytes' blockwise rule, ties to the upper value)."""
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n % blocksize:
        am = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, am.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / am, -1, 1)])
    bounds = (code[:-1] + code[1:]) / 2  # code is sorted
    return torch.bucketize(scaled, bounds, out_int32=True).to(torch.uint8), absmax


def _check_float_weight(weight, what: str, compute_dtype: Optional[torch.dtype] = None) -> None:
    if not isinstance(weight, Tensor):
        raise TypeError(f"{what}: expected a weight tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise QuantizationError(f"{what}: the weight must be 2-D (out_features x in_features), got shape "
                                f"{tuple(weight.shape)}")
    if weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{what}: the weight has dtype {weight.dtype}; expected a floating-point weight "
                        "(float32, float16, bfloat16 or float64)")
    if weight.is_meta:
        raise QuantizationError(f"{what}: the weight is on the meta device (no values to quantize)")
    if not weight.numel():
        return
    # one reduction without a temporary copy of the weight; NaN propagates through it
    peak = float(torch.linalg.vector_norm(weight, float("inf")))
    if math.isnan(peak) or math.isinf(peak):
        raise QuantizationError(f"{what}: the weight holds {'NaN' if math.isnan(peak) else 'inf'}")
    # The scales are float32 (a float64 weight's 1e300 made inf scales and NaN codes), and the weight is
    # dequantized in its compute dtype: each must hold the weight's largest value (the +-1 NF4 level and the
    # +-127 int8 code reproduce it, rounded to float32).
    for dtype, why in ((torch.float32, "NF4 and int8 scales are float32"),
                       (compute_dtype or weight.dtype, "the compute dtype: the weight would dequantize to inf")):
        if dtype in FLOAT_DTYPES and not _fits(peak, dtype):
            raise QuantizationError(f"{what}: the weight holds {peak:g}, beyond {_name(dtype)}'s range ({why})")


def _fits(value: float, dtype: torch.dtype) -> bool:
    """Whether `value`, rounded to float32 (as the scales are) and then to `dtype`, is finite."""
    return bool(torch.isfinite(torch.tensor(value, dtype=torch.float64).float().to(dtype)))


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


@torch.no_grad()
def quantize_nf4(weight: Tensor, blocksize: int = 64, double_quant: bool = True,
                 compute_dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
    """NF4 of an out x in float weight in bitsandbytes' layout: the codes and absmax
    bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant) gives (nested: its quantize_blockwise of absmax - mean, blocks
    of 256). `compute_dtype` defaults to the weight's dtype. in_features must be a multiple of
    `blocksize` (QuantizationError otherwise). Rows are quantized a chunk at a time (rows are whole
    blocks), so the temporaries stay bounded whatever the weight's size."""
    what = "quantize_nf4"
    _check_float_weight(weight, what, compute_dtype)
    # an integer of any type (numpy's too), never a float or bool: 64.0 == 64 would pass the check below
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize not in NF4_BLOCKSIZES:
        raise QuantizationError(f"{what}: blocksize {blocksize!r} is not one of {NF4_BLOCKSIZES}")
    blocksize = int(blocksize)
    N, K = weight.shape
    if K % blocksize:
        raise QuantizationError(f"{what}: in_features {K} is not a multiple of the block size {blocksize} "
                                "(every row must be a whole number of blocks)")
    if N * K == 0:
        raise QuantizationError(f"{what}: the weight is empty (shape {tuple(weight.shape)})")
    code = nf4_code(weight.device)
    packed = torch.empty(N * K // 2, dtype=torch.uint8, device=weight.device)
    absmax = torch.empty(N * K // blocksize, dtype=torch.float32, device=weight.device)
    for start, stop in row_chunks(N, K):
        q, absmax[start * K // blocksize: stop * K // blocksize] = _blockwise(weight[start:stop].reshape(-1).float(),
                                                                             code, blocksize)
        packed[start * K // 2: stop * K // 2] = (q[::2] << 4) | q[1::2]
    data = dict(shape=(N, K), packed=packed, code=code, blocksize=blocksize)
    if double_quant:
        offset = absmax.mean()  # in float32, as bitsandbytes computes it
        if not bool(torch.isfinite(offset)):  # the float32 sum overflowed (absmax near float32's largest)
            offset = absmax.double().mean().float()
        code2 = dynamic_code(weight.device)
        qabsmax, absmax2 = _blockwise(absmax - offset, code2, NESTED_BLOCKSIZE)
        nf4 = NF4Data(**data, qabsmax=qabsmax, code2=code2, absmax2=absmax2, blocksize2=NESTED_BLOCKSIZE,
                      offset=float(offset))
    else:
        nf4 = NF4Data(**data, absmax=absmax)
    return QuantizedWeight(nf4, compute_dtype or weight.dtype)


@torch.no_grad()
def quantize_int8(weight: Tensor, compute_dtype: Optional[torch.dtype] = None) -> "QuantizedWeight":
    """int8 weight-only, one scale per output row: q = round(W * 127 / absmax_row), scale = absmax_row / 127
    (bitsandbytes' int8_vectorwise_quant codes, threshold 0). A zero row gets scale 0."""
    what = "quantize_int8"
    _check_float_weight(weight, what, compute_dtype)
    if weight.numel() == 0:
        raise QuantizationError(f"{what}: the weight is empty (shape {tuple(weight.shape)})")
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    row_max = torch.empty(N, dtype=torch.float32, device=weight.device)
    for start, stop in row_chunks(N, K):  # bounded temporaries
        w = weight[start:stop].float()
        row_max[start:stop] = w.abs().max(dim=1).values
        q[start:stop] = torch.round(w * (127.0 / row_max[start:stop].clamp(min=1e-38).unsqueeze(-1)))
    return QuantizedWeight(Int8Data(tuple(weight.shape), q, row_max / 127.0), compute_dtype or weight.dtype)


def quantize(weight: Tensor, quant_type: str, **kwargs) -> "QuantizedWeight":
    """quantize_nf4 or quantize_int8 by name ("nf4" | "int8")."""
    if quant_type == "nf4":
        return quantize_nf4(weight, **kwargs)
    if quant_type == "int8":
        return quantize_int8(weight, **kwargs)
    raise ValueError(f"unknown quant_type {quant_type!r}; expected one of {', '.join(FORMATS)}")


def check_data(data: QuantData, what: str = "QuantizedWeight", same_device: bool = True) -> None:
    """The packed layout holds together: sizes, dtypes and (`same_device`) one device (QuantizationError /
    TypeError naming the field)."""
    if isinstance(data, Int8Data):
        N, K = data.shape
        if data.qweight.dtype != torch.int8 or tuple(data.qweight.shape) != (N, K):
            raise QuantizationError(f"{what}: qweight must be int8 of shape {(N, K)}, got {data.qweight.dtype} "
                                    f"{tuple(data.qweight.shape)}")
        if tuple(data.scale.shape) != (N,) or not data.scale.is_floating_point():
            raise QuantizationError(f"{what}: scale must be float of shape ({N},), got {data.scale.dtype} "
                                    f"{tuple(data.scale.shape)}")
        tensors = (data.qweight, data.scale)
    elif isinstance(data, NF4Data):
        N, K = data.shape
        if data.blocksize not in NF4_BLOCKSIZES or K % data.blocksize:
            raise QuantizationError(f"{what}: in_features {K} is not a multiple of the NF4 block size "
                                    f"{data.blocksize} (every row must be a whole number of blocks)")
        if data.packed.dtype != torch.uint8 or data.packed.numel() != N * K // 2:
            raise QuantizationError(f"{what}: packed must hold {N * K // 2} uint8 (two 4-bit codes a byte), got "
                                    f"{data.packed.numel()} {data.packed.dtype}")
        if data.code.numel() != 16:
            raise QuantizationError(f"{what}: code must hold the 16 NF4 levels, got {data.code.numel()} values")
        blocks = N * K // data.blocksize
        if data.nested:
            if data.qabsmax.dtype != torch.uint8 or data.qabsmax.numel() != blocks:
                raise QuantizationError(f"{what}: the nested absmax must be {blocks} uint8, got "
                                        f"{data.qabsmax.numel()} {data.qabsmax.dtype}")
            if data.code2 is None or data.code2.numel() != 256 or data.absmax2 is None \
                    or data.absmax2.numel() != math.ceil(blocks / data.blocksize2):
                raise QuantizationError(f"{what}: the nested absmax needs code2 (256 values) and absmax2 "
                                        f"({math.ceil(blocks / data.blocksize2)} values)")
            tensors = (data.packed, data.code, data.qabsmax, data.code2, data.absmax2)
        else:
            if data.absmax is None or data.absmax.numel() != blocks or not data.absmax.is_floating_point():
                raise QuantizationError(f"{what}: absmax must hold {blocks} floats (one per block of "
                                        f"{data.blocksize}), got "
                                        f"{None if data.absmax is None else data.absmax.numel()}")
            tensors = (data.packed, data.code, data.absmax)
    else:
        raise TypeError(f"{what}: expected NF4Data or Int8Data, got {type(data).__name__}")
    devices = {t.device for t in tensors}
    if same_device and len(devices) > 1:
        raise QuantizationError(f"{what}: the packed tensors are on several devices: {sorted(map(str, devices))}")


def _nonfinite(t: Tensor) -> Optional[str]:
    """"NaN" or "inf" when `t` holds one (NaN first), else None."""
    if not t.numel() or bool(torch.isfinite(t).all()):
        return None
    return "NaN" if bool(torch.isnan(t).any()) else "inf"


def value_problem(data: QuantData, compute_dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why `data` (a layout `check_data` accepts) would dequantize to NaN or inf, in float32 or in
    `compute_dtype`: a scale, code table or nested offset holding NaN / inf (named), or a largest weight
    value beyond the dtype's range. None when every value is finite. Reads the scales and tables (a few
    floats per block or row), never the packed codes; a meta layout has no values (None)."""
    if isinstance(data, Int8Data):
        if data.scale.is_meta:
            return None
        bad = _nonfinite(data.scale)
        if bad:
            return f"scale holds {bad}"
        # A row's largest value is |q| <= 128 times its scale: only rows where that bound overflows are read
        scale = data.scale.float().abs()
        bound = scale * 128
        over = ~torch.isfinite(bound) | ~torch.isfinite(bound.to(compute_dtype))
        if not bool(over.any()):
            return None
        rows = over.nonzero().squeeze(1)
        q = data.qweight[rows.to(data.qweight.device)].to(scale.device)
        row_peak = q.to(torch.int16).abs().amax(dim=1).float() * scale[rows]
        if not bool(torch.isfinite(row_peak).all()):
            return f"the weight dequantizes to inf in float32 (scale up to {float(scale.max()):g})"
        peak = row_peak.max()
    else:
        if data.packed.is_meta:
            return None
        named = [("code", data.code)]
        if data.nested:
            offset = float(data.offset)
            named += [("code2", data.code2), ("offset", torch.tensor(offset)), ("absmax2", data.absmax2)]
        else:
            named.append(("absmax", data.absmax))
        for name, t in named:
            bad = _nonfinite(t.float())
            if bad:
                return f"{name} holds {bad}"
        absmax = data.block_absmax(0, data.qabsmax.numel() if data.nested else data.absmax.numel())
        bad = _nonfinite(absmax)
        if bad:
            return f"the nested absmax (code2[qabsmax] * absmax2 + offset) holds {bad}"
        level, scale = data.code.float().abs().max(), absmax.abs().max()
        peak = level * scale
        if not bool(torch.isfinite(peak)):
            return (f"the weight dequantizes to inf in float32 (largest |code| {float(level):g} times largest "
                    f"absmax {float(scale):g})")
    if not bool(torch.isfinite(peak.to(compute_dtype))):
        return (f"the weight's largest value {float(peak):g} is beyond {_name(compute_dtype)}'s range, its compute "
                "dtype (it would dequantize to inf)")
    return None


def check_values(data: QuantData, compute_dtype: torch.dtype = torch.float32, what: str = "QuantizedWeight") -> None:
    """QuantizationError naming the field when `data` would dequantize to NaN or inf (`value_problem`)."""
    problem = value_problem(data, compute_dtype)
    if problem:
        raise QuantizationError(f"{what}: {problem}")


# id(offset tensor) -> (weak reference to it, (version, data pointer) it was read at, value): kept beside the
# tensor, not on it, so that no copy of the tensor (deepcopy, pickle) carries a stale entry along
_OFFSETS_READ: dict = {}


def offset_value(offset: Tensor) -> float:
    """The nested NF4 offset (a 0-dim float32 tensor, the one truth) as the Python float the kernels and custom
    ops take. The value is read from the device (on a GPU, a device-to-host sync) only when the tensor changed
    since it was last read: the tensor's (version counter, data pointer) at that read is kept, so any in-place
    write (which bumps the version), `.data =` (which moves the pointer) or another tensor in the buffer's place
    (a device move, load_state_dict(assign=True), a copy) is read again. Writes that bypass the version counter
    (in place through `.data` or a NumPy view, which autograd does not see either) are not noticed. An
    inference tensor has no version counter: it is read on every call. QuantizationError if the value is NaN
    or inf. A meta offset has no value: 0.0 (shapes only)."""
    if offset.is_meta:
        return 0.0
    key = None if offset.is_inference() else (offset._version, offset.data_ptr())
    entry = _OFFSETS_READ.get(id(offset))
    if key is not None and entry is not None and entry[0]() is offset and entry[1] == key:
        return entry[2]
    value = float(offset)
    if not math.isfinite(value):
        raise QuantizationError(f"QuantizedWeight: the nested NF4 offset holds {'NaN' if math.isnan(value) else 'inf'}")
    if key is not None:
        ident = id(offset)
        _OFFSETS_READ[ident] = (weakref.ref(offset, lambda _: _OFFSETS_READ.pop(ident, None)), key, value)
    return value


def _normal_tensor(t: Tensor) -> Tensor:
    """`t`, or a copy of it that is not an inference tensor (made in torch.inference_mode, which keeps no
    version counter: `offset_value` would read it on every call)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()


class QuantizedWeight(nn.Module):
    """A frozen N x K weight held quantized (NF4 or int8); behaves enough like a weight tensor for the
    layer: `shape`, `dtype` (the compute dtype), `device`, `requires_grad` (False).

    Build it with `quantize_nf4` / `quantize_int8`, or from bitsandbytes' packed tensors
    (`quant_convert`). The tensors are buffers (state_dict keys `packed`, `code`, `absmax` or
    `qabsmax`/`code2`/`absmax2` for NF4; `qweight`, `scale` for int8)."""

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
        check_data(data)
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"QuantizedWeight: compute dtype {dtype} is not a floating-point dtype")
        check_values(data, dtype)
        self.format = "int8" if isinstance(data, Int8Data) else "nf4"
        self._shape = tuple(int(s) for s in data.shape)
        self.compute_dtype = dtype
        if self.format == "int8":
            self.register_buffer("qweight", data.qweight.contiguous())  # no copy when it is (the usual case)
            self.register_buffer("scale", data.scale.float().contiguous())
        else:
            self.blocksize, self.blocksize2 = int(data.blocksize), int(data.blocksize2)
            self.register_buffer("packed", data.packed.contiguous().reshape(-1))
            self.register_buffer("code", data.code.float().contiguous())
            for name in ("absmax", "qabsmax", "code2", "absmax2"):  # as they are (views when contiguous)
                if getattr(data, name) is not None:
                    t = getattr(data, name).contiguous().reshape(-1)
                    self.register_buffer(name, t.float() if name != "qabsmax" else t)
            if data.nested:  # a buffer, the one truth (a state_dict carries it); read as `offset_value` reads it
                with torch.inference_mode(False):  # a tensor with a version counter, even in inference mode
                    self.register_buffer("offset", torch.tensor(float(data.offset), dtype=torch.float32,
                                                                device=data.packed.device))

    def __getstate__(self):
        # copies (deepcopy, pickle) leave out the bitsandbytes layer the weight was read from (quant_convert):
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
        return next(self.buffers()).device

    @property
    def is_meta(self) -> bool:
        return self.device.type == "meta"

    @property
    def nested(self) -> bool:
        return self.format == "nf4" and "qabsmax" in self._buffers

    def data(self) -> QuantData:
        """The `quant_format` view of the current buffers (follows .to(device), load_state_dict and in-place
        writes). The nested offset is the buffer's value (`offset_value`: read from the device only when the
        buffer changed); under torch.compile it is the buffer itself, which `op_args` hands to the custom ops,
        read when they run (a float taken while tracing would be a constant of the graph, blind to later
        writes)."""
        if self.format == "int8":
            return Int8Data(self._shape, self.qweight, self.scale)
        get = self._buffers.get
        offset = get("offset")
        if offset is not None and not torch.compiler.is_compiling():
            offset = offset_value(offset)
        return NF4Data(self._shape, self.packed, self.code, self.blocksize, absmax=get("absmax"),
                       qabsmax=get("qabsmax"), code2=get("code2"), absmax2=get("absmax2"),
                       blocksize2=self.blocksize2, offset=0.0 if offset is None else offset)

    _FLOAT_BUFFERS = ("code", "absmax", "code2", "absmax2", "scale", "offset")

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
        for name, current in self._buffers.items():
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
            if name in self._FLOAT_BUFFERS and value.dtype != torch.float32:  # loading casts them to float32
                cast = value.float()
                if _nonfinite(cast) and not (value.is_floating_point() and _nonfinite(value)):
                    return (f"{name} holds a value beyond float32's range (largest "
                            f"{float(value.abs().max()):g}; inf once cast to float32, the buffers' dtype)")
                value = cast
            merged[name] = value
        if strict and missing:
            return f"missing {', '.join(missing)}"
        try:  # with assign=True the checkpoint's tensors become the buffers: they must share one device
            check_data(self._layout(merged), "QuantizedWeight", same_device=assign)
        except (QuantizationError, TypeError) as err:
            return str(err).removeprefix("QuantizedWeight: ")
        if any(t.is_meta for t in merged.values()):
            return None
        # The values are read where the checkpoint's scales are (not necessarily this weight's device yet); the
        # packed NF4 codes are never read (an empty stand-in), int8 codes only in rows a scale could overflow.
        codes = "qweight" if self.format == "int8" else "packed"
        small = [n for n in merged if n != codes]
        device = next((state_dict[prefix + n].device for n in small if prefix + n in state_dict),
                      merged[small[0]].device)
        moved = {n: t.to(device) for n, t in merged.items() if n != codes}
        moved[codes] = merged[codes] if codes == "qweight" else torch.empty(0, dtype=torch.uint8, device=device)
        return value_problem(self._layout(moved), self.compute_dtype)

    def _layout(self, tensors: dict) -> QuantData:
        """The layout of buffers given by name (the nested offset as its value)."""
        if self.format == "int8":
            return Int8Data(self._shape, tensors["qweight"], tensors["scale"])
        offset = tensors.get("offset")
        return NF4Data(self._shape, tensors["packed"], tensors["code"], self.blocksize, absmax=tensors.get("absmax"),
                       qabsmax=tensors.get("qabsmax"), code2=tensors.get("code2"), absmax2=tensors.get("absmax2"),
                       blocksize2=self.blocksize2,
                       offset=0.0 if offset is None or offset.is_meta else float(offset))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Everything is checked before anything is copied (load_refusal): a refused load leaves every buffer
        # as it was. A strict load missing entries reports them as nn.Module does, loading none of the others.
        missing = [prefix + n for n in self._buffers if prefix + n not in state_dict]
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
        # tensor with a version counter for the offset)
        for name in self._FLOAT_BUFFERS:
            t = self._buffers.get(name)
            if t is not None and t.dtype != torch.float32:
                self._buffers[name] = t.float()
        if "offset" in self._buffers:
            self._buffers["offset"] = _normal_tensor(self._buffers["offset"])

    def nbytes(self) -> int:
        """Bytes held by every tensor of this weight (packed data, scales, code tables)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def bytes_per_param(self) -> float:
        return self.nbytes() / max(1, math.prod(self._shape))

    # ---- dequantization

    def dequantize_rows(self, start: int, stop: int, dtype: Optional[torch.dtype] = None) -> Tensor:
        """Rows start..stop-1 of W (computed in fp32, as bitsandbytes does, then cast to `dtype`)."""
        rows = dequantize_rows(self.data(), start, stop)
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
        probe = fn(torch.empty(0, dtype=self.compute_dtype, device=self.device))
        self.compute_dtype = probe.dtype
        for name, t in self._buffers.items():
            if t is not None:
                new = fn(t)
                self._buffers[name] = new if new.dtype == t.dtype else t.to(new.device)
        if "offset" in self._buffers:  # moved in inference mode: keep a version counter (offset_value)
            self._buffers["offset"] = _normal_tensor(self._buffers["offset"])
        return self

    def extra_repr(self) -> str:
        N, K = self._shape
        kind = (f"nf4, blocksize={self.blocksize}{', double_quant' if self.nested else ''}"
                if self.format == "nf4" else "int8 per-row scale")
        return (f"{N}x{K}, {kind}, dtype={str(self.compute_dtype).replace('torch.', '')}, "
                f"{self.bytes_per_param():.3f} bytes/param")


# ------------------------------------------------------------------------------ row chunks

def dequantize_rows(data: QuantData, start: int, stop: int) -> Tensor:
    """Rows start..stop-1 of W in fp32, bit for bit `data.dequantize_rows` (the quant_format reference),
    with fewer and smaller temporaries (what the PyTorch path runs on every chunk): NF4 bytes index a
    256 x 2 table of level pairs with int32 indices and each block is scaled in place (rows are whole
    blocks); about 6 bytes of temporaries per element instead of ~20."""
    if isinstance(data, Int8Data):
        return data.qweight[start:stop].float().mul_(data.scale[start:stop, None].float())
    N, K = data.shape
    byte_index = torch.arange(256, device=data.packed.device)
    code = data.code.float()
    pairs = torch.stack([code[byte_index >> 4], code[byte_index & 15]], dim=1)  # byte -> (high, low) levels
    packed = data.packed.reshape(-1)[start * K // 2: stop * K // 2]
    values = pairs.index_select(0, packed.int()).view(-1, data.blocksize)
    per_row = K // data.blocksize
    values.mul_(data.block_absmax(start * per_row, stop * per_row)[:, None])
    return values.view(stop - start, K)


CHUNK_ELEMENTS = 1 << 22  # the most weight elements dequantized at once on the PyTorch path (8 MiB in 16-bit)


def row_chunks(N: int, K: int, max_elements: Optional[int] = None) -> Iterator[tuple[int, int]]:
    """(start, stop) row ranges of an N x K weight, each at most `max_elements` (default
    CHUNK_ELEMENTS, read at each call) elements, at least one row."""
    limit = CHUNK_ELEMENTS if max_elements is None else max_elements
    step = max(1, limit // max(1, K))
    for start in range(0, N, step):
        yield start, min(N, start + step)


_NF4, _NF4_NESTED, _INT8, _NF4_NESTED_OFFSET_TENSOR = 0, 1, 2, 3  # layout codes of op_args' meta


def op_args(data: QuantData) -> tuple[list, list, float]:
    """The layout as a custom op's arguments: (tensors, [layout code, N, K, blocksize, blocksize2], offset).
    A nested offset given as a tensor (`QuantizedWeight.data()` under torch.compile) travels as a sixth tensor,
    read by `from_op_args` when the op runs (`offset_value`), the float argument then 0.0 and unused: the op's
    schema keeps `offset: float`, and the compiled graph follows writes to the offset buffer."""
    N, K = data.shape
    if isinstance(data, Int8Data):
        return [data.qweight, data.scale], [_INT8, N, K, 0, 0], 0.0
    if data.nested:
        tensors = [data.packed, data.code, data.qabsmax, data.code2, data.absmax2]
        if isinstance(data.offset, Tensor):
            return tensors + [data.offset], [_NF4_NESTED_OFFSET_TENSOR, N, K, data.blocksize, data.blocksize2], 0.0
        return tensors, [_NF4_NESTED, N, K, data.blocksize, data.blocksize2], float(data.offset)
    return [data.packed, data.code, data.absmax], [_NF4, N, K, data.blocksize, data.blocksize2], 0.0


def from_op_args(tensors: list, meta: list, offset: float) -> QuantData:
    """The inverse of `op_args` (a nested offset that travelled as a tensor read as a float: `offset_value`)."""
    kind, N, K, blocksize, blocksize2 = meta
    if kind == _INT8:
        return Int8Data((N, K), tensors[0], tensors[1])
    if kind in (_NF4_NESTED, _NF4_NESTED_OFFSET_TENSOR):
        packed, code, qabsmax, code2, absmax2 = tensors[:5]
        if kind == _NF4_NESTED_OFFSET_TENSOR:
            offset = offset_value(tensors[5])
        return NF4Data((N, K), packed, code, blocksize, qabsmax=qabsmax, code2=code2, absmax2=absmax2,
                       blocksize2=blocksize2, offset=offset)
    packed, code, absmax = tensors
    return NF4Data((N, K), packed, code, blocksize, absmax=absmax, blocksize2=blocksize2)


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
        from .quant_layer import autocast_inputs
        from ..ops.quant import quant_linear
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear: input's last dimension is {x.shape[-1]} but in_features is "
                             f"{self.in_features}")
        x, bias = autocast_inputs(x, self.bias)  # as nn.Linear under torch.autocast
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


def _holds_quantized(module: nn.Module) -> bool:
    """A module whose frozen weight is quantized: QuantizedLinear, a layer adapted over one,
    bitsandbytes' Linear4bit / Linear8bitLt, or an nn.Linear holding torchao's NF4Tensor."""
    from .convert_bnb import is_quantized_base
    return isinstance(module._modules.get("weight"), QuantizedWeight) or is_quantized_base(module)


def _default_skip(model: nn.Module) -> set:
    """What default targets leave unquantized, as transformers' bitsandbytes loading does
    (get_keys_to_not_convert): the output layer and, in a transformers model (one with
    get_output_embeddings), the module holding its last parameter (a classification head: `score`)."""
    from ..peft_compat.targets import _output_layer_name
    skip = {_output_layer_name(model)}
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
    from ..peft_compat.targets import name_matches
    if quant_type not in FORMATS:
        raise ValueError(f"quantize_model: unknown quant_type {quant_type!r}; expected one of {', '.join(FORMATS)}")
    skip = _default_skip(model) if target_modules is None else set()
    every = list(model.named_modules(remove_duplicate=False))  # a shared Linear is replaced under all its names
    chosen = {id(m) for n, m in every if type(m) is nn.Linear and n not in skip and not _holds_quantized(m)
              and (target_modules is None or name_matches(n, target_modules))
              and not name_matches(n, exclude_modules)}
    names = [n for n, m in model.named_modules() if id(m) in chosen]
    if not names:
        done = [n for n, m in model.named_modules() if _holds_quantized(m)
                and (target_modules is None or name_matches(n, target_modules))]
        hint = f" (already quantized: {', '.join(map(repr, done[:4]))}{', ...' if len(done) > 4 else ''})" \
            if done else ""
        raise ValueError(f"quantize_model: target_modules {target_modules!r} matches no nn.Linear{hint}")
    kwargs = dict(blocksize=blocksize, double_quant=double_quant) if quant_type == "nf4" else {}
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
