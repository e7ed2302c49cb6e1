"""Launch helpers every kernel family shares: the padded rank, the autotuning bucket of M, the
config family of a device, the partial-sum slots a launch needs and wrote, the grids, and the
column chunk of the dY pass. Plain functions of sizes and configs: no kernel is imported here.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from . import configs

__all__ = ["block_r", "m_bucket", "arch_of", "row_blocks", "row_blocks_used", "rows_grid", "tiles_grid", "dy_chunk"]


def block_r(r: int) -> int:
    """The rank padded for tl.dot: a power of two, at least 16 (padding rows/cols are masked to 0)."""
    return max(16, triton.next_power_of_2(r))


def m_bucket(M: int) -> int:
    """Autotuning key for M: its power-of-two bucket, so a new sequence length does not retune."""
    return max(16, triton.next_power_of_2(M))


@lru_cache(maxsize=None)
def _arch_of_index(index: int) -> int:
    major, _ = torch.cuda.get_device_capability(index)
    return 90 if major >= 9 else 80


def arch_of(device: torch.device) -> int:
    """Config family for a device: 90 (Hopper and newer) or 80 (Ampere/Ada); 90 under the interpreter."""
    if device.type != "cuda" or configs.interpreting():
        return 90
    return _arch_of_index(device.index if device.index is not None else torch.cuda.current_device())


def row_blocks(launcher, M: int) -> int:
    """Enough partial-sum slots for one per row block, whichever config the autotuner picks."""
    return triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in launcher.configs))


def row_blocks_used(launcher, M: int) -> int:
    """The slots the launch just made actually wrote: one per row block of the chosen config."""
    return triton.cdiv(M, launcher.best_config.kwargs["BLOCK_M"])


# The dY pass splits N into chunks (a multiple of every config's BLOCK_N) so that short inputs
# still give enough programs to fill a large GPU; each chunk adds one M x r partial of G.
_DY_CHUNK_UNIT = 256
_DY_TARGET_PROGRAMS = 1024


def dy_chunk(M: int, N: int) -> int:
    """Columns of dY per program of the dY pass: one chunk for tall inputs, more for short ones."""
    rows = triton.cdiv(M, 64)
    splits = max(1, min(triton.cdiv(_DY_TARGET_PROGRAMS, rows), triton.cdiv(N, _DY_CHUNK_UNIT)))
    return triton.cdiv(triton.cdiv(N, splits), _DY_CHUNK_UNIT) * _DY_CHUNK_UNIT


def rows_grid(M):
    """The grid of one program per BLOCK_M rows, for whichever config is launched."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def tiles_grid(M, N):
    """The grid of one program per BLOCK_M x BLOCK_N output tile, for whichever config is launched."""
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
