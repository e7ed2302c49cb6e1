"""The one place that chooses which implementation runs an op: one table (`dispatch.table`), one rule.

Rules, in order:
1. An explicit request (the backend= argument, else FUSED_LORA_BACKEND) wins. Asking for a row
   that cannot run raises `BackendUnavailable` with its reasons, never a silent fallback.
2. "auto" off CUDA (the CPU): torch, untimed.
3. "auto" on CUDA: the first call for a key (op, device name, dtype, M's power-of-two bucket, N,
   K, rank bucket, dropout on/off, and for backward which gradients) times every row that can run
   it, as an autotuner does, and keeps the fastest (ties: the earlier row) in memory and in a JSON
   file under `cache.cache_dir()`, so the layer is never slower than the cuBLAS path and later processes
   reuse the choice without timing. Nothing is timed while torch.compile traces or a CUDA graph is
   being captured: there the known winner runs, else torch.
4. With dropout, backward runs what the forward's key chose: the rows draw different masks from
   one seed, and forward and backward must agree on the mask.
5. A row with `check_against` (the Hopper-path rows, the triton row's segment and quantized-base
   kernels without dropout, and the dequant-once row, whose kernels no GPU has run yet) is timed only
   after its output matched that row's (torch; for the Hopper rows with dropout the triton row, whose
   mask they share) on the key's inputs with random LoRA
   weights (the ops' `probe`: a fresh adapter's B = 0 would hide every low-rank term); a row that
   does not match is recorded as failed and never chosen. Such a row read from the cache as a key's
   winner is checked the same way on the key's first call in each process before it runs (one probe);
   if it does not match, it is recorded as failed and the key is timed afresh without it; where no
   check can run (no inputs to probe, a CUDA graph being captured) the default runs. A backward
   with dropout that follows such a row (rule 4) is checked the same way on its first call per key
   and process; if it does not match, the reference row (same mask) runs it instead.

6. With FUSED_LORA_NO_TRANSIENT_WEIGHT=1 (`table.no_transient_weight`), auto leaves out the rows that
   allocate a transient 16-bit copy of a quantized weight (dequant-once), for a user who needs the memory:
   a key whose known winner is such a row runs the fastest other row its timings name (checked as rule 5
   says where it needs it), else the default. Asking for the row by name still runs it.

Triton runs on CPU tensors only under TRITON_INTERPRET=1 (its interpreter), and only when asked
for by name: that is how CI tests the real kernels without a GPU. The interpreter computes
bfloat16 matrix products wrongly, so bfloat16 is refused under it.

A cache file that cannot be read, parsed or written is ignored (noted in `report()`, and a warning
once per file and process), never fatal (`dispatch.cache`).
`calls` counts which implementation ran each op, so tests (and users) can see it; `report()` says
what was chosen for which keys and the timings behind it.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import threading
import warnings
from collections import Counter
from typing import Any, Callable, Optional, Sequence

import torch

from . import cache
from .cache import Choice
from .check import outputs_mismatch
from .problem import Problem
from .table import (ENV_VAR, IMPLEMENTATIONS, NO_TRANSIENT_WEIGHT_ENV_VAR, BackendUnavailable, Implementation,
                    no_transient_weight)

calls: Counter = Counter()  # (op name, backend) -> number of calls


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


class Registry:
    """The table of implementations and what auto has chosen with it.

    Everything environment-dependent can be injected (tests use fakes): `timer(fn) -> ms`,
    `cache_directory` (default: `cache_dir()` at each use), `name_of(device) -> str`, `tuned_devices`
    (device types on which auto times; CUDA), `versions_of() -> dict`.
    """

    def __init__(self, implementations: Sequence[Implementation] = IMPLEMENTATIONS,
                 timer: Callable[[Callable[[], Any]], float] = cuda_timer, cache_directory: Optional[str] = None,
                 name_of: Callable[[torch.device], str] = device_name, tuned_devices: Sequence[str] = ("cuda",),
                 versions_of: Callable[[], dict] = cache.versions):
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
        """The rows auto may choose for `problem`, in table order: those that can run it, less the rows
        allocating a transient weight under FUSED_LORA_NO_TRANSIENT_WEIGHT (rule 6)."""
        lean = no_transient_weight()
        return [impl for impl in self.implementations
                if not impl.not_supported_reasons(problem) and not (lean and impl.transient_weight)]

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
            if problem.op.backward and problem.dropout:
                twin = problem.forward_twin()
                known = self._allowed(self.known(twin), by_name)
                # A cached forward row not yet checked did not run the forward (the default did): follow that.
                trusted = known is not None and known.winner in by_name and not self._unchecked(twin, known)
                follows = by_name[known.winner] if trusted else default
                return self._checked_follower(problem, follows, by_name, bench, probe)
            known = self._allowed(self.known(problem), by_name)
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

    def _allowed(self, choice: Optional[Choice], by_name: dict) -> Optional[Choice]:
        """`choice`, or where its winner is not among the rows auto may choose here (`by_name`: a row left out
        by rule 6, or one that cannot run here), the same choice with the fastest of its timed rows that is
        (ties: the earlier row); unchanged when none is (the default then runs). Nothing is timed, nor
        stored: the key's entry keeps its winner for a process without the setting."""
        if choice is None or choice.winner in by_name:
            return choice
        timed = [name for name in choice.ms if name in by_name]
        if not timed:
            return choice
        return dataclasses.replace(choice, winner=min(timed, key=lambda n: (choice.ms[n], self.names.index(n))))

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
                if not cache.is_ms(took):  # a broken clock: not a duration to compare, nor one the cache may hold
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
        return cache.cache_file(self._cache_directory or cache.cache_dir(), name, self._versions_of())

    def _load(self, name: str) -> None:
        if name in self._loaded:
            return
        self._loaded.add(name)
        path = self._file(name)
        if not os.path.exists(path):
            return
        try:
            loaded = cache.valid_choices(cache.read_json(path), self.names)
        except (OSError, ValueError) as err:  # not a readable cache: choose afresh, and say so once
            note = f"ignored the cache file {path}: {err}"
            self.notes.append(note)
            # Once per file and process (`_loaded`), not per call; the next choice stored replaces the file.
            warnings.warn(f"fused_lora.backends: {note} (auto times afresh and replaces it)", stacklevel=4)
            return
        for key, choice in loaded.items():
            self.choices.setdefault((name, key), choice)

    def _store(self, name: str, key: str, choice: Choice) -> None:
        path = self._file(name)
        try:
            try:  # the file's other well-formed choices (another process may have added some) are kept
                kept = cache.valid_choices(cache.read_json(path), self.names) if os.path.lexists(path) else {}
            except (OSError, ValueError):
                kept = {}  # not a cache (warned about when first read): replaced by a good file below
            kept[key] = choice
            entries = {k: {"winner": c.winner, "ms": c.ms, "errors": c.errors} for k, c in kept.items()}
            cache.write_atomic(path, {"format": cache.CACHE_FORMAT, "device": name, "versions": self._versions_of(),
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
        if no_transient_weight():
            lines.append(f"  {NO_TRANSIENT_WEIGHT_ENV_VAR}={os.environ[NO_TRANSIENT_WEIGHT_ENV_VAR]}: auto leaves out "
                         + ", ".join(impl.name for impl in self.implementations if impl.transient_weight)
                         + " (a transient 16-bit copy of a quantized weight)")
        directory = self._cache_directory or cache.cache_dir()
        lines.append(f"tuned choices (cache: {directory}):")
        shown = 0
        for (name, key), choice in sorted(self.choices.items()):
            lines.append(f"  {name}: {_choice_line(key, choice)}")
            shown += 1
        for path in sorted(glob.glob(os.path.join(directory, "backends-*.json"))):
            try:
                data = cache.read_json(path)
                entries = cache.valid_choices(data, self.names)
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


def _choice_line(key: str, choice: Choice) -> str:
    timings = ", ".join(f"{n} {ms:.3f} ms" for n, ms in choice.ms.items()) or "no timing"
    failed = "".join(f"; {n} failed: {e}" for n, e in choice.errors.items())
    return f"{key}: {choice.winner} ({timings}{failed})" + (" [from disk]" if choice.source == "disk" else "")


REGISTRY = Registry()


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


def choose_backend(device: torch.device, dtype: torch.dtype, rank: int, requested: str = "auto",
                   op: str = "fwd") -> str:
    """The backend for tensors of this device, dtype and rank without timing anything: the forced one
    (BackendUnavailable if it cannot run), else auto's untimed default (torch). `op` names the op family
    asked about (default: one adapter's forward; "grouped_fwd" for expert stacks, whose kernels take less)."""
    return REGISTRY.select(Problem(op, device, dtype, 0, 0, 0, rank), requested).name


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
