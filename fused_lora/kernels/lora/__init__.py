"""The pointer kernels of one adapter over a 16-bit base: the shrink pass and the forward GEMM
(forward.py), the dY pass and the dX / dA kernel (backward.py), DoRA's variants of them
(HAS_COLSCALE), and their launchers (launchers.py: the "triton" row's FWD, BWD, DORA_FWD, DORA_BWD,
and the steps the other families reuse)."""
