"""The static performance gate: every kernel variant the launchers can run, compiled for sm_90 and
sm_80 without a GPU, and read by ptxas.

A variant is one kernel x architecture x dtype (bf16, fp16, fp32: fp32 dots run as TF32) x padded
rank (BLOCK_R) x flag combination that changes the code (HAS_DROPOUT, HAS_BIAS, HAS_DB,
HAS_DX/HAS_DA) x autotuning config the launchers may pick. The segment kernels of mixed batches
(kernels/segments/) add their own: bf16/fp16 x the two multi ranks x flags, one config each (the grouped
op's, kernels/grouped/, too: its transposed expert stack and its weight and bias gradients); the
quantized-base GEMMs (kernels/quantized/) have no rank variants but QUANT/NESTED (nf4, nested nf4,
int8) x HAS_BIAS or LOW_RANK_IN_DX; the one-launch dequantization (kernels/quantized/dequantize.py) its
formats and layouts x output dtype x tile, compiled without floating-point contraction as its launcher
runs it; the Hopper path (TMA, single pass) sm_90 16-bit only.
Each is compiled the way the JIT specializes it for contiguous inputs with sizes divisible by 16 (unit strides constant, the rest
16-divisible: the case that pipelines fully and uses the most shared memory), then Triton's own
ptxas is run with -v on its PTX, with the flags Triton's make_cubin uses, and its report parsed:
registers per thread, spill stores/loads in bytes, and the C75xx performance advisories
("wgmma.mma_async instructions are serialized ..." and the like).

Fails on: a compile error or shared memory over the limit (either architecture), and on any spill
or C75xx advisory for sm_90 (for sm_80 those are reported, not failed).

    python -m fused_lora.kernels.compile_check          # summary and findings; exit 1 on failure
    python -m fused_lora.kernels.compile_check --all    # also one line per variant

ptxas reports are cached by the hash of (ptxas, flags, PTX) beside Triton's own cache, so a rerun
with unchanged kernels costs only Triton's cache lookups.
"""
from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import triton
from triton.compiler import ASTSource

from . import configs
from .hopper.dx_tma import descriptor_blocks as dx_tma_blocks
from .hopper.dx_tma import lora_dx_tma_kernel
from .hopper.forward_one_pass import lora_forward_one_pass_kernel
from .hopper.forward_tma import descriptor_blocks as forward_tma_blocks
from .hopper.forward_tma import lora_forward_tma_kernel
from .lora.launchers import KERNELS as POINTER_KERNELS
from .quantized.dequantize import dequantize_kernel
from .quantized.quant_backward import quant_dx_kernel
from .quantized.quant_forward import quant_forward_kernel
from .reduce import BLOCK, sum_partials_kernel
from .grouped.launchers import KERNELS as GROUPED
from .segments.launchers import KERNELS as MULTI

RANKS = (16, 32, 64, 128, 256)  # every padded rank (BLOCK_R) the launchers use
ARCHS = (90, 80)
DTYPES = ("bf16", "fp16", "fp32")
GATED_ARCH = 90  # spills and advisories fail the gate here; elsewhere they are reported
_ELT = {"bf16": 2, "fp16": 2, "fp32": 4}

# Strides that are 1 for contiguous inputs (the JIT turns them into constants).
_UNIT_STRIDES = {
    "shrink": {"stride_xk", "stride_ak", "stride_hr"},
    "forward": {"stride_xk", "stride_wk", "stride_hr", "stride_br", "stride_yn"},
    "dy": {"stride_dyn", "stride_br", "stride_hr"},
    "dx_da": {"stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_xk", "stride_dxk"},
    "reduce": set(),
    "dora_forward": {"stride_xk", "stride_wk", "stride_hr", "stride_br", "stride_yn"},
    "dora_dy": {"stride_dyn", "stride_br", "stride_hr", "stride_yn"},
}
# Every combination of the constexpr flags each launcher passes.
_DX_DA = [dict(HAS_DX=dx, HAS_DA=da, HAS_DROPOUT=drop)
          for (dx, da), drop in itertools.product([(True, True), (True, False), (False, True)], [False, True])]
FLAGS = {
    "shrink": [dict(HAS_DROPOUT=False), dict(HAS_DROPOUT=True)],
    "forward": [dict(HAS_BIAS=False, HAS_COLSCALE=False), dict(HAS_BIAS=True, HAS_COLSCALE=False)],
    "dy": [dict(HAS_DB=False, HAS_COLSCALE=False), dict(HAS_DB=True, HAS_COLSCALE=False)],
    "dx_da": _DX_DA,
    "reduce": [{}],
    # DoRA launches one combination of each (a missing bias is passed as zeros)
    "dora_forward": [dict(HAS_BIAS=True, HAS_COLSCALE=True)],
    "dora_dy": [dict(HAS_DB=True, HAS_COLSCALE=True)],
}
# Several adapters in one batch (kernels/segments/): one config per variant, the multi ranks
# (configs.MULTI_BLOCK_RS) and the 16-bit dtypes only (float32 multi batches are refused on a GPU).
MULTI_DTYPES = ("bf16", "fp16")
_UNIT_STRIDES.update({
    "multi_shrink": {"stride_xk", "stride_ak", "stride_hr"},
    "multi_forward": {"stride_xk", "stride_wk", "stride_hr", "stride_br", "stride_yn"},
    "multi_dy": {"stride_dyn", "stride_br", "stride_hr"},
    "multi_dx_da": {"stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_xk", "stride_dxk"},
    "multi_sum": set(),
})
FLAGS.update({
    "multi_shrink": [dict(HAS_DROPOUT=False), dict(HAS_DROPOUT=True)],
    "multi_forward": [{}],
    "multi_dy": [{}],
    "multi_dx_da": [dict(HAS_DX=dx, HAS_DROPOUT=drop) for dx, drop in itertools.product([True, False], [False, True])],
    "multi_sum": [{}],
})
# LoRA on expert weights (kernels/grouped/): the segment kernels again, with the per-segment weight of an
# (E, N, K) stack compiled as the mixed batch's weight (unit stride along K, the other strides 16-divisible: the
# multi variants above), and as variants of their own the two kernels that read the transposed (E, K, N)
# stack (unit stride along N), and the expert stack's gradients (grouped/wgrad.py). 16-bit only, as above.
GROUPED_FLAGS = {
    "grouped_forward_t": [{}],
    "grouped_dx_da_t": [dict(HAS_DX=True, HAS_DROPOUT=drop) for drop in (False, True)],  # without dX, W is not read
    "grouped_wgrad": [{}],
    "grouped_colsum": [{}],
}
FLAGS.update(GROUPED_FLAGS)
_UNIT_STRIDES.update({
    "grouped_forward_t": {"stride_xk", "stride_wn", "stride_hr", "stride_br", "stride_yn"},
    "grouped_dx_da_t": {"stride_dyn", "stride_wn", "stride_gr", "stride_ak", "stride_xk", "stride_dxk"},
    "grouped_wgrad": {"stride_ui", "stride_vj", "stride_oj"},
    "grouped_colsum": {"stride_dyn"},
})
_TYPED_PTRS = {"order_ptr": "*i32", "tiles_ptr": "*i32", "ints_ptr": "*i64", "floats_ptr": "*fp32",
               "bounds_ptr": "*i32", "ws_ptr": "*fp32", "offsets_ptr": "*i32"}
_PLAIN_INTS = {"tile0", "lora_tile0", "pos0", "n_tiles"}  # tile and position counts: no 16-divisibility
_FLOAT_ARGS = {"scaling", "scale"}
_FP32_BUFFERS = {"g_ws_ptr", "db_ws_ptr", "da_ws_ptr", "ws0_ptr", "ws1_ptr", "colscale_ptr", "dm_ws_ptr"}

# The GEMMs over a quantized base (kernels/quantized/): no rank variants (their low-rank term loops
# over rank chunks); QUANT x NESTED change the code, and the packed weight's pointer types.
# NF4 runs ALIGNED (rows of whole blocks: every weight fused_lora.modules.quantized and bitsandbytes make) with
# each flag, and its general path with one flag set only (kernels.quantized passes a bias and the
# low-rank term of dX through memory there).
_QUANT_FORMATS = [dict(QUANT="nf4", NESTED=False), dict(QUANT="nf4", NESTED=True), dict(QUANT="int8", NESTED=False)]


def _quant_flags(name: str) -> list:
    out = []
    for f in _QUANT_FORMATS:
        for aligned in ((True, False) if f["QUANT"] == "nf4" else (False,)):
            general_nf4 = f["QUANT"] == "nf4" and not aligned
            out.extend(dict(f, ALIGNED=aligned, **{name: b}) for b in ((True,) if general_nf4 else (False, True)))
    return out


FLAGS["quant_forward"] = _quant_flags("HAS_BIAS")
FLAGS["quant_dx"] = _quant_flags("LOW_RANK_IN_DX")
_UNIT_STRIDES["quant_forward"] = {"stride_xk", "stride_hr", "stride_br", "stride_yn"}
_UNIT_STRIDES["quant_dx"] = {"stride_dyn", "stride_gr", "stride_ak", "stride_dxk"}
_QUANT_POINTERS = {"code_ptr": "*fp32", "absmax_ptr": "*fp32", "qabsmax_ptr": "*u8", "code2_ptr": "*fp32",
                   "absmax2_ptr": "*fp32"}


# The one-launch dequantization (the dequant-once row on CUDA): each format and layout the launcher runs (NF4
# nested or not, aligned or general; int8) in each output dtype, with each tile it may pick
# (configs.dequant_configs: the narrow one for aligned NF4 blocks of 32).
FLAGS["dequantize"] = [dict(QUANT="nf4", NESTED=nested, ALIGNED=aligned) for nested in (False, True)
                       for aligned in (True, False)] + [dict(QUANT="int8", NESTED=False, ALIGNED=False)]
_UNIT_STRIDES["dequantize"] = {"stride_ok"}


def _dequant_configs(flags: dict) -> list:
    return configs.dequant_configs(flags["QUANT"] == "nf4" and flags["ALIGNED"])


def _quant_kernel(name: str):
    return {"quant_forward": quant_forward_kernel, "quant_dx": quant_dx_kernel}[name]


@dataclass(frozen=True)
class Variant:
    kernel: str
    arch: int
    dtype: str
    block_r: int  # 0 for kernels without a rank
    flags: tuple  # ((name, value), ...)
    config: int  # index into configs.candidates(...), -1 for the untuned reduction


@dataclass
class Result:
    variant: Variant
    config: str = ""
    shared: int | None = None
    registers: int | None = None
    spill_stores: int = 0
    spill_loads: int = 0
    advisories: list = field(default_factory=list)
    error: str | None = None

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def failures(self) -> list:
        """Why this variant fails the gate (empty if it passes)."""
        out = [self.error] if self.error else []
        limit = configs.SMEM_LIMIT[self.variant.arch]
        if self.shared is not None and self.shared > limit:
            out.append(f"shared memory {self.shared} > {limit}")
        if self.variant.arch == GATED_ARCH:
            if self.spills:
                out.append(f"spills {self.spill_stores} B stored / {self.spill_loads} B loaded")
            out.extend(self.advisories)
        return out


def variants(archs=ARCHS, dtypes=DTYPES) -> list:
    """Every variant any launch may compile (under the real, non-interpreter config lists)."""
    out = []
    for arch, dtype in itertools.product(archs, dtypes):
        for kernel in configs.KERNELS:
            for block_r, flags in itertools.product(RANKS, FLAGS[kernel]):
                n = len(configs.candidates(kernel, arch, block_r, _ELT[dtype], flags.get("HAS_DROPOUT", False)))
                out.extend(Variant(kernel, arch, dtype, block_r, tuple(flags.items()), i) for i in range(n))
        out.append(Variant("reduce", arch, dtype, 0, (), -1))
        if dtype in MULTI_DTYPES:
            out.extend(Variant(kernel, arch, dtype, block_r, tuple(flags.items()), 0)
                       for kernel in configs.MULTI_KERNELS
                       for block_r, flags in itertools.product(configs.MULTI_BLOCK_RS, FLAGS[kernel]))
            out.append(Variant("multi_sum", arch, dtype, 0, (), -1))
            out.extend(Variant(kernel, arch, dtype, block_r, tuple(flags.items()), 0)
                       for kernel in configs.GROUPED_KERNELS
                       for block_r in (configs.MULTI_BLOCK_RS if kernel in configs.GROUPED_SEGMENT_KERNELS else (0,))
                       for flags in GROUPED_FLAGS[kernel])
        for kernel in configs.QUANT_KERNELS:
            for flags in FLAGS[kernel]:
                n = len(configs.quant_candidates(kernel, arch, _ELT[dtype]))
                out.extend(Variant(kernel, arch, dtype, 0, tuple(flags.items()), i) for i in range(n))
        for kernel in configs.DEQUANT_KERNELS:
            for flags in FLAGS[kernel]:
                out.extend(Variant(kernel, arch, dtype, 0, tuple(flags.items()), i)
                           for i in range(len(_dequant_configs(flags))))
    return out + hopper_variants(archs, dtypes)


def _source(v: Variant):
    """The kernel, its compile-time constants and signature for one variant, and its config."""
    descriptors = {}
    if v.kernel in HOPPER_FLAGS:
        fn, blocks = _hopper_kernel(v.kernel)
        cfg = configs.tma_candidates(v.kernel, v.arch, v.block_r, _ELT[v.dtype], dict(v.flags).get("HAS_DROPOUT", False))[v.config]
        constexprs = dict(cfg.kwargs, BLOCK_R=v.block_r, **dict(v.flags))
        descriptors = blocks(cfg)
    elif v.kernel == "reduce":
        fn, constexprs, cfg = sum_partials_kernel, {"BLOCK": BLOCK}, triton.Config({}, num_warps=4, num_stages=1)
    elif v.kernel == "multi_sum":
        fn, constexprs, cfg = MULTI[v.kernel], {"BLOCK": BLOCK}, triton.Config({}, num_warps=4, num_stages=1)
    elif v.kernel in GROUPED:
        fn = GROUPED[v.kernel]
        cfg = configs.grouped_config(v.kernel, v.arch, v.block_r, _ELT[v.dtype], dict(v.flags).get("HAS_DROPOUT", False))
        constexprs = dict(cfg.kwargs, **({"BLOCK_R": v.block_r} if v.block_r else {}), **dict(v.flags))
    elif v.kernel in MULTI:
        fn = MULTI[v.kernel]
        cfg = configs.multi_config(v.kernel, v.arch, v.block_r, _ELT[v.dtype], dict(v.flags).get("HAS_DROPOUT", False))
        constexprs = dict(cfg.kwargs, BLOCK_R=v.block_r, **dict(v.flags))
    elif v.kernel in configs.DEQUANT_KERNELS:
        fn = dequantize_kernel
        cfg = _dequant_configs(dict(v.flags))[v.config]
        constexprs = dict(cfg.kwargs, **dict(v.flags))
    elif v.kernel in configs.QUANT_KERNELS:
        fn = _quant_kernel(v.kernel)
        cfg = configs.quant_candidates(v.kernel, v.arch, _ELT[v.dtype])[v.config]
        constexprs = dict(cfg.kwargs, RANK_STEP=configs.QUANT_RANK_STEP, **dict(v.flags))
    else:
        fn = POINTER_KERNELS[v.kernel][0]
        cfg = configs.candidates(v.kernel, v.arch, v.block_r, _ELT[v.dtype], dict(v.flags).get("HAS_DROPOUT", False))[v.config]
        constexprs = dict(cfg.kwargs, BLOCK_R=v.block_r, **dict(v.flags))
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in descriptors:
            signature[name] = f"tensordesc<{v.dtype}[{', '.join(map(str, descriptors[name]))}]>"
        elif name in _UNIT_STRIDES[v.kernel]:
            signature[name], constexprs[name] = "constexpr", 1
        elif name in _TYPED_PTRS:
            signature[name] = _TYPED_PTRS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "q_ptr":  # the packed weight: NF4 byte pairs or int8
            signature[name] = "*u8" if dict(v.flags)["QUANT"] == "nf4" else "*i8"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _QUANT_POINTERS:
            signature[name] = _QUANT_POINTERS[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_BUFFERS else f"*{v.dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("bs_shift", "bs2_shift"):  # not specialized by the JIT (do_not_specialize)
            signature[name] = "i32"
        elif name in _FLOAT_ARGS or name == "offset":
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        elif name in _PLAIN_INTS or name == "NUM_PROGRAMS":  # counts (NUM_PROGRAMS: the SM count): no divisibility to assume
            signature[name] = "i32"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): val for k, val in constexprs.items()})
    return src, cfg


# ---- The Hopper path's kernels (configs.HOPPER_KERNELS): compiled for sm_90 only, in bf16 and fp16,
# at padded ranks <= configs.HOPPER_MAX_BLOCK_R, one config per variant (the rows that run them,
# "triton-tma" and "triton-onepass" in fused_lora.dispatch.table, refuse everything else).
_UNIT_STRIDES.update({
    "forward_tma": {"stride_hr", "stride_br"},
    "dx_tma": {"stride_gr", "stride_ak", "stride_xk"},
    "forward_one_pass": {"stride_xk", "stride_wk", "stride_ak", "stride_br", "stride_yn", "stride_hr"},
})
HOPPER_FLAGS = {
    "forward_tma": [dict(HAS_BIAS=False), dict(HAS_BIAS=True)],
    "dx_tma": [dict(HAS_DA=da, HAS_DROPOUT=drop) for da, drop in itertools.product([True, False], [False, True])],
    "forward_one_pass": [dict(HAS_BIAS=bias, HAS_DROPOUT=drop)
                         for bias, drop in itertools.product([False, True], [False, True])],
}
FLAGS.update(HOPPER_FLAGS)


def _hopper_kernel(name: str):
    """(jit function, descriptor block shapes of a config or None) of a Hopper-path kernel."""
    if name == "forward_tma":
        return lora_forward_tma_kernel, forward_tma_blocks
    if name == "dx_tma":
        return lora_dx_tma_kernel, dx_tma_blocks
    return lora_forward_one_pass_kernel, lambda cfg: {}


def hopper_variants(archs=ARCHS, dtypes=DTYPES) -> list:
    out = []
    if configs.HOPPER_ARCH not in archs:
        return out
    for dtype in dtypes:
        if _ELT[dtype] != configs.HOPPER_ELT:
            continue
        for kernel in configs.HOPPER_KERNELS:
            for block_r, flags in itertools.product([r for r in RANKS if r <= configs.HOPPER_MAX_BLOCK_R],
                                                    HOPPER_FLAGS[kernel]):
                n = len(configs.tma_candidates(kernel, configs.HOPPER_ARCH, block_r, _ELT[dtype],
                                               flags.get("HAS_DROPOUT", False)))
                out.extend(Variant(kernel, configs.HOPPER_ARCH, dtype, block_r, tuple(flags.items()), i)
                           for i in range(n))
    return out


def _ptxas_command(arch: int, ptx_path: str, fp_fusion: bool) -> list:
    """ptxas -v with the flags Triton's make_cubin passes for this architecture."""
    from triton.backends.nvidia import compiler as nv
    flags = ["-lineinfo", "-v"] + ([] if fp_fusion else ["--fmad=false"])
    if "--regAllocOptLevel=2" in inspect.getsource(nv.CUDABackend.make_cubin):  # newer tritons add it
        flags.append("--regAllocOptLevel=2")
    return [nv.get_ptxas(arch).path, *flags, f"--gpu-name={nv.sm_arch_from_capability(arch)}", ptx_path,
            "-o", ptx_path + ".o"]


_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_ADVISORY = re.compile(r"\((C75\d\d)\)\s*(.*)")


def parse_ptxas(log: str) -> dict:
    """Registers, spill bytes and C75xx advisories from a `ptxas -v` report."""
    spills = _SPILLS.search(log)
    regs = _REGISTERS.search(log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "spill_stores": int(spills.group(1)) if spills else 0,
        "spill_loads": int(spills.group(2)) if spills else 0,
        "advisories": [f"{code} {msg.strip()[:160]}" for code, msg in _ADVISORY.findall(log)],
    }


def _cache_dir() -> str:
    from triton import knobs
    return os.path.join(knobs.cache.dir, "fused_lora_ptxas")


def ptxas_report(arch: int, ptx: str, fp_fusion: bool = True) -> dict:
    """parse_ptxas of ptxas -v on this PTX; cached by (ptxas, flags, PTX)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        cmd = _ptxas_command(arch, path, fp_fusion)
        from triton.backends.nvidia.compiler import get_ptxas
        # The ptxas (its path and version: each triton bundles its own), its flags, the PTX.
        key = hashlib.sha256(json.dumps([cmd[0], get_ptxas(arch).version, cmd[1:-3], ptx]).encode()).hexdigest()
        cached = os.path.join(_cache_dir(), key + ".json")
        if os.path.exists(cached):
            with open(cached) as f:
                return json.load(f)
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"ptxas failed: {(proc.stderr or proc.stdout).strip()[:300]}")
        report = parse_ptxas(proc.stdout + proc.stderr)
    os.makedirs(_cache_dir(), exist_ok=True)
    with open(cached + f".{os.getpid()}", "w") as f:
        json.dump(report, f)
    os.replace(cached + f".{os.getpid()}", cached)
    return report


def compile_variant(v: Variant) -> Result:
    """Compile one variant for its architecture and read ptxas' report of it."""
    from triton.backends.compiler import GPUTarget
    src, cfg = _source(v)
    result = Result(v, config=_config_name(cfg))
    try:
        options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        if v.kernel in configs.DEQUANT_KERNELS:
            options["enable_fp_fusion"] = False  # as its launcher runs it (exact nested absmax)
        compiled = triton.compile(src, target=GPUTarget("cuda", v.arch, 32), options=options)
        result.shared = compiled.metadata.shared
        for name, value in ptxas_report(v.arch, compiled.asm["ptx"],
                                               getattr(compiled.metadata, "enable_fp_fusion", True)).items():
            setattr(result, name, value)
    except Exception as err:  # a compile failure is a finding, reported with its variant
        result.error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:200]}"
    return result


def _config_name(cfg) -> str:
    k = cfg.kwargs
    tile = "x".join(str(k[n]) for n in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if n in k)  # dequantize: rows x columns
    return f"{tile or '-'} w{cfg.num_warps} s{cfg.num_stages}"


def run_all(workers: int | None = None, archs=ARCHS, dtypes=DTYPES) -> list:
    """Compile all variants in fresh worker processes started without TRITON_INTERPRET, so the
    kernels are real JIT functions there and the full config lists apply, whatever this process
    runs under."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers or os.cpu_count() or 2, mp_context=ctx) as pool:
            todo = pool.submit(variants, archs, dtypes).result()
            # The largest tiles compile slowest: start them first so the workers finish together.
            slow = ("forward", "dx_da", "quant_forward", "quant_dx", "grouped_wgrad") + tuple(HOPPER_FLAGS)
            todo.sort(key=lambda v: (v.kernel not in slow, v.config))
            return list(pool.map(compile_variant, todo, chunksize=4))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def summary(results) -> dict:
    """Per architecture: variants compiled, with spills, with advisories, failing the gate."""
    out = {}
    for arch in sorted({r.variant.arch for r in results}, reverse=True):
        rs = [r for r in results if r.variant.arch == arch]
        out[arch] = {"compiled": sum(r.error is None for r in rs), "spills": sum(r.spills for r in rs),
                     "advisories": sum(bool(r.advisories) for r in rs), "failed": sum(bool(r.failures()) for r in rs),
                     "variants": len(rs)}
    return out


def _describe(r: Result) -> str:
    v = r.variant
    flags = ",".join(k if val is True else f"{k}={val}" for k, val in v.flags if val) or "-"
    return (f"{v.kernel:13s} sm_{v.arch} {v.dtype:4s} r<={v.block_r:<3d} {flags:30s} {r.config:18s} "
            f"regs={r.registers} spill={r.spill_stores}/{r.spill_loads} smem={r.shared}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    start = time.time()
    results = run_all()
    elapsed = time.time() - start
    print(f"triton {triton.__version__}: {len(results)} variants in {elapsed:.0f} s")
    print(f"{'kernel':17s}{'arch':6s}{'variants':>9s}{'max regs':>9s}{'spills':>7s}{'advis.':>7s}{'max smem':>9s}")
    groups = itertools.groupby(sorted(results, key=lambda r: (r.variant.kernel, -r.variant.arch)),
                               key=lambda r: (r.variant.kernel, r.variant.arch))
    for (kernel, arch), rs in groups:
        rs = list(rs)
        regs = max((r.registers or 0) for r in rs)
        smem = max((r.shared or 0) for r in rs)
        print(f"{kernel:17s}sm_{arch:<3d}{len(rs):9d}{regs:9d}{sum(r.spills for r in rs):7d}"
              f"{sum(bool(r.advisories) for r in rs):7d}{smem:9d}")
    for r in results:
        problems = r.failures() or ([f"spills {r.spill_stores}/{r.spill_loads} B"] if r.spills else []) + r.advisories
        if "--all" in argv or problems:
            print(_describe(r) + ("  " + "; ".join(problems) if problems else ""))
    failed = 0
    for arch, s in summary(results).items():
        gate = "gated" if arch == GATED_ARCH else "reported"
        print(f"sm_{arch} ({gate}): {s['compiled']}/{s['variants']} compiled, {s['spills']} with spills, "
              f"{s['advisories']} with C75xx advisories, {s['failed']} failing")
        failed += s["failed"]
    print("PASS" if not failed else f"FAIL: {failed} variants")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
