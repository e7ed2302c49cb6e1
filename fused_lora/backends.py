"""`fused_lora.backends`: the name scripts and users know for `fused_lora.dispatch`, the layer that chooses
which implementation runs each op (its table, `select`, `report()`, `calls`, `BackendUnavailable`)."""
from .dispatch import *  # noqa: F401,F403
from .dispatch import (BACKENDS, ENV_VAR, IMPLEMENTATIONS, REGISTRY, BackendUnavailable, Problem,  # noqa: F401
                       calls, choose_backend, describe, get, report, requested_backend, select)
