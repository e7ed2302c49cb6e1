"""Which op an implementation is asked to run, as data: the library's axes (base, adapters, variant) and
the direction. The dispatch table, the implementation rows' declared ops and the tuning keys all use it;
`name` is the op's short name (the key's first word, the ops' `calls` counter, the messages); `function`
the name of the function an implementation row's module defines for the op (one naming rule for every row:
`dispatch.table`).

    base       "dense" (a 16-bit weight) | "quant" (a quantized base, `core.formats`) | "experts" (a 3-D stack
               of 16-bit expert weights, one per group of rows: the grouped op, `ops.grouped`)
    adapters   "one" | "several" (a mixed batch: a per-row adapter index, `core.segments`)
    variant    "lora" | "dora"
    direction  "fwd" | "bwd"
"""
from __future__ import annotations

from dataclasses import dataclass, replace

BASES = ("dense", "quant", "experts")
ADAPTERS = ("one", "several")
VARIANTS = ("lora", "dora")
DIRECTIONS = ("fwd", "bwd")


@dataclass(frozen=True)
class Op:
    base: str = "dense"
    adapters: str = "one"
    variant: str = "lora"
    direction: str = "fwd"

    def __post_init__(self):
        for field, value, allowed in (("base", self.base, BASES), ("adapters", self.adapters, ADAPTERS),
                                      ("variant", self.variant, VARIANTS), ("direction", self.direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"Op: {field} {value!r} is not one of {', '.join(allowed)}")

    @property
    def name(self) -> str:
        """The short name: fwd, bwd, multi_fwd, quant_bwd, quant_multi_fwd, dora_fwd, grouped_fwd, ..."""
        parts = {"dense": [], "quant": ["quant"], "experts": ["grouped"]}[self.base]
        parts += ["multi"] if self.adapters == "several" else []
        parts += ["dora"] if self.variant == "dora" else []
        return "_".join(parts + [self.direction])

    @property
    def function(self) -> str:
        """The name of the function an implementation row's module defines for this op."""
        return _FUNCTIONS[self.name]

    @property
    def backward(self) -> bool:
        return self.direction == "bwd"

    def forward_twin(self) -> "Op":
        """The forward op whose backward this is (itself for a forward)."""
        return replace(self, direction="fwd")

    @staticmethod
    def named(name: str) -> "Op":
        """The op with this short name (ValueError for another name)."""
        try:
            return _BY_NAME[name]
        except KeyError:
            raise ValueError(f"unknown op {name!r}; the ops are {', '.join(_BY_NAME)}") from None

    def __str__(self) -> str:
        return self.name


FWD, BWD = Op(), Op(direction="bwd")
MULTI_FWD, MULTI_BWD = Op(adapters="several"), Op(adapters="several", direction="bwd")
QUANT_FWD, QUANT_BWD = Op(base="quant"), Op(base="quant", direction="bwd")
QUANT_MULTI_FWD = Op(base="quant", adapters="several")
QUANT_MULTI_BWD = Op(base="quant", adapters="several", direction="bwd")
DORA_FWD, DORA_BWD = Op(variant="dora"), Op(variant="dora", direction="bwd")
# The grouped op (mixture-of-experts weights): rows sorted by group, group g's rows through expert g's base
# weight and LoRA factors (one adapter, per-expert A and B; `ops.grouped.lora_linear_grouped`).
GROUPED_FWD, GROUPED_BWD = Op(base="experts"), Op(base="experts", direction="bwd")
GROUPED_OPS = frozenset({GROUPED_FWD, GROUPED_BWD})
# The ops the library runs (DoRA over one dense adapter only: QDoRA and DoRA in a mixed batch are refused;
# expert weights with one adapter, plain LoRA).
ALL_OPS = (FWD, BWD, MULTI_FWD, MULTI_BWD, QUANT_FWD, QUANT_BWD, QUANT_MULTI_FWD, QUANT_MULTI_BWD, DORA_FWD, DORA_BWD,
           GROUPED_FWD, GROUPED_BWD)
_BY_NAME = {op.name: op for op in ALL_OPS}
_FUNCTIONS = {"fwd": "forward", "bwd": "backward", "multi_fwd": "multi_forward", "multi_bwd": "multi_backward",
              "quant_fwd": "forward_quant", "quant_bwd": "backward_quant", "quant_multi_fwd": "quant_multi_forward",
              "quant_multi_bwd": "quant_multi_backward", "dora_fwd": "dora_forward", "dora_bwd": "dora_backward",
              "grouped_fwd": "grouped_forward", "grouped_bwd": "grouped_backward"}
