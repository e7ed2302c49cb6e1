"""The "triton-tma" implementation: the Hopper path, with the interface of `fused_lora.kernels`
(forward, backward and `keep_mask`).

    forward   the shrink pass (pointer kernel, bandwidth-bound) then the TMA + persistent GEMM
              (`hopper.forward_tma.lora_forward_tma_kernel`)
    backward  the dY pass and the reductions of `fused_lora.kernels.lora`, with the dX / dA-partials
              step replaced by the TMA + persistent kernel (`hopper.dx_tma.lora_dx_tma_kernel`); without
              dX (only dA, dB asked for) the pointer kernel's HAS_DX=False variant runs
    keep_mask the same mask as the pointer kernels (`dropout.keep_tile`)

One config per variant (configs.tma_candidates), launched directly: the choice between this path
and the pointer kernels is made by timing whole rows (`fused_lora.dispatch.registry`), not by autotuning
here. TMA descriptors need a unit last stride, 16-byte aligned row strides and base addresses:
a call whose tensors do not meet that (a transposed or offset view; the row's reasons already
refuse sizes that cannot) runs the pointer kernels for that GEMM instead, with the same results.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from .. import configs
from ..dropout import keep_mask, keep_threshold
from ..launch import arch_of, block_r
from ..lora.launchers import backward as pointer_backward  # the pointer kernels' backward
from ..lora.launchers import dx_da_pointer, forward_gemm, shrink
from .dx_tma import descriptor_blocks as dx_blocks
from .dx_tma import lora_dx_tma_kernel
from .forward_tma import descriptor_blocks as forward_blocks
from .forward_tma import lora_forward_tma_kernel

__all__ = ["forward", "backward", "keep_mask", "tma_ready"]

# Programs of the persistent grid under the interpreter: few, so each walks several tiles.
_INTERPRETER_PROGRAMS = 3


def tma_ready(*tensors) -> bool:
    """Whether TMA descriptors can address these 2-D tensors: unit last stride, 16-byte aligned
    base address and row stride."""
    for t in tensors:
        elt = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * elt) % 16:
            return False
    return True


@lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _programs(device: torch.device, tiles: int) -> int:
    """The persistent grid: one program per SM (never more than there are tiles)."""
    if device.type != "cuda":
        sms = _INTERPRETER_PROGRAMS
    else:
        sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(sms, tiles))


def _config(kernel_name: str, x: torch.Tensor, r: int, dropout: bool = False):
    """The variant's config: with dropout the one the static gate compiles that variant with."""
    return configs.tma_candidates(kernel_name, arch_of(x.device), block_r(r), x.element_size(), dropout)[0]


def _descriptors(blocks: dict, **tensors) -> dict:
    return {name: TensorDescriptor.from_tensor(t, blocks[name]) for name, t in tensors.items()}


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    h = shrink(x, lora_A, dropout_p, seed)
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if not tma_ready(x, weight, y):
        return forward_gemm(x, weight, bias, h, lora_B, scaling), h
    cfg = _config("forward_tma", x, r)
    k = cfg.kwargs
    d = _descriptors(forward_blocks(cfg), x_desc=x, w_desc=weight, y_desc=y)
    programs = _programs(x.device, triton.cdiv(M, k["BLOCK_M"]) * triton.cdiv(N, k["BLOCK_N"]))
    lora_forward_tma_kernel[(programs,)](
        d["x_desc"], d["w_desc"], d["y_desc"], bias if bias is not None else y, h, lora_B,
        *h.stride(), *lora_B.stride(), M, N, K, r, programs, float(scaling),
        HAS_BIAS=bias is not None, BLOCK_R=block_r(r), **k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y, h


def dx_da_tma(dy, x, weight, g, lora_A, p, seed, need_dx, need_lora):
    """The dX / dA-partials step of `fused_lora.kernels.backward` on the TMA kernel (same outputs
    as `dx_da_pointer`)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    if not need_dx or not tma_ready(dy, weight, dx):
        return dx_da_pointer(dy, x, weight, g, lora_A, p, seed, need_dx, need_lora)
    cfg = _config("dx_tma", x, r, p > 0.0)
    k = cfg.kwargs
    row_blocks = triton.cdiv(M, k["BLOCK_M"])
    da_ws = torch.empty((row_blocks, r, K), dtype=torch.float32, device=x.device) if need_lora else g
    d = _descriptors(dx_blocks(cfg), dy_desc=dy, w_desc=weight, dx_desc=dx)
    programs = _programs(x.device, row_blocks * triton.cdiv(K, k["BLOCK_N"]))
    lora_dx_tma_kernel[(programs,)](
        d["dy_desc"], d["w_desc"], d["dx_desc"], g, lora_A, x, da_ws,
        *g.stride(), *lora_A.stride(), *x.stride(),
        M, N, K, r, programs, seed, keep_threshold(p), 1.0 / (1.0 - p),
        HAS_DA=need_lora, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r), **k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx, (da_ws if need_lora else None), row_blocks


def backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_dw, need_db):
    return pointer_backward(dy, x, weight, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora,
                            need_dw, need_db, dx_da_step=dx_da_tma)


