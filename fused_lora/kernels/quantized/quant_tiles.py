"""Dequantization of one tile of a quantized frozen weight, in registers, inside a GEMM's loop.

`dequant_tile` returns W[rows, col0 : col0 + COLS] in fp32 for W an N x K weight stored as
(fused_lora.core.formats):

- NF4, bitsandbytes' layout: the weight flattened row-major (element (n, k) is number f = n K + k),
  byte f // 2 holding element f in its high nibble when f is even, in its low nibble when f is
  odd; level = code[nibble]; one absmax per `blocksize` consecutive elements, fp32 or (NESTED)
  code2[qabsmax[j]] * absmax2[j // blocksize2] + offset.
- int8: qweight[n, k] * scale[n].

The column run of a row, COLS elements, is read as COLS // 2 byte pairs. When K is odd, rows
start on either nibble of a byte: an odd row takes its even-numbered elements from the low nibble
of byte j and its odd-numbered ones from the high nibble of byte j + 1 (a second load, masked
off on even rows, so even K costs one byte load per two elements).

A run of COLS <= 64 <= blocksize elements (COLS <= 128 in the dX kernel) crosses at most
COLS // 64 + 1 absmax blocks (MIN_BLOCKSIZE = 64, the launchers check it), so each row loads
that many absmax values (un-nested in the kernel: no fp32 copy of the absmax is made per call)
and each element selects its own with compares: no per-element absmax load.

When every row is a whole number of blocks (ALIGNED, the launcher's fact) the odd-row byte and
the compares go: each run of 64 columns starting at a multiple of 64 lies in one block, so one
absmax per row and run is scaled onto its levels (`_aligned_nf4`).

Elements outside the weight (rows >= N, columns >= K) come out finite but not zero: the other
dot operand is zero there (masked x or dY), or the output there is not stored.
"""
import torch
import triton
import triton.language as tl

from ...core.limits import KERNEL_MIN_BLOCKSIZE

MIN_BLOCKSIZE = KERNEL_MIN_BLOCKSIZE  # the smallest NF4 blocksize the kernels take (the backends table refuses less)


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """fp32 (256, 2): row b holds (code[b >> 4], code[b & 15]), the levels of byte b's two nibbles."""
    code = code.float()
    return torch.stack((code[:, None].expand(16, 16), code[None, :].expand(16, 16)), dim=-1).reshape(256, 2)


@triton.jit
def _absmax_at(j, valid, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, bs2_shift, offset, NESTED: tl.constexpr):
    """fp32 absmax of blocks j (an int64 vector), 0 where not valid."""
    if NESTED:
        q = tl.load(qabsmax_ptr + j, mask=valid, other=0)
        am = tl.load(code2_ptr + q) * tl.load(absmax2_ptr + (j >> bs2_shift), mask=valid, other=0.0) + offset
        return tl.where(valid, am, 0.0)
    else:
        return tl.load(absmax_ptr + j, mask=valid, other=0.0)


@triton.jit
def dequant_tile(
    q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
    offs_row, row_in, col0, C, C_HALF, C_ODD, bs_shift, bs2_shift, n_blocks, offset,
    QUANT: tl.constexpr, NESTED: tl.constexpr, COLS: tl.constexpr, ALIGNED: tl.constexpr = False,
):
    """fp32 tile W[offs_row, col0 : col0 + COLS] of a row-major weight with rows of C elements.

    QUANT "nf4": q_ptr packed uint8, code_ptr fp32[256 x 2] the pair table (`pair_table`), absmax_ptr fp32 per block or (NESTED)
    qabsmax_ptr uint8 per block, code2_ptr fp32[256], absmax2_ptr fp32 per blocksize2 blocks;
    blocksize = 2 ** bs_shift, blocksize2 = 2 ** bs2_shift, n_blocks the number of blocks,
    C_HALF = C // 2, C_ODD = C % 2 (separate arguments: the byte offsets then keep the alignment
    the JIT knows of C_HALF, so even rows load as vectors). QUANT "int8": q_ptr int8 N x C,
    absmax_ptr the fp32 scale per row (the other pointers and sizes unused). col0 is even.

    ALIGNED (NF4; the launcher's fact): C is a multiple of the blocksize and col0 of min(COLS, 64).
    Every row then starts a block on a byte, and each run of 64 columns lies in one block: no
    odd-row byte, one absmax per row and 64-column run, no per-element compares (`_aligned_nf4`)."""
    cols = col0 + tl.arange(0, COLS)
    if QUANT == "int8":
        ptrs = q_ptr + offs_row.to(tl.int64)[:, None] * C + cols[None, :]
        q = tl.load(ptrs, mask=row_in[:, None] & (cols < C)[None, :], other=0)
        scale = tl.load(absmax_ptr + offs_row, mask=row_in, other=0.0)
        return q.to(tl.float32) * scale[:, None]
    elif ALIGNED:
        return _aligned_nf4(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, offs_row, row_in,
                            col0, C, C_HALF, bs_shift, bs2_shift, offset, NESTED, COLS)
    else:
        rows = offs_row.to(tl.int64)
        f0 = rows * C + col0  # flat index of each row's first element
        odd = ((rows * C_ODD) & 1)[:, None] == 1  # whether it sits in a low nibble (col0 is even)
        # Pair i holds columns col0 + 2i (inside when i < ceil((C - col0) / 2)) and col0 + 2i + 1
        # (when i < floor((C - col0) / 2)), bounds written with C_HALF to keep their alignment.
        pair = tl.arange(0, COLS // 2)
        in_even = row_in[:, None] & (pair < C_HALF - (col0 >> 1) + C_ODD)[None, :]
        in_odd = row_in[:, None] & (pair < C_HALF - (col0 >> 1))[None, :]
        # Byte f0 // 2, written so that the JIT sees its alignment when C is even.
        byte_ptrs = q_ptr + (rows * C_HALF + (rows >> 1) * C_ODD + (col0 >> 1))[:, None] + pair[None, :]
        b0 = tl.load(byte_ptrs, mask=in_even, other=0)
        b1 = tl.load(byte_ptrs + 1, mask=in_odd & odd, other=0)
        # The two nibbles of pair i, first in the high half, make a byte that indexes the pair
        # table: one 8-byte lookup (two fp32 levels) per two elements.
        pair_code = tl.where(odd, ((b0 & 15) << 4) | (b1 >> 4), b0)
        both = tl.load(code_ptr.to(tl.pointer_type(tl.int64)) + pair_code)
        level_even = (both & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
        level_odd = (both >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
        level = tl.reshape(tl.join(level_even, level_odd), (offs_row.shape[0], COLS))
        # Per row, the absmax of the block holding its first element, then the next blocks' where
        # they start inside the run.
        j0 = f0 >> bs_shift
        scale = _absmax_at(j0, row_in, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, bs2_shift, offset, NESTED)
        scale = tl.broadcast_to(scale[:, None], (offs_row.shape[0], COLS))
        local = tl.arange(0, COLS)[None, :]
        for t in tl.static_range(1, (COLS + 63) // 64 + 1):  # 64 = MIN_BLOCKSIZE
            j = j0 + t
            start = tl.minimum((j << bs_shift) - f0, COLS).to(tl.int32)  # first column of block j in the run
            am = _absmax_at(j, row_in & (j < n_blocks), absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr,
                            bs2_shift, offset, NESTED)
            scale = tl.where(local >= start[:, None], am[:, None], scale)
        return level * scale


@triton.jit
def _pair_levels(q_ptr, code_ptr, byte_offs, valid, ROWS: tl.constexpr, COLS: tl.constexpr):
    """fp32 levels of the ROWS x COLS // 2 bytes at q_ptr + byte_offs (two nibbles each, the high
    one first): one 8-byte pair-table lookup per byte, the pair spread back to COLS columns."""
    byte = tl.load(q_ptr + byte_offs, mask=valid, other=0)
    both = tl.load(code_ptr.to(tl.pointer_type(tl.int64)) + byte)
    level_even = (both & 0xFFFFFFFF).to(tl.uint32).to(tl.float32, bitcast=True)
    level_odd = (both >> 32).to(tl.uint32).to(tl.float32, bitcast=True)
    return tl.reshape(tl.join(level_even, level_odd), (ROWS, COLS))


@triton.jit
def _aligned_nf4(q_ptr, code_ptr, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, offs_row, row_in,
                 col0, C, C_HALF, bs_shift, bs2_shift, offset, NESTED: tl.constexpr, COLS: tl.constexpr):
    """dequant_tile's NF4 case when C % blocksize == 0 and col0 % min(COLS, 64) == 0: rows start on
    a byte, so one byte load per two columns; a run of RUN = min(COLS, 64) <= blocksize columns
    from a multiple of RUN lies in one block, so each row needs COLS // RUN absmax values, one per
    run (un-nested once per row and run), and no element compares its column with a boundary."""
    RUN: tl.constexpr = 64 if COLS > 64 else COLS
    ROWS: tl.constexpr = offs_row.shape[0]
    rows = offs_row.to(tl.int64)
    pair = tl.arange(0, COLS // 2)
    # C is even here (a multiple of the blocksize): every column pair is inside or outside together.
    valid = row_in[:, None] & (pair < C_HALF - (col0 >> 1))[None, :]
    level = _pair_levels(q_ptr, code_ptr, (rows * C_HALF + (col0 >> 1))[:, None] + pair[None, :], valid, ROWS, COLS)
    f0 = rows * C + col0  # flat index of each row's first element
    if COLS == RUN:
        scale = _absmax_at(f0 >> bs_shift, row_in, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, bs2_shift,
                           offset, NESTED)
        return level * scale[:, None]
    else:
        run = tl.arange(0, COLS // RUN)
        j = (f0[:, None] + (run * RUN)[None, :]) >> bs_shift  # ROWS x runs: the block of each run
        run_in = row_in[:, None] & ((col0 + run * RUN) < C)[None, :]
        scale = _absmax_at(j, run_in, absmax_ptr, qabsmax_ptr, code2_ptr, absmax2_ptr, bs2_shift, offset, NESTED)
        level = tl.reshape(level, (ROWS, COLS // RUN, RUN))
        return tl.reshape(level * scale[:, :, None], (ROWS, COLS))
