"""Timing and memory measurement shared by the benchmark scripts.

Times are medians. On CUDA, `triton.testing.do_bench` (which flushes L2 between runs); on CPU,
repeated rounds over the variants in a shuffled order (so slow drifts of a shared machine hit every
variant alike) timed with time.perf_counter. Memory is what a callable allocates beyond what existed before it: on CUDA from
the caching allocator's counters, on CPU from the profiler's allocation events.
"""
from __future__ import annotations

import csv
import os
import random
import statistics
import time
from typing import Callable

import torch
from torch import nn


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(fns: dict[str, Callable[[], None]], device: str, reps: int = 10, warmup: int = 2,
                  rounds: dict | None = None) -> dict[str, float]:
    """Median milliseconds of each callable. On CPU, `rounds` (a dict, when given) receives each callable's
    times round by round, for ratios paired within a round (robust to a shared machine's load drifting)."""
    if device.startswith("cuda"):
        import triton.testing
        return {k: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") for k, fn in fns.items()}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)  # no variant always runs right after another: position effects average out
        for k in order:
            fn = fns[k]
            t0 = time.perf_counter()
            fn()
            samples[k].append((time.perf_counter() - t0) * 1e3)
    if rounds is not None:
        rounds.update(samples)
    return {k: statistics.median(v) for k, v in samples.items()}


def memory_mib(forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None], device: str):
    """(MiB held after forward: output + saved activations, MiB peak during forward + backward),
    both above what was allocated before the forward."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        out = forward()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated() - before
        backward(out)
        del out
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        return held / 2**20, peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    def running_peak(prof):
        current = peak = 0
        for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
            current += e.nbytes()
            peak = max(peak, current)
        return current, peak

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = forward()
    held, peak_fwd = running_peak(prof)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backward(out)
        del out
    _, peak_bwd = running_peak(prof)
    return held / 2**20, max(peak_fwd, held + peak_bwd) / 2**20


def write_csv(path: str, rows: list[dict]) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def bench_device(ap, gpu_suite: bool) -> str:
    """"cuda" where a GPU is, else "cpu"; --gpu-suite without one is the argument parser's error."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if gpu_suite and device != "cuda":
        ap.error("--gpu-suite needs a CUDA device")
    return device


def environment(device: str) -> str:
    parts = [f"torch {torch.__version__}"]
    try:
        import triton
        parts.append(f"triton {triton.__version__}")
    except ImportError:
        pass
    try:
        import peft
        parts.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    return f"{name}; " + ", ".join(parts)


class Holder(nn.Module):
    """peft adapts named children; the layer lives at `proj`."""

    def __init__(self, linear):
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)
