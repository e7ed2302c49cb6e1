"""peft's add_weighted_adapter math: one layer's new (lora_A, lora_B) from several adapters.

Each adapter i has A_i (r_i x in), B_i (out x r_i), scale s_i, weight w_i (peft's formulas, peft 0.21):
    linear  A = sum_i sign(w_i s_i) sqrt(|w_i s_i|) A_i,   B = sum_i sqrt(|w_i s_i|) B_i   (equal ranks)
    cat     A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],           B = [B_1, B_2, ...]             (rank sum r_i)
    svd     D = sum_i w_i s_i B_i A_i = U S V^T;  B = U[:, :r] diag(S[:r]),  A = V^T[:r]   (rank r)
            with `clamp` (a quantile q): both clamped to +-quantile(cat(B, A), q).
The new adapter's scale is then lora_alpha / r = 1 (peft builds it with lora_alpha = r)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

COMBINATION_TYPES = ("linear", "cat", "svd")
# peft 0.21's other types (TIES, DARE, magnitude pruning): known, not implemented here
PEFT_ONLY_TYPES = ("ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd", "dare_linear_svd",
                   "magnitude_prune", "magnitude_prune_svd")


def new_rank(combination_type: str, ranks: Sequence[int], svd_rank: Optional[int]) -> int:
    """The combined adapter's rank (peft's rule); ValueError for unequal ranks under "linear"."""
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"add_weighted_adapter: combination_type='linear' needs adapters of one rank, got "
                             f"ranks {list(ranks)} (use 'cat' or 'svd')")
        return ranks[0]
    if combination_type == "cat":
        return sum(ranks)
    return svd_rank or max(ranks)


def combine(combination_type: str, loras: Sequence[tuple[Tensor, Tensor, float]], weights: Sequence[float],
            rank: int, svd_clamp: Optional[float] = None, svd_full_matrices: bool = True,
            svd_driver: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """(A, B) of the combination of `loras` ((A_i, B_i, s_i), A_i r_i x in, B_i out x r_i) with `weights`."""
    if combination_type == "linear":
        ws = [w * s for (_, _, s), w in zip(loras, weights)]
        wa = [math.sqrt(abs(v)) * (1 if v >= 0 else -1) for v in ws]
        wb = [math.sqrt(abs(v)) for v in ws]
        A = sum(a * lora[0].detach() for a, lora in zip(wa, loras))
        B = sum(b * lora[1].detach() for b, lora in zip(wb, loras))
        return A, B
    if combination_type == "cat":
        A = torch.cat([lora[0].detach() * w * lora[2] for lora, w in zip(loras, weights)], dim=0)
        B = torch.cat([lora[1].detach() for lora in loras], dim=1)
        return A, B
    delta = sum(w * lora[2] * (lora[1].detach().float() @ lora[0].detach().float())
                for lora, w in zip(loras, weights))
    U, S, Vh = torch.linalg.svd(delta, full_matrices=svd_full_matrices, driver=svd_driver)
    B = U[:, :rank] @ torch.diag(S[:rank])
    A = Vh[:rank, :]
    if svd_clamp is not None:
        hi = torch.quantile(torch.cat([B.flatten(), A.flatten()]), svd_clamp)
        B, A = B.clamp(-hi, hi), A.clamp(-hi, hi)
    return A, B
