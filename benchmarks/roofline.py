"""Roofline ideal of one LoRA layer against its frozen base Linear: how close a measured ratio could get.

    python benchmarks/roofline.py                       # the GPU suite's shapes, r 16 and 64, bf16
    python benchmarks/roofline.py --shape 2048 1024 1024 --ranks 16 --dtype float32

Machine (docs/DESIGN.md, "The roofline"; H100 SXM, used for the H200 too): 800 TFLOP/s bf16/fp16
dense and 3.0 TB/s, as the project measured a matmul and a copy on an H100. float32 matmuls run as
TF32 on tensor cores: half the bf16 rate.

Accounting. The layer is x (M x K) -> Y (M x N) with W (N x K) frozen, LoRA rank r, b bytes per
element. Each kernel takes max(FLOPs / peak, bytes / bandwidth) (compute and memory overlap within
a kernel, not across kernels); a pass's time is the sum over its kernels. Each kernel reads its
inputs and writes its outputs once (perfect tiling); dropout is free (masks drawn in registers).
    base forward    Y = x W^T                FLOPs 2MNK          bytes b(MK + NK + MN)
    base backward   dX = dY W (W frozen)     FLOPs 2MNK          bytes b(MN + NK + MK)
    LoRA forward, the two-pass design of the kernels:
      shrink        H = (D x) A^T            FLOPs 2MKr          bytes b(MK + rK + Mr)   <- re-reads x
      main          Y = x W^T + s H B^T      FLOPs 2MNK + 2MNr   bytes b(MK + NK + Mr + Nr + MN)
    LoRA backward:
      dy pass       G = s dY B, dB = s dY^T H  FLOPs 4MNr        bytes b(MN + Nr + 2Mr) + 4Nr  <- reads dY
      dx/dA         dX = dY W + D(G A), dA = G^T (D x)
                                             FLOPs 2MNK + 4MKr   bytes b(MN + NK + Mr + rK + 2MK) + 4rK
(dA and dB accumulate in fp32: 4 bytes.) At the suite's shapes the GEMM kernels are compute-bound
and the shrink and dy passes bandwidth-bound, so the ideal ratio is about
    forward   1 + r/K + (peak b / bandwidth) / (2N)
    fwd+bwd   1 + r/(2K) + r/N + (peak b / bandwidth) (1/N + 1/K) / 4
i.e. the avoidable part is the extra pass over x (forward) and over dY (backward); docs/DESIGN.md's
figures (8192x4096x4096 r=16: 1.07 / 1.07; 8192x4096x14336: 1.02 / 1.05; 8192x14336x4096:
1.07 / 1.05; 2048x4096x4096 r=64: 1.08 / 1.09) follow, and tests/benchmarks/test_roofline.py checks them.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

SUITE_SHAPES = [(8192, 4096, 4096), (8192, 4096, 14336), (8192, 14336, 4096), (2048, 4096, 4096)]


@dataclass(frozen=True)
class Machine:
    name: str
    flops_16bit: float  # FLOP/s, bf16/fp16 dense tensor cores
    bandwidth: float  # bytes/s

    def flops(self, elt_bytes: int) -> float:
        """Dense matmul rate for this element size: fp32 goes through TF32, half the 16-bit rate."""
        return self.flops_16bit if elt_bytes <= 2 else self.flops_16bit / 2


H100 = Machine("H100 SXM (800 TFLOP/s bf16 dense, 3.0 TB/s; docs/DESIGN.md)", 800e12, 3.0e12)


@dataclass(frozen=True)
class Ideal:
    """Ideal times (seconds) and the LoRA layer / base Linear ratios."""
    base_fwd: float
    base_fwdbwd: float
    lora_fwd: float
    lora_fwdbwd: float

    @property
    def fwd(self) -> float:
        return self.lora_fwd / self.base_fwd

    @property
    def fwdbwd(self) -> float:
        return self.lora_fwdbwd / self.base_fwdbwd


def _kernel_time(flops: float, nbytes: float, elt: int, machine: Machine) -> float:
    return max(flops / machine.flops(elt), nbytes / machine.bandwidth)


def kernels(M: int, K: int, N: int, r: int, elt: int) -> dict:
    """(FLOPs, bytes) per kernel of each pass; see the module doc for the accounting."""
    b, f32 = elt, 4
    return {
        "base_fwd": [(2 * M * N * K, b * (M * K + N * K + M * N))],
        "base_bwd": [(2 * M * N * K, b * (M * N + N * K + M * K))],
        "lora_fwd": [(2 * M * K * r, b * (M * K + r * K + M * r)),
                     (2 * M * N * K + 2 * M * N * r, b * (M * K + N * K + M * r + N * r + M * N))],
        "lora_bwd": [(4 * M * N * r, b * (M * N + N * r + 2 * M * r) + f32 * N * r),
                     (2 * M * N * K + 4 * M * K * r, b * (M * N + N * K + M * r + r * K + 2 * M * K) + f32 * r * K)],
    }


def ideal(M: int, K: int, N: int, r: int, elt: int = 2, machine: Machine = H100) -> Ideal:
    """The ideal LoRA layer against the frozen base Linear (frozen W, input gradient wanted)."""
    t = {name: sum(_kernel_time(fl, nb, elt, machine) for fl, nb in ks) for name, ks in kernels(M, K, N, r, elt).items()}
    return Ideal(t["base_fwd"], t["base_fwd"] + t["base_bwd"], t["lora_fwd"], t["lora_fwd"] + t["lora_bwd"])


def ideal_ratios(M: int, K: int, N: int, r: int, elt: int = 2, machine: Machine = H100) -> dict:
    """{"fwd": ..., "fwdbwd": ...}: the ideal LoRA-layer / base-Linear time ratios, rounded to 3 places."""
    i = ideal(M, K, N, r, elt, machine)
    return {"fwd": round(i.fwd, 3), "fwdbwd": round(i.fwdbwd, 3)}


ELT_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", type=int, nargs=3, metavar=("M", "K", "N"), action="append")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--dtype", choices=sorted(ELT_BYTES), default="bfloat16")
    args = ap.parse_args(argv)
    elt = ELT_BYTES[args.dtype]
    print(f"# ideal LoRA layer / base Linear on {H100.name}, {args.dtype}")
    print(f"{'M':>6} {'K':>6} {'N':>6} {'r':>4} {'fwd x':>7} {'f+b x':>7} {'base fwd us':>12} {'base f+b us':>12}")
    for M, K, N in [tuple(s) for s in args.shape] if args.shape else SUITE_SHAPES:
        for r in args.ranks:
            i = ideal(M, K, N, r, elt)
            print(f"{M:>6} {K:>6} {N:>6} {r:>4} {i.fwd:>7.3f} {i.fwdbwd:>7.3f} {i.base_fwd * 1e6:>12.1f} "
                  f"{i.base_fwdbwd * 1e6:>12.1f}")


if __name__ == "__main__":
    main()
