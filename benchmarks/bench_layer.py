"""One LoRA layer: fused_lora against the base nn.Linear (the floor), peft, and peft patched by
fused_lora.patch_peft (peft's layer computing through fused_lora's op), in one run.

    python benchmarks/bench_layer.py                  # CPU: M=2048, K=N=1024, r=16, fp32 (< 1 min)
    python benchmarks/bench_layer.py --gpu-suite      # CUDA: the four shapes of the anchors, r 16/64, bf16

For every shape, rank and dropout it times forward and forward+backward (frozen base, input
requiring grad, as in fine-tuning) and measures memory held after forward and the peak of
forward+backward. Prints ratios to the base Linear and to peft; writes CSV (and a PNG when
matplotlib is present) under benchmarks/out/.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Holder, bench_device, environment, memory_mib, time_variants, write_csv  # noqa: E402
from roofline import ideal_ratios  # noqa: E402

from fused_lora import FusedLoRALinear, patch_peft  # noqa: E402

GPU_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 4096, 4096)]
OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def build_variants(M, K, N, r, p, dtype, device, with_peft=True, with_compile=False):
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    variants = {"base": base}

    def ours(backend):
        return FusedLoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r, lora_dropout=p,
                                           init_lora_weights=False, backend=backend)
    variants["fused_lora"] = ours("auto")
    if device == "cuda":
        # Every row of the backends table that can run this layer, forced: torch (cuBLAS GEMMs onto
        # the rank-r term, beta = 1), triton (the pointer kernels) and the Hopper-path candidates
        # (triton-tma, triton-onepass: sm_90), each beside what auto picks among them.
        for name, reasons in backend_rows(M, K, N, r, p, dtype, device):
            if reasons:
                print(f"# fused_lora[{name}] not run at {M}x{K}x{N} r={r}: {'; '.join(reasons)}")
            else:
                variants[f"fused_lora[{name}]"] = ours(name)
    if with_peft:
        import peft
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["proj"])
        pm = peft.get_peft_model(Holder(copy.deepcopy(base)), cfg, autocast_adapter_dtype=False)
        variants["peft"] = pm
        # The same peft layer computing through fused_lora's op: what an existing peft user gets.
        variants["patch_peft"] = patch_peft(copy.deepcopy(pm), verbose=False)
        if with_compile:
            torch._dynamo.reset()  # a fresh cache per case: past cache_size_limit dynamo falls back to eager
            variants["compile(peft)"] = torch.compile(pm)
    for m in variants.values():
        m.train()
    return variants


def backend_rows(M, K, N, r, p, dtype, device):
    """(name, reasons it cannot run this layer's forward) for each row of the backends table."""
    from fused_lora import dispatch as backends
    problem = backends.Problem("fwd", torch.device(device), dtype, M, N, K, r, p > 0)
    return [(impl.name, impl.not_supported_reasons(problem)) for impl in backends.IMPLEMENTATIONS]


def step_fns(module, x, dy):
    def fwd():
        module(x)

    def fwdbwd():
        module(x).backward(dy)
        x.grad = None
        for q in module.parameters():
            q.grad = None

    return fwd, fwdbwd


def run(shapes, ranks, dropouts, dtype, device, reps, with_peft=True, compile_ranks=(), log=print):
    rows = []
    for (M, K, N) in shapes:
        for r in ranks:
            x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(M, N, device=device, dtype=dtype)
            timed, mems = {}, {}
            for p in dropouts:
                variants = build_variants(M, K, N, r, p, dtype, device, with_peft, r in compile_ranks)
                for name, m in variants.items():
                    if name == "base" and p != dropouts[0]:
                        continue  # the base has no dropout: measured once per shape and rank
                    fwd, fwdbwd = step_fns(m, x, dy)
                    fwdbwd()  # warm-up: autotuning and auto's timing stay out of held/peak memory
                    timed[(name, p, "fwd")], timed[(name, p, "fwdbwd")] = fwd, fwdbwd
                    mems[(name, p)] = memory_mib(lambda: m(x), lambda y: y.backward(dy), device)
            ms = time_variants(timed, device, reps=reps)
            base_f, base_fb = ms[("base", dropouts[0], "fwd")], ms[("base", dropouts[0], "fwdbwd")]
            ideal = ideal_ratios(M, K, N, r, x.element_size())  # the roofline's best LoRA/base ratio
            for (name, p) in mems:
                peft_fb = ms.get(("peft", p, "fwdbwd"))
                rows.append(dict(
                    M=M, K=K, N=N, r=r, dropout=p if name != "base" else 0.0, variant=name,
                    fwd_ms=round(ms[(name, p, "fwd")], 4), fwdbwd_ms=round(ms[(name, p, "fwdbwd")], 4),
                    fwd_x=round(ms[(name, p, "fwd")] / base_f, 3), fwdbwd_x=round(ms[(name, p, "fwdbwd")] / base_fb, 3),
                    fwdbwd_vs_peft=round(ms[(name, p, "fwdbwd")] / peft_fb, 3) if peft_fb else "",
                    held_MiB=round(mems[(name, p)][0], 1), peak_MiB=round(mems[(name, p)][1], 1),
                    ideal_fwd_x=round(ideal["fwd"], 3), ideal_fwdbwd_x=round(ideal["fwdbwd"], 3)))
                log(format_row(rows[-1]))
    return rows


HEADER = (f"{'M':>5} {'K':>5} {'N':>5} {'r':>3} {'p':>4} {'variant':<26} {'fwd ms':>8} {'fwd x':>6} "
          f"{'f+b ms':>8} {'f+b x':>6} {'vs peft':>7} {'held MiB':>9} {'peak MiB':>9} {'ideal f/fb':>11}")


def format_row(row):
    vs = f"{row['fwdbwd_vs_peft']:.2f}" if row["fwdbwd_vs_peft"] != "" else "-"
    return (f"{row['M']:>5} {row['K']:>5} {row['N']:>5} {row['r']:>3} {row['dropout']:>4} {row['variant']:<26} "
            f"{row['fwd_ms']:>8.3f} {row['fwd_x']:>6.2f} {row['fwdbwd_ms']:>8.3f} {row['fwdbwd_x']:>6.2f} {vs:>7} "
            f"{row['held_MiB']:>9.1f} {row['peak_MiB']:>9.1f} {row['ideal_fwd_x']:>5.2f}/{row['ideal_fwdbwd_x']:<5.2f}")


def plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    cases = sorted({(r["M"], r["K"], r["N"], r["r"], r["dropout"]) for r in rows if r["variant"] != "base"})
    names = [n for n in ("fused_lora", "fused_lora[torch]", "fused_lora[triton]", "fused_lora[triton-tma]",
                         "fused_lora[triton-onepass]", "patch_peft", "peft", "compile(peft)")
             if any(r["variant"] == n for r in rows)]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ys = [next((r["fwdbwd_x"] for r in rows if r["variant"] == name and
                    (r["M"], r["K"], r["N"], r["r"], r["dropout"]) == c), 0) for c in cases]
        ax.bar([j + i * width for j in range(len(cases))], ys, width, label=name)
    ax.axhline(1.0, color="black", lw=1, label="base Linear")
    ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cases))])
    ax.set_xticklabels([f"{M}x{K}x{N}\nr={r} p={p}" for M, K, N, r, p in cases], fontsize=7)
    ax.set_ylabel("forward+backward time / base Linear")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-suite", action="store_true", help="the anchor shapes on CUDA in bf16")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("M", "K", "N"), action="append")
    ap.add_argument("--ranks", type=int, nargs="+")
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--reps", type=int, default=10, help="CPU repetitions per variant (median)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--compile-ranks", type=int, nargs="*", default=None,
                    help="ranks at which torch.compile(peft) is also timed (CUDA default: 16, as in the anchors; "
                         "CPU default: none). Each case compiles anew, which takes tens of seconds")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "layer"))
    args = ap.parse_args(argv)
    device = bench_device(ap, args.gpu_suite)
    gpu = device == "cuda"
    shapes = [tuple(s) for s in args.shape] if args.shape else (GPU_SHAPES if gpu else [(2048, 1024, 1024)])
    ranks = args.ranks or ([16, 64] if gpu else [16])
    dtype = getattr(torch, args.dtype or ("bfloat16" if gpu else "float32"))
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    print(f"# {environment(device)}; {dtype}")
    print(HEADER)
    compile_ranks = args.compile_ranks if args.compile_ranks is not None else ([16] if gpu else [])
    rows = run(shapes, ranks, args.dropouts, dtype, device, args.reps, with_peft=not args.no_peft,
               compile_ranks=compile_ranks)
    write_csv(args.out + ".csv", rows)
    wrote_png = plot(rows, args.out + ".png")
    print(f"# wrote {args.out}.csv" + (f" and {args.out}.png" if wrote_png else ""))


if __name__ == "__main__":
    main()
