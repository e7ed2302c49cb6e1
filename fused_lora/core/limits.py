"""The limits of what the implementations take, stated once: the dispatch table refuses past them with
its reasons, and the kernels' configs are built to them (a test holds the two together)."""

MAX_TRITON_RANK = 256  # the Triton kernels' largest rank (one adapter)
MAX_TRITON_MULTI_RANK = 128  # the segment kernels' largest rank (several adapters in one batch)
HOPPER_MAX_RANK = 64  # the largest rank the Hopper-path variants are compiled for
KERNEL_MIN_BLOCKSIZE = 64  # the smallest NF4 block the Triton kernels take (bitsandbytes' default)
# The quantized layouts the Triton kernels read (core.formats.layout_name's first item): the name a refusal
# uses and the smallest block the kernels take (0: no blocks). A layout missing here runs on the torch row only.
KERNEL_LAYOUTS = {"nf4": ("NF4", KERNEL_MIN_BLOCKSIZE), "nf4-nested": ("NF4", KERNEL_MIN_BLOCKSIZE), "int8": ("int8", 0)}
