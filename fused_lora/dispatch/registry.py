"""The one place that chooses which implementation runs an op: one table, one rule.

The table (`IMPLEMENTATIONS`, in order of preference on ties):
    torch   fused_lora.torch_row.dense: PyTorch ops (cuBLAS on a GPU); runs whatever torch runs
    triton  fused_lora.kernels: the fused Triton kernels
    triton-tma      fused_lora.kernels.tma: the Hopper path (TMA + persistent forward and dX GEMMs)
    triton-onepass  fused_lora.kernels.one_pass: the single-pass forward (no shrink pass)
(a `cuda` row for csrc/ joins it later). Each row states why it cannot run a `Problem` (its
`not_supported_reasons`, empty when it can), as xformers' dispatch does.

Rules, in order:
1. An explicit request (the backend= argument, else FUSED_LORA_BACKEND) wins. Asking for a row
   that cannot run raises `BackendUnavailable` with its reasons, never a silent fallback.
2. "auto" off CUDA (the CPU): torch, untimed.
3. "auto" on CUDA: the first call for a key (op, device name, dtype, M's power-of-two bucket, N,
   K, rank bucket, dropout on/off, and for backward which gradients) times every row that can run
   it, as an autotuner does, and keeps the fastest (ties: the earlier row) in memory and in a JSON
   file under `cache_dir()`, so the layer is never slower than the cuBLAS path and later processes
   reuse the choice without timing. Nothing is timed while torch.compile traces or a CUDA graph is
   being captured: there the known winner runs, else torch.
4. With dropout, backward runs what the forward's key chose: the rows draw different masks from
   one seed, and forward and backward must agree on the mask.
5. A row with `check_against` (the Hopper-path rows, and the triton row's segment and
   quantized-base kernels without dropout, whose kernels no GPU has run yet) is timed only after its output matched that row's
   (torch; with dropout the triton row, whose mask it shares) on the key's inputs with random LoRA
   weights (the ops' `probe`: a fresh adapter's B = 0 would hide every low-rank term); a row that
   does not match is recorded as failed and never chosen. Such a row read from the cache as a key's
   winner is checked the same way on the key's first call in each process before it runs (one probe);
   if it does not match, it is recorded as failed and the key is timed afresh without it; where no
   check can run (no inputs to probe, a CUDA graph being captured) the default runs. A backward
   with dropout that follows such a row (rule 4) is checked the same way on its first call per key
   and process; if it does not match, the reference row (same mask) runs it instead.

Triton runs on CPU tensors only under TRITON_INTERPRET=1 (its interpreter), and only when asked
for by name: that is how CI tests the real kernels without a GPU. The interpreter computes
bfloat16 matrix products wrongly, so bfloat16 is refused under it.

A cache file that cannot be read, parsed or written is ignored (noted in `report()`, and a warning
once per file and process), never fatal: it is read only as a regular file of at most
MAX_CACHE_BYTES (a FIFO or a device at its path is refused without blocking: `files.read_regular_file`)
and only when every field has its type (`_schema_error`); the next choice stored replaces it.
`calls` counts which implementation ran each op, so tests (and users) can see it; `report()` says
what was chosen for which keys and the timings behind it.
"""
from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib
import importlib.metadata
import importlib.util
import json
import math
import os
import re
import tempfile
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional, Sequence

import torch

from ..core.files import read_regular_file
from ..core.interpreter import interpreting  # noqa: F401  (also part of this module's API)
from ..core.limits import KERNEL_MIN_BLOCKSIZE

ENV_VAR = "FUSED_LORA_BACKEND"
CACHE_ENV_VAR = "FUSED_LORA_CACHE_DIR"
MAX_TRITON_RANK = 256
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CACHE_FORMAT = 1
MAX_CACHE_BYTES = 16 << 20  # a real cache holds kilobytes; this bounds what a hostile file costs

BACKWARD_OPS = {"bwd": "fwd", "multi_bwd": "multi_fwd", "quant_bwd": "quant_fwd"}  # a backward op -> the forward whose mask it must reuse
calls: Counter = Counter()  # (op name, backend) -> number of calls


class BackendUnavailable(RuntimeError):
    """A backend was requested by name but cannot run these inputs."""




@lru_cache(maxsize=None)
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _pow2_bucket(n: int, floor: int = 16) -> int:
    """The power of two at or above n (at least `floor`): sizes that share tuned choices."""
    return max(floor, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class Problem:
    """What an op is asked to compute, as far as choosing an implementation goes.

    op: "fwd" or "bwd" (one adapter), "multi_fwd" or "multi_bwd" (several adapters, a per-row adapter
    index; `rank` is then the largest rank), "quant_fwd" or "quant_bwd" (a quantized base, `quant_ops`);
    x is M x K, W is N x K, the LoRA rank is `rank`; `dropout` whether p > 0;
    `grads`: for backward, the gradients asked for, among ("dx", "lora", "dW", "db"); `base`, `blocksize`:
    a quantized base's layout (`quant_format.layout_name`: other kernels, so tuned apart), "" for a 16-bit one.
    """
    op: str
    device: torch.device
    dtype: torch.dtype
    M: int
    N: int
    K: int
    rank: int
    dropout: bool = False
    grads: tuple = ()
    base: str = ""
    blocksize: int = 0

    def key(self) -> str:
        """The tuning key within one device: M and the rank by power-of-two bucket."""
        key = (f"{self.op} {str(self.dtype).replace('torch.', '')} M{_pow2_bucket(self.M)} N{self.N} K{self.K} "
               f"r{_pow2_bucket(self.rank)} dropout={'on' if self.dropout else 'off'}")
        if self.op in BACKWARD_OPS:
            key += " grads=" + ("+".join(self.grads) or "none")
        if self.base:
            key += f" base={self.base}" + (f"/{self.blocksize}" if self.blocksize else "")
        return key

    def forward_twin(self) -> "Problem":
        """The forward problem whose backward this is."""
        return dataclasses.replace(self, op=BACKWARD_OPS[self.op], grads=())


def triton_not_supported_reasons(device: torch.device, dtype: torch.dtype, rank: int) -> list[str]:
    """Why the Triton kernels cannot run on these inputs (empty when they can)."""
    reasons = []
    if not triton_installed():
        reasons.append("triton is not installed")
    if device.type == "cpu" and not interpreting():
        reasons.append("tensors are on the CPU and TRITON_INTERPRET=1 is not set")
    elif device.type not in ("cuda", "cpu"):
        reasons.append(f"device type {device.type!r} is not supported by the Triton kernels")
    if dtype not in TRITON_DTYPES:
        reasons.append(f"dtype {dtype} is not one of float16, bfloat16, float32")
    elif dtype == torch.bfloat16 and interpreting():
        # The interpreter holds bf16 as uint16 and its tl.dot gives garbage (errors ~1e10);
        # compiled kernels on a GPU (TRITON_INTERPRET unset) compute bf16 correctly.
        reasons.append("bfloat16 is not supported by Triton's interpreter (its bf16 dot is wrong); "
                       "compiled GPU bf16 is")
    if rank > MAX_TRITON_RANK:
        reasons.append(f"rank {rank} is above {MAX_TRITON_RANK}")
    return reasons


MAX_TRITON_MULTI_RANK = 128  # kernels/configs.MAX_MULTI_RANK (not imported here: no Triton at import)


def triton_multi_reasons(problem: "Problem") -> list[str]:
    """What the segment kernels (several adapters in one batch) cannot run, beyond the single-adapter
    reasons: ranks above 128 and, compiled on a GPU, float32 (their compiled variants are 16-bit)."""
    if not problem.op.startswith("multi_"):
        return []
    reasons = []
    if problem.rank > MAX_TRITON_MULTI_RANK:
        reasons.append(f"the multi-adapter kernels take ranks up to {MAX_TRITON_MULTI_RANK}, the largest "
                       f"rank here is {problem.rank}")
    if problem.dtype == torch.float32 and problem.device.type == "cuda":
        reasons.append("the multi-adapter kernels are compiled for float16 and bfloat16 on a GPU, not float32")
    return reasons


def triton_op_reasons(op: str) -> list[str]:
    """Ops the Triton kernels do not implement yet (empty when they do)."""
    if op.startswith("quant_") and importlib.util.find_spec("fused_lora.kernels.quantized.launchers") is None:
        return ["the Triton kernels for a quantized base (fused_lora.kernels.quant: forward_quant, "
                "backward_quant) are not there yet; the torch backend runs it"]
    return quant_multi_reasons(op)


@dataclass(frozen=True)
class Implementation:
    """One row of the table: a name, what it is, where its code lives, and what it cannot run.

    `load()` returns an object with `forward`, `backward` and `keep_mask` as in `torch_impl`.
    """
    name: str
    doc: str
    loader: Callable[[], Any]
    reasons: Callable[[Problem], list] = lambda problem: []
    # For a row auto must not trust untested on a device: the name of the row whose output its own
    # must match, on the same inputs, before auto times it (see `Registry._time`); None (or a
    # callable returning None for a problem): trusted.
    check_against: Optional[Callable[[Problem], str]] = None

    def not_supported_reasons(self, problem: Problem) -> list[str]:
        return list(self.reasons(problem))

    def load(self):
        return self.loader()


IMPLEMENTATIONS: tuple[Implementation, ...] = (
    Implementation("torch", "PyTorch ops (cuBLAS GEMMs onto the rank-r term on a GPU); runs anywhere torch runs",
                   lambda: importlib.import_module("fused_lora.torch_row.dense")),
    # Imported on first use only: no Triton work at package import.
    Implementation("triton", "the fused Triton kernels (CUDA; CPU only under TRITON_INTERPRET=1)",
                   lambda: importlib.import_module("fused_lora.kernels"),
                   lambda p: (triton_not_supported_reasons(p.device, p.dtype, p.rank) + triton_op_reasons(p.op)
                              + triton_multi_reasons(p) + triton_base_reasons(p)),
                   check_against=lambda p: _segment_kernels_checked_against(p)),
)


def _segment_kernels_checked_against(p: Problem) -> Optional[str]:
    """The triton row's segment kernels (ops multi_fwd / multi_bwd) and its quantized-base kernels
    (quant_*: NF4/int8 dequantized in the GEMMs), which no GPU has run yet either, are checked against the
    torch row's path for the op. The segment kernels' probe keeps the dropout, and the two rows draw
    different masks: with dropout they are unchecked. The quantized ops' probe turns the dropout off
    (quant_ops), so their forward is checked with dropout too; a backward with dropout follows its
    forward's row (rule 4), and torch, another mask, could not stand in for it: unchecked there.
    The single-adapter 16-bit ops are trusted."""
    if p.op.startswith("quant_"):
        return None if p.op.endswith("_bwd") and p.dropout else "torch"
    return "torch" if p.op.startswith("multi_") and not p.dropout else None


def triton_base_reasons(p: Problem) -> list[str]:
    """Why the triton row cannot run over this quantized base's layout (empty when it can)."""
    if p.base.startswith("nf4") and p.blocksize < KERNEL_MIN_BLOCKSIZE:
        return [f"NF4 blocksize {p.blocksize}: the Triton kernels take blocks of {KERNEL_MIN_BLOCKSIZE} elements "
                "or more; the torch backend runs it"]
    return []


# ---- Several adapters in one batch over a quantized base (quant_ops.lora_linear_quant_multi): ops
# "quant_multi_fwd" / "quant_multi_bwd"; the triton row runs fused_lora.kernels.quant_multi.
BACKWARD_OPS["quant_multi_bwd"] = "quant_multi_fwd"


def quant_multi_reasons(op: str) -> list[str]:
    """Why the triton row cannot run a "quant_multi_" op (beyond its other reasons): its launchers missing."""
    if op.startswith("quant_multi_") and importlib.util.find_spec("fused_lora.kernels.quantized.multi") is None:
        return ["the Triton launchers for several adapters over a quantized base (fused_lora.kernels.quant_multi) "
                "are not there; the torch backend runs it"]
    return []


# ---- The Hopper path: candidates beside the pointer kernels, timed by auto like every row.
HOPPER_MAX_RANK = 64
HOPPER_DTYPES = (torch.float16, torch.bfloat16)


def _hopper_reasons(p: Problem, tma: bool) -> list[str]:
    """Why the Hopper-path kernels (fused_lora.kernels.tma, .one_pass) cannot run `p`: what the
    triton row cannot run, and beyond it what their compiled variant set leaves out (the static gate
    compiles them for sm_90, in float16/bfloat16, at ranks <= 64; the triton row runs the rest),
    and for TMA rows of K and N that are not 16-byte multiples (a descriptor's row stride)."""
    reasons = triton_not_supported_reasons(p.device, p.dtype, p.rank)
    if p.op not in ("fwd", "bwd"):
        reasons.append(f"op {p.op}: the Hopper-path rows run one plain adapter (ops fwd, bwd); several adapters "
                       "in one batch run on the triton row's segment kernels")
    if p.device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(p.device)
        if major != 9:
            reasons.append(f"this GPU is sm_{major}{minor}: the Hopper-path kernels are built and gated for "
                           f"sm_90 only{' (TMA descriptors need sm_90)' if tma and major < 9 else ''}")
    if p.dtype in TRITON_DTYPES and p.dtype not in HOPPER_DTYPES:
        reasons.append(f"dtype {str(p.dtype).replace('torch.', '')}: the Hopper-path kernels are compiled for "
                       "float16 and bfloat16 only (the triton row runs it)")
    if HOPPER_MAX_RANK < p.rank <= MAX_TRITON_RANK:
        reasons.append(f"rank {p.rank} is above {HOPPER_MAX_RANK}, the largest the Hopper-path kernels are "
                       "compiled for (the triton row runs it)")
    if tma and p.dtype in HOPPER_DTYPES:
        elt = torch.empty((), dtype=p.dtype).element_size()
        odd = [f"{name}={n}" for name, n in (("K", p.K), ("N", p.N)) if (n * elt) % 16]
        if odd:
            reasons.append(f"TMA descriptors need rows of 16-byte multiples: {', '.join(odd)} in "
                           f"{str(p.dtype).replace('torch.', '')} is not (the triton row runs it)")
    return reasons


def _checked_against(p: Problem) -> str:
    """The row a Hopper-path row's output is checked against before auto times it: torch (an
    independent implementation) without dropout; with dropout the pointer kernels (triton), whose
    dropout mask the Hopper path shares bit for bit (torch draws a different one)."""
    return "triton" if p.dropout else "torch"


IMPLEMENTATIONS += (
    Implementation("triton-tma", "Hopper path: TMA descriptors + persistent grid for the forward and dX GEMMs "
                   "(fused_lora.kernels.tma; sm_90)",
                   lambda: importlib.import_module("fused_lora.kernels.hopper.tma"),
                   lambda p: _hopper_reasons(p, tma=True), check_against=_checked_against),
    Implementation("triton-onepass", "single-pass forward: H accumulated in the GEMM's K loop, no shrink pass "
                   "(fused_lora.kernels.one_pass; sm_90)",
                   lambda: importlib.import_module("fused_lora.kernels.hopper.one_pass"),
                   lambda p: _hopper_reasons(p, tma=False), check_against=_checked_against),
)
BACKENDS = tuple(impl.name for impl in IMPLEMENTATIONS)


@dataclass
class Choice:
    """What auto chose for one key: the winner, each candidate's median ms, and failures."""
    winner: str
    ms: dict
    errors: dict = dataclasses.field(default_factory=dict)
    source: str = "timed"  # "timed" in this process, or "disk" (read from the cache)


# ------------------------------------------------------------------------------------- timing

def cuda_timer(fn: Callable[[], Any]) -> float:
    """Median milliseconds of `fn` on the current CUDA stream, autotuner style (warm-up, then timed
    reps): triton.testing.do_bench when triton is installed (L2 flushed between reps), else events."""
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=10, rep=40, return_mode="median"))
    for _ in range(3):
        fn()
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(sorted(times)[len(times) // 2])


def timing_allowed() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured (timing would break both)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_initialized()
                and torch.cuda.is_current_stream_capturing())


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type


# ----------------------------------------------------------------------------------- the cache

def cache_dir() -> str:
    """Where tuned choices are kept: $FUSED_LORA_CACHE_DIR, else $XDG_CACHE_HOME/fused_lora, else
    ~/.cache/fused_lora."""
    explicit = os.environ.get(CACHE_ENV_VAR)
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fused_lora")


# The folders whose files key the tuned choices: every implementation (the Triton kernels, the PyTorch
# row, the core math and formats both read) and the rules choosing between them (this layer). By
# folder, not by a list kept by hand: a file added to any of them is covered.
DIGESTED_FOLDERS = ("core", "torch_row", "kernels", "dispatch")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def digested_sources(root: str = PACKAGE_ROOT) -> list[str]:
    """The files whose content keys the tuned choices: every .py file under DIGESTED_FOLDERS of the
    package at `root`."""
    return sorted(path for folder in DIGESTED_FOLDERS
                  for path in glob.glob(os.path.join(root, folder, "**", "*.py"), recursive=True))


def sources_digest(root: str = PACKAGE_ROOT) -> str:
    """A digest of `digested_sources(root)`, names and contents: an edited, added or removed kernel,
    PyTorch path, format or selection rule invalidates the tuned choices."""
    h = hashlib.sha1()
    for path in digested_sources(root):
        h.update(os.path.relpath(path, root).encode() + b"\0")
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            pass
    return h.hexdigest()[:12]


@lru_cache(maxsize=None)
def _sources_digest() -> str:
    return sources_digest()


def versions() -> dict:
    """What a tuned choice depends on besides the device."""
    try:
        triton_version = importlib.metadata.version("triton") if triton_installed() else None
    except Exception:  # metadata missing (a source checkout of triton): the digest still changes with ours
        triton_version = "unknown"
    from .. import __version__
    return {"fused_lora": __version__, "sources": _sources_digest(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton_version}


def _cache_file(directory: str, device: str, vers: dict) -> str:
    slug = re.sub(r"[^A-Za-z0-9]+", "_", device).strip("_")[:40] or "device"
    digest = hashlib.sha1(json.dumps([device, vers], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(directory, f"backends-{slug}-{digest}.json")


def _is_ms(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _schema_error(data) -> Optional[str]:
    """What makes a cache file's parsed data not a backend cache (a wrong type anywhere), or None.

    A file of the current format is what `Registry._store` writes: {"format": 1, "device": str,
    "versions": {str: str, number or null}, "choices": {key: {"winner": str, "ms": {str: finite ms >= 0},
    "errors": {str: str}}}}."""
    if not isinstance(data, dict):
        return f"not a fused_lora backend cache (a JSON {type(data).__name__}, not an object)"
    if data.get("format") != CACHE_FORMAT or isinstance(data.get("format"), bool):
        return f"not a fused_lora backend cache (format {data.get('format')!r}, expected {CACHE_FORMAT})"
    if not isinstance(data.get("device"), str):
        return f"its device is {type(data.get('device')).__name__}, not a string"
    vers = data.get("versions")
    if not isinstance(vers, dict) or not all(v is None or (isinstance(v, (str, int, float)) and not isinstance(v, bool))
                                             for v in vers.values()):
        return "its versions are not an object of strings, numbers or nulls"
    if not isinstance(data.get("choices"), dict):
        return f"its choices are {type(data.get('choices')).__name__}, not an object"
    for key, entry in data["choices"].items():
        if not isinstance(entry, dict):
            return f"choice {key!r} is {type(entry).__name__}, not an object"
        if not isinstance(entry.get("winner"), str):
            return f"choice {key!r}: its winner is {type(entry.get('winner')).__name__}, not a row's name"
        ms, errors = entry.get("ms"), entry.get("errors", {})
        if not isinstance(ms, dict) or not all(_is_ms(v) for v in ms.values()):
            return f"choice {key!r}: its ms are not an object of finite milliseconds"
        if not isinstance(errors, dict) or not all(isinstance(v, str) for v in errors.values()):
            return f"choice {key!r}: its errors are not an object of strings"
    return None


def _valid_choices(data, names: Sequence[str]) -> dict:
    """The choices of a cache file's data whose winner is a row of this table (others, from a table with
    other rows, are dropped); ValueError naming the problem when the data is not a well-formed backend
    cache (`_schema_error`): such a file is ignored as a whole, never half trusted."""
    problem = _schema_error(data)
    if problem:
        raise ValueError(problem)
    return {key: Choice(entry["winner"], dict(entry["ms"]), dict(entry.get("errors", {})), "disk")
            for key, entry in data["choices"].items() if entry["winner"] in names}


def _read_json(path: str):
    """A cache file's parsed JSON, read as `files.read_regular_file` reads (a regular file of at most
    MAX_CACHE_BYTES: a FIFO or a link to /dev/zero at the path neither blocks nor reads without end);
    ValueError (or OSError) for a file that is not that, is not JSON, or is nested beyond the parser."""
    text = read_regular_file(path, MAX_CACHE_BYTES, "a backend cache")
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("its JSON is nested too deeply for a backend cache") from None


def _write_atomic(path: str, data: dict) -> None:
    """Write-then-rename in the same directory: a reader sees the old file or the new, never half."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".backends-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# -------------------------------------------------------------------------------- the registry

class Registry:
    """The table of implementations and what auto has chosen with it.

    Everything environment-dependent can be injected (tests use fakes): `timer(fn) -> ms`,
    `cache_directory` (default: `cache_dir()` at each use), `name_of(device) -> str`, `tuned_devices`
    (device types on which auto times; CUDA), `versions_of() -> dict`.
    """

    def __init__(self, implementations: Sequence[Implementation] = IMPLEMENTATIONS,
                 timer: Callable[[Callable[[], Any]], float] = cuda_timer, cache_directory: Optional[str] = None,
                 name_of: Callable[[torch.device], str] = device_name, tuned_devices: Sequence[str] = ("cuda",),
                 versions_of: Callable[[], dict] = versions):
        self.implementations = tuple(implementations)
        self._by_name = {impl.name: impl for impl in self.implementations}
        self._timer = timer
        self._cache_directory = cache_directory
        self._name_of = name_of
        self._tuned_devices = tuple(tuned_devices)
        self._versions_of = versions_of
        self.choices: dict[tuple[str, str], Choice] = {}  # (device name, key) -> choice
        self.notes: list[str] = []  # cache files ignored, writes that failed, backward checks failed
        self.checked: dict[tuple[str, str, str], Optional[str]] = {}  # (device, key, row) -> None or why not
        self._loaded: set[str] = set()  # device names whose cache file was read
        self._lock = threading.RLock()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._by_name)

    @property
    def tuned_devices(self) -> tuple[str, ...]:
        """Device types on which auto times the rows (elsewhere it takes the first row that can run)."""
        return self._tuned_devices

    def get(self, name: str) -> Implementation:
        """The row called `name` (ValueError for an unknown name)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(self.names)}") from None

    def requested(self, requested: str = "auto") -> str:
        """The backend asked for: the argument unless "auto", else the environment, else "auto"."""
        choice = requested if requested != "auto" else os.environ.get(ENV_VAR, "auto") or "auto"
        if choice != "auto" and choice not in self._by_name:
            raise ValueError(f"unknown backend {choice!r} (from {'argument' if requested != 'auto' else ENV_VAR}); "
                             f"expected one of auto, {', '.join(self.names)}")
        return choice

    def candidates(self, problem: Problem) -> list[Implementation]:
        """The rows that can run `problem`, in table order."""
        return [impl for impl in self.implementations if not impl.not_supported_reasons(problem)]

    def select(self, problem: Problem, requested: str = "auto",
               bench: Optional[Callable[[Any], Callable[[], Any]]] = None,
               probe: Optional[Callable[[Any], Callable[[], Any]]] = None) -> Implementation:
        """The row that runs `problem`. `bench(module)` returns a callable running the op on the actual
        inputs with that row's module: auto times those on a key's first call (see the module doc).
        `probe(module)`, where given, runs it on the inputs rule 5 checks rows on (default: bench's)."""
        choice = self.requested(requested)
        if choice != "auto":
            impl = self._by_name[choice]
            reasons = impl.not_supported_reasons(problem)
            if reasons:
                raise BackendUnavailable(f"the {choice} backend was requested but cannot run: " + "; ".join(reasons))
            return impl
        candidates = self.candidates(problem)
        if not candidates:
            raise BackendUnavailable("no backend can run these inputs: " + "; ".join(
                f"{impl.name}: {', '.join(impl.not_supported_reasons(problem))}" for impl in self.implementations))
        default = candidates[0]
        if problem.device.type not in self._tuned_devices or len(candidates) == 1:
            return default
        by_name = {impl.name: impl for impl in candidates}
        with self._lock:
            can_run_now = bench is not None and min(problem.M, problem.N, problem.K) > 0 and timing_allowed()
            if problem.op in BACKWARD_OPS and problem.dropout:
                twin = problem.forward_twin()
                known = self.known(twin)
                # A cached forward row not yet checked did not run the forward (the default did): follow that.
                trusted = known is not None and known.winner in by_name and not self._unchecked(twin, known)
                follows = by_name[known.winner] if trusted else default
                return self._checked_follower(problem, follows, by_name, bench, probe)
            known = self.known(problem)
            if known is not None and known.winner in by_name and self._unchecked(problem, known):
                if not can_run_now:
                    return default  # cannot check it here: the deterministic default, as for an unknown key
                known = self._check_cached(problem, known, candidates, bench, probe)
            if known is not None:
                return by_name.get(known.winner, default)
            if not can_run_now:
                return default  # nothing to time (or no timing allowed here): the deterministic default
            chosen = self._time(problem, candidates, bench, probe)
            return by_name[chosen.winner]

    def _unchecked(self, problem: Problem, choice: Choice) -> bool:
        """Whether `choice` was read from the cache and names a row that needs the check rule for this
        problem (rule 5) and has not yet passed it in this process. The cache holds a name, not the
        evidence: the file may be edited, or the kernels may compile otherwise here (another driver)."""
        impl = self._by_name.get(choice.winner)
        if choice.source != "disk" or impl is None or impl.check_against is None or impl.check_against(problem) is None:
            return False
        return self.checked.get((self._name_of(problem.device), problem.key(), impl.name), "unchecked") is not None

    def _check_cached(self, problem: Problem, choice: Choice, candidates: list[Implementation], bench,
                      probe=None) -> Choice:
        """Rule 5 for a choice read from the cache (`_unchecked`): the row's output on this key's probe
        must match its reference row's before it runs, once per key and process (the outcome is kept in
        `checked`). A row that does not match is recorded as failed, as when timing, and the key is timed
        afresh among the other rows (the new choice replaces the cached one, on disk too)."""
        impl = self._by_name[choice.winner]
        slot = (self._name_of(problem.device), problem.key(), impl.name)
        references: dict = {}
        try:
            self._check(problem, impl, probe or bench, references)
        except Exception as err:
            self.checked[slot] = f"{type(err).__name__}: {err}"[:500]
            self.notes.append(f"{impl.name}, the cached choice for {problem.key()}, failed its check (timed afresh "
                              f"without it): {self.checked[slot]}")
            return self._time(problem, candidates, bench, probe, failed={impl.name: self.checked[slot]},
                              references=references)
        self.checked[slot] = None
        return choice

    def _checked_follower(self, problem: Problem, impl: Implementation, by_name: dict, bench,
                          probe=None) -> Implementation:
        """Rule 5 for a backward that follows its forward's row (rule 4, which times nothing): a row
        with `check_against` runs its backward only once that backward's output on the key's inputs
        matched its reference row's (the forward's check says nothing of the backward kernels);
        otherwise, and where no check can run now (a CUDA graph being captured), the reference runs,
        which draws the same mask. Without `bench` the caller needs only the row's mask: the row.
        The outcome is kept per key in memory (`checked`): one check per process."""
        if impl.check_against is None or impl.check_against(problem) is None or bench is None:
            return impl
        ref = by_name.get(impl.check_against(problem))
        if ref is None:  # not a candidate here: nothing shares the mask, keep the forward's row
            return impl
        slot = (self._name_of(problem.device), problem.key(), impl.name)
        if slot not in self.checked:
            if not timing_allowed():
                return ref
            try:
                self._check(problem, impl, probe or bench, {})
                self.checked[slot] = None
            except Exception as err:
                self.checked[slot] = f"{type(err).__name__}: {err}"[:500]
                self.notes.append(f"{impl.name} not run for {problem.key()}: {self.checked[slot]}")
        return impl if self.checked[slot] is None else ref

    def known(self, problem: Problem) -> Optional[Choice]:
        """The choice already made for this problem's key (in memory or in the cache file), if any."""
        name = self._name_of(problem.device)
        self._load(name)
        return self.choices.get((name, problem.key()))

    def _time(self, problem: Problem, candidates: list[Implementation], bench, probe=None,
              failed: Optional[dict] = None, references: Optional[dict] = None) -> Choice:
        """Times the candidates (rows with check_against once their check passed) and keeps the fastest.
        `failed`: rows already known to fail on this key (name -> why), recorded as such, not run again;
        `references`: the reference rows' outputs on the probe, where a check already computed them."""
        ms, errors = {}, dict(failed or {})
        references = {} if references is None else references  # row name -> its output on the probe
        for impl in candidates:
            if impl.name in errors:
                continue
            try:
                fn = bench(impl.load())
                if impl.check_against is not None and impl.check_against(problem) is not None:
                    self._check(problem, impl, probe or bench, references)
                with torch.no_grad():
                    took = float(self._timer(fn))
                if not _is_ms(took):  # a broken clock: not a duration to compare, nor one the cache may hold
                    raise RuntimeError(f"its timing gave {took} ms")
                ms[impl.name] = took
            except Exception as err:  # a row that fails on this GPU (e.g. out of shared memory) is not chosen
                errors[impl.name] = f"{type(err).__name__}: {err}"[:500]
        # The fastest; ties and total failure go to the earlier row (the failure then shows when it runs).
        winner = min(ms, key=lambda n: (ms[n], self.names.index(n))) if ms else candidates[0].name
        choice = Choice(winner, ms, errors)
        name = self._name_of(problem.device)
        self.choices[(name, problem.key())] = choice
        if ms:  # a choice nothing was timed for (every row failed, perhaps for want of memory) is not kept on disk
            self._store(name, problem.key(), choice)
        return choice

    def _check(self, problem: Problem, impl: Implementation, bench, references: dict) -> None:
        """The rule for rows with `check_against`: no such row wins a key before its output on that
        key's actual inputs has matched its reference row's (a kernel never run on this device, a
        miscompile or a wrong launch shows here, not in a training run). Checked each time a key is
        timed, and once per key and process where the choice comes from the cache (`_check_cached`:
        a file records a name, not the check). A mismatch, or a reference that cannot run, raises:
        the caller records it as the row's error and the row is not chosen. `bench` here is the
        caller's probe where it gave one: the op on inputs whose LoRA weights are random, since on a
        fresh adapter's (B = 0) every low-rank term is zero and a kernel that loses one would pass."""
        ref_name = impl.check_against(problem)
        with torch.no_grad():
            if ref_name not in references:
                references[ref_name] = bench(self.get(ref_name).load())()
            got = bench(impl.load())()
        mismatch = outputs_mismatch(got, references[ref_name], problem.dtype)
        if mismatch:
            raise RuntimeError(f"output differs from the {ref_name} row's, so it was not timed: {mismatch}")

    # ---- the disk cache

    def _file(self, name: str) -> str:
        return _cache_file(self._cache_directory or cache_dir(), name, self._versions_of())

    def _load(self, name: str) -> None:
        if name in self._loaded:
            return
        self._loaded.add(name)
        path = self._file(name)
        if not os.path.exists(path):
            return
        try:
            loaded = _valid_choices(_read_json(path), self.names)
        except (OSError, ValueError) as err:  # not a readable cache: choose afresh, and say so once
            note = f"ignored the cache file {path}: {err}"
            self.notes.append(note)
            # Once per file and process (`_loaded`), not per call; the next choice stored replaces the file.
            warnings.warn(f"fused_lora.dispatch.registry: {note} (auto times afresh and replaces it)", stacklevel=4)
            return
        for key, choice in loaded.items():
            self.choices.setdefault((name, key), choice)

    def _store(self, name: str, key: str, choice: Choice) -> None:
        path = self._file(name)
        try:
            try:  # the file's other well-formed choices (another process may have added some) are kept
                kept = _valid_choices(_read_json(path), self.names) if os.path.lexists(path) else {}
            except (OSError, ValueError):
                kept = {}  # not a cache (warned about when first read): replaced by a good file below
            kept[key] = choice
            entries = {k: {"winner": c.winner, "ms": c.ms, "errors": c.errors} for k, c in kept.items()}
            _write_atomic(path, {"format": CACHE_FORMAT, "device": name, "versions": self._versions_of(),
                                 "choices": entries})
        except OSError as err:  # read-only or full disk: the choice still holds for this process
            self.notes.append(f"could not write the cache file {path}: {err}")

    # ---- display

    def report(self) -> str:
        """What runs where and why: the table, the cache, and each key's choice with its timings."""
        lines = ["backends (auto on CUDA times the rows per shape key and keeps the fastest; ties: the earlier row):"]
        for impl in self.implementations:
            lines.append(f"  {impl.name:<14} {impl.doc}")
        devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
        for device in devices:
            for dtype in (torch.float32, torch.bfloat16):
                problem = Problem("fwd", device, dtype, 1, 4096, 4096, 16)  # a typical layer (TMA rows need aligned sizes)
                cells = []
                for impl in self.implementations:
                    reasons = impl.not_supported_reasons(problem)
                    cells.append(f"{impl.name}: " + ("can run" if not reasons else "no (" + "; ".join(reasons) + ")"))
                lines.append(f"  {device.type} {str(dtype).replace('torch.', '')} r<=16, auto -> "
                             f"{describe(device, dtype, 16, 'auto', self)}; " + "; ".join(cells))
        if os.environ.get(ENV_VAR):
            lines.append(f"  {ENV_VAR}={os.environ[ENV_VAR]} forces that backend everywhere")
        directory = self._cache_directory or cache_dir()
        lines.append(f"tuned choices (cache: {directory}):")
        shown = 0
        for (name, key), choice in sorted(self.choices.items()):
            lines.append(f"  {name}: {_choice_line(key, choice)}")
            shown += 1
        for path in sorted(glob.glob(os.path.join(directory, "backends-*.json"))):
            try:
                data = _read_json(path)
                entries = _valid_choices(data, self.names)
            except (OSError, ValueError) as err:
                lines.append(f"  {os.path.basename(path)}: unreadable, ignored ({err})")
                continue
            vers = data.get("versions") or {}
            current = [(data.get("device"), key) for key in entries]
            if all(c in self.choices for c in current) and vers == self._versions_of():
                continue  # already listed above
            lines.append(f"  {data.get('device')} ({', '.join(f'{k} {v}' for k, v in sorted(vers.items()))}):")
            for key, choice in sorted(entries.items()):
                lines.append(f"    {_choice_line(key, choice)}")
                shown += 1
        if not shown:
            lines.append("  none yet (auto times on the first CUDA call for each key)")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _tensors(out) -> list:
    """The tensors and Nones of an op's output, nested tuples and lists flattened in order (the multi
    backward returns a list of (dA, dB) pairs or Nones)."""
    if not isinstance(out, (tuple, list)):
        return [out]
    return [t for item in out for t in _tensors(item)]


def outputs_mismatch(got, want, dtype: torch.dtype) -> Optional[str]:
    """Why two rows' outputs (a tensor, or tuples of tensors and Nones) do not agree, or None. Each
    tensor is compared in max norm relative to the reference's largest magnitude: 3e-2 for 16-bit
    dtypes, 1e-2 for float32 (TF32 on a GPU); enough for a different summation order, far below
    what a wrong tile, a lost term or a garbage value gives. Non-finite values must match too."""
    got, want = _tensors(got), _tensors(want)
    if len(got) != len(want):
        return f"{len(got)} outputs against {len(want)}"
    tol = 1e-2 if dtype == torch.float32 else 3e-2
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None or w is None:
            if (g is None) != (w is None):
                return f"output {i} is {'missing' if g is None else 'not expected'}"
            continue
        if g.shape != w.shape:
            return f"output {i} has shape {tuple(g.shape)}, expected {tuple(w.shape)}"
        if not g.numel():
            continue
        g64, w64 = g.detach().double(), w.detach().double()
        if not torch.equal(torch.isfinite(g64), torch.isfinite(w64)):
            return f"output {i} has non-finite values where the reference has none (or the reverse)"
        finite = torch.isfinite(w64)
        scale = max(1.0, w64[finite].abs().max().item()) if finite.any() else 1.0
        err = (g64 - w64)[finite].abs().max().item() if finite.any() else 0.0
        if err > tol * scale:
            return f"output {i}: max error {err:.3g} > {tol} x {scale:.3g}"
    return None


def _choice_line(key: str, choice: Choice) -> str:
    timings = ", ".join(f"{n} {ms:.3f} ms" for n, ms in choice.ms.items()) or "no timing"
    failed = "".join(f"; {n} failed: {e}" for n, e in choice.errors.items())
    return f"{key}: {choice.winner} ({timings}{failed})" + (" [from disk]" if choice.source == "disk" else "")


REGISTRY = Registry()


# ------------------------------------------------------------------ module-level entry points

def get(name: str) -> Implementation:
    return REGISTRY.get(name)


def select(problem: Problem, requested: str = "auto", bench=None, probe=None) -> Implementation:
    """The implementation that runs `problem` (see the module doc for the rules)."""
    return REGISTRY.select(problem, requested, bench, probe)


def report() -> str:
    """Human-readable: the table, which row can run what, and what auto chose for which keys with
    the timings behind it (this process's choices and the cache files)."""
    return REGISTRY.report()


def requested_backend(requested: str = "auto") -> str:
    """The backend asked for: the argument unless "auto", else the environment, else "auto"."""
    return REGISTRY.requested(requested)


def choose_backend(device: torch.device, dtype: torch.dtype, rank: int, requested: str = "auto") -> str:
    """The backend for tensors of this device, dtype and rank without timing anything: the forced one
    (BackendUnavailable if it cannot run), else auto's untimed default (torch)."""
    return REGISTRY.select(Problem("fwd", device, dtype, 0, 0, 0, rank), requested).name


def describe(device: torch.device, dtype: torch.dtype, rank: int, requested: str = "auto",
             registry: Optional[Registry] = None) -> str:
    """The backend name, or how auto decides, or why none can run: for reprs and error-free display."""
    registry = registry or REGISTRY
    try:
        choice = registry.requested(requested)
        problem = Problem("fwd", device, dtype, 1, 4096, 4096, rank)  # a typical layer (see report)
        if choice != "auto":
            return registry.select(problem, choice).name
        names = [impl.name for impl in registry.candidates(problem)]
        if device.type in registry.tuned_devices and len(names) > 1:
            return "auto (the fastest of " + ", ".join(names) + ", timed per shape)"
        if not names:
            raise BackendUnavailable("no backend can run these inputs")
        return names[0]
    except (BackendUnavailable, ValueError) as err:
        return f"unavailable ({err})"
