"""The layer benchmark times every backend row that can run a layer (the Hopper-path candidates
included), and the summary names them by strategy, from the CSV or from the printed rows."""
import os
import sys

import torch

from utils import REPO_ROOT  # noqa: E402  (tests/ is on sys.path: conftest.py)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import bench_layer  # noqa: E402
import summarize  # noqa: E402

from fused_lora import dispatch as backends  # noqa: E402


def test_backend_rows_are_the_whole_table_with_reasons():
    rows = dict(bench_layer.backend_rows(64, 40, 72, 16, 0.0, torch.float16, "cpu"))
    assert list(rows) == [impl.name for impl in backends.IMPLEMENTATIONS]
    assert rows["torch"] == []
    assert {"triton-tma", "triton-onepass"} <= set(rows)


def test_printed_rows_of_the_new_candidates_reach_the_summary(tmp_path):
    lines = ["# H200; torch.bfloat16", bench_layer.HEADER]
    for variant, fwd_ms in (("base", 0.4), ("fused_lora", 0.42), ("fused_lora[triton-tma]", 0.42),
                            ("fused_lora[triton-onepass]", 0.46)):
        lines.append(bench_layer.format_row(dict(
            M=8192, K=4096, N=4096, r=16, dropout=0.0, variant=variant, fwd_ms=fwd_ms, fwdbwd_ms=2 * fwd_ms,
            fwd_x=fwd_ms / 0.4, fwdbwd_x=fwd_ms / 0.4, fwdbwd_vs_peft="", held_MiB=64.0, peak_MiB=128.0,
            ideal_fwd_x=1.07, ideal_fwdbwd_x=1.07)))
    (tmp_path / "layer_8192x4096x4096.log").write_text("\n".join(lines) + "\n")
    summary = summarize.summarize(str(tmp_path))
    (case,) = summary["layer"]
    p0 = case["dropout"]["0.0"]
    assert p0["triton-tma"]["fwd_ms"] == 0.42 and p0["triton-tma"]["fwdbwd_ms"] == 0.84
    assert p0["triton-onepass"]["fwd_x"] == 1.15  # the printed columns: fwd ms, fwd x, f+b ms, f+b x
    assert p0["auto"]["fwd_ms"] == 0.42
    summarize.print_table(summary)
