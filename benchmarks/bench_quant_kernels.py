"""Timing of the quantized-base kernels (fused_lora.kernels.quantized) against the 16-bit base, one run.

Per shape (M K N) and rank, median milliseconds of forward + backward (dX, dA, dB; the base frozen):

    base16       the frozen 16-bit base Linear: y = x W^T, dX = dY W (cuBLAS)
    lora16       fused_lora's Triton kernels on the 16-bit W
    nf4, nf4-nested, int8
                 the quantized-base kernels (W dequantized inside the GEMMs)
    deq+cublas   NF4 (nested) dequantized to 16 bits in PyTorch (core.formats' dequantize_rows,
                 before the forward and again before the backward, as a dequantize-then-GEMM
                 QLoRA does), then the base GEMMs: what the fused kernels avoid

and the ratios to base16 (issue 12's target: nf4-nested <= 1.25 at 8192x4096x4096, r=16). The
packed weights hold random bytes (NF4's levels are used near uniformly by design, so the table
lookups see a realistic pattern; timing does not depend on the values). Needs a CUDA GPU; on a
CPU `--smoke` runs one tiny shape through TRITON_INTERPRET=1 to check the script, timing nothing
worth reading.

    python benchmarks/bench_quant_kernels.py [--shape M K N] [--ranks 16] [--dtype bf16] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import os
import sys

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from harness import time_variants  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_weights(N, K, device, seed=0):
    """(NF4Data, NF4Data nested, Int8Data) of an N x K weight with random contents."""
    from fused_lora.core.formats import Int8Data, NF4Data
    from fused_lora.core.formats.nf4 import NF4_LEVELS
    g = torch.Generator(device=device).manual_seed(seed)
    n_blocks = -(-(N * K) // 64)
    packed = torch.randint(0, 256, (N * K // 2,), generator=g, dtype=torch.uint8, device=device)
    code = torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)
    absmax = torch.rand(n_blocks, generator=g, device=device) * K ** -0.5
    plain = NF4Data((N, K), packed, code, 64, absmax=absmax)
    nested = NF4Data((N, K), packed, code, 64, qabsmax=torch.randint(0, 256, (n_blocks,), generator=g, dtype=torch.uint8,
                                                                      device=device),
                     code2=torch.linspace(-1, 1, 256, device=device),
                     absmax2=torch.rand(-(-n_blocks // 256), generator=g, device=device) * K ** -0.5,
                     blocksize2=256, offset=K ** -0.5)
    int8 = Int8Data((N, K), torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8, device=device),
                    torch.rand(N, generator=g, device=device) / 127 * K ** -0.5)
    return plain, nested, int8


def variants(M, K, N, r, dtype, device):
    from fused_lora import kernels
    from fused_lora.kernels.quantized.launchers import backward_quant, forward_quant
    g = torch.Generator(device=device).manual_seed(1)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, dy = rnd(M, K), rnd(M, N)
    a, b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
    nf4, nf4_nested, int8 = random_weights(N, K, device)
    w16 = nf4_nested.dequantize_rows(0, N).to(dtype)
    s, p, seed = 2.0, 0.0, 1234

    def base16():
        torch.nn.functional.linear(x, w16)
        dy @ w16

    def lora16():
        y, h = kernels.forward(x, w16, None, a, b, s, p, seed)
        kernels.backward(dy, x, w16, a, b, h, s, p, seed, True, True, False, False)

    def quant(wq):
        def run():
            y, h = forward_quant(x, wq, None, a, b, s, p, seed)
            backward_quant(dy, x, wq, a, b, h, s, p, seed, True, True)
        return run

    def deq_cublas():
        w = nf4_nested.dequantize_rows(0, N).to(dtype)
        torch.nn.functional.linear(x, w)
        del w
        w = nf4_nested.dequantize_rows(0, N).to(dtype)
        dy @ w

    return {"base16": base16, "lora16": lora16, "nf4": quant(nf4), "nf4-nested": quant(nf4_nested),
            "int8": quant(int8), "deq+cublas": deq_cublas}


def check_outputs(M, K, N, r, dtype, device) -> list:
    """Before timing, the kernels' Y and dX at the benchmark shape against the same math on the
    dequantized weight (core.formats' dequantize_rows, the layouts' one definition, rounded to the
    compute dtype as a 16-bit copy would be) in fp32: (name, relative error of Y, of dX, ok) per
    format. On a GPU this is the first run of these kernels at the real tile configs (the tests
    run them at small shapes). The bound: a few units of the compute dtype's rounding, far below
    what a lost tile, a wrong absmax or a swapped nibble gives (O(1))."""
    from fused_lora.kernels.quantized.launchers import backward_quant, forward_quant
    g = torch.Generator(device=device).manual_seed(2)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    x, dy = rnd(M, K), rnd(M, N)
    a, b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)  # B != 0: the low-rank terms count
    s = 2.0
    bound = {torch.float32: 1e-2, torch.float16: 4e-3, torch.bfloat16: 2e-2}[dtype]  # fp32 runs tf32 dots
    out = []
    for name, wq in zip(("nf4", "nf4-nested", "int8"), random_weights(N, K, device)):
        w = wq.dequantize_rows(0, N).to(dtype).float()
        y, h = forward_quant(x, wq, None, a, b, s, 0.0, 1)
        dx = backward_quant(dy, x, wq, a, b, h, s, 0.0, 1, True, False)[0]
        xf, dyf, af, bf = x.float(), dy.float(), a.float(), b.float()
        y_ref = xf @ w.T + s * (xf @ af.T) @ bf.T
        dx_ref = dyf @ w + s * (dyf @ bf) @ af
        err = [float((got.float() - ref).norm() / ref.norm()) for got, ref in ((y, y_ref), (dx, dx_ref))]
        out.append((name, *err, max(err) <= bound))
        print(f"correctness {name}: Y rel. error {err[0]:.2e}, dX {err[1]:.2e} (bound {bound:.0e}): "
              f"{'ok' if out[-1][-1] else 'MISMATCH'}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, action="append", metavar=("M", "K", "N"))
    ap.add_argument("--ranks", nargs="+", type=int, default=[16])
    ap.add_argument("--dtype", choices=DTYPES, default="bf16")
    ap.add_argument("--reps", type=int, default=10, help="CPU rounds (CUDA uses do_bench)")
    ap.add_argument("--out", default=None, help="directory for quant_kernels.csv")
    ap.add_argument("--smoke", action="store_true", help="CPU: one tiny shape through the interpreter")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    shapes = args.shape or [(8192, 4096, 4096)]
    if device == "cpu":
        if not args.smoke:
            print("bench_quant_kernels: no CUDA device (run with --smoke to check the script on a CPU)")
            return 0
        shapes, args.ranks, dtype, args.reps = [(40, 96, 72)], [4], torch.float32, 2
    rows = []
    print(f"{'shape':>18s} {'r':>4s} " + " ".join(f"{k:>11s}" for k in ("base16", "lora16", "nf4", "nf4-nested",
                                                                      "int8", "deq+cublas")) + "   ratios to base16")
    failed = []
    for M, K, N in shapes:
        failed += [c[0] for c in check_outputs(M, K, N, args.ranks[0], dtype, device) if not c[-1]]
        for r in args.ranks:
            ms = time_variants(variants(M, K, N, r, dtype, device), device, reps=args.reps)
            ratio = {k: v / ms["base16"] for k, v in ms.items()}
            rows.append(dict(M=M, K=K, N=N, r=r, dtype=args.dtype if device == "cuda" else "fp32",
                             **{f"{k}_ms": round(v, 4) for k, v in ms.items()},
                             **{f"{k}_ratio": round(v, 3) for k, v in ratio.items()}))
            print(f"{f'{M}x{K}x{N}':>18s} {r:4d} " + " ".join(f"{ms[k]:11.3f}" for k in ms) + "   "
                  + " ".join(f"{k}={ratio[k]:.2f}" for k in ms if k != "base16"))
            if device == "cuda" and (M, K, N, r) == (8192, 4096, 4096, 16):
                ok = ratio["nf4-nested"] <= 1.25
                print(f"target nf4-nested fwd+bwd <= 1.25 x base16: {ratio['nf4-nested']:.2f} {'met' if ok else 'NOT met'}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "quant_kernels.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if failed:
        print(f"bench_quant_kernels: the kernels' output differs from the dequantized reference for {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
