"""Fresh-eyes review of the quantized base (issue 12): defects found by trying it as a user would, each
held by a test that failed before its fix."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fused_lora
from fused_lora.core.formats import QuantizationError
from fused_lora.modules.quantized import quantize_nf4
from test_static_loop import _static_loop
from utils import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT


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
    import numpy as np  # a dependency of torch: always there
    w = torch.randn(8, 128)
    qw = quantize_nf4(w, blocksize=np.int64(128))
    assert type(qw.blocksize) is int and qw.blocksize == 128
    assert torch.equal(qw.dequantize(), quantize_nf4(w, blocksize=128).dequantize())


# ------------------------------------------------------------------ benchmarks/static_loop.py's table

def _row(label, hgmma_op, hgmma, total, mma, issue, int_pipe, macs):
    counts = dict.fromkeys(("hgmma", "mem", "int", "float", "conv", "unif", "other"), 0)
    counts.update(hgmma=hgmma, int=(total - hgmma))
    return dict(label=label, config="c", counts=counts, total=total, hgmma_ops=[hgmma_op], mma=mma, issue=issue,
                int_pipe=int_pipe, macs=macs, overlapped=max(mma, issue, int_pipe) / macs,
                serial=(mma + max(issue, int_pipe)) / macs)


def _cells(line: str) -> int:
    return len(line.strip().strip("|").split("|"))


def test_the_report_is_a_markdown_table_with_the_projection():
    # A delimiter row with more cells than the header is no table in GitHub's markdown: the report (and
    # RESULTS.md, pasted from it) showed as raw text.
    sl = _static_loop()
    rows = [_row("base fwd (x W^T, floor)", "HGMMA.64x256x16.F32.BF16", 4, 136, 1024, 264, 296, 128 * 256 * 64 / 4),
            _row("base dX (dY W, floor)", "HGMMA.64x256x16.F32.BF16", 4, 174, 1024, 340, 448, 128 * 256 * 64 / 4),
            _row("nf4 fwd", "HGMMA.64x256x16.F32.BF16", 2, 209, 512, 414, 376, 256 * 128 * 32 / 4),
            _row("nf4 dX", "HGMMA.64x128x16.F32.BF16", 4, 197, 512, 386, 368, 256 * 128 * 32 / 4)]
    text = sl.report(rows, "bf16")
    table = [line for line in text.splitlines() if line.startswith("|")]
    header, delimiter, body = table[0], table[1], table[2:]
    assert set(delimiter.replace("|", "").replace("-", "").replace(":", "").strip()) == set()
    assert _cells(delimiter) == _cells(header) == 15
    assert all(_cells(line) == 15 for line in body)
    # The projection, by hand: nf4 forward max(512, 414, 376) / 512 per its multiply-adds, against the
    # floor's max(1024, 264, 296) / 1024: 1.00; serial (512 + 414) / 512 against (1024 + 296) / 1024.
    nf4_fwd = body[2].split("|")
    assert nf4_fwd[-3].strip() == "1.00" and nf4_fwd[-2].strip() == f"{(926 / 512) / (1320 / 1024):.2f}"


def test_results_md_tables_have_as_many_delimiter_cells_as_header_cells():
    lines = open(os.path.join(ROOT, "benchmarks", "RESULTS.md")).read().splitlines()
    for i in range(1, len(lines)):
        if lines[i].startswith("|-") and lines[i - 1].startswith("|"):
            assert _cells(lines[i]) == _cells(lines[i - 1]), f"RESULTS.md line {i + 1}: {lines[i - 1][:60]}"


def test_every_option_the_usage_line_names_exists():
    sl = _static_loop()
    usage = next(line for line in sl.__doc__.splitlines() if "python benchmarks/static_loop.py" in line)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    helptext = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "static_loop.py"), "--help"],
                              check=True, capture_output=True, text=True, env=env, timeout=300).stdout
    for option in (w.strip("[]") for w in usage.split() if w.strip("[]").startswith("--")):
        assert option in helptext, option
