"""Autotuning configurations for the kernels, per GPU architecture, and their pruning.

Lists are small on purpose (Triton tutorial 06 style): a handful of tiles known to suit Hopper
(sm_90: 228 KiB of shared memory per block) and Ampere (sm_80: 163 KiB). Configs whose shared
memory estimate does not fit, given the LoRA rank's epilogue tiles, are pruned before tuning;
tests/test_kernel_compile.py compiles every config that survives for sm_90 and sm_80 and checks
the real shared-memory use against the limits. Under TRITON_INTERPRET=1 a single small config is
used (the interpreter cannot benchmark several).
"""
from __future__ import annotations

import triton

from ..backends import interpreting

SMEM_LIMIT = {90: 232_448, 80: 166_912}  # bytes per block (opt-in maximum)


def _cfg(bm, bn, bk, warps, stages, group=8):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": group},
                         num_warps=warps, num_stages=stages)


# The two GEMMs with a LoRA epilogue: forward (Y = x W^T ...) and backward (dX = dY W ...).
_GEMM = {
    90: [_cfg(128, 256, 64, 8, 3), _cfg(256, 128, 64, 8, 3), _cfg(128, 128, 64, 8, 4), _cfg(64, 128, 64, 4, 4),
         _cfg(64, 64, 32, 4, 2)],
    80: [_cfg(128, 256, 32, 8, 3), _cfg(128, 128, 32, 4, 4), _cfg(64, 128, 32, 4, 4), _cfg(64, 64, 32, 4, 2)],
}
# Memory-bound passes over x (shrink: H = (D x) A^T) and over dY (G = s dY B, dB = s dY^T H).
_PASS = {
    90: [_cfg(64, 64, 128, 4, 3), _cfg(128, 64, 64, 8, 3), _cfg(32, 64, 128, 4, 3), _cfg(32, 32, 32, 4, 2)],
    80: [_cfg(64, 64, 64, 4, 3), _cfg(128, 64, 64, 8, 3), _cfg(32, 64, 128, 4, 3), _cfg(32, 32, 32, 4, 2)],
}
_INTERPRETER = [_cfg(32, 32, 32, 4, 1, group=2)]


def gemm_configs(arch: int) -> list:
    return list(_INTERPRETER) if interpreting() else list(_GEMM[arch])


def pass_configs(arch: int) -> list:
    return list(_INTERPRETER) if interpreting() else list(_PASS[arch])


def gemm_smem_estimate(cfg, block_r: int, elt: int) -> int:
    """Pipelined operand tiles, or the epilogue's rank tiles: an estimate for pruning (the compile test has the truth)."""
    k = cfg.kwargs
    main = (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"] * elt * cfg.num_stages
    epilogue = (k["BLOCK_M"] + k["BLOCK_N"]) * block_r * elt
    return max(main, epilogue + k["BLOCK_M"] * k["BLOCK_N"] * 4 // 2)


def pass_smem_estimate(cfg, block_r: int, elt: int, stream: str) -> int:
    """A pass streams BLOCK_M x <stream> tiles of x or dY and <stream> x BLOCK_R tiles of A or B,
    holds a BLOCK_M x BLOCK_R tile, and (dy) stages a <stream> x BLOCK_R fp32 partial for atomics."""
    k = cfg.kwargs
    s = k[stream]
    return (k["BLOCK_M"] * s + s * block_r) * elt * cfg.num_stages + k["BLOCK_M"] * block_r * elt + s * block_r * 4


def keep_fitting(configs, estimate, block_r: int, elt: int, arch: int) -> list:
    """Configs whose estimate fits the architecture, with a margin for what the estimate misses.
    Each list ends with a small config that fits at every rank, so none comes back empty."""
    limit = SMEM_LIMIT[arch] * 0.85
    kept = [c for c in configs if estimate(c, block_r, elt) <= limit]
    if not kept:
        raise ValueError(f"no config fits sm_{arch} at BLOCK_R={block_r}: the config lists need a smaller entry")
    return kept


KERNELS = ("shrink", "forward", "dy", "dx_da")


def candidates(kernel_name: str, arch: int, block_r: int, elt: int) -> list:
    """Every config the autotuner may pick for this kernel, architecture, padded rank, element size."""
    if kernel_name in ("forward", "dx_da"):
        return keep_fitting(gemm_configs(arch), gemm_smem_estimate, block_r, elt, arch)
    if kernel_name in ("shrink", "dy"):
        stream = "BLOCK_K" if kernel_name == "shrink" else "BLOCK_N"
        estimate = lambda c, r, e: pass_smem_estimate(c, r, e, stream)  # noqa: E731
        return keep_fitting(pass_configs(arch), estimate, block_r, elt, arch)
    raise KeyError(kernel_name)
