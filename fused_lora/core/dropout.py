"""Dropout seeds, and the PyTorch path's masks, regenerated from a seed instead of stored.

The Triton kernels draw their masks in-kernel with Philox (`kernels/dropout.py`); the PyTorch
path draws them here. The two backends therefore give different (but each reproducible) masks for
one seed: a mask is a function of (backend, seed, shape, p, device type).

On CPU the mask comes from numpy's SFC64 generator, 16 random bits per element (4 per 64-bit
draw), compared against round(p * 2^16): about ten times faster than torch.bernoulli_, which
matters because the mask is drawn twice per step (forward and backward). The keep probability is
therefore 1 - round(p * 65536) / 65536, within 8e-6 of 1 - p. On other devices the device's own
torch.Generator draws it.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

SEED_HIGH = 2**62  # seeds are drawn in [0, SEED_HIGH): fits int64 and Philox's 64-bit key
_SEED_MIX = 0x9E3779B97F4A7C15  # 2^64 / golden ratio (odd): spreads (seed, adapter) over the seed range


def new_seed() -> Tensor:
    """A fresh seed from the default CPU generator, as a 0-dim int64 CPU tensor.

    Drawing it from the CPU generator makes it follow `torch.manual_seed` and lets activation
    checkpointing (which restores the CPU RNG state) recompute the same mask.
    """
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64)


def seed_for(dropout_p: float) -> Tensor:
    """A fresh seed when there is dropout (`new_seed`), else the unused one (`no_seed`): what a call draws."""
    return new_seed() if dropout_p > 0.0 else no_seed()


def no_seed() -> Tensor:
    """The seed passed when there is no dropout (never read)."""
    return torch.zeros((), dtype=torch.int64)


def adapter_seed(seed, adapter: int):
    """The dropout seed of adapter `adapter` (index in a mixed batch's adapter list) for the call seed `seed`:
    an int, or for a 0-dim int64 tensor a tensor (no host read; seed + step < 2^63, no overflow). Every
    implementation of a mixed batch draws adapter a's mask from it, as the single-adapter op would."""
    step = (adapter + 1) * _SEED_MIX % SEED_HIGH
    return (seed + step) % SEED_HIGH if isinstance(seed, Tensor) else (int(seed) + step) % SEED_HIGH


def keep_mask(seed: int, shape, p: float, device) -> Tensor:
    """Boolean keep mask (True with probability ~1 - p), reproducible from `seed`."""
    device = torch.device(device)
    numel = 1
    for s in shape:
        numel *= s
    if device.type == "cpu":
        raw = np.random.SFC64(seed).random_raw((numel + 3) // 4).view(np.int16)[:numel]
        threshold = -32768 + int(round(p * 65536))
        if threshold > 32767:  # p within 2^-17 of 1: no int16 draw reaches it (compared as int16 it would wrap)
            return torch.zeros(shape, dtype=torch.bool)
        return torch.from_numpy(raw).reshape(shape) >= threshold
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device) >= p
