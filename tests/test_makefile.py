"""The Makefile's set-up (issue 18 items 19 and 20): `make demo` installs what the demo needs and
`make test` adds the test extras; a PYTHON that does not exist is said to be missing; a PYTHON other
than the one .venv was made with rebuilds .venv, and says so.

Each test runs make in a scratch directory holding a copy of the Makefile (and the two files its
stamp depends on), mostly with -n (print the commands, run none): nothing is installed."""
import os
import shutil
import subprocess
import sys

import pytest
from utils import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


@pytest.fixture
def project(tmp_path):
    for name in ("Makefile", "pyproject.toml", "setup.py"):
        shutil.copy(os.path.join(ROOT, name), tmp_path / name)
    return tmp_path


def _make(project, *args, env=None):
    res = subprocess.run(["make", "--no-print-directory", *args], cwd=project, capture_output=True, text=True,
                         timeout=60, env={**os.environ, **(env or {})})
    return res.returncode, res.stdout + res.stderr


def _fake_venv(project, base: str):
    """A .venv whose python says it was made from `base`, set up already (its stamps newer than the
    Makefile's inputs)."""
    bin_dir = project / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    python = bin_dir / "python"
    python.write_text(f"#!/bin/sh\necho {base}\n")
    python.chmod(0o755)
    for stamp in (".fused_lora-installed", ".fused_lora-test-installed"):
        (project / ".venv" / stamp).touch()


def test_demo_installs_the_package_alone_and_test_adds_the_test_extras(project):
    """issue 18 item 19: the demo's set-up was `pip install -e ".[test]"` (2.6 GB with trl,
    bitsandbytes, torchao, ...)."""
    code, out = _make(project, "-n", "demo")
    assert code == 0, out
    installs = [line for line in out.splitlines() if "pip install" in line and "torch==" not in line]
    assert len(installs) == 1 and installs[0].rstrip().endswith("install --quiet -e ."), out
    assert "-m fused_lora demo" in out
    code, out = _make(project, "-n", "test")
    assert code == 0, out
    installs = [line for line in out.splitlines() if "pip install" in line and "torch==" not in line]
    assert [line.split("install --quiet ")[1] for line in installs] == ["-e .", '-e ".[test]"'], out
    assert "-m pytest" in out


def test_a_python_that_does_not_exist_is_said_to_be_missing(project):
    """issue 18 item 20: `make demo PYTHON=/nonexistent` said "needs Python >= 3.10"."""
    code, out = _make(project, "demo", "PYTHON=/nonexistent/python3")
    assert code != 0
    assert "PYTHON=/nonexistent/python3: not found" in out and ">= 3.10" not in out, out
    assert not (project / ".venv").exists()
    # With a .venv already there, an explicit PYTHON that does not exist is refused too (not silently ignored).
    _fake_venv(project, "/usr/bin/python3.11")
    code, out = _make(project, "demo", "PYTHON=/nonexistent/python3")
    assert code != 0 and "PYTHON=/nonexistent/python3: not found" in out, out
    assert (project / ".venv" / "bin" / "python").exists()  # nothing removed for a PYTHON that is not there


def test_a_python_too_old_is_named_with_its_version(project, tmp_path_factory):
    old = tmp_path_factory.mktemp("bin") / "python3.9"
    old.write_text("#!/bin/sh\n"
                   "case \"$*\" in *version_info*) exit 1 ;; *python_version*) echo 3.9.18 ;; esac\n")
    old.chmod(0o755)
    code, out = _make(project, "demo", f"PYTHON={old}")
    assert code != 0 and "fused_lora needs Python >= 3.10" in out and "3.9.18" in out, out


def test_another_python_rebuilds_the_venv_and_says_so(project):
    """issue 18 item 20: `make demo PYTHON=python3.12` silently kept a .venv made by Python 3.11."""
    _fake_venv(project, "/opt/other/bin/python3.99")
    code, out = _make(project, "-n", "demo", f"PYTHON={sys.executable}")
    assert code == 0, out
    assert ".venv was made by /opt/other/bin/python3.99" in out and "rebuilding .venv" in out, out
    assert "rm -rf .venv" in out
    # Without PYTHON given, an existing .venv is kept (and reused: nothing to set up).
    code, out = _make(project, "-n", "demo")
    assert code == 0 and "rebuilding" not in out and "rm -rf" not in out and "pip install" not in out, out
    # The same interpreter given explicitly keeps it too.
    same = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    (project / ".venv" / "bin" / "python").write_text(f"#!/bin/sh\necho {same}\n")
    code, out = _make(project, "-n", "demo", f"PYTHON={sys.executable}")
    assert code == 0 and "rebuilding" not in out and "pip install" not in out, out
