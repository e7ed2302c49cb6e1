"""Which op an implementation is asked to run, as data: the library's axes (base, adapters, variant) and
the direction. The dispatch table, the implementation rows' declared ops and the tuning keys all use it.

    base       "dense" (a 16-bit weight) | "quant" (a quantized base, `core.formats`) | "experts" (a 3-D stack
               of 16-bit expert weights, one per group of rows: the grouped op, `ops.grouped`)
    adapters   "one" | "several" (a mixed batch: a per-row adapter index, `core.segments`)
    variant    "lora" | "dora"
    direction  "fwd" | "bwd"

An `Op` is also its short name, a str (fwd, bwd, multi_fwd, quant_bwd, quant_multi_fwd, dora_fwd, ...): the
tuning key's first word, the ops' `calls` counter, the messages, and what `Problem.op` was before it was data,
so code comparing it with a name keeps working. The name is derived from the fields by one rule: the base's
prefix (none for dense; `BASE_PREFIX`), "multi" for several adapters, the variant unless plain LoRA, then the
direction. `function` is
the name of the function an implementation row's module defines for the op (`dispatch.table`).
"""
from __future__ import annotations

BASES = ("dense", "quant", "experts")
BASE_PREFIX = {"dense": "", "quant": "quant", "experts": "grouped"}  # how an op's name says its base
ADAPTERS = ("one", "several")
VARIANTS = ("lora", "dora")
DIRECTIONS = ("fwd", "bwd")
_DEFAULT = {"variant": "lora"}  # the variant a name leaves out

# The functions implementation rows define for the first ops (names older than this rule); an op added later
# gets the rule's name: its name with the direction spelled out (e.g. a future experts_fwd: experts_forward).
_LEGACY_FUNCTIONS = {"fwd": "forward", "bwd": "backward", "multi_fwd": "multi_forward",
                     "multi_bwd": "multi_backward", "quant_fwd": "forward_quant", "quant_bwd": "backward_quant",
                     "quant_multi_fwd": "quant_multi_forward", "quant_multi_bwd": "quant_multi_backward",
                     "dora_fwd": "dora_forward", "dora_bwd": "dora_backward"}


class Op(str):
    """An op: its fields (base, adapters, variant, direction) and, as a str, its short name."""
    __slots__ = ("base", "adapters", "variant", "direction")

    def __new__(cls, base: str = "dense", adapters: str = "one", variant: str = "lora", direction: str = "fwd"):
        for field, value, allowed in (("base", base, BASES), ("adapters", adapters, ADAPTERS),
                                      ("variant", variant, VARIANTS), ("direction", direction, DIRECTIONS)):
            if value not in allowed:
                raise ValueError(f"Op: {field} {value!r} is not one of {', '.join(allowed)}")
        parts = [BASE_PREFIX[base], "multi" if adapters == "several" else "",
                 variant if variant != _DEFAULT["variant"] else "", direction]
        self = super().__new__(cls, "_".join(p for p in parts if p))
        for field, value in (("base", base), ("adapters", adapters), ("variant", variant), ("direction", direction)):
            object.__setattr__(self, field, value)
        return self

    def __setattr__(self, name, value):
        raise AttributeError("Op is immutable")

    def __reduce__(self):
        return Op, (self.base, self.adapters, self.variant, self.direction)

    def __repr__(self) -> str:
        return (f"Op(base={self.base!r}, adapters={self.adapters!r}, variant={self.variant!r}, "
                f"direction={self.direction!r})")

    @property
    def name(self) -> str:
        """The short name (the op itself as a plain str)."""
        return str.__str__(self)

    @property
    def function(self) -> str:
        """The name of the function an implementation row's module defines for this op."""
        return _LEGACY_FUNCTIONS.get(self.name) or self.name[:-3] + ("forward" if self.direction == "fwd"
                                                                         else "backward")

    @property
    def backward(self) -> bool:
        return self.direction == "bwd"

    def forward_twin(self) -> "Op":
        """The forward op whose backward this is (itself for a forward)."""
        return Op(self.base, self.adapters, self.variant, "fwd")

    @staticmethod
    def named(name: str) -> "Op":
        """The op with this short name (ValueError for another name)."""
        try:
            return _BY_NAME[name]
        except KeyError:
            raise ValueError(f"unknown op {name!r}; the ops are {', '.join(_BY_NAME)}") from None


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
