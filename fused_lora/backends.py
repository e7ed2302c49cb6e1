"""`fused_lora.backends`: the name scripts and users know for the dispatch layer's public face
(fused_lora.dispatch): the implementation table, `select`, `report`, `calls`, `BackendUnavailable`."""
from .dispatch.registry import *  # noqa: F401,F403
from .dispatch.registry import (BackendUnavailable, Problem, REGISTRY, calls, choose_backend, describe, get,  # noqa: F401
                                report, requested_backend, select)
