"""The packed layouts of a quantized frozen base weight, and their reference dequantization.

Plain data, no dependency: the container the layer holds (`fused_lora.modules.quantized`), the PyTorch path
and the Triton kernels all read these fields, so the layout is written down once, here.

NF4 (bitsandbytes' layout, read as bitsandbytes writes it): the N x K weight, flattened row-major,
is cut into blocks of `blocksize` consecutive elements, each scaled by its absmax and rounded to
the nearest of the 16 NF4 levels (`code`). Byte i of `packed` holds element 2i in its high nibble
and element 2i + 1 in its low nibble. With double quantization ("nested", bitsandbytes'
compress_statistics) the fp32 absmax is itself stored as uint8 indices into a 256-entry table
`code2`, one fp32 scale `absmax2` per `blocksize2` absmax values, plus one `offset`:
    absmax[j] = code2[qabsmax[j]] * absmax2[j // blocksize2] + offset.

int8 (weight-only, per output channel): W[n, k] = qweight[n, k] * scale[n].
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

NF4_LEVELS = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
              -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
              0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
              0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


KERNEL_MIN_BLOCKSIZE = 64  # the smallest NF4 block the Triton kernels take (bitsandbytes' default)


def layout_name(data) -> tuple[str, int]:
    """(format, blocksize) of a weight's layout, as the backends table keys and refuses on it:
    ("int8", 0), ("nf4", blocksize) or ("nf4-nested", blocksize)."""
    if isinstance(data, Int8Data):
        return "int8", 0
    return ("nf4-nested" if data.nested else "nf4"), data.blocksize


@dataclass(frozen=True)
class NF4Data:
    """An N x K weight in NF4. Either `absmax` (fp32, one per block) or the nested triple
    (`qabsmax` uint8, `code2` fp32[256], `absmax2` fp32) with `offset` is set."""
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


@dataclass(frozen=True)
class Int8Data:
    """An N x K weight as int8 with one fp32 scale per output row."""
    shape: tuple  # (N, K)
    qweight: torch.Tensor  # int8, N x K
    scale: torch.Tensor  # fp32[N]

    def dequantize_rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop-1 of W in fp32."""
        return self.qweight[start:stop].float() * self.scale[start:stop, None].float()
