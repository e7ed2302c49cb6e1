"""Compile every kernel with every config it may pick for sm_90 and sm_80, without a GPU.

The interpreter says nothing of shared memory; this does. Each kernel is compiled the way the JIT
specializes it at run time for contiguous inputs with sizes divisible by 16 (unit strides constant,
the rest 16-divisible): the case that pipelines fully and so uses the most shared memory.

    python -m fused_lora.kernels.compile_check      # prints a table, exits 1 on any failure
"""
from __future__ import annotations

import os
import sys
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

RANKS = (16, 32, 64, 128, 256)  # every padded rank (BLOCK_R) the launchers use
ARCHS = (90, 80)

# Strides that are 1 for contiguous inputs (the JIT turns them into constants).
_UNIT_STRIDES = {
    "shrink": {"stride_xk", "stride_ak", "stride_hr"},
    "forward": {"stride_xk", "stride_wk", "stride_hr", "stride_br", "stride_yn"},
    "dy": {"stride_dyn", "stride_br", "stride_hr", "stride_gr"},
    "dx_da": {"stride_dyn", "stride_wk", "stride_gr", "stride_ak", "stride_xk", "stride_dxk"},
}
# The largest variant of each kernel (every optional part on).
_FLAGS = {
    "shrink": {"HAS_DROPOUT": True},
    "forward": {"HAS_BIAS": True},
    "dy": {},
    "dx_da": {"HAS_DX": True, "HAS_DA": True, "HAS_DROPOUT": True},
}
_FLOAT_ARGS = {"scaling", "scale"}
_FP32_BUFFERS = {"db_ptr", "da_ptr"}


def jobs(dtypes=("bf16", "fp16")):
    """(kernel, arch, block_r, dtype, config index) covering every config any launch may use.

    A config's shared memory only grows with the rank (its epilogue tiles are BLOCK_R wide), so
    each config is compiled once per dtype, at the largest padded rank for which it is kept.
    """
    from . import configs
    out = []
    for kernel in configs.KERNELS:
        for arch in ARCHS:
            worst = {}  # config -> (largest block_r keeping it, its index in that rank's list)
            for block_r in RANKS:
                for i, cfg in enumerate(configs.candidates(kernel, arch, block_r, 2)):
                    worst[str(cfg)] = (block_r, i)
            for block_r, i in worst.values():
                out.extend((kernel, arch, block_r, dtype, i) for dtype in dtypes)
    return out


def compile_one(job):
    """Compile one job; returns (job, shared bytes, limit, error message or None)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from . import _KERNELS, configs
    kernel, arch, block_r, dtype, index = job
    cfg = configs.candidates(kernel, arch, block_r, 2)[index]
    fn = _KERNELS[kernel][0]
    constexprs = dict(cfg.kwargs, BLOCK_R=block_r, **_FLAGS[kernel])
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _UNIT_STRIDES[kernel]:
            signature[name], constexprs[name] = "constexpr", 1
        elif name.endswith("_ptr"):
            signature[name] = "*fp32" if name in _FP32_BUFFERS else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name == "seed":
            signature[name] = "i64"
        else:
            signature[name] = "i32"
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    limit = configs.SMEM_LIMIT[arch]
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    except Exception as err:  # a compile failure is a finding, reported with its job
        return job, None, limit, f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    shared = compiled.metadata.shared
    return job, shared, limit, None if shared <= limit else f"shared memory {shared} > {limit}"


def run_all(workers: int = 2, dtypes=("bf16", "fp16")):
    """Compile all jobs in fresh worker processes started without TRITON_INTERPRET, so the kernels
    are real JIT functions there and the full config lists apply, whatever this process runs under."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        todo = _jobs_in_fresh_process(dtypes)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            return list(pool.map(compile_one, todo))
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def _jobs_in_fresh_process(dtypes):
    # The job list depends on the (non-interpreter) config lists: build it where they apply.
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        return pool.submit(jobs, dtypes).result()


def main() -> int:
    from . import configs
    results = run_all(workers=os.cpu_count() or 2)
    failed = 0
    for (kernel, arch, block_r, dtype, index), shared, limit, err in results:
        cfg = configs.candidates(kernel, arch, block_r, 2)[index]
        status = "ok" if err is None else "FAIL " + err
        failed += err is not None
        print(f"{kernel:8s} sm_{arch} r<={block_r:3d} {dtype} {cfg}: shared={shared} limit={limit} {status}")
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
