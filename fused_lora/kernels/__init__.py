"""The Triton backend: launchers with the same interface as `fused_lora.torch_impl`.

    forward(x, W, b, A, B, s, p, seed) -> (Y, H)
    backward(dY, x, W, A, B, H, s, p, seed, need_dx, need_lora, need_dw, need_db) -> (dx, dA, dB, dW, db)
    keep_mask(seed, (M, K), p, device) -> the boolean dropout mask the kernels use

Importing this module imports triton; `fused_lora.ops` imports it only when the Triton backend
is chosen. Inputs reach these launchers checked and non-empty (`fused_lora.ops` computes empty sizes
itself), so nothing here imports the rest of the package but `fused_lora.interpreter`.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from . import configs
from .backward import lora_dx_da_kernel, lora_dy_kernel
from .dropout import keep_mask, keep_threshold
from .forward import lora_forward_kernel, lora_shrink_kernel
from .reduce import sum_partials

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


_KERNELS = {  # name -> (jit function, autotuning key: every argument that changes the code or the work)
    "shrink": (lora_shrink_kernel, ["M_BUCKET", "K", "HAS_DROPOUT"]),
    "forward": (lora_forward_kernel, ["M_BUCKET", "N", "K", "HAS_BIAS"]),
    "dy": (lora_dy_kernel, ["M_BUCKET", "N", "N_CHUNK", "HAS_DB"]),
    "dx_da": (lora_dx_da_kernel, ["M_BUCKET", "N", "K", "HAS_DX", "HAS_DA", "HAS_DROPOUT"]),
}


@lru_cache(maxsize=None)
def _tuned(kernel_name: str, arch: int, blk_r: int, elt: int, dropout: bool):
    """The autotuned launcher for one kernel, architecture, padded rank, element size and dropout."""
    fn, key = _KERNELS[kernel_name]
    return triton.autotune(configs.candidates(kernel_name, arch, blk_r, elt, dropout), key=key)(fn)


def _launcher(kernel_name: str, x: torch.Tensor, r: int, dropout: bool = False):
    return _tuned(kernel_name, arch_of(x.device), block_r(r), x.element_size(), dropout)


def _row_blocks(launcher, M: int) -> int:
    """Enough partial-sum slots for one per row block, whichever config the autotuner picks."""
    return triton.cdiv(M, min(c.kwargs["BLOCK_M"] for c in launcher.configs))


def _row_blocks_used(launcher, M: int) -> int:
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


def _rows_grid(M):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),)


def _tiles_grid(M, N):
    return lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    h = shrink(x, lora_A, dropout_p, seed)
    return forward_gemm(x, weight, bias, h, lora_B, scaling), h


def shrink(x, lora_A, dropout_p, seed):
    """H = (D x) A^T (the shrink pass), in x's dtype."""
    M, K = x.shape
    r = lora_A.shape[0]
    h = torch.empty((M, r), dtype=x.dtype, device=x.device)
    p = float(dropout_p)
    _launcher("shrink", x, r, p > 0.0)[_rows_grid(M)](
        x, lora_A, h, *x.stride(), *lora_A.stride(), *h.stride(),
        M, K, r, seed, keep_threshold(p), 1.0 / (1.0 - p), m_bucket(M), HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
    return h


def forward_gemm(x, weight, bias, h, lora_B, scaling):
    """Y = x W^T + b + s H B^T with the pointer kernel."""
    M, K = x.shape
    N, r = weight.shape[0], h.shape[1]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    _launcher("forward", x, r)[_tiles_grid(M, N)](
        x, weight, bias if bias is not None else y, h, lora_B, y,
        *x.stride(), *weight.stride(), *h.stride(), *lora_B.stride(), *y.stride(),
        M, N, K, r, float(scaling), m_bucket(M), HAS_BIAS=bias is not None, BLOCK_R=block_r(r))
    return y


def backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_dw, need_db,
             dx_da_step=None):
    """`dx_da_step` (default `dx_da_pointer`) launches the dX / dA-partials step: other launchers
    (fused_lora.kernels.tma) replace that step alone."""
    dx = dA = dB = None
    if need_dx or need_lora:
        dx, dA, dB = _lora_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora,
                                    dx_da_step or dx_da_pointer)
    dW = torch.mm(dy.t(), x) if need_dw else None
    db = dy.sum(0) if need_db else None
    return dx, dA, dB, dW, db


def _lora_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, dx_da_step):
    """dX, dA, dB in four launches: dY pass, G sum, dX/dA, dA+dB sums."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    f32 = dict(dtype=torch.float32, device=x.device)
    # 1. dY pass: partials of G (one per column chunk) and of dB (one per row block).
    dy_pass = _launcher("dy", x, r)
    chunk = dy_chunk(M, N)
    g_ws = torch.empty((triton.cdiv(N, chunk), M, r), **f32)
    db_ws = torch.empty((_row_blocks(dy_pass, M), N, r), **f32) if need_lora else g_ws
    dy_pass[lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, chunk))](
        dy, lora_B, h, g_ws, db_ws, *dy.stride(), *lora_B.stride(), *h.stride(),
        M, N, r, chunk, float(scaling), m_bucket(M), HAS_DB=need_lora, BLOCK_R=block_r(r))
    db_slots = _row_blocks_used(dy_pass, M)
    g = torch.empty((M, r), dtype=x.dtype, device=x.device)
    sum_partials((g_ws, g))
    # 2. dX and the dA partials (one per row block).
    dx, da_ws, da_slots = dx_da_step(dy, x, weight, g, lora_A, float(dropout_p), seed, need_dx, need_lora)
    if not need_lora:
        return dx, None, None
    # 3. dA and dB summed in a fixed order, written in the parameters' dtypes.
    dA = torch.empty((r, K), dtype=lora_A.dtype, device=x.device)
    dB = torch.empty((N, r), dtype=lora_B.dtype, device=x.device)
    sum_partials((da_ws[:da_slots], dA), (db_ws[:db_slots], dB))
    return dx, dA, dB


def dx_da_pointer(dy, x, weight, g, lora_A, p, seed, need_dx, need_lora):
    """dX = D (G A) + dY W and the dA partials with the pointer kernel: (dx or None, the fp32
    workspace of dA partials (None without need_lora), how many of its slots were written)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    dx_da = _launcher("dx_da", x, r, p > 0.0)
    da_ws = torch.empty((_row_blocks(dx_da, M), r, K), dtype=torch.float32, device=x.device) if need_lora else g
    dx_da[_tiles_grid(M, K)](
        dy, weight, g, lora_A, x, dx if need_dx else g, da_ws,
        *dy.stride(), *weight.stride(), *g.stride(), *lora_A.stride(), *x.stride(),
        *(dx.stride() if need_dx else (0, 0)),
        M, N, K, r, seed, keep_threshold(p), 1.0 / (1.0 - p), m_bucket(M),
        HAS_DX=need_dx, HAS_DA=need_lora, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
    return dx, (da_ws if need_lora else None), _row_blocks_used(dx_da, M)


# Several adapters in one batch (segment kernels; the interface of fused_lora.multi_impl). Imported
# last: its launchers use dy_chunk and arch_of above.
from .multi import multi_backward, multi_forward  # noqa: E402

__all__ += ["multi_forward", "multi_backward"]
