"""Choosing the implementation that runs each op (also known as `fused_lora.backends`).

    problem.py   Problem: what an op is asked to compute, and its tuning key
    table.py     the one implementation table: rows, the ops each implements, why each cannot run a problem
    dequant_once.py  the dequant-once row's module: torch_row.dequant_once with the device's dequantizer
    registry.py  selection (explicit request, auto's timing, the check rule), `calls`, `report()`
    cache.py     the on-disk cache of auto's choices, keyed by a digest of every implementation file
    check.py     the check rule's comparison of two rows' outputs
"""
from .cache import (CACHE_ENV_VAR, DIGESTED_FOLDERS, Choice, cache_dir, digested_sources, sources_digest,  # noqa: F401
                    versions)
from .check import outputs_mismatch  # noqa: F401
from .problem import Problem  # noqa: F401
from .registry import (REGISTRY, Registry, calls, choose_backend, describe, get, report,  # noqa: F401
                       requested_backend, select, timing_allowed)
from .table import (BACKENDS, ENV_VAR, IMPLEMENTATIONS, NO_TRANSIENT_WEIGHT_ENV_VAR, BackendUnavailable,  # noqa: F401
                    Implementation, no_transient_weight, triton_installed, triton_multi_reasons,
                    triton_not_supported_reasons)
