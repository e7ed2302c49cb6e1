"""The Hopper path (sm_90, 16-bit, ranks up to core.limits.HOPPER_MAX_RANK): the TMA + persistent
forward and dX GEMMs (forward_tma.py, dx_tma.py) behind the "triton-tma" row (tma.py), and the
single-pass forward (forward_one_pass.py) behind the "triton-onepass" row (one_pass.py). Each row
module offers forward, backward and keep_mask."""
