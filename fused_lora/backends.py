"""`fused_lora.backends`: the name scripts and users know for `fused_lora.dispatch`, the layer that chooses
which implementation runs each op (its table, `select`, `report()`, `calls`, `BackendUnavailable`), with the
names this module held before the dispatch layer was split into its modules. Read-only: to change a setting
(a test's monkeypatch), patch the module that holds it (fused_lora.dispatch.registry, .table or .cache)."""
from .core.interpreter import interpreting  # noqa: F401
from .core.limits import HOPPER_MAX_RANK, KERNEL_MIN_BLOCKSIZE, MAX_TRITON_MULTI_RANK, MAX_TRITON_RANK  # noqa: F401
from .core.op_kinds import ALL_OPS
from .dispatch import *  # noqa: F401,F403
from .dispatch.cache import CACHE_FORMAT, MAX_CACHE_BYTES  # noqa: F401
from .dispatch.registry import cuda_timer, device_name  # noqa: F401
from .dispatch.table import (HOPPER_DTYPES, TRITON_DTYPES, hopper_reasons, triton_base_reasons,  # noqa: F401
                             triton_reasons)

# a backward op -> the forward whose dropout mask it must reuse (by name, as before ops became data)
BACKWARD_OPS = {op.name: op.forward_twin().name for op in ALL_OPS if op.backward and op.variant == "lora"}
