"""Triton launchers for a LoRA layer over a quantized frozen base (NF4 or int8), the 16-bit weight
never made in memory: the forward GEMM and the dX GEMM dequantize their W tiles in registers.

    forward_quant(x, wq, bias, lora_A, lora_B, scaling, dropout_p, seed) -> (Y, H)
    backward_quant(dy, x, wq, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_db=False)
        -> (dx, dA, dB, db), each None when not asked for
    check_quant_weight(wq, x) -> None, or ValueError naming what the kernels cannot take

Arguments as `fused_lora.kernels.forward` / `backward` take them (x: M x K, 2-D, non-empty, on the
GPU or under TRITON_INTERPRET=1 on the CPU; x, lora_A, lora_B, bias, dy, h in the compute dtype
fp16/bf16/fp32; scaling, dropout_p floats; seed an int), but the frozen weight is `wq`, a
`fused_lora.core.formats.NF4Data` or `Int8Data` of shape (N, K) on x's device:

- NF4Data: packed uint8 contiguous with N * K / 2 elements (N * K even), code fp32[16], blocksize
  a power of two >= 64 (MIN_BLOCKSIZE; bitsandbytes' default is 64), blocksize2 a power of two, and
  either absmax fp32[ceil(N K / blocksize)]
  or (nested) qabsmax uint8[same], code2 fp32[256], absmax2 fp32[ceil(len(qabsmax) / blocksize2)],
  offset. The nested absmax is un-nested inside the kernels (no fp32 absmax made per call).
- Int8Data: qweight int8 N x K contiguous, scale fp32[N].
What is particular to a format (its checks, its weight arguments, whether it runs the general path)
is one entry of `FORMATS`, looked up by the layout's `format`.
Any M, N, K (K odd too: NF4 rows then start inside a byte). Each NF4 call builds a 2 KB table of
level pairs (`quant_tiles.pair_table`, one small torch op). NF4 weights whose rows are whole
blocks (K % blocksize == 0: every weight fused_lora.modules.quantized or bitsandbytes makes) run the kernels'
ALIGNED path (`aligned_nf4`: one byte load per two elements, one absmax per row and 64 columns,
no per-element block compares); the others run the general path, compiled with one flag set only
(a zero bias when there is none; the low-rank term of dX through dX's memory, as with dropout).

Y = x W^T + b + s H B^T and dX = D (G A) + dY W with W = wq.dequantize_rows(0, N) cast to x's
dtype (the dequantization is exact in fp32, then rounded to x's dtype like a 16-bit copy would be);
H, dropout (the same mask as the 16-bit kernels draw for the seed), G, dA and dB exactly as
`fused_lora.kernels` computes them: the shrink pass, the dY pass, `lora_dx_da_kernel` (run with
N = 0: the dA partials, and with dropout the masked low-rank term D (G A) of dX) and the
fixed-order reductions are reused unchanged. The base weight and bias are frozen: no dW, db.
With dropout, D (G A) passes through dX's memory, so it is rounded once to x's dtype before dY W is
added (the 16-bit kernels keep it in fp32): within the tests' tolerance rule.

Launches: forward 2 (shrink, quantized GEMM); backward 3 to 5 (dY pass, G sum, [dA partials /
D (G A)], [quantized dX GEMM], [dA + dB sum]).

    dequantize(wq, dtype) -> W, the whole N x K weight in dtype, in one launch (`dequantize.dequantize_kernel`,
        the same tile loaders): what the dequant-once row multiplies by with the vendor GEMMs
"""
from __future__ import annotations

from functools import lru_cache

import torch
import triton

from dataclasses import dataclass
from typing import Callable

from ...core import formats as core_formats
from ...core.formats import int8, nf4
from .. import configs
from ..dropout import keep_threshold
from ..launch import arch_of, block_r, m_bucket, row_blocks, row_blocks_used, tiles_grid
from ..lora.launchers import dy_pass, launcher, shrink, sum_lora_grads
from .dequantize import dequantize_kernel
from .quant_backward import quant_dx_kernel
from .quant_forward import quant_forward_kernel
from .quant_tiles import MIN_BLOCKSIZE, pair_table

__all__ = ["forward_quant", "backward_quant", "check_quant_weight", "aligned_nf4", "MIN_BLOCKSIZE", "KernelFormat",
           "FORMATS", "kernel_format", "dequantize", "DEQUANT_DTYPES"]

_KERNELS = {  # name -> (jit function, autotuning key: every argument that changes the code or the work)
    "quant_forward": (quant_forward_kernel, ["M_BUCKET", "N", "K", "HAS_BIAS", "QUANT", "NESTED", "ALIGNED"]),
    "quant_dx": (quant_dx_kernel, ["M_BUCKET", "N", "K", "LOW_RANK_IN_DX", "QUANT", "NESTED", "ALIGNED"]),
}


@lru_cache(maxsize=None)
def _tuned(kernel_name: str, arch: int, elt: int):
    fn, key = _KERNELS[kernel_name]
    return triton.autotune(configs.quant_candidates(kernel_name, arch, elt), key=key)(fn)


def _quant_launcher(kernel_name: str, x: torch.Tensor):
    return _tuned(kernel_name, arch_of(x.device), x.element_size())


def _fail(msg: str):
    raise ValueError(f"quantized base for the Triton kernels: {msg}")


def _expect(t, name: str, dtype, numel: int, device):
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} is missing")
    if t.dtype != dtype or t.numel() != numel or not t.is_contiguous() or t.device != device:
        _fail(f"{name} must be a contiguous {dtype} tensor of {numel} elements on {device}, "
              f"got {t.dtype}, {t.numel()} elements, contiguous={t.is_contiguous()}, on {t.device}")


def _power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and n & (n - 1) == 0


def _check_nf4(wq, N: int, K: int, dev, min_blocksize: int = MIN_BLOCKSIZE) -> None:
    if (N * K) % 2:
        _fail(f"N * K = {N * K} is odd: NF4 packs two elements per byte")
    if wq.blocksize < min_blocksize or not _power_of_two(wq.blocksize):
        _fail(f"blocksize {wq.blocksize}: the kernels take powers of two from {min_blocksize} (as bitsandbytes writes)")
    _expect(wq.packed, "packed", torch.uint8, N * K // 2, dev)
    _expect(wq.code, "code", torch.float32, 16, dev)
    n_blocks = triton.cdiv(N * K, wq.blocksize)
    if wq.nested:
        _expect(wq.qabsmax, "qabsmax", torch.uint8, n_blocks, dev)
        _expect(wq.code2, "code2", torch.float32, 256, dev)
        if not _power_of_two(wq.blocksize2):
            _fail(f"blocksize2 {wq.blocksize2} is not a power of two (bitsandbytes writes 256)")
        _expect(wq.absmax2, "absmax2", torch.float32, triton.cdiv(n_blocks, wq.blocksize2), dev)
    else:
        _expect(wq.absmax, "absmax", torch.float32, n_blocks, dev)


def _check_int8(wq, N: int, K: int, dev, min_blocksize: int = MIN_BLOCKSIZE) -> None:
    _expect(wq.qweight, "qweight", torch.int8, N * K, dev)
    _expect(wq.scale, "scale", torch.float32, N, dev)


def _format_name(wq):
    """The name of wq's format (`core.formats`) when wq is one of its layouts, else None."""
    return type(wq).format if core_formats.is_layout(wq) else None


def aligned_nf4(wq) -> bool:
    """Whether wq is NF4 with rows of whole blocks (K % blocksize == 0, as fused_lora.modules.quantized and
    bitsandbytes' Linear4bit layers always are): the kernels' fast path (ALIGNED: no odd-row bytes,
    one absmax per row and 64-column run). Other NF4 weights take the general path, compiled in one
    flag set only (a bias and the low-rank term of dX passed through memory) to keep the variants few."""
    return _format_name(wq) == nf4.NAME and wq.shape[1] % wq.blocksize == 0


def _nf4_args(wq) -> tuple:
    N, K = wq.shape
    sizes = (K // 2, K % 2, wq.blocksize.bit_length() - 1, wq.blocksize2.bit_length() - 1,
             triton.cdiv(N * K, wq.blocksize), float(wq.offset))
    pairs = pair_table(wq.code)
    if wq.nested:
        ptrs = (wq.packed, pairs, wq.code2, wq.qabsmax, wq.code2, wq.absmax2)
    else:
        ptrs = (wq.packed, pairs, wq.absmax, wq.packed, wq.absmax, wq.absmax)
    return ptrs, sizes, dict(QUANT="nf4", NESTED=wq.nested, ALIGNED=aligned_nf4(wq))


def _int8_args(wq) -> tuple:
    N, K = wq.shape
    q = wq.qweight
    ptrs = (q, wq.scale, wq.scale, q.view(torch.uint8), wq.scale, wq.scale)
    return ptrs, (K // 2, K % 2, 0, 0, 1, 0.0), dict(QUANT="int8", NESTED=False, ALIGNED=False)


@dataclass(frozen=True)
class KernelFormat:
    """What the quantized GEMMs need of one format of `core.formats` (its tiles: `quant_tiles.dequant_tile`
    under QUANT = the format's name):

    check(wq, N, K, device, min_blocksize=MIN_BLOCKSIZE)
                             the layout invariants the kernels rely on (ValueError naming the field);
                             NF4 blocks of `min_blocksize` elements and more
    weight_args(wq)          (pointers q, code, absmax, qabsmax, code2, absmax2), (K // 2, K % 2, log2
                             blocksize, log2 blocksize2, n_blocks, offset), the constexprs (QUANT, NESTED,
                             ALIGNED). Pointers a format does not read get a stand-in of the type the gate
                             compiles with.
    general(wq)              whether wq runs a path compiled with one flag set only: a bias (zeros when
                             there is none) and the low-rank term of dX through dX's memory
    """
    check: Callable
    weight_args: Callable
    general: Callable


# The formats the kernels take, by `core.formats` name: adding one is a tile loader and an entry here.
FORMATS = {
    nf4.NAME: KernelFormat(_check_nf4, _nf4_args, general=lambda wq: not aligned_nf4(wq)),
    int8.NAME: KernelFormat(_check_int8, _int8_args, general=lambda wq: False),
}


def kernel_format(wq) -> KernelFormat:
    """The entry of FORMATS for wq's format (ValueError for anything else)."""
    fmt = FORMATS.get(_format_name(wq))
    if fmt is None:
        names = " or ".join(core_formats.FORMATS[name].DATA.__name__ for name in FORMATS)
        _fail(f"expected {names}, got {type(wq).__name__}")
    return fmt


def check_quant_weight(wq, x: torch.Tensor) -> None:
    """The layout invariants the kernels rely on (cheap: sizes, dtypes, contiguity, devices)."""
    fmt = kernel_format(wq)
    N, K = wq.shape
    if x.dim() != 2 or x.shape[1] != K:
        _fail(f"x of shape {tuple(x.shape)} does not match the weight's {N} x {K}")
    fmt.check(wq, N, K, x.device)


def _weight_args(wq) -> tuple:
    """(pointers, sizes, constexprs) of wq for the quantized GEMMs (KernelFormat.weight_args)."""
    return kernel_format(wq).weight_args(wq)


def forward_quant(x, wq, bias, lora_A, lora_B, scaling, dropout_p, seed):
    """(Y, H): Y = x W^T + b + s H B^T, H = (D x) A^T, W = wq dequantized tile by tile in the GEMM."""
    check_quant_weight(wq, x)
    M, K = x.shape
    N, r = wq.shape[0], lora_A.shape[0]
    h = shrink(x, lora_A, dropout_p, seed)  # the 16-bit forward's shrink pass
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ptrs, sizes, flags = _weight_args(wq)
    if bias is None and kernel_format(wq).general(wq):
        bias = torch.zeros(N, dtype=x.dtype, device=x.device)  # the general NF4 path runs with a bias only
    _quant_launcher("quant_forward", x)[tiles_grid(M, N)](
        x, *ptrs, bias if bias is not None else y, h, lora_B, y,
        *x.stride(), *h.stride(), *lora_B.stride(), *y.stride(),
        M, N, K, r, *sizes, float(scaling), m_bucket(M),
        HAS_BIAS=bias is not None, RANK_STEP=configs.QUANT_RANK_STEP, **flags)
    return y, h


def backward_quant(dy, x, wq, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora, need_db=False):
    """(dx, dA, dB, db), each None when not asked for (the contract of fused_lora.ops.quant; db is
    dY's column sum, as the 16-bit launcher computes it)."""
    dx, dA, dB = _lora_grads(dy, x, wq, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora)
    return dx, dA, dB, (dy.sum(0) if need_db else None)


def _lora_grads(dy, x, wq, lora_A, lora_B, h, scaling, dropout_p, seed, need_dx, need_lora):
    """(dx, dA, dB), each None when not asked for: the dY pass (G and dB partials), the G sum, the
    dA partials and with dropout D (G A) (lora_dx_da_kernel with N = 0), dX = D (G A) + dY W over
    the quantized W, the sums."""
    check_quant_weight(wq, x)
    if not (need_dx or need_lora):
        return None, None, None
    M, K = x.shape
    N, r = wq.shape[0], lora_A.shape[0]
    p = float(dropout_p)
    f32 = dict(dtype=torch.float32, device=x.device)
    # 1. dY pass and G, as the 16-bit backward runs them.
    g, db_ws, db_slots = dy_pass(dy, lora_B, h, scaling, need_lora)
    # 2. The dA partials, and with dropout D (G A) written into dX: the 16-bit backward's kernel
    #    with N = 0 (no dY W; it reads no weight, g stands in for it).
    dx = torch.empty((M, K), dtype=x.dtype, device=x.device) if need_dx else None
    # The general NF4 path (not aligned_nf4) is compiled with LOW_RANK_IN_DX only: G A comes through dX.
    low_rank_in_dx = need_dx and (p > 0.0 or kernel_format(wq).general(wq))
    if need_lora or low_rank_in_dx:
        dx_da = launcher("dx_da", x, r, p > 0.0)
        da_ws = torch.empty((row_blocks(dx_da, M), r, K), **f32) if need_lora else g
        dx_da[tiles_grid(M, K)](
            dy, g, g, lora_A, x, dx if low_rank_in_dx else g, da_ws,
            *dy.stride(), *g.stride(), *g.stride(), *lora_A.stride(), *x.stride(),
            *(dx.stride() if low_rank_in_dx else (0, 0)),
            M, 0, K, r, seed, keep_threshold(p), 1.0 / (1.0 - p), m_bucket(M),
            HAS_DX=low_rank_in_dx, HAS_DA=need_lora, HAS_DROPOUT=p > 0.0, BLOCK_R=block_r(r))
        da_slots = row_blocks_used(dx_da, M)
    # 3. dX over the quantized weight, onto the low-rank term.
    if need_dx:
        ptrs, sizes, flags = _weight_args(wq)
        _quant_launcher("quant_dx", x)[tiles_grid(M, K)](
            dy, *ptrs, g, lora_A, dx,
            *dy.stride(), *g.stride(), *lora_A.stride(), *dx.stride(),
            M, N, K, r, *sizes, m_bucket(M),
            LOW_RANK_IN_DX=low_rank_in_dx, RANK_STEP=configs.QUANT_RANK_STEP, **flags)
    if not need_lora:
        return dx, None, None
    # 4. dA and dB summed in a fixed order, written in the parameters' dtypes.
    return (dx,) + sum_lora_grads(da_ws[:da_slots], db_ws[:db_slots], lora_A, lora_B)


DEQUANT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def dequantize(wq, dtype: torch.dtype) -> torch.Tensor:
    """The whole N x K weight in `dtype` (float16, bfloat16 or float32), in one launch on wq's device: the fp32
    product of each element rounded once to `dtype`, bit for bit `core.formats.dequantize_rows(wq, 0, N)
    .to(dtype)` and bitsandbytes' dequantize_4bit. NF4 blocks of 32 elements are taken when rows are whole
    blocks (every weight the container holds), else blocks of MIN_BLOCKSIZE and more. A fresh, contiguous
    tensor (the caller's transient buffer). ValueError naming what the kernel cannot take."""
    fmt = kernel_format(wq)
    N, K = wq.shape
    aligned = aligned_nf4(wq)
    device = getattr(wq, core_formats.format_of(wq).CODES).device
    min_blocksize = configs.DEQUANT_NARROW_BLOCKSIZE if aligned else MIN_BLOCKSIZE
    fmt.check(wq, N, K, device, min_blocksize=min_blocksize)
    if dtype not in DEQUANT_DTYPES:
        _fail(f"dtype {dtype}: the dequantization writes float16, bfloat16 or float32")
    out = torch.empty((N, K), dtype=dtype, device=device)
    ptrs, sizes, flags = _weight_args(wq)
    narrow = aligned and wq.blocksize < MIN_BLOCKSIZE
    cfg = configs.DEQUANT_NARROW if narrow else configs.DEQUANT_WIDE
    block_n, block_k = cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
    dequantize_kernel[(triton.cdiv(N, block_n), triton.cdiv(K, block_k))](
        *ptrs, out, *out.stride(), N, K, *sizes, **flags, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=False)
    return out
