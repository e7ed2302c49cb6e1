"""Test-session setup.

Without a GPU, the Triton kernels are tested through Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, at collection time, unless the caller set it.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.pop("FUSED_LORA_BACKEND", None)  # tests choose backends explicitly


def pytest_sessionfinish(session, exitstatus):
    """With FUSED_LORA_NO_SKIPS=1 (set by CI), a skipped test fails the run: on CI every test is
    expected to run (triton, peft and transformers are installed), so a skip means a test silently
    stopped testing something, e.g. the Triton kernels because triton failed to import."""
    if os.environ.get("FUSED_LORA_NO_SKIPS") != "1" or exitstatus != 0:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        names = ", ".join(getattr(r, "nodeid", "?") for r in skipped[:5])
        print(f"\nFUSED_LORA_NO_SKIPS=1 but {len(skipped)} tests were skipped ({names}): failing the run")
        session.exitstatus = 1
