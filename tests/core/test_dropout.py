"""core.dropout's keep mask on the CPU: the keep rate is 1 - p over the whole range of p, up to keeping nothing."""
import math

import pytest
import torch

from fused_lora.core.dropout import keep_mask


@pytest.mark.parametrize("p", [1 - 2.0 ** -17, 0.999999, 1 - 1e-12])
def test_p_next_to_one_keeps_nothing(p):
    """The 16-bit draws compared with a threshold that leaves their range: nothing is kept (the threshold once
    wrapped around the int16 range and everything was kept, to be scaled by 1 / (1 - p))."""
    assert int(keep_mask(7, (1000, 100), p, "cpu").sum()) == 0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9, 0.999, 1 - 2.0 ** -15])
def test_the_keep_rate_is_one_minus_p(p):
    n = 400_000
    kept = int(keep_mask(3, (n,), p, "cpu").sum())
    quantized = round((1 - p) * 65536) / 65536  # the draws' resolution: 16 bits
    sd = math.sqrt(n * quantized * (1 - quantized))
    assert abs(kept - n * quantized) <= 5 * sd + 1
