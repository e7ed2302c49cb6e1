"""The GEMMs over a quantized frozen base (`core.formats`): the W tiles dequantized in registers
(quant_tiles.py: one tile loader per format), the forward and dX kernels (quant_forward.py,
quant_backward.py), their launchers (launchers.py: QUANT_FWD, QUANT_BWD, and FORMATS, the one
table of what is particular to each format) and the launchers of several adapters over a quantized
base (multi.py: QUANT_MULTI_FWD, QUANT_MULTI_BWD)."""
