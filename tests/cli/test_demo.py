"""`python -m fused_lora demo`: the tutorial's exact counts and checks, and what its new task shows."""
import math
import os
import subprocess
import sys

import pytest

from fused_lora.cli.demo import CHANCE_MARGIN, run
from utils import REPO_ROOT  # noqa: E402


@pytest.fixture(scope="module")
def demo():
    lines = []
    figures = run(device="cpu", log=lines.append)
    return figures, "\n".join(lines)


def test_demo_figures(demo):
    f, _ = demo
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


def test_demo_says_what_the_new_task_shows(demo):
    """Step 6 states its outcome from the accuracies it measured: chance level is said as such."""
    f, text = demo
    acc = f["new_task_accuracy"]
    # y = sum of 20 uniforms > 10 splits about evenly: 200 eval rows, majority between 50% and 60%.
    assert 0.5 <= acc["majority"] < 0.6
    # The rule is learnable in the step's budget: a fresh MLP learns it.
    assert acc["from_scratch"] > acc["majority"] + CHANCE_MARGIN
    at_chance = acc["adapter"] < acc["majority"] + CHANCE_MARGIN
    assert ("The adapter ends at chance level" in text) == at_chance
    assert ("The adapter learned the new task" in text) == (not at_chance)
    assert f"the adapter {acc['adapter']:.0%}" in text
    if at_chance:  # then the eval loss is close to answering 50/50
        assert abs(f["new_task"][-1][1] - math.log(2)) < 0.1


# The packages of the extras (pyproject.toml): the demo's set-up (`make demo`) installs none of them.
EXTRAS = ("transformers", "peft", "trl", "bitsandbytes", "torchao", "accelerate", "hypothesis", "pytest")


def test_demo_command_prints_peft_lines():
    """The command prints peft's lines; it runs with the package alone, none of the extras importable
    (issue 18 items 14 and 19: `make demo` installs no extra)."""
    code = ("import sys\n"
            f"for name in {EXTRAS!r}:\n"
            "    sys.modules[name] = None  # `import name` now fails as if it were not installed\n"
            "from fused_lora.cli.main import main\n"
            "sys.exit(main(['demo', '--device', 'cpu']))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout
    assert "trainable params: 12,660 || all params: 455,262 || trainable%: 2.7808" in out
    assert "trainable params: 13,062 || all params: 455,664 || trainable%: 2.8666" in out
    assert "442,602 parameters, 0 trainable" in out
