"""Autotuning configurations for the kernels, per GPU architecture, and their pruning.

Lists are small on purpose (Triton tutorial 06 style): a handful of tiles known to suit Hopper
(sm_90: 228 KiB of shared memory per block) and Ampere (sm_80: 163 KiB). For each kernel variant
(padded rank, element size, dropout) the configs whose shared-memory and register estimates fit
are kept: at most two per GEMM, one per memory-bound pass. The static gate
(`python -m fused_lora.kernels.compile_check`, tests/test_kernel_compile.py) compiles every one
that survives for sm_90 and sm_80 and holds it to the real shared memory, and for sm_90 to no
register spill and no ptxas performance advisory. Under TRITON_INTERPRET=1 a single small config
is used (the interpreter cannot benchmark several).
"""
from __future__ import annotations

import triton

from ..interpreter import interpreting

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
