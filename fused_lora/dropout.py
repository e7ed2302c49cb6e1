"""Dropout masks for the PyTorch path, regenerated from a seed instead of stored.

The Triton kernels draw their masks in-kernel with Philox (`kernels/dropout.py`); the PyTorch
path draws them with a seeded `torch.Generator`. The two backends therefore give different (but
each reproducible) masks for one seed: a mask is a function of (backend, seed, shape, p).
"""
from __future__ import annotations

import torch
from torch import Tensor

SEED_HIGH = 2**62  # seeds are drawn in [0, SEED_HIGH): fits int64 and Philox's 64-bit key


def new_seed() -> Tensor:
    """A fresh seed from the default CPU generator, as a 0-dim int64 CPU tensor.

    Drawing it from the CPU generator makes it follow `torch.manual_seed` and lets activation
    checkpointing (which restores the CPU RNG state) recompute the same mask.
    """
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64)


def no_seed() -> Tensor:
    """The seed passed when there is no dropout (never read)."""
    return torch.zeros((), dtype=torch.int64)


def torch_dropout_scale(seed: int, shape, p: float, dtype: torch.dtype, device) -> Tensor:
    """D = keep / (1 - p) with keep ~ Bernoulli(1 - p), reproducible from `seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    # Always drawn in float32 so the pattern does not depend on the compute dtype.
    d = torch.empty(shape, dtype=torch.float32, device=device)
    d.bernoulli_(1.0 - p, generator=gen)
    return d.mul_(1.0 / (1.0 - p)).to(dtype)

