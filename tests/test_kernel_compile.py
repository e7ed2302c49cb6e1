"""Every kernel config compiles for sm_90 (H100/H200) and sm_80 (A100) within shared memory.

Runs on the CPU: Triton compiles for a GPUTarget it does not have. The interpreter cannot catch
shared-memory overflows or GPU-only compile errors (dot blocks under 16, mixed-dtype dots); this can.
"""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def test_every_config_compiles_within_shared_memory():
    from fused_lora.kernels import compile_check
    results = compile_check.run_all(workers=2)
    kernels = {job[0] for job, *_ in results}
    assert kernels == {"shrink", "forward", "dy", "dx_da"} and {job[1] for job, *_ in results} == {80, 90}
    failures = [f"{job}: {err}" for job, shared, limit, err in results if err is not None]
    assert not failures, "\n".join(failures)
    assert all(0 < shared <= limit for _, shared, limit, _ in results)
