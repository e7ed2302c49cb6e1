"""Several adapters in one batch (a mixed batch, `core.segments`): the segment kernels
(multi_forward.py, multi_backward.py: row tiles of one adapter each) and their launchers
(launchers.py: the "triton" row's MULTI_FWD, MULTI_BWD)."""
