"""benchmarks/roofline.py reproduces docs/DESIGN.md's ideal ratios, and benchmarks/summarize.py builds summary.json."""
import json
import os
import re
import sys

import pytest

from utils import REPO_ROOT  # noqa: E402  (tests/ is on sys.path: conftest.py)
BENCH = os.path.join(REPO_ROOT, "benchmarks")
sys.path.insert(0, BENCH)
import roofline  # noqa: E402
import summarize  # noqa: E402


def design_table() -> dict:
    """docs/DESIGN.md's roofline table (H100: 800 TFLOP/s bf16, 3.0 TB/s), two decimals, read from the
    page itself so that the page and the script cannot drift apart: (M, K, N, r) -> (fwd, fwd+bwd)."""
    with open(os.path.join(os.path.dirname(BENCH), "docs", "DESIGN.md")) as f:
        rows = re.findall(r"^\| (\d+) x (\d+) x (\d+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|$", f.read(), re.M)
    return {tuple(map(int, row[:4])): tuple(map(float, row[4:])) for row in rows}


DESIGN = design_table()


def test_design_page_holds_the_roofline_table():
    """The four shapes docs/DESIGN.md shows are read from it: a page that lost its table would
    otherwise leave the test below checking nothing (issue 18 item 21)."""
    assert set(DESIGN) == {(8192, 4096, 4096, 16), (8192, 4096, 14336, 16), (8192, 14336, 4096, 16),
                           (2048, 4096, 4096, 64)}


@pytest.mark.parametrize("case", sorted(DESIGN), ids=lambda c: "x".join(map(str, c)))
def test_roofline_reproduces_design_figures(case):
    """roofline.ideal gives docs/DESIGN.md's ideal ratios to their two decimals."""
    got = roofline.ideal(*case, elt=2)
    fwd, fwdbwd = DESIGN[case]
    assert abs(got.fwd - fwd) <= 0.01 and abs(got.fwdbwd - fwdbwd) <= 0.01, (got.fwd, got.fwdbwd)


def test_roofline_closed_form_and_limits():
    """At compute-bound shapes the model reduces to the closed form of its docstring; more rank or
    wider elements never make the ideal cheaper; a zero rank leaves only the extra passes."""
    M, K, N, r = 8192, 4096, 4096, 16
    m = roofline.H100
    extra = m.flops(2) * 2 / m.bandwidth
    i = roofline.ideal(M, K, N, r)
    assert i.fwd == pytest.approx(1 + r / K + extra / (2 * N), rel=1e-3)
    assert i.fwdbwd == pytest.approx(1 + r / (2 * K) + r / N + extra * (1 / N + 1 / K) / 4, rel=1e-3)
    assert i.base_fwd == pytest.approx(2 * M * N * K / 800e12)
    assert roofline.ideal(M, K, N, 64).fwdbwd > i.fwdbwd > 1.0
    assert roofline.ideal_ratios(M, K, N, r) == {"fwd": round(i.fwd, 3), "fwdbwd": round(i.fwdbwd, 3)}


LAYER_CSV = """M,K,N,r,dropout,variant,fwd_ms,fwdbwd_ms,fwd_x,fwdbwd_x,fwdbwd_vs_peft,held_MiB,peak_MiB
8192,4096,4096,16,0.0,base,0.4,0.8,1.0,1.0,0.4,64.0,128.0
8192,4096,4096,16,0.0,fused_lora,0.44,0.9,1.1,1.125,0.45,64.3,130.0
8192,4096,4096,16,0.0,fused_lora[torch],0.48,1.0,1.2,1.25,0.5,64.3,140.0
8192,4096,4096,16,0.0,peft,1.0,2.0,2.5,2.5,1.0,200.0,300.0
8192,4096,4096,16,0.1,fused_lora,0.5,1.2,1.25,1.5,0.4,64.3,130.0
8192,4096,4096,16,0.1,fused_lora[torch],0.48,1.0,1.2,1.25,0.33,64.3,140.0
8192,4096,4096,16,0.1,peft,1.2,3.0,3.0,3.75,1.0,300.0,400.0
"""
FINETUNE_CSV = """variant,dropout,checkpointing,step_ms,tokens_per_s,peak_GiB,x_floor,x_peft
floor,0.0,False,100.0,81920,10.0,1.0,
peft,0.0,False,180.0,45511,12.0,1.8,1.0
fused_lora,0.0,False,110.0,74473,11.0,1.1,0.611
"""


def test_summary_from_csvs_logs_and_statuses(tmp_path):
    (tmp_path / "layer_8192x4096x4096.csv").write_text(LAYER_CSV)
    (tmp_path / "finetune.csv").write_text(FINETUNE_CSV)
    (tmp_path / "status.tsv").write_text("tests\t0\t50\ttests.log\nlayer_8192x4096x4096\t1\t70\tlayer.log\n"
                                         "layer_8192x4096x4096_nocompile\t0\t40\tlayer2.log\nfinetune\t124\t120\tft.log\n")
    (tmp_path / "layer.log").write_text("...\ntorch._dynamo.exc.BackendCompilerFailed: boom\n")
    (tmp_path / "ft.log").write_text("step 3\n")
    cache = tmp_path / "backend_cache"
    cache.mkdir()
    fwd_key = "fwd bfloat16 M8192 N4096 K4096 r16 dropout=off"  # as fused_lora.dispatch.registry.Problem.key writes it
    (cache / "backends-H100-abc.json").write_text(json.dumps(
        {"format": 1, "device": "H100", "versions": {}, "choices": {
            fwd_key: {"winner": "triton", "ms": {"torch": 1, "triton": 0.9}},
            "bwd bfloat16 M8192 N4096 K4096 r16 dropout=off grads=dx+lora": {"winner": "torch", "ms": {"torch": 1}},
            "fwd bfloat16 M8192 N4096 K4096 r16 dropout=on": {"winner": "torch", "ms": {"torch": 1}}}}))
    (cache / "backends-bad.json").write_text("{corrupt")
    summary = summarize.summarize(str(tmp_path))
    json.dumps(summary)  # serialisable
    (case,) = summary["layer"]
    assert (case["M"], case["K"], case["N"], case["r"]) == (8192, 4096, 4096, 16)
    assert case["ideal"] == roofline.ideal_ratios(8192, 4096, 4096, 16, 2)
    p0 = case["dropout"]["0.0"]
    assert p0["auto"]["fwdbwd_x"] == 1.125 and p0["torch"]["fwdbwd_x"] == 1.25 and p0["peft"]["fwd_x"] == 2.5
    assert p0["auto"]["fwdbwd_vs_ideal"] == pytest.approx(1.125 / case["ideal"]["fwdbwd"], abs=1e-3)
    assert p0["auto"]["held_MiB"] == 64.3 and p0["auto"]["peak_MiB"] == 130.0
    assert p0["base"]["fwd_ms"] == 0.4  # measured once, shown under every dropout
    assert case["dropout"]["0.1"]["base"]["fwd_ms"] == 0.4
    assert p0["auto_not_slower_than_torch"] is True
    assert case["dropout"]["0.1"]["auto_not_slower_than_torch"] is False  # 1.2 ms against torch's 1.0
    assert summary["auto_never_slower_than_torch"] is False
    assert summary["finetune"][2]["x_floor"] == 1.1
    stages = summary["stages"]
    assert stages["tests"]["ok"] and not stages["finetune"]["ok"] and stages["finetune"]["timed_out"]
    assert "BackendCompilerFailed" in stages["layer_8192x4096x4096"]["error_tail"]
    assert summary["backend_choices"]["H100"][fwd_key]["winner"] == "triton"
    assert p0["auto_ran"] == {"fwd": "triton", "bwd": "torch"}
    assert case["dropout"]["0.1"]["auto_ran"] == {"fwd": "torch", "bwd": "torch"}
    assert any("backends-bad.json" in e for e in summary["errors"])


def test_summary_reads_printed_rows_when_a_csv_is_missing(tmp_path):
    """A layer run killed by its time limit leaves no CSV; the rows it printed still count."""
    (tmp_path / "layer_2048x4096x4096.log").write_text(
        "# H100; torch.bfloat16\n"
        "    M     K     N   r    p variant             fwd ms  fwd x   f+b ms  f+b x vs peft  held MiB  peak MiB\n"
        " 2048  4096  4096  64  0.0 base               0.100   1.00    0.200   1.00    0.40      16.0      32.0\n"
        " 2048  4096  4096  64  0.0 compile(peft)      0.150   1.50    0.300   1.50       -      20.0      40.0\n"
        "Traceback (most recent call last):\n")
    summary = summarize.summarize(str(tmp_path))
    (case,) = summary["layer"]
    assert case["r"] == 64 and case["dropout"]["0.0"]["compile(peft)"]["fwdbwd_x"] == 1.5
    assert case["dropout"]["0.0"]["compile(peft)"]["fwdbwd_vs_peft"] is None


def test_summary_of_an_empty_folder_is_valid(tmp_path):
    summary = summarize.summarize(str(tmp_path))
    assert summary["layer"] == [] and summary["finetune"] == [] and summary["auto_never_slower_than_torch"] is None
    summarize.main([str(tmp_path)])
    assert json.loads((tmp_path / "summary.json").read_text())["layer"] == []


def test_gpu_check_records_failed_stages_and_still_writes_the_summary(tmp_path):
    """benchmarks/gpu_check.sh on a machine where every stage fails fast (no GPU here): each failure is
    recorded (a crashed layer run is retried without torch.compile), the script goes on, and
    summary.json is written; the exit status says something failed."""
    import subprocess
    root = os.path.dirname(BENCH)
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_BUDGET_S": "400",
           "TEST_FILES": "tests/no_such_test_file.py", "HOPPER_TEST_FILES": "tests/no_such_test_file.py",
           "LAYER_SHAPES": "8 8 8", "LAYER_ARGS": "--ranks 0",
           "GPU_CHECK_SKIP": "quant moe multi dora more"}  # the first shape's stages only: CI time
    env.pop("FUSED_LORA_CACHE_DIR", None)
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_check.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = summary["stages"]
    assert stages["info"]["ok"]
    for name in ("tests", "hopper_tests", "layer_8x8x8", "layer_8x8x8_nocompile"):
        assert stages[name]["run"] and not stages[name]["ok"] and stages[name]["error_tail"], name
    for name in ("quant", "moe", "multi", "dora", "more_finetune", "more_quant"):
        assert not stages[name]["run"], name
    assert "r must be" in stages["layer_8x8x8_nocompile"]["error_tail"]
    assert (tmp_path / "backends_report.txt").read_text().startswith("backends")
    assert os.path.isdir(tmp_path / "backend_cache") or not summary["backend_choices"]
