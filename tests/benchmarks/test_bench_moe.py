"""benchmarks/bench_moe.py runs (a tiny block, one repetition): its correctness line passes (fused_lora's block
with peft's adapter equals peft's), every variant is timed and measured, and the allowance it reports is the
LoRA parameters, their gradients and 4 x rows x r per projection."""
import csv
import os
import sys

import pytest

from utils import REPO_ROOT  # noqa: E402  (tests/ is on sys.path: conftest.py)
sys.path.insert(0, os.path.join(REPO_ROOT, "benchmarks"))
import bench_moe  # noqa: E402

pytest.importorskip("peft")
pytest.importorskip("transformers")


def test_tiny_run_writes_every_variant(tmp_path, capsys):
    out = tmp_path / "moe.csv"
    bench_moe.main(["--tokens", "24", "--experts", "4", "--hidden", "32", "--intermediate", "16", "--rank", "4",
                    "--reps", "1", "--threads", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "(ok, tolerance" in printed and "# targets:" in printed
    rows = list(csv.DictReader(out.open()))
    assert [r["variant"] for r in rows] == ["base", "base eager", "fused_lora", "peft", "patch_peft"]
    assert all(float(r["fwdbwd_ms"]) > 0 and float(r["peak_MiB"]) > 0 for r in rows)
    assert float(rows[0]["fwdbwd_x"]) == 1.0 and float(rows[3]["fwdbwd_vs_peft"]) == 1.0


def test_allowance_counts_the_lora_parameters():
    a = bench_moe.allowance_MiB(T=10, k=2, E=4, H=8, I=6, r=2, itemsize=4)
    params = 4 * 2 * (8 + 12) + 4 * 2 * (6 + 8)  # gate_up: A (4, 2, 8), B (4, 12, 2); down: A (4, 2, 6), B (4, 8, 2)
    assert a["lora_params"] == params * 4 / 2**20
    assert a["allowance"] == (2 * params + 4 * 20 * 2 * 2) * 4 / 2**20
    assert a["stacks"] == 4 * (12 * 8 + 8 * 6) * 4 / 2**20
