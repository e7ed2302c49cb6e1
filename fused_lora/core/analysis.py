"""Analysis helpers from the LoRA paper: the amplification factor and low-rank approximation."""
from __future__ import annotations

import torch
from torch import Tensor


def amplification_factor(delta_w: Tensor, w: Tensor, r: int) -> float:
    """||dW||_F / ||U_r^T W V_r||_F (LoRA paper, section 7).

    U_r, V_r are the top-r left/right singular vectors of dW: how much dW amplifies the directions
    of W it shares. (Projecting with a full SVD would be orthogonal and reduce this to
    ||dW||_F / ||W||_F, which is not the paper's quantity.)
    """
    if delta_w.shape != w.shape:
        raise ValueError(f"amplification_factor: delta_w {tuple(delta_w.shape)} and w {tuple(w.shape)} differ")
    if not 1 <= r <= min(w.shape):
        raise ValueError(f"amplification_factor: r must be in [1, {min(w.shape)}], got {r}")
    d, w = delta_w.detach().double(), w.detach().double()
    u, _, vh = torch.linalg.svd(d, full_matrices=False)
    projected = u[:, :r].t() @ w @ vh[:r].t()
    return (torch.linalg.matrix_norm(d) / torch.linalg.matrix_norm(projected)).item()


def low_rank_approx(matrix: Tensor, rank: int) -> Tensor:
    """The best rank-`rank` approximation of `matrix` in Frobenius norm (truncated SVD, Eckart-Young)."""
    if matrix.dim() != 2:
        raise ValueError(f"low_rank_approx: expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not 0 <= rank <= min(matrix.shape):
        raise ValueError(f"low_rank_approx: rank must be in [0, {min(matrix.shape)}], got {rank}")
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]
