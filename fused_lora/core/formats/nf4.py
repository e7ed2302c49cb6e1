"""NF4, bitsandbytes' 4-bit NormalFloat layout, with or without its nested (double) quantization of the
absmax, read as bitsandbytes writes it.

The N x K weight, flattened row-major, is cut into blocks of `blocksize` consecutive elements, each scaled
by its absmax and rounded to the nearest of the 16 NF4 levels (`code`). Byte i of `packed` holds element
2i in its high nibble and element 2i + 1 in its low nibble. With double quantization ("nested",
bitsandbytes' compress_statistics) the fp32 absmax is itself stored as uint8 indices into a 256-entry
table `code2`, one fp32 scale `absmax2` per `blocksize2` absmax values, plus one `offset`:
    absmax[j] = code2[qabsmax[j]] * absmax2[j // blocksize2] + offset.
Every row is a whole number of blocks (K % blocksize == 0): a row chunk never splits a block and a kernel
tile reads whole blocks.

The format's functions (the interface `fused_lora.core.formats` names) are below; the nested offset is a
0-dim float32 buffer, the one truth, read as a Python float only when it changed (`offset_value`).
"""
from __future__ import annotations

import math
import numbers
import weakref
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch
from torch import Tensor

from . import common
from .common import QuantizationError, blockwise, check_float_weight, dtype_name, nonfinite, row_chunks

NAME = "nf4"
NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes' quantize_4bit accepts these
NESTED_BLOCKSIZE = 256  # bitsandbytes' block size for the nested (double) quantization of the absmax
FLOAT_BUFFERS = ("code", "absmax", "code2", "absmax2", "offset")
CODES = "packed"  # the buffer of packed codes (the rest are scales and tables)
CODES_READ_BY_VALUE_CHECK = False  # value_problem reads the scales and tables only
OPTIONS = ("blocksize", "double_quant")  # quantize()'s options beside the weight and compute dtype
# op_args' layout codes (the custom ops' `meta[0]`): plain, nested, and nested with the offset as a tensor
PLAIN, NESTED, NESTED_OFFSET_TENSOR = 0, 1, 3
LAYOUT_CODES = (PLAIN, NESTED, NESTED_OFFSET_TENSOR)


@dataclass(frozen=True)
class NF4Data:
    """An N x K weight in NF4. Either `absmax` (fp32, one per block) or the nested triple
    (`qabsmax` uint8, `code2` fp32[256], `absmax2` fp32) with `offset` is set."""
    format: ClassVar[str] = NAME
    shape: tuple  # (N, K)
    packed: torch.Tensor  # uint8, N * K // 2 elements, contiguous
    code: torch.Tensor  # fp32[16], the NF4 levels
    blocksize: int
    absmax: Optional[torch.Tensor] = None  # fp32[ceil(N * K / blocksize)]
    qabsmax: Optional[torch.Tensor] = None  # uint8[ceil(N * K / blocksize)]
    code2: Optional[torch.Tensor] = None  # fp32[256]
    absmax2: Optional[torch.Tensor] = None  # fp32[ceil(len(qabsmax) / blocksize2)]
    blocksize2: int = 256
    offset: float = 0.0

    @property
    def nested(self) -> bool:
        return self.qabsmax is not None

    def block_absmax(self, first: int, last: int) -> torch.Tensor:
        """fp32 absmax of blocks first..last-1 (un-nested when the absmax is quantized)."""
        if not self.nested:
            return self.absmax[first:last].float()
        j = torch.arange(first, last, device=self.packed.device)
        return self.code2[self.qabsmax[first:last].long()] * self.absmax2[j // self.blocksize2] + self.offset

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of W in fp32: the reference every other path is tested against."""
        N, K = self.shape
        lo, hi = start * K, stop * K
        b0, b1 = lo // self.blocksize, (hi + self.blocksize - 1) // self.blocksize
        scale = self.block_absmax(b0, b1).repeat_interleave(self.blocksize)
        scale = scale[lo - b0 * self.blocksize: hi - b0 * self.blocksize]
        # lo and hi are even whenever N * K is (checked by the container): whole bytes.
        byte = self.packed.reshape(-1)[lo // 2: hi // 2]
        idx = torch.stack([byte >> 4, byte & 15], dim=1).reshape(-1).long()
        return (self.code.float()[idx] * scale).reshape(stop - start, K)


DATA = NF4Data  # the layout class of this format


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


@torch.no_grad()
def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = True,
             compute_dtype: Optional[torch.dtype] = None, what: str = "quantize_nf4") -> NF4Data:
    """NF4 of an out x in float weight in bitsandbytes' layout: the codes and absmax
    bitsandbytes.functional.quantize_4bit(weight, blocksize, quant_type="nf4",
    compress_statistics=double_quant) gives (nested: its quantize_blockwise of absmax - mean, blocks
    of 256). in_features must be a multiple of `blocksize` (QuantizationError otherwise). Rows are
    quantized a chunk at a time (rows are whole blocks), so the temporaries stay bounded."""
    check_float_weight(weight, what, compute_dtype)
    # an integer of any type (numpy's too), never a float or bool: 64.0 == 64 would pass the check below
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) or blocksize not in BLOCKSIZES:
        raise QuantizationError(f"{what}: blocksize {blocksize!r} is not one of {BLOCKSIZES}")
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
        q, absmax[start * K // blocksize: stop * K // blocksize] = blockwise(weight[start:stop].reshape(-1).float(),
                                                                            code, blocksize)
        packed[start * K // 2: stop * K // 2] = (q[::2] << 4) | q[1::2]
    data = dict(shape=(N, K), packed=packed, code=code, blocksize=blocksize)
    if not double_quant:
        return NF4Data(**data, absmax=absmax)
    offset = absmax.mean()  # in float32, as bitsandbytes computes it
    if not bool(torch.isfinite(offset)):  # the float32 sum overflowed (absmax near float32's largest)
        offset = absmax.double().mean().float()
    code2 = dynamic_code(weight.device)
    qabsmax, absmax2 = blockwise(absmax - offset, code2, NESTED_BLOCKSIZE)
    return NF4Data(**data, qabsmax=qabsmax, code2=code2, absmax2=absmax2, blocksize2=NESTED_BLOCKSIZE,
                   offset=float(offset))


def check(data: NF4Data, what: str, same_device: bool = True) -> None:
    """The packed layout holds together: sizes, dtypes and (`same_device`) one device."""
    N, K = data.shape
    if data.blocksize not in BLOCKSIZES or K % data.blocksize:
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
    devices = {t.device for t in tensors}
    if same_device and len(devices) > 1:
        raise QuantizationError(f"{what}: the packed tensors are on several devices: {sorted(map(str, devices))}")


def value_problem(data: NF4Data, compute_dtype: torch.dtype = torch.float32) -> Optional[str]:
    """Why `data` would dequantize to NaN or inf (see `fused_lora.core.formats.value_problem`); reads the
    scales and tables (a few floats per block), never the packed codes."""
    if data.packed.is_meta:
        return None
    named = [("code", data.code)]
    if data.nested:
        offset = float(data.offset)
        named += [("code2", data.code2), ("offset", torch.tensor(offset)), ("absmax2", data.absmax2)]
    else:
        named.append(("absmax", data.absmax))
    for name, t in named:
        bad = nonfinite(t.float())
        if bad:
            return f"{name} holds {bad}"
    absmax = data.block_absmax(0, data.qabsmax.numel() if data.nested else data.absmax.numel())
    bad = nonfinite(absmax)
    if bad:
        return f"the nested absmax (code2[qabsmax] * absmax2 + offset) holds {bad}"
    level, scale = data.code.float().abs().max(), absmax.abs().max()
    peak = level * scale
    if not bool(torch.isfinite(peak)):
        return (f"the weight dequantizes to inf in float32 (largest |code| {float(level):g} times largest "
                f"absmax {float(scale):g})")
    if not bool(torch.isfinite(peak.to(compute_dtype))):
        return (f"the weight's largest value {float(peak):g} is beyond {dtype_name(compute_dtype)}'s range, its "
                "compute dtype (it would dequantize to inf)")
    return None


def dequantize_rows(data: NF4Data, start: int, stop: int) -> Tensor:
    """Rows start..stop-1 of W in fp32, bit for bit `NF4Data.dequantize_rows` (the reference), with fewer and
    smaller temporaries (what the PyTorch path runs on every chunk): NF4 bytes index a 256 x 2 table of level
    pairs with int32 indices and each block is scaled in place (rows are whole blocks); about 6 bytes of
    temporaries per element instead of ~20."""
    N, K = data.shape
    byte_index = torch.arange(256, device=data.packed.device)
    code = data.code.float()
    pairs = torch.stack([code[byte_index >> 4], code[byte_index & 15]], dim=1)  # byte -> (high, low) levels
    packed = data.packed.reshape(-1)[start * K // 2: stop * K // 2]
    values = pairs.index_select(0, packed.int()).view(-1, data.blocksize)
    per_row = K // data.blocksize
    values.mul_(data.block_absmax(start * per_row, stop * per_row)[:, None])
    return values.view(stop - start, K)


def dequantize(data: NF4Data, dtype: torch.dtype) -> Tensor:
    """The whole weight in `dtype`, bit for bit `dequantize_rows(data, 0, N).to(dtype)`, in the eager way measured
    fastest on a shared CPU (benchmarks/RESULTS.md, issue 21): `common.CHUNK_ELEMENTS` elements at a time, each
    byte's two levels one 8-byte lookup (a 256-entry table of level pairs read as int64: copied, never computed
    on) into one fp32 scratch reused chunk after chunk (memory already touched), then each block scaled by its
    absmax in fp32 and rounded once as it is stored in `dtype` (one pass over the result, the only fresh memory).
    Few, large ops: on a loaded machine each op's thread synchronisation costs more than a pass over memory."""
    N, K = data.shape
    device = data.packed.device
    code = data.code.float()
    byte = torch.arange(256, device=device)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).view(torch.int64).view(256)
    packed = data.packed.reshape(-1)
    bs = data.blocksize
    absmax = data.block_absmax(0, N * K // bs)[:, None]
    out = torch.empty(N, K, dtype=dtype, device=device)
    flat = out.view(-1)
    step = max(bs, common.CHUNK_ELEMENTS - common.CHUNK_ELEMENTS % bs)  # whole blocks
    scratch = torch.empty(min(step, N * K), dtype=torch.float32, device=device)
    for lo in range(0, N * K, step):
        hi = min(N * K, lo + step)
        levels = scratch[:hi - lo]
        torch.index_select(pairs, 0, packed[lo // 2: hi // 2].int(), out=levels.view(torch.int64))
        torch.mul(levels.view(-1, bs), absmax[lo // bs: hi // bs], out=flat[lo:hi].view(-1, bs))
    return out


def layout_name(data: NF4Data) -> tuple[str, int]:
    """("nf4", blocksize) or ("nf4-nested", blocksize): what the backend table keys and refuses on."""
    return ("nf4-nested" if data.nested else "nf4"), data.blocksize


def op_args(data: NF4Data) -> tuple[list, list, float]:
    """The layout as a custom op's arguments (see `fused_lora.core.formats.op_args`). A nested offset given
    as a tensor (`QuantizedWeight.data()` under torch.compile) travels as a sixth tensor, read by
    `from_op_args` when the op runs, the float argument then 0.0 and unused: the op's schema keeps
    `offset: float`, and the compiled graph follows writes to the offset buffer."""
    N, K = data.shape
    if data.nested:
        tensors = [data.packed, data.code, data.qabsmax, data.code2, data.absmax2]
        if isinstance(data.offset, Tensor):
            return tensors + [data.offset], [NESTED_OFFSET_TENSOR, N, K, data.blocksize, data.blocksize2], 0.0
        return tensors, [NESTED, N, K, data.blocksize, data.blocksize2], float(data.offset)
    return [data.packed, data.code, data.absmax], [PLAIN, N, K, data.blocksize, data.blocksize2], 0.0


def from_op_args(tensors: list, meta: list, offset: float) -> NF4Data:
    """The inverse of `op_args` (a nested offset that travelled as a tensor read as a float: `offset_value`)."""
    kind, N, K, blocksize, blocksize2 = meta
    if kind in (NESTED, NESTED_OFFSET_TENSOR):
        packed, code, qabsmax, code2, absmax2 = tensors[:5]
        if kind == NESTED_OFFSET_TENSOR:
            offset = offset_value(tensors[5])
        return NF4Data((N, K), packed, code, blocksize, qabsmax=qabsmax, code2=code2, absmax2=absmax2,
                       blocksize2=blocksize2, offset=offset)
    packed, code, absmax = tensors
    return NF4Data((N, K), packed, code, blocksize, absmax=absmax, blocksize2=blocksize2)


# ---- the container's view (fused_lora.modules.quantized.QuantizedWeight holds the buffers)

def attributes(data: NF4Data) -> dict:
    """The layout's integers the container keeps as attributes."""
    return {"blocksize": int(data.blocksize), "blocksize2": int(data.blocksize2)}


def buffers(data: NF4Data) -> dict[str, Tensor]:
    """The container's buffers, by state_dict name, in registration order: the packed codes and tables as
    they are (views when contiguous), float tables in fp32; the nested offset a 0-dim fp32 tensor."""
    out = {"packed": data.packed.contiguous().reshape(-1), "code": data.code.float().contiguous()}
    for name in ("absmax", "qabsmax", "code2", "absmax2"):
        if getattr(data, name) is not None:
            t = getattr(data, name).contiguous().reshape(-1)
            out[name] = t.float() if name != "qabsmax" else t
    if data.nested:  # a buffer, the one truth (a state_dict carries it); read as `offset_value` reads it
        with torch.inference_mode(False):  # a tensor with a version counter, even in inference mode
            out["offset"] = torch.tensor(float(data.offset), dtype=torch.float32, device=data.packed.device)
    return out


def layout(shape: tuple, tensors: dict, attrs: dict, offset: str = "value") -> NF4Data:
    """The layout of buffers given by name. The nested offset: "value", read as `offset_value` reads it (once
    per change; NaN / inf refused); "float", read as it is (a checkpoint's entries, judged by value_problem);
    "tensor", the tensor itself (read when a custom op runs: under torch.compile)."""
    get = tensors.get
    value = get("offset")
    if value is None:
        value = 0.0
    elif offset == "value":
        value = offset_value(value)  # a meta offset: 0.0
    elif offset == "float":
        value = 0.0 if value.is_meta else float(value)
    return NF4Data(tuple(shape), tensors["packed"], tensors["code"], attrs["blocksize"], absmax=get("absmax"),
                   qabsmax=get("qabsmax"), code2=get("code2"), absmax2=get("absmax2"),
                   blocksize2=attrs["blocksize2"], offset=value)


def settle(tensors: dict) -> None:
    """After buffers were replaced (a device move, load_state_dict): the offset keeps a version counter."""
    if "offset" in tensors:
        tensors["offset"] = normal_tensor(tensors["offset"])


def describe(attrs: dict, tensors: dict) -> str:
    return f"nf4, blocksize={attrs['blocksize']}{', double_quant' if 'qabsmax' in tensors else ''}"


def is_nested(tensors: dict) -> bool:
    return "qabsmax" in tensors


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


def normal_tensor(t: Tensor) -> Tensor:
    """`t`, or a copy of it that is not an inference tensor (made in torch.inference_mode, which keeps no
    version counter: `offset_value` would read it on every call)."""
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        return t.clone()
