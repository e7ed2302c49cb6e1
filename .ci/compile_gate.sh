#!/usr/bin/env bash
# The static performance gate (fused_lora/kernels/compile_check.py) under triton 3.6, the GPU
# machine's version: every kernel variant compiled for sm_90 and sm_80 without a GPU, failing on
# any sm_90 spill or ptxas C75xx advisory. (tests/kernels/test_compile_gate.py runs the same gate under
# the triton the project's own venv has.)
#
# The venv holds torch (CPU), triton 3.6 and the package's dependencies; PYTHONPATH points at this
# checkout. It is kept between runs (recreated if its versions are wrong); Triton's cache and the
# gate's ptxas-report cache make a rerun with unchanged kernels take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

venv="${FUSED_LORA_TRITON36_VENV:-${TMPDIR:-/tmp}/fused_lora-triton36}"
want='2.13.0+cpu 3.6'
have() { "$venv/bin/python" -c 'import torch, triton, numpy, safetensors; print(torch.__version__, triton.__version__[:3])' 2>/dev/null || true; }
if [ "$(have)" != "$want" ]; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    # Pinned torch first: an unpinned one would pull a multi-GB CUDA build on a CPU-only machine.
    # Beside them only the package's own dependencies (numpy, safetensors): no project install.
    "$venv/bin/python" -m pip install --quiet torch==2.13.0 'triton==3.6.*' numpy safetensors
fi
echo "compile gate under: $(have)"
PYTHONPATH="$PWD" \
    "$venv/bin/python" -m fused_lora.kernels.compile_check
