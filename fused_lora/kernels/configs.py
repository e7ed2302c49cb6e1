"""Autotuning configurations for the kernels, per GPU architecture, and their pruning.

Lists are small on purpose (Triton tutorial 06 style): a handful of tiles known to suit Hopper
(sm_90: 228 KiB of shared memory per block) and Ampere (sm_80: 163 KiB). For each kernel variant
(padded rank, element size, dropout) the configs whose shared-memory and register estimates fit
are kept: at most two per GEMM, one per memory-bound pass. The static gate
(`python -m fused_lora.kernels.compile_check`, tests/kernels/test_compile_gate.py) compiles every one
that survives for sm_90 and sm_80 and holds it to the real shared memory, and for sm_90 to no
register spill and no ptxas performance advisory. Under TRITON_INTERPRET=1 a single small config
is used (the interpreter cannot benchmark several).
"""
from __future__ import annotations

import triton

from ..core.interpreter import interpreting
from ..core.limits import MAX_TRITON_MULTI_RANK

SMEM_LIMIT = {90: 232_448, 80: 166_912}  # bytes per block (opt-in maximum)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# The two GEMMs with a LoRA term: forward (Y = x W^T ...) and backward (dX = dY W ...). Each list
# ends with small tiles that fit every rank, dtype and flag (the pruning below picks per variant).
_GEMM = {
    90: [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4), _cfg(64, 64, 32, 4, 2),
         _cfg(64, 64, 32, 8, 2), _cfg(32, 32, 32, 4, 2)],
    80: [_cfg(128, 256, 32, 8, 3), _cfg(128, 128, 32, 8, 3), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 2),
         _cfg(64, 64, 32, 8, 2), _cfg(32, 32, 32, 4, 2)],
}
# Memory-bound passes over x (shrink: H = (D x) A^T) and over dY (G = s dY B, dB = s dY^T H): the
# first config that fits is used (no tuning: the tile hardly matters to a bandwidth-bound pass).
# The shrink pass with dropout, and the dY pass at the largest rank tiles, keep to BLOCK_M = 32
# (mma.sync): with Hopper's wgmma, ptxas serializes their MMAs (advisory C7515: the masked x tile
# is a register operand; the dB partial's registers run out), the latter on 8 warps (on 4, triton
# 3.9 caps it at 128 registers and it spills). The shrink pass keeps to 4 warps: at 8, triton 3.6
# gets the C7515 advisory.
_PASS = {
    90: [_cfg(64, 64, 128, 4, 3), _cfg(32, 64, 128, 4, 3), _cfg(32, 32, 32, 4, 2),
         _cfg(32, 32, 32, 8, 2)],
    80: [_cfg(64, 64, 64, 4, 3), _cfg(32, 64, 128, 4, 3), _cfg(32, 32, 32, 4, 2),
         _cfg(32, 32, 32, 8, 2)],
}
MAX_GEMM_CANDIDATES = 2  # autotuning candidates per GEMM variant: the largest tiles that fit
_INTERPRETER = [_cfg(32, 32, 32, 4, 1, group=2)]


def gemm_configs(arch: int) -> list:
    return list(_INTERPRETER) if interpreting() else list(_GEMM[arch])


def pass_configs(arch: int) -> list:
    return list(_INTERPRETER) if interpreting() else list(_PASS[arch])


def gemm_smem_estimate(cfg, block_r: int, elt: int) -> int:
    """Pipelined operand tiles plus the rank tiles of the low-rank product (both are allocated at
    once: the main loop's first loads are in flight while the low-rank product runs)."""
    k = cfg.kwargs
    main = (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elt * cfg.num_stages
    return main + (k["BLOCK_M"] + k["BLOCK_N"]) * block_r * elt


def pass_smem_estimate(cfg, block_r: int, elt: int, stream: str) -> int:
    """A pass streams BLOCK_M x <stream> tiles of x or dY and <stream> x BLOCK_R tiles of A or B,
    holds a BLOCK_M x BLOCK_R tile, and (dy) stages a <stream> x BLOCK_R fp32 partial of dB."""
    k = cfg.kwargs
    s = k[stream]
    return (k["BLOCK_M"] * s + s * block_r) * elt * cfg.num_stages + k["BLOCK_M"] * block_r * elt + s * block_r * 4


# 32-bit registers per thread the estimates below may use: ptxas caps a thread at 255, and the
# estimates leave out addresses, masks and loop state.
REG_BUDGET = 200


def gemm_regs_estimate(cfg, block_r: int, elt: int, dropout: bool) -> float:
    """Per thread: the fp32 accumulator, the rank tiles, and (dropout) the tile's Philox numbers."""
    k, threads = cfg.kwargs, 32 * cfg.num_warps
    tile = k["BLOCK_M"] * k["BLOCK_N"]
    return (tile * (2 if dropout else 1) + (k["BLOCK_M"] + k["BLOCK_N"]) * block_r * elt / 4) / threads


def pass_regs_estimate(cfg, block_r: int, elt: int, kernel_name: str) -> float:
    """Per thread: the fp32 BLOCK_M x BLOCK_R accumulator and rank tile, and (dy) the fp32
    BLOCK_N x BLOCK_R partial of dB and the B tile."""
    k, threads = cfg.kwargs, 32 * cfg.num_warps
    partial = k["BLOCK_N"] * block_r * (1 + elt / 4) if kernel_name == "dy" else 0
    return (k["BLOCK_M"] * block_r * (1 + elt / 4) + partial) / threads


def keep_fitting(configs, estimate, block_r: int, elt: int, arch: int, regs=None) -> list:
    """Configs whose shared-memory estimate fits the architecture (with a margin for what the
    estimate misses) and whose register estimate fits REG_BUDGET. None may come back empty."""
    limit = SMEM_LIMIT[arch] * 0.85
    kept = [c for c in configs if estimate(c, block_r, elt) <= limit and (regs is None or regs(c) <= REG_BUDGET)]
    if not kept:
        raise ValueError(f"no config fits sm_{arch} at BLOCK_R={block_r}: the config lists need a smaller entry")
    return kept


KERNELS = ("shrink", "forward", "dy", "dx_da", "dora_forward", "dora_dy")


def candidates(kernel_name: str, arch: int, block_r: int, elt: int, dropout: bool = False) -> list:
    """Every config the autotuner may pick for this kernel, architecture, padded rank, element size
    and dropout (on or off: it changes the code of shrink and dx_da)."""
    if interpreting():
        return list(_INTERPRETER)
    if kernel_name in ("dora_forward", "dora_dy"):  # DoRA's variants: the LoRA kernel's first choice only
        return candidates(kernel_name[len("dora_"):], arch, block_r, elt)[:1]
    if kernel_name in ("forward", "dx_da"):
        dropout = dropout and kernel_name == "dx_da"
        regs = lambda c: gemm_regs_estimate(c, block_r, elt, dropout)  # noqa: E731
        kept = keep_fitting(gemm_configs(arch), gemm_smem_estimate, block_r, elt, arch, regs)
        return kept[:MAX_GEMM_CANDIDATES]
    if kernel_name in ("shrink", "dy"):
        stream = "BLOCK_K" if kernel_name == "shrink" else "BLOCK_N"
        estimate = lambda c, r, e: pass_smem_estimate(c, r, e, stream)  # noqa: E731
        regs = lambda c: pass_regs_estimate(c, block_r, elt, kernel_name)  # noqa: E731
        configs = pass_configs(arch)
        if kernel_name == "shrink":
            configs = [c for c in configs if c.num_warps == 4 and (c.kwargs["BLOCK_M"] == 32 or not dropout)]
        if kernel_name == "dy" and block_r * elt >= 512:
            configs = [c for c in configs if c.kwargs["BLOCK_M"] == c.kwargs["BLOCK_N"] == 32 and c.num_warps == 8]
        return keep_fitting(configs, estimate, block_r, elt, arch, regs)[:1]
    raise KeyError(kernel_name)


# ---- several adapters in one batch (kernels/segments/)
# One config per variant, no autotuning: the tile table (row tiles that never cross an adapter's
# rows) is built for the kernel's BLOCK_M before launch. The config is the single-adapter kernel's
# first (largest) fitting one. Two padded ranks only (ranks up to 32 pad to 32, up to 128 to 128)
# and 16-bit dtypes on a GPU, to keep the compile gate's added variants near 64.
MULTI_KERNELS = ("multi_shrink", "multi_forward", "multi_dy", "multi_dx_da")
MULTI_BLOCK_RS = (32, MAX_TRITON_MULTI_RANK)  # the largest is core.limits' (a power of two): the rank the table refuses past
MAX_MULTI_RANK = MULTI_BLOCK_RS[-1]
_MULTI_BASE = {"multi_shrink": "shrink", "multi_forward": "forward", "multi_dy": "dy", "multi_dx_da": "dx_da"}


def multi_block_r(rank: int) -> int:
    """The padded rank (BLOCK_R) of the multi-adapter kernels for a largest rank `rank`."""
    return next(b for b in MULTI_BLOCK_RS if rank <= b) if rank <= MAX_MULTI_RANK else rank


def multi_config(kernel_name: str, arch: int, block_r: int, elt: int, dropout: bool = False):
    """The one config a multi-adapter kernel runs with (the interpreter's small one when interpreting)."""
    if interpreting():
        return _INTERPRETER[0]
    kept = candidates(_MULTI_BASE[kernel_name], arch, block_r, elt, dropout)
    # dX/dA with dropout at BLOCK_R = 32: the 128 x 128 tile plus the row gather spills on sm_90
    # under triton 3.6 (255 registers); the next candidate (64 x 128, 4 warps) compiles clean.
    if kernel_name == "multi_dx_da" and dropout and block_r == 32:
        return kept[min(1, len(kept) - 1)]
    return kept[0]
# ---- The Hopper path (kernels/hopper/tma.py: forward_tma, dx_tma; kernels/hopper/one_pass.py: forward_one_pass).
# 128x256 tiles (8 warps, 3 stages; the TMA kernels store them in two halves) fit at BLOCK_R = 16;
# larger ranks get 128x128 (4 stages).
# Rows of their own in fused_lora.dispatch.table, timed against the pointer kernels; sm_90 only, bf16 and
# fp16, padded rank <= 64 (the static gate compiles each (dtype, rank, flags) once: one config per
# variant keeps these three kernels to 60 variants). fp32 and larger ranks run on the pointer rows.
HOPPER_KERNELS = ("forward_tma", "dx_tma", "forward_one_pass")
HOPPER_ARCH = 90
HOPPER_ELT = 2
HOPPER_MAX_BLOCK_R = 64
_HOPPER = {
    "forward_tma": [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4)],
    "dx_tma": [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4)],
    "forward_one_pass": [_cfg(128, 256, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4)],
}
# dX with dropout: the keep mask and the masked x tile of the dA partial, beside the persistent
# loop's state, take 128x128 (8 warps) to 255 registers and spill at BLOCK_R = 32 under triton
# 3.9 (and 128x64x32 at 64 under 3.6); 128x64x64 on one warpgroup, 3 stages, is clean under both.
_HOPPER_DROPOUT = {"dx_tma": [_cfg(128, 64, 64, 4, 3)]}


def hopper_smem_estimate(cfg, block_r: int, elt: int, kernel_name: str) -> int:
    """The GEMM estimate, plus (TMA kernels) the output tile staged in shared memory for the TMA
    store (half of it for 256-wide tiles, stored in two halves), plus (one-pass) the pipelined A^T
    tiles of the in-loop H product."""
    k = cfg.kwargs
    extra = 0
    if kernel_name in ("forward_tma", "dx_tma"):
        extra = k["BLOCK_M"] * k["BLOCK_N"] * elt // (2 if k["BLOCK_N"] >= 256 else 1)
    else:
        extra = k["BLOCK_K"] * block_r * elt * cfg.num_stages
    return gemm_smem_estimate(cfg, block_r, elt) + extra


def hopper_regs_estimate(cfg, block_r: int, elt: int, kernel_name: str, dropout: bool) -> float:
    """The GEMM estimate, plus (one-pass) the fp32 BLOCK_M x BLOCK_R accumulator of H."""
    extra = cfg.kwargs["BLOCK_M"] * block_r / (32 * cfg.num_warps) if kernel_name == "forward_one_pass" else 0
    return gemm_regs_estimate(cfg, block_r, elt, dropout) + extra


def tma_candidates(kernel_name: str, arch: int, block_r: int, elt: int, dropout: bool = False) -> list:
    """The one config a Hopper-path kernel runs with for this variant (a list, as `candidates`)."""
    if kernel_name not in _HOPPER:
        raise KeyError(kernel_name)
    if interpreting():
        return list(_INTERPRETER)
    dropout = dropout and kernel_name != "forward_tma"
    smem = lambda c, r, e: hopper_smem_estimate(c, r, e, kernel_name)  # noqa: E731
    regs = lambda c: hopper_regs_estimate(c, block_r, elt, kernel_name, dropout)  # noqa: E731
    configs = _HOPPER_DROPOUT.get(kernel_name, _HOPPER[kernel_name]) if dropout else _HOPPER[kernel_name]
    return keep_fitting(configs, smem, block_r, elt, arch, regs)[:1]
# The GEMMs over a quantized frozen base (kernels/quantized/quant_forward.py, quant_backward.py): the W tile
# of each step is dequantized in registers by every thread, so its cost per FLOP falls with the
# rows sharing it: 256 rows (on sm_90, NF4 aligned to its blocks, about 210 non-MMA instructions
# per warp per 32-deep step, which 2 warps per sub-partition issue in less than the step's 512
# tensor-core cycles: benchmarks/static_loop.py; 128 rows would leave the dequantization exposed). The forward's BLOCK_K and the dX kernel's BLOCK_N are the run of a W row
# dequantized at once: at most 64 and 128 (quant_tiles bounds the absmax blocks a run crosses).
# One config per variant (the gate's budget): the first that fits.
_QUANT_GEMM = {
    "quant_forward": {
        90: [_cfg(256, 128, 32, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(64, 64, 32, 4, 2)],
        80: [_cfg(128, 128, 32, 8, 3), _cfg(64, 64, 32, 4, 2)],
    },
    "quant_dx": {
        90: [_cfg(256, 128, 32, 8, 4), _cfg(128, 128, 64, 8, 3), _cfg(64, 64, 32, 4, 2)],
        80: [_cfg(128, 128, 32, 8, 3), _cfg(64, 64, 32, 4, 2)],
    },
}
QUANT_KERNELS = tuple(_QUANT_GEMM)
QUANT_RANK_STEP = 16  # the rank chunk of the quantized GEMMs' low-rank term (a loop, any rank)


def quant_smem_estimate(cfg, block_r: int, elt: int) -> int:
    """Pipelined activation tiles and packed W bytes (int8 size: an upper bound for NF4), the
    dequantized W tile staged for the dot, and the rank chunks of the low-rank product."""
    k = cfg.kwargs
    w = k["BLOCK_N"] * k["BLOCK_K"]
    stream = (k["BLOCK_M"] * k["BLOCK_K"] * elt + w) * cfg.num_stages
    return stream + w * elt + (k["BLOCK_M"] + k["BLOCK_N"]) * QUANT_RANK_STEP * elt


def quant_regs_estimate(cfg, elt: int) -> float:
    """Per thread: the fp32 accumulator and the W tile's levels and scales (fp32, about 1.5 values
    per element with 16-bit inputs, 2 with fp32)."""
    k, threads = cfg.kwargs, 32 * cfg.num_warps
    return (k["BLOCK_M"] * k["BLOCK_N"] + (1 + elt / 4) * k["BLOCK_N"] * k["BLOCK_K"]) / threads


def quant_candidates(kernel_name: str, arch: int, elt: int) -> list:
    """The config a quantized-base GEMM uses for this architecture and element size."""
    if interpreting():
        return list(_INTERPRETER)
    regs = lambda c: quant_regs_estimate(c, elt)  # noqa: E731
    configs = _QUANT_GEMM[kernel_name][arch]
    if kernel_name == "quant_dx" and elt == 4:
        # fp32 keeps 128 x 128: with the D (G A) tile read into the accumulator (LOW_RANK_IN_DX),
        # 256 x 128 spilled (sm_90, 3.9) in the transposed kernel; not re-tried since dX = dY W.
        configs = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]
    return keep_fitting(configs, quant_smem_estimate, 0, elt, arch, regs)[:1]


# The one-launch dequantization of a whole quantized weight (kernels/quantized/dequantize.py): no loop and no
# dot, a copy bound by memory (0.5 byte read and 2 written per NF4 element in 16 bits). A tile of 32 rows x
# 256 columns (8 KB written in 16 bits, 64 elements a thread at 4 warps); for NF4 blocks of 32 elements a
# tile of 128 rows x 32 columns, each row's run one block (the aligned tile loader's rule: a run of
# min(BLOCK_K, 64) columns lies in one block). The same configs under the interpreter.
DEQUANT_KERNELS = ("dequantize",)
DEQUANT_WIDE = triton.Config({"BLOCK_N": 32, "BLOCK_K": 256}, num_warps=4, num_stages=1)
DEQUANT_NARROW = triton.Config({"BLOCK_N": 128, "BLOCK_K": 32}, num_warps=4, num_stages=1)
DEQUANT_NARROW_BLOCKSIZE = 32  # NF4 blocks this small take DEQUANT_NARROW (aligned weights only)


def dequant_configs(aligned_nf4: bool) -> list:
    """The configs the one-launch dequantization may run with: DEQUANT_WIDE for every weight, and for NF4
    whose rows are whole blocks DEQUANT_NARROW too (taken for blocks of DEQUANT_NARROW_BLOCKSIZE)."""
    return [DEQUANT_WIDE, DEQUANT_NARROW] if aligned_nf4 else [DEQUANT_WIDE]


# ---- LoRA on expert weights (kernels/grouped/): the segment kernels over an expert stack, and its gradients.
# The (E, N, K) stack compiles as a mixed batch's weight does (unit stride along K); the transposed (E, K, N)
# stack (unit stride along N) is a variant of its own for the two kernels that read W: "grouped_forward_t"
# and "grouped_dx_da_t" (the segment kernels' configs). dW_e (grouped_wgrad: a GEMM over each expert's rows,
# one 128 x 128 output tile per program) and db_e (grouped_colsum, memory-bound) run only when the base is
# trained. 16-bit dtypes on a GPU and the segment kernels' two padded ranks, as for a mixed batch.
GROUPED_KERNELS = ("grouped_forward_t", "grouped_dx_da_t", "grouped_wgrad", "grouped_colsum")
GROUPED_SEGMENT_KERNELS = {"grouped_forward_t": "multi_forward", "grouped_dx_da_t": "multi_dx_da"}
_GROUPED = {
    "grouped_wgrad": {90: _cfg(128, 128, 64, 8, 3), 80: _cfg(128, 128, 32, 8, 3)},
    "grouped_colsum": {arch: triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=2)
                       for arch in (90, 80)},
}


def grouped_config(kernel_name: str, arch: int, block_r: int = 0, elt: int = 2, dropout: bool = False):
    """The one config a grouped-op kernel runs with (the interpreter's small one when interpreting); the
    transposed-layout variants of the segment kernels take those kernels' configs."""
    if kernel_name in GROUPED_SEGMENT_KERNELS:
        return multi_config(GROUPED_SEGMENT_KERNELS[kernel_name], arch, block_r, elt, dropout)
    if kernel_name == "grouped_colsum" and interpreting():
        return triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)
    return _INTERPRETER[0] if interpreting() else _GROUPED[kernel_name][arch]
