"""The "triton-onepass" implementation: the single-pass forward, with the interface of
`fused_lora.kernels` (forward, backward and `keep_mask`).

    forward   `hopper.forward_one_pass.lora_forward_one_pass_kernel`: Y and H in one launch, no shrink pass
    backward  the pointer kernels' backward, unchanged (H and the dropout mask mean what they mean
              there, so it applies as is)
    keep_mask the same mask as the pointer kernels

One config per variant (configs.tma_candidates), launched directly: whether the single pass beats
shrink + GEMM at a shape is decided by timing whole rows (`fused_lora.dispatch.registry`).
"""
from __future__ import annotations

import torch
import triton

from .. import configs
from ..dropout import keep_mask, keep_threshold
from ..launch import arch_of, block_r
from ..lora.launchers import backward  # the pointer kernels' backward: H and the mask mean what they mean there
from .forward_one_pass import lora_forward_one_pass_kernel

__all__ = ["forward", "backward", "keep_mask"]


def forward(x, weight, bias, lora_A, lora_B, scaling, dropout_p, seed):
    M, K = x.shape
    N, r = weight.shape[0], lora_A.shape[0]
    p = float(dropout_p)
    h = torch.empty((M, r), dtype=x.dtype, device=x.device)
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    cfg = configs.tma_candidates("forward_one_pass", arch_of(x.device), block_r(r), x.element_size(), p > 0.0)[0]
    k = cfg.kwargs
    grid = (triton.cdiv(M, k["BLOCK_M"]) * triton.cdiv(N, k["BLOCK_N"]),)
    lora_forward_one_pass_kernel[grid](
        x, weight, bias if bias is not None else y, lora_A, lora_B, y, h,
        *x.stride(), *weight.stride(), *lora_A.stride(), *lora_B.stride(), *y.stride(), *h.stride(),
        M, N, K, r, seed, keep_threshold(p), 1.0 / (1.0 - p), float(scaling),
        HAS_BIAS=bias is not None, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r), **k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y, h


