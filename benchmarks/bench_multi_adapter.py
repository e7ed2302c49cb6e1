"""Several adapters in one batch: k = 1, 4, 16 adapters over a fixed number of tokens, in one run.

    python benchmarks/bench_multi_adapter.py            # CPU: 16 samples x 128 tokens, K=N=1024, r=16, fp32
    python benchmarks/bench_multi_adapter.py --gpu-suite # CUDA: 64 x 128 tokens, K=N=4096, r=16, bf16
    python benchmarks/bench_multi_adapter.py --dense-max-rank 0  # the torch path run by run (1e9: stacked)

The batch holds `samples` samples of `seq` tokens; sample i uses adapter i mod k (interleaved, so
an adapter's rows are not contiguous: the gather path; --grouped sorts the samples by adapter).

Inference (eval, no grad), forward only:
    base                the frozen nn.Linear (the floor)
    ours                FusedLoRALinear(x, adapter_names=...): one base GEMM, per-adapter low-rank terms
    ours single         the same layer without adapter_names: one adapter on every row (the target's
                        denominator: a mixed batch should cost about what a single-adapter batch costs)
    peft                peft's lora.Linear with k adapters, forward(x, adapter_names=...): its loop
Training (train mode, every adapter trainable, x requiring grad), forward+backward:
    base                the frozen nn.Linear
    ours                one mixed pass: FusedLoRALinear(x, adapter_names=...) then backward
    ours single         one pass of the active adapter over the whole batch
    ours k passes       k separate passes of FusedLoRALinear, one per adapter on its own samples
                        (set_adapter, forward, backward), the sub-batches split outside the timing
    peft k passes       the same with peft (peft refuses adapter_names in training)
"ours" runs the backend `--backends` names first (CPU: auto = torch; the GPU suite: triton, the
segment kernels); each further backend adds "ours <backend>" and "ours <backend> single" rows.
Ratios are taken within the run; a 2-core shared CPU moves absolute times by 10-20%.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_device, environment, time_variants, write_csv  # noqa: E402

from fused_lora import FusedLoRALinear
from fused_lora.torch_row import multi as multi_impl  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def names_of(k: int) -> list[str]:
    return ["default"] + [f"a{i}" for i in range(1, k)]


def build(K, N, r, k, dtype, device):
    """(base Linear, our layer, peft's lora.Linear), all with the same k adapters."""
    import peft
    from peft.tuners.lora import Linear as PeftLinear
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    ours = FusedLoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r, init_lora_weights=False)
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False)
    theirs = PeftLinear(copy.deepcopy(base), "default", config=cfg, r=r, lora_alpha=2 * r)
    for name in names_of(k)[1:]:
        ours.add_adapter(name, r=r, lora_alpha=2 * r, init_lora_weights=False)
        theirs.update_layer(name, r, lora_alpha=2 * r, config=cfg)
    ours.set_requires_grad(names_of(k))
    theirs.set_requires_grad(names_of(k))
    theirs.to(device=device, dtype=dtype)
    return base, ours, theirs


def cases(samples, seq, K, N, r, ks, dtype, device, grouped, reps, backends=("auto",), log=print):
    rows = []
    for k in ks:
        base, ours, theirs = build(K, N, r, k, dtype, device)
        names = [names_of(k)[i % k] for i in range(samples)]
        if grouped:
            names.sort(key=names_of(k).index)
        x = torch.randn(samples, seq, K, device=device, dtype=dtype)
        xg = x.clone().requires_grad_(True)
        dy = torch.randn(samples, seq, N, device=device, dtype=dtype)
        split = {n: [i for i, m in enumerate(names) if m == n] for n in names_of(k)}
        parts = {n: (x[idx].clone().requires_grad_(True), dy[idx].clone()) for n, idx in split.items()}

        def infer(module, **kw):
            def fn():
                with torch.no_grad():
                    module.eval()(x, **kw)
            return fn

        def clear(module, *inputs):
            for t in (*inputs, *module.parameters()):
                t.grad = None

        def train_base():
            base(xg).backward(dy)
            clear(base, xg)

        def with_backend(backend, fn):
            def run():
                ours.backend = backend
                fn()
            return run

        def train_ours(mixed=True):
            def fn():
                ours.set_adapter(names_of(k)[0])  # trainable: this adapter alone (set_adapter's rule) ...
                if mixed:
                    ours.set_requires_grad(names_of(k))  # ... or, mixed, all k (separate() leaves one)
                ours.train()(xg, **({"adapter_names": names} if mixed else {})).backward(dy)
                clear(ours, xg)
            return fn

        def separate(module):
            def fn():
                module.train()
                for n, (xs, dys) in parts.items():
                    module.set_adapter(n)
                    module(xs).backward(dys)
                    clear(module, xs)
            return fn

        fns = {("inference", "base"): infer(base), ("inference", "peft"): infer(theirs, adapter_names=names),
               ("training", "base"): train_base, ("training", "peft k passes"): separate(theirs)}
        for i, backend in enumerate(backends):
            label = "ours" if i == 0 else f"ours {backend}"
            fns[("inference", label)] = with_backend(backend, infer(ours, adapter_names=names))
            fns[("inference", label + " single")] = with_backend(backend, infer(ours))
            fns[("training", label)] = with_backend(backend, train_ours())
            fns[("training", label + " single")] = with_backend(backend, train_ours(mixed=False))
        fns[("training", "ours k passes")] = with_backend(backends[0], separate(ours))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ms = time_variants(fns, device, reps=reps)
        ratios = {
            ("inference", "ours"): ms[("inference", "ours")] / ms[("inference", "peft")],
            ("training", "ours"): ms[("training", "ours")] / ms[("training", "ours k passes")],
            ("training", "peft k passes"): ms[("training", "peft k passes")] / ms[("training", "ours k passes")],
        }
        for (mode, variant), t in ms.items():
            rows.append(dict(k=k, mode=mode, variant=variant, ms=round(t, 3),
                             vs_base=round(t / ms[(mode, "base")], 3),
                             vs_baseline=round(t / ms[(mode, "peft" if mode == "inference" else "ours k passes")], 3)))
            log(f"{k:>3} {mode:<10} {variant:<15} {t:>9.2f} ms {rows[-1]['vs_base']:>6.2f}x base "
                f"{rows[-1]['vs_baseline']:>6.2f}x {'peft' if mode == 'inference' else 'k passes'}")
        log(f"# k={k}: inference ours/peft {ratios[('inference', 'ours')]:.2f}; training ours/(ours k passes) "
            f"{ratios[('training', 'ours')]:.2f}, (peft k passes)/(ours k passes) "
            f"{ratios[('training', 'peft k passes')]:.2f}")
        for i, backend in enumerate(backends):  # the GPU target: mixed <= 1.15x single, both modes
            label = "ours" if i == 0 else f"ours {backend}"
            log(f"# k={k} {backend}: mixed / single-adapter batch: inference "
                f"{ms[('inference', label)] / ms[('inference', label + ' single')]:.3f}, training "
                f"{ms[('training', label)] / ms[('training', label + ' single')]:.3f}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-suite", action="store_true", help="CUDA, bf16, 64 x 128 tokens, K=N=4096")
    ap.add_argument("--samples", type=int)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--K", type=int)
    ap.add_argument("--N", type=int)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--grouped", action="store_true", help="samples sorted by adapter (contiguous rows)")
    ap.add_argument("--reps", type=int, default=10, help="CPU repetitions per variant (median)")
    ap.add_argument("--backends", nargs="+", help="backends of our layer, the first labelled 'ours' "
                    "(default: auto on CPU; triton torch on CUDA)")
    ap.add_argument("--dense-max-rank", type=int, help="the torch path's multi_impl.DENSE_MAX_RANK for this run "
                    "(0: the adapters run by run whatever their ranks; a large value: always stacked)")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "multi_adapter"))
    args = ap.parse_args(argv)
    if args.dense_max_rank is not None:
        multi_impl.DENSE_MAX_RANK = args.dense_max_rank
    device = bench_device(ap, args.gpu_suite)
    gpu = device == "cuda"
    samples = args.samples or (64 if gpu else 16)
    K, N = args.K or (4096 if gpu else 1024), args.N or (4096 if gpu else 1024)
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    print(f"# {environment(device)}; {dtype}; {samples} samples x {args.seq} tokens, K={K}, N={N}, r={args.r}, "
          f"{'grouped' if args.grouped else 'interleaved'} adapters; torch path stacked up to a total rank of "
          f"{multi_impl.DENSE_MAX_RANK}; {torch.get_num_threads()} threads, load average "
          f"{os.getloadavg()[0]:.1f}")
    backend_list = args.backends or (["triton", "torch"] if gpu else ["auto"])
    rows = cases(samples, args.seq, K, N, args.r, args.ks, dtype, device, args.grouped, args.reps, backend_list)
    write_csv(args.out + ".csv", rows)
    print(f"# wrote {args.out}.csv")


if __name__ == "__main__":
    main()
