"""Test-session setup.

Without a GPU, the Triton kernels are tested through Triton's interpreter: TRITON_INTERPRET must be
set before triton is first imported, so it is set here, at collection time, unless the caller set it.

The tests mirror the package, one folder per layer (tests/core, tests/kernels, ...), with file names unique
across folders; tests/ and every folder are on sys.path, so `utils` and a test module's shared helpers
(e.g. test_multi_op.make_multi) import by name from anywhere in the suite.
"""
import os
import sys

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
for _folder in sorted(os.listdir(_HERE)):
    if os.path.isdir(os.path.join(_HERE, _folder)) and not _folder.startswith(("_", ".")):
        sys.path.insert(1, os.path.join(_HERE, _folder))

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
