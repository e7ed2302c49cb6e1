"""What a LoraModel call hands to its modules (each layer's adapter_names, each modules_to_save copy's
per-sample mask), per thread: {module: value} for the calls running in this thread. Not an attribute of
the modules, which every thread would share (concurrent calls of one model read each other's names);
dynamo traces a threading.local (guarding on what it holds), so torch.compile(fullgraph=True) keeps
taking adapter_names."""
from __future__ import annotations

import contextlib
import threading

from torch import nn

_CALL = threading.local()


@contextlib.contextmanager
def call_values(values: dict):
    """Within the block, in this thread only, `call_value(module)` is `values[module]` for each module
    in `values` (a LoraModel call's adapter_names for its layers); an enclosing block's values stay
    visible for other modules, and come back afterwards."""
    previous = getattr(_CALL, "values", None)
    _CALL.values = values if previous is None else {**previous, **values}
    try:
        yield
    finally:
        _CALL.values = previous


def call_value(module: nn.Module):
    """What the LoraModel call running in this thread gave `module` (`call_values`), or None."""
    values = getattr(_CALL, "values", None)
    return None if values is None else values.get(module)
