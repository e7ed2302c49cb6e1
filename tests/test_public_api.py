"""The package face keeps what users and scripts reach for (issue 19's must-not-change): every public name,
`fused_lora.backends` (the documented `fused_lora.backends.report()` after a plain `import fused_lora`, and the
names the module held before the dispatch layer was split), and `Problem.op` still comparing equal to the op's
short name."""
import subprocess
import sys

import torch

import fused_lora
from fused_lora import backends

PUBLIC = ["FusedLoRALinear", "lora_linear", "lora_linear_multi", "dora_linear", "LoraConfig", "get_lora_model",
          "LoraModel", "AdapterError", "BackendUnavailable", "patch_peft", "unpatch_peft", "quantize_model",
          "QuantizedLinear", "QuantizedWeight", "quantize_nf4", "quantize_int8", "lora_linear_quant", "__version__"]
LEGACY_BACKENDS = ["select", "report", "calls", "get", "describe", "choose_backend", "requested_backend", "Problem",
                   "Registry", "REGISTRY", "Implementation", "IMPLEMENTATIONS", "BACKENDS", "BackendUnavailable",
                   "ENV_VAR", "CACHE_ENV_VAR", "CACHE_FORMAT", "MAX_CACHE_BYTES", "MAX_TRITON_RANK",
                   "MAX_TRITON_MULTI_RANK", "HOPPER_MAX_RANK", "KERNEL_MIN_BLOCKSIZE", "TRITON_DTYPES", "HOPPER_DTYPES",
                   "BACKWARD_OPS", "Choice", "cache_dir", "versions", "cuda_timer", "device_name", "timing_allowed",
                   "interpreting", "triton_installed", "triton_not_supported_reasons", "triton_multi_reasons",
                   "triton_base_reasons", "outputs_mismatch", "digested_sources", "sources_digest"]


def test_public_names():
    assert set(PUBLIC) <= set(fused_lora.__all__)
    for name in PUBLIC:
        assert getattr(fused_lora, name) is not None


def test_backends_after_a_plain_import():
    code = "import fused_lora; print(fused_lora.backends.report().splitlines()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("backends"), out.stderr[-2000:]


def test_backends_keeps_its_names():
    missing = [name for name in LEGACY_BACKENDS if not hasattr(backends, name)]
    assert not missing, missing
    assert {"bwd": "fwd", "multi_bwd": "multi_fwd", "quant_bwd": "quant_fwd",
            "quant_multi_bwd": "quant_multi_fwd"}.items() <= backends.BACKWARD_OPS.items()


def test_problem_op_compares_with_its_name():
    p = backends.Problem("quant_multi_bwd", torch.device("cpu"), torch.float16, 8, 8, 8, 4)
    assert p.op == "quant_multi_bwd" and p.op.startswith("quant_") and p.op.adapters == "several"
    assert {p.op: 1}["quant_multi_bwd"] == 1 and p.forward_twin().op == "quant_multi_fwd"
