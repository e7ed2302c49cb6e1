"""What an op is asked to compute, as far as choosing an implementation goes, and its tuning key."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Union

import torch

from ..core.op_kinds import Op


def pow2_bucket(n: int, floor: int = 16) -> int:
    """The power of two at or above n (at least `floor`): sizes that share tuned choices."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class Problem:
    """What an op is asked to compute, as far as choosing an implementation goes.

    op: the op (`core.op_kinds.Op`: base, adapters, variant, direction; its short name, e.g. "multi_fwd",
    is accepted too); x is M x K, W is N x K, the LoRA rank is `rank` (several adapters: the largest);
    `dropout` whether p > 0; `grads`: for backward, the gradients asked for, among ("dx", "lora", "dW",
    "db"); `base`, `blocksize`: a quantized base's layout (`core.formats.layout_name`: other kernels, so
    tuned apart), "" for a 16-bit one; for the grouped op (op.base "experts") the expert stack's layout,
    "experts" for (E, N, K) or "experts_t" for (E, K, N), and `groups` its number of experts E (0 otherwise).
    """
    op: Union[Op, str]
    device: torch.device
    dtype: torch.dtype
    M: int
    N: int
    K: int
    rank: int
    dropout: bool = False
    grads: tuple = ()
    base: str = ""
    blocksize: int = 0
    groups: int = 0

    def __post_init__(self):
        if isinstance(self.op, str):
            object.__setattr__(self, "op", Op.named(self.op))

    def key(self) -> str:
        """The tuning key within one device: M and the rank by power-of-two bucket."""
        key = (f"{self.op.name} {str(self.dtype).replace('torch.', '')} M{pow2_bucket(self.M)} N{self.N} K{self.K} "
               f"r{pow2_bucket(self.rank)} dropout={'on' if self.dropout else 'off'}")
        if self.op.backward and self.op.variant != "dora":  # DoRA's backward computes every gradient it is given
            key += " grads=" + ("+".join(self.grads) or "none")
        if self.base:
            key += f" base={self.base}" + (f"/{self.blocksize}" if self.blocksize else "")
        if self.groups:
            key += f" E{self.groups}"
        return key

    def forward_twin(self) -> "Problem":
        """The forward problem whose backward this is."""
        return dataclasses.replace(self, op=self.op.forward_twin(), grads=())
