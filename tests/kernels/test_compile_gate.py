"""The static performance gate: every kernel variant compiles for sm_90 (H100/H200) and sm_80 (A100)
within shared memory, and for sm_90 without register spills or ptxas performance advisories.

Runs on the CPU: Triton compiles for a GPUTarget it does not have, and its bundled ptxas reads the
result. The interpreter cannot catch shared-memory overflows, GPU-only compile errors (dot blocks
under 16, mixed-dtype dots) or spills; this can. .ci/compile_gate.sh runs the same gate under
triton 3.6, the GPU machine's version.
"""
import importlib.util

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def test_parse_ptxas_report():
    from fused_lora.kernels.compile_check import parse_ptxas
    log = """ptxas info    : Function properties for k
    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to x."""
    got = parse_ptxas(log)
    assert got["registers"] == 255 and got["spill_stores"] == 24 and got["spill_loads"] == 16
    assert len(got["advisories"]) == 1 and got["advisories"][0].startswith("C7515 Potential Performance Loss")
    assert parse_ptxas("0 bytes spill stores, 0 bytes spill loads\nUsed 40 registers")["advisories"] == []


def test_every_variant_compiles_clean():
    from fused_lora.kernels import compile_check, configs
    results = compile_check.run_all(workers=2)
    seen = {(r.variant.kernel, r.variant.arch, r.variant.dtype) for r in results}
    want = {(k, a, d) for k in configs.KERNELS + configs.QUANT_KERNELS + configs.DEQUANT_KERNELS + ("reduce",)
            for a in compile_check.ARCHS for d in compile_check.DTYPES}
    want |= {(k, a, d) for k in configs.MULTI_KERNELS + ("multi_sum",) + configs.GROUPED_KERNELS
             for a in compile_check.ARCHS for d in compile_check.MULTI_DTYPES}  # segment and grouped kernels: 16-bit
    # The Hopper path (TMA + persistent GEMMs, the single-pass forward): sm_90, 16-bit dtypes only.
    want |= {(k, configs.HOPPER_ARCH, d) for k in configs.HOPPER_KERNELS for d in ("bf16", "fp16")}
    assert seen == want
    grouped = [r for r in results if r.variant.kernel in configs.GROUPED_SEGMENT_KERNELS]  # the transposed stack
    assert {r.variant.block_r for r in grouped} == set(configs.MULTI_BLOCK_RS)
    hopper = [r for r in results if r.variant.kernel in configs.HOPPER_KERNELS]
    assert {r.variant.block_r for r in hopper} == {16, 32, 64}
    flags = {(r.variant.kernel, r.variant.flags) for r in results}
    assert len(flags) == sum(len(f) for f in compile_check.FLAGS.values())
    failures = [f"{compile_check._describe(r)}: {'; '.join(r.failures())}" for r in results if r.failures()]
    assert not failures, "\n".join(failures)
    assert all(r.shared is not None and r.registers for r in results)
