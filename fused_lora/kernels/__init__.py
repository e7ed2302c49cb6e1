"""The Triton backend: launchers with the same interface as `fused_lora.torch_impl`.

    forward(x, W, b, A, B, s, p, seed) -> (Y, H)
    backward(dY, x, W, A, B, H, s, p, seed, need_dx, need_lora, need_dw, need_db) -> (dx, dA, dB, dW, db)
    keep_mask(seed, (M, K), p, device) -> the boolean dropout mask the kernels use

Importing this module imports triton; `fused_lora.ops` imports it only when the Triton backend
is chosen.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from . import configs
from .backward import lora_dx_da_kernel, lora_dy_kernel
from .dropout import keep_mask, keep_threshold
from .forward import lora_forward_kernel, lora_shrink_kernel
from .. import torch_impl

__all__ = ["forward", "backward", "keep_mask", "block_r", "arch_of"]


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


_KERNELS = {  # name -> (jit function, autotuning key, buffers zeroed before each tuning run)
    "shrink": (lora_shrink_kernel, ["M_BUCKET", "K"], None),
    "forward": (lora_forward_kernel, ["M_BUCKET", "N", "K"], None),
    "dy": (lora_dy_kernel, ["M_BUCKET", "N"], ["db_ptr"]),
    "dx_da": (lora_dx_da_kernel, ["M_BUCKET", "N", "K", "HAS_DX", "HAS_DA"], ["da_ptr"]),
}


@lru_cache(maxsize=None)
def _tuned(kernel_name: str, arch: int, blk_r: int, elt: int):
    """The autotuned launcher for one kernel, architecture, padded rank and element size."""
    fn, key, zeroed = _KERNELS[kernel_name]
    return triton.autotune(configs.candidates(kernel_name, arch, blk_r, elt), key=key, reset_to_zero=zeroed)(fn)


def _launcher(kernel_name: str, x: torch.Tensor, r: int):
    return _tuned(kernel_name, arch_of(x.device), block_r(r), x.element_size())


def _rows_grid(M):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def _tiles_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def _degenerate(*sizes: int) -> bool:
    # Nothing to launch: torch ops give the exact empty / zero results for empty sizes.
    return min(sizes) == 0


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    if _degenerate(M, N, K):
        return torch_impl.forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed)
    h = torch.empty((M, r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    p = float(dropout_p)
    scale = 1.0 / (1.0 - p)
    _launcher("shrink", x, r)[_rows_grid(M)](
        x, lora_A, h, *x.stride(), *lora_A.stride(), *h.stride(),
        M, K, r, seed, keep_threshold(p), scale, m_bucket(M), HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
    _launcher("forward", x, r)[_tiles_grid(M, N)](
        x, weight, bias if bias is not None else y, h, lora_B, y,
        *x.stride(), *weight.stride(), *h.stride(), *lora_B.stride(), *y.stride(),
        M, N, K, r, float(scaling), m_bucket(M), HAS_BIAS=bias is not None, BLOCK_R=block_r(r))
    return y, h


def backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_dw, need_db):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    if _degenerate(M, N, K):
        return torch_impl.backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed,
                                   need_dx, need_lora, need_dw, need_db)
    p = float(dropout_p)
    scale = 1.0 / (1.0 - p)
    g = torch.empty((M, r), dtype=x.dtype, device=x.device)
    db32 = torch.zeros((N, r), dtype=torch.float32, device=x.device)
    _launcher("dy", x, r)[_rows_grid(M)](
        dy, lora_B, h, g, db32, *dy.stride(), *lora_B.stride(), *h.stride(), *g.stride(),
        M, N, r, float(scaling), m_bucket(M), BLOCK_R=block_r(r))
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    da32 = torch.zeros((r, K), dtype=torch.float32, device=x.device) if need_lora else None
    if need_dx or need_lora:
        _launcher("dx_da", x, r)[_tiles_grid(M, K)](
            dy, weight, g, lora_A, x, dx if need_dx else g, da32 if need_lora else g,
            *dy.stride(), *weight.stride(), *g.stride(), *lora_A.stride(), *x.stride(),
            *(dx.stride() if need_dx else (0, 0)),
            M, N, K, r, seed, keep_threshold(p), scale, m_bucket(M),
            HAS_DX=need_dx, HAS_DA=need_lora, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
    dA = da32.to(lora_A.dtype) if need_lora else None
    dB = db32.to(lora_B.dtype) if need_lora else None
    dW = torch.mm(dy.t(), x) if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, dA, dB, dW, db
