"""A static measure of the GEMM kernels' main loops on Hopper, without a GPU: a PROJECTION, not a timing.

Each kernel variant is compiled for sm_90 by the static gate's own machinery
(`fused_lora.kernels.compile_check`: the same signature, specialization and config as the
launchers use), its cubin disassembled with Triton's bundled nvdisasm, and its main K loop found:
the instructions from the label a backward branch jumps to, to that branch, in the loop holding
the most instructions among those with an HGMMA (wgmma). The loop's instructions are counted per
class, per warp and per HGMMA:

    hgmma  the wgmma instructions (HGMMA.64xNx16)
    mem    loads and async copies: LDG, LDS, LDSM, LDGSTS, LDC, (U)TMA, stores
    int    integer ALU: LOP3, SHF, PRMT, IMAD, IADD3, LEA, ISETP, SEL, ...
    float  FMUL, FFMA, FADD, HMUL2, HFMA2, FSEL, FSETP, ...
    conv   conversions: F2F, F2FP, I2F, F2I, ...
    unif   uniform-datapath instructions (U*: the loop counter, descriptors)
    other  barriers, wgmma fences and waits, branches, moves, never-executed @!PT fillers

The projection rule (per SM sub-partition, per K step of the loop, in clock cycles), stated as the
assumptions it is:
- The tensor cores: H100 SXM runs dense bf16/fp16 at 989 TFLOP/s on 132 SMs at 1.83 GHz, i.e.
  4096 FLOP = 2048 multiply-adds per clock per SM, 512 per sub-partition (NVIDIA's datasheet
  figures; the arithmetic as in https://forums.developer.nvidia.com/t/how-to-calculate-the-tensor-core-fp16-performance-of-h100/244727).
  A wgmma 64xNx16 is 1024 N multiply-adds over the warpgroup's 4 sub-partitions: each of its 4
  warps' HGMMA keeps its sub-partition's tensor core busy N/2 cycles (tf32 operands: N cycles).
- The issue: each sub-partition's scheduler issues at most one warp instruction per clock (no dual
  issue on Hopper), so every non-MMA instruction of a warp costs at least one cycle of its
  sub-partition's issue; the integer ALU has 16 lanes per sub-partition (64 results per clock per
  SM in the CUDA guide's throughput table), so an integer instruction holds it 2 cycles.
- A step costs max(tensor cycles, issue cycles, integer-pipe cycles) of its sub-partition when
  the wgmma overlaps the other instructions (it is asynchronous, and the dequantized tile is the
  next step's operand), at worst their sum (`serial`). Both are shown; the truth of a pipelined
  loop lies between and nearer the first. Latency (memory, dependency stalls), the epilogue and the
  side passes (shrink, dY pass, dA/dB sums) are left out.
- Ratios are per multiply-add, against the 16-bit floor: a plain Triton GEMM at the LoRA forward's
  config (the same loads and wgmma as cuBLAS' kernel to within its scheduling).

    python benchmarks/static_loop.py [--dtype bf16] [--kernels ...] [--dump DIR] [--json FILE]

Needs only the CPU (triton's compiler and its bundled nvdisasm).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
if __name__ == "__main__":  # compile real kernels, with the GPU config lists (imported, e.g. by the tests'
    os.environ.pop("TRITON_INTERPRET", None)  # interpreter session, the module leaves the process as it is)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fused_lora.kernels import compile_check as cc  # noqa: E402
from fused_lora.kernels import configs  # noqa: E402
from fused_lora.kernels.tiles import grouped_tile, load_tile, store_tile  # noqa: E402

ARCH = 90
SUBPARTITIONS = 4
MACS_PER_CLOCK_SP = 512  # dense 16-bit multiply-adds per clock per sub-partition (see above)
INT_PIPE_CYCLES = 2  # cycles an integer warp instruction holds its sub-partition's 16-lane ALU


@triton.jit
def base_gemm_kernel(
    x_ptr, w_ptr, y_ptr, stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """The floor: Y = x W^T (or, strides swapped, dX = dY W) as a plain pointer GEMM, no LoRA term."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = load_tile(x_ptr, offs_m, offs_k, stride_xm, stride_xk, offs_m < M, offs_k < K)
        w = load_tile(w_ptr, offs_k, offs_n, stride_wk, stride_wn, offs_k < K, offs_n < N)
        acc = tl.dot(x, w, acc)
    store_tile(y_ptr, acc, offs_m, offs_n, stride_ym, stride_yn, offs_m < M, offs_n < N)


def _base_source(dtype: str, dx: bool):
    """(ASTSource, config) of the floor GEMM at the LoRA forward's first config for this dtype: the
    forward reads W^T tiles (W's K contiguous: unit stride_wk), dX reads W tiles (unit stride_wn)."""
    from triton.compiler import ASTSource
    cfg = configs.candidates("forward", ARCH, 16, cc._ELT[dtype])[0]
    fn = base_gemm_kernel
    unit = {"stride_xk", "stride_yn", "stride_wn" if dx else "stride_wk"}
    signature, attrs, constexprs = {}, {}, dict(cfg.kwargs)
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in unit:
            signature[name], constexprs[name] = "constexpr", 1
        else:
            signature[name] = f"*{dtype}" if name.endswith("_ptr") else "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return src, cfg


def subjects(dtype: str) -> list:
    """(label, what) for every kernel measured: the floor, the LoRA pointer forward, and the
    quantized GEMMs (forward and dX, no dropout, no bias) at the configs the launchers pick for a
    4096 x 4096 weight (NF4 then runs ALIGNED: K is a multiple of the blocksize), and for
    comparison NF4's general path (any K; compiled with a bias / the low-rank term through dX)."""
    def quant(kernel, fmt, nested, aligned, flag):
        flags = dict(QUANT=fmt, NESTED=nested, ALIGNED=aligned)
        flags["HAS_BIAS" if kernel == "quant_forward" else "LOW_RANK_IN_DX"] = flag
        return cc.Variant(kernel, ARCH, dtype, 0, tuple(flags.items()), 0)
    out = [
        ("base fwd (x W^T, floor)", ("base", False)),
        ("base dX (dY W, floor)", ("base", True)),
        ("lora fwd (pointer, r=16)", cc.Variant("forward", ARCH, dtype, 16,
                                                  (("HAS_BIAS", False), ("HAS_COLSCALE", False)), 0)),
    ]
    for fmt, nested, name in (("nf4", True, "nf4-nested"), ("nf4", False, "nf4"), ("int8", False, "int8")):
        out.append((f"{name} fwd", quant("quant_forward", fmt, nested, fmt == "nf4", False)))
        out.append((f"{name} dX", quant("quant_dx", fmt, nested, fmt == "nf4", False)))
    out.append(("nf4-nested-general fwd", quant("quant_forward", "nf4", True, False, True)))
    out.append(("nf4-nested-general dX", quant("quant_dx", "nf4", True, False, True)))
    return out


def compile_cubin(what, dtype: str):
    """(cubin bytes, config) of one subject."""
    from triton.backends.compiler import GPUTarget
    if isinstance(what, tuple):
        src, cfg = _base_source(dtype, what[1])
    else:
        src, cfg = cc._source(what)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCH, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    return compiled.asm["cubin"], cfg


def disassemble(cubin: bytes) -> str:
    nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSTR = re.compile(r"/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


@dataclass
class Instr:
    pred: str
    op: str
    args: str


def parse(sass: str):
    """The instruction list and each label's position in it."""
    instrs, labels = [], {}
    for line in sass.splitlines():
        m = _LABEL.match(line.strip())
        if m:
            labels[m.group(1)] = len(instrs)
            continue
        m = _INSTR.search(line)
        if m:
            instrs.append(Instr((m.group(1) or "").strip(), m.group(2), m.group(3)))
    return instrs, labels


def main_loop(instrs, labels) -> list:
    """The body of the largest loop (backward branch) that holds an HGMMA."""
    loops = []
    for i, ins in enumerate(instrs):
        if ins.op.startswith("BRA"):
            t = _TARGET.search(ins.args)
            if t and labels.get(t.group(1), i + 1) <= i:
                body = instrs[labels[t.group(1)]: i + 1]
                if any(b.op.startswith("HGMMA") for b in body):
                    loops.append(body)
    if not loops:
        raise RuntimeError("no loop with an HGMMA found")
    return max(loops, key=len)


CLASSES = ("hgmma", "mem", "int", "float", "conv", "unif", "other")
_MEM = ("LDG", "LDS", "LDSM", "LDGSTS", "LDC", "STG", "STS", "STSM", "UTMALDG", "UBLKCP", "LD", "ST", "ATOM", "RED")
_INT = ("LOP3", "LOP", "SHF", "PRMT", "IMAD", "IADD3", "IADD", "LEA", "ISETP", "SEL", "SGXT", "IABS", "VIADD",
        "IMNMX", "VIMNMX", "BFE", "BFI", "FLO", "POPC", "BMSK", "IMUL", "I2IP", "SHL", "SHR", "IDP", "VIADDMNMX")
_FLOAT = ("FMUL", "FFMA", "FADD", "FSEL", "FSETP", "FMNMX", "HMUL2", "HFMA2", "HADD2", "HSET2", "HSETP2", "HMNMX2",
          "FCHK", "MUFU", "FSET")
_CONV = ("F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND")


def classify(ins: Instr) -> str:
    base = ins.op.split(".")[0]
    if ins.pred == "@!PT":
        return "other"  # never executed (ptxas' fillers), but issued
    if base == "HGMMA":
        return "hgmma"
    if base in _MEM:
        return "mem"
    if base in _CONV:
        return "conv"
    if base in _INT:
        return "int"
    if base in _FLOAT:
        return "float"
    if base.startswith("U") and base not in ("UTMALDG", "UBLKCP"):
        return "unif"
    return "other"


def hgmma_cycles(op: str, dtype: str) -> float:
    """Tensor-core cycles of one warp's HGMMA on its sub-partition: N/2 for 16-bit operands."""
    n = int(re.match(r"HGMMA\.64x(\d+)x", op).group(1))
    return n / 2 * (2 if dtype == "fp32" else 1)


def measure(label, what, dtype: str, dump=None) -> dict:
    cubin, cfg = compile_cubin(what, dtype)
    sass = disassemble(cubin)
    if dump:
        os.makedirs(dump, exist_ok=True)
        with open(os.path.join(dump, re.sub(r"\W+", "_", label).strip("_") + ".sass"), "w") as f:
            f.write(sass)
    body = main_loop(*parse(sass))
    counts = {c: 0 for c in CLASSES}
    for ins in body:
        counts[classify(ins)] += 1
    k = cfg.kwargs
    warps_per_sp = cfg.num_warps / SUBPARTITIONS
    mma = sum(hgmma_cycles(i.op, dtype) for i in body if i.op.startswith("HGMMA")) * warps_per_sp
    issue = (len(body) - counts["hgmma"]) * warps_per_sp
    int_pipe = counts["int"] * INT_PIPE_CYCLES * warps_per_sp
    macs = k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"] / SUBPARTITIONS  # per step per sub-partition
    return dict(label=label, config=cc._config_name(cfg), counts=counts, total=len(body),
                hgmma_ops=sorted({i.op for i in body if i.op.startswith("HGMMA")}),
                mma=mma, issue=issue, int_pipe=int_pipe, macs=macs,
                overlapped=max(mma, issue, int_pipe) / macs, serial=(mma + max(issue, int_pipe)) / macs)


def report(rows, dtype: str) -> str:
    floor = {"fwd": rows[0], "dX": rows[1]}
    lines = [f"triton {triton.__version__}, sm_{ARCH}, {dtype}, configs as the launchers pick them at 8192x4096x4096 "
             "r=16 (no dropout, no bias). Per warp and main-loop iteration: instruction counts; per sub-partition "
             "and step: tensor / issue / integer-pipe cycles. Projected, not measured.",
             "",
             "| kernel | config | HGMMA | " + " | ".join(CLASSES[1:]) + " | non-MMA per HGMMA | tensor | issue | "
             "int pipe | projected x floor (overlapped) | (serial) |",
             "|" + "---|" * (len(CLASSES) + 8)]  # one per header cell: kernel, config, the classes, 6 more
    for r in rows:
        c = r["counts"]
        ref = floor["dX" if "dX" in r["label"] else "fwd"]
        per = (r["total"] - c["hgmma"]) / max(c["hgmma"], 1)
        lines.append(f"| {r['label']} | {r['config']} | {c['hgmma']} x {','.join(o.split('.')[1] for o in r['hgmma_ops'])} | "
                     + " | ".join(str(c[k]) for k in CLASSES[1:])
                     + f" | {per:.1f} | {r['mma']:.0f} | {r['issue']:.0f} | {r['int_pipe']:.0f} | "
                     f"{r['overlapped'] / ref['overlapped']:.2f} | {r['serial'] / ref['serial']:.2f} |")
    layer = {}
    for name in ("nf4-nested", "nf4", "int8", "nf4-nested-general"):
        parts = [r for r in rows if r["label"].startswith(name + " ")]
        if len(parts) == 2:
            f, d = parts
            over = (f["overlapped"] + d["overlapped"]) / (floor["fwd"]["overlapped"] + floor["dX"]["overlapped"])
            ser = (f["serial"] + d["serial"]) / (floor["fwd"]["serial"] + floor["dX"]["serial"])
            layer[name] = (over, ser)
    lines.append("")
    lines.append("Projected GEMM part of a layer's forward + backward (forward GEMM + dX GEMM, equal multiply-adds) "
                 "against the 16-bit base's two GEMMs, the side passes left out: "
                 + "; ".join(f"{n} {o:.2f}x overlapped ({s:.2f}x serial)" for n, (o, s) in layer.items()) + ".")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    ap.add_argument("--kernels", nargs="*", help="labels (prefixes) to measure; default all")
    ap.add_argument("--dump", help="directory to write each kernel's disassembly to")
    ap.add_argument("--json", help="file to write the rows to (counts and cycles per kernel)")
    args = ap.parse_args(argv)
    rows = []
    for label, what in subjects(args.dtype):
        if args.kernels and not any(label.startswith(k) for k in args.kernels) and not label.startswith("base"):
            continue
        rows.append(measure(label, what, args.dtype, args.dump))
    print(report(rows, args.dtype))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
