"""LoRA on expert weights (the grouped op, `ops.grouped`): the segment kernels (`kernels/segments/`) over an
expert stack, plus the per-expert weight and bias gradients (wgrad.py); launchers.py: the "triton" row's
GROUPED_FWD, GROUPED_BWD."""
