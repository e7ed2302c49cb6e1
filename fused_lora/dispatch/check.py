"""The check rule's comparison: whether two rows' outputs agree (a row no GPU has run yet is timed only
after its output on a key's inputs matched its reference row's)."""
from __future__ import annotations

from typing import Optional

import torch


def flat_outputs(out) -> list:
    """The tensors and Nones of an op's output, nested tuples and lists flattened in order (the multi
    backward returns a list of (dA, dB) pairs or Nones)."""
    if not isinstance(out, (tuple, list)):
        return [out]
    return [t for item in out for t in flat_outputs(item)]


def outputs_mismatch(got, want, dtype: torch.dtype) -> Optional[str]:
    """Why two rows' outputs (a tensor, or tuples of tensors and Nones) do not agree, or None. Each
    tensor is compared in max norm relative to the reference's largest magnitude: 3e-2 for 16-bit
    dtypes, 1e-2 for float32 (TF32 on a GPU); enough for a different summation order, far below
    what a wrong tile, a lost term or a garbage value gives. Non-finite values must match too."""
    got, want = flat_outputs(got), flat_outputs(want)
    if len(got) != len(want):
        return f"{len(got)} outputs against {len(want)}"
    tol = 1e-2 if dtype == torch.float32 else 3e-2
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            if (g is None) != (w is None):
                return f"output {i} is {'missing' if g is None else 'not expected'}"
            continue
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        if not g.numel():
            continue
        g64, w64 = g.detach().double(), w.detach().double()
        if not torch.equal(torch.isfinite(g64), torch.isfinite(w64)):
            return f"output {i} has non-finite values where the reference has none (or the reverse)"
        finite = torch.isfinite(w64)
        scale = max(1.0, w64[finite].abs().max().item()) if finite.any() else 1.0
        err = (g64 - w64)[finite].abs().max().item() if finite.any() else 0.0
        if err > tol * scale:
            return f"output {i}: max error {err:.3g} > {tol} x {scale:.3g}"
    return None
