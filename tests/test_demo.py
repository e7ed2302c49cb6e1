"""`python -m fused_lora demo`: the tutorial's exact counts and checks."""
import subprocess
import sys

from fused_lora.demo import run


def test_demo_figures():
    lines = []
    f = run(device="cpu", log=lines.append)
    assert f["class_counts"] == (663, 337)
    assert f["base_params"] == 442_602
    assert f["lora_counts"] == (12_660, 455_262)
    assert f["with_head_counts"] == (13_062, 455_664)
    assert f["merged_counts"] == (0, 442_602)
    assert f["starts_at_base"] and f["base_unchanged"] and f["merged_matches"] and f["reload_matches"]
    assert 48_000 < f["adapter_bytes"] < 54_000  # 12,660 fp32 values plus the header: ~51 kB
    first_eval, last_eval = f["pretrain"][0][1], f["pretrain"][-1][1]
    assert last_eval < first_eval
    assert f["new_task"][-1][0] < f["new_task"][0][0]  # the loss falls on the new task
    assert f["seconds"] < 30


def test_demo_command_prints_peft_lines():
    out = subprocess.run([sys.executable, "-m", "fused_lora", "demo", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert "trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808" in out
    assert "trainable params: 13,062 || all params: 455,664 || trainable%: 2.8666" in out
    assert "442,602 parameters, 0 trainable" in out
