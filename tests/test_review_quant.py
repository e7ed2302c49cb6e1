"""Fresh-eyes review of the quantized base (issue 12): defects found by trying it as a user would, each
held by a test that failed before its fix."""
import pytest
import torch
from torch import nn

import fused_lora
from fused_lora.quant import QuantizationError, quantize_nf4


# ------------------------------------------------------------------ a block size that is not an integer

@pytest.mark.parametrize("blocksize", [64.0, 64.5, True])
def test_a_blocksize_that_is_not_an_integer_is_refused_by_name(blocksize):
    # 64.0 == 64 passed the membership check and crashed inside torch.empty (a float size)
    with pytest.raises(QuantizationError, match="blocksize"):
        quantize_nf4(torch.randn(8, 128), blocksize=blocksize)
    model = nn.Sequential(nn.Linear(128, 8))
    with pytest.raises(QuantizationError, match="blocksize"):
        fused_lora.quantize_model(model, "nf4", target_modules=["0"], blocksize=blocksize)
    assert type(model[0]) is nn.Linear  # nothing replaced


def test_an_integer_blocksize_of_another_integer_type_is_taken():
    np = pytest.importorskip("numpy")
    w = torch.randn(8, 128)
    qw = quantize_nf4(w, blocksize=np.int64(128))
    assert type(qw.blocksize) is int and qw.blocksize == 128
    assert torch.equal(qw.dequantize(), quantize_nf4(w, blocksize=128).dequantize())
