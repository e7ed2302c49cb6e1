"""A quantized (QLoRA) base: bytes per parameter held by the base, and step times against the dense base.

One run measures, on one device, with ratios to the dense (unquantized: fp32 on CPU, bf16 on CUDA) frozen
base measured in the same run:
  1. bytes per parameter held by the base weight: fused_lora NF4 (double quant and not), int8,
     bitsandbytes' Linear4bit (its packed data and quant state), the dense weight;
  2. one LoRA layer per shape, forward + backward (dX and the adapter's gradients): the frozen dense
     nn.Linear alone (the floor), fused_lora over the dense base, over NF4 and over int8 with auto's choice
     and each implementation row by name (the in-loop triton kernels, dequant-once, the chunked torch row;
     a row that cannot run here is listed as not run, with why), and peft over bitsandbytes' Linear4bit
     (NF4, double quant; not run where bitsandbytes is missing, as on the GPU machine), with the peak memory
     above the inputs and the ratio to the chunked torch row (on CPU both ratios are medians of the ratios
     within each round of timing: paired, so a shared machine's drifting load cancels);
  3. dequantizing the whole NF4 weight (per shape): each exact candidate (the torch row's chunks, one shot,
     torch.compile of it, core.formats.dequantize, on CUDA the one Triton launch; bitsandbytes' C kernel on
     its own weight for scale), bit for bit the reference (asserted), and its share of the NF4 layer's step
     (two dequantizations a step) on the row that runs it;
  4. one fine-tuning step (forward, backward, AdamW on the adapters) of a Llama-shaped model from a config:
     fused_lora over the dense base, fused_lora over NF4 (quantize_model), peft over bitsandbytes NF4.

CPU defaults are scaled down to run in about a minute (say so when quoting them): layer 1024x1024x1024,
r=16, the "small" Llama (4M parameters, batch 2 x 128). On CUDA: the shapes 8192x4096x4096 and
8192x4096x14336 (issue 21), bf16, and --model 1b.
Usage: python benchmarks/bench_quant.py [--device cuda] [--dtype bfloat16] [--shape M K N [--shape M K N ...]]
       [--rank 16] [--model small|1b] [--batch 2] [--seq 128] [--skip memory layer dequant finetune]
       [--out benchmarks/out/quant]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import environment, memory_mib, time_variants, write_csv  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import (FusedLoRALinear, LoraConfig, QuantizedLinear, dispatch, get_lora_model,  # noqa: E402
                        quantize_model)
from fused_lora.core import formats  # noqa: E402
from fused_lora.core.op_kinds import QUANT_FWD  # noqa: E402
from fused_lora.dispatch import dequant_once  # noqa: E402
from fused_lora.cli.finetune import LLAMA_TARGETS, build_llama, counting_batches  # noqa: E402
from fused_lora.modules.quantized import quantize_int8, quantize_nf4  # noqa: E402


def bnb_linear4bit(linear: nn.Linear, device: str, dtype: torch.dtype):
    import bitsandbytes as bnb
    q = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    q.load_state_dict({k: v.float() for k, v in linear.state_dict().items()})
    return q.to(device)


def bnb_bytes(module) -> int:
    state = module.weight.quant_state
    tensors = [module.weight.data, state.absmax, state.code]
    if state.state2 is not None:
        tensors += [state.state2.absmax, state.state2.code, state.offset]
    return sum(t.numel() * t.element_size() for t in tensors)


def have_bnb() -> bool:
    try:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
        return True
    except ImportError:
        return False


def memory_table(K: int, N: int, device: str, dtype: torch.dtype) -> list[dict]:
    w = torch.randn(N, K, device=device, dtype=dtype) * K ** -0.5
    n = w.numel()
    rows = [(str(dtype).replace("torch.", ""), w.numel() * w.element_size()),
            ("fused_lora nf4 + double quant", quantize_nf4(w).nbytes()),
            ("fused_lora nf4", quantize_nf4(w, double_quant=False).nbytes()),
            ("fused_lora int8", quantize_int8(w).nbytes())]
    if have_bnb():
        lin = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        rows.append(("bitsandbytes Linear4bit nf4 + double quant", bnb_bytes(bnb_linear4bit(lin, device, dtype))))
    return [{"base": name, "bytes_per_param": round(b / n, 4)} for name, b in rows]


QUANT_ROWS = ("auto", "torch", "dequant-once", "triton")  # auto's choice, then each implementation row by name
ROW_NAMES = {"torch": "chunked torch", "dequant-once": "dequant-once", "triton": "in-loop triton"}


def row_refusal(row: str, qlinear, M: int, r: int, device: str, dtype: torch.dtype):
    """Why implementation row `row` cannot run this quantized layer's ops here (None when it can)."""
    if row == "auto":
        return None
    data = qlinear.weight.data()
    N, K = data.shape
    problem = dispatch.Problem(QUANT_FWD, torch.device(device), dtype, M, N, K, r, False, (),
                               *formats.layout_name(data))
    reasons = dispatch.get(row).not_supported_reasons(problem)
    return "; ".join(reasons) or None


def layer_table(M: int, K: int, N: int, r: int, device: str, dtype: torch.dtype, reps: int) -> list[dict]:
    """One LoRA layer, forward + backward: the dense base alone (the floor), fused_lora over the dense base,
    over NF4 (double quant) and int8 with auto's choice and each implementation row by name, peft over
    bitsandbytes' Linear4bit. A row that cannot run here (triton on a CPU), or peft without bitsandbytes,
    is listed as not run, with the reason, never with a number."""
    torch.manual_seed(0)
    lin = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    dense = f"{str(dtype).replace('torch.', '')} base"
    layers = {f"{dense} alone (floor)": lin,
              f"fused_lora, {dense}": FusedLoRALinear.from_linear(copy.deepcopy(lin), r=r, lora_alpha=2 * r)}
    not_run = {}
    for fmt in ("nf4", "int8"):
        qlinear = QuantizedLinear.from_linear(lin, fmt)
        for row in QUANT_ROWS:
            name = f"fused_lora, {fmt} base, " + ("auto" if row == "auto" else ROW_NAMES[row])
            refusal = row_refusal(row, qlinear, M, r, device, dtype)
            if refusal:
                not_run[name] = f"not run: {refusal}"
                continue
            layers[name] = FusedLoRALinear.from_linear(qlinear, r=r, lora_alpha=2 * r, backend=row)
    peft_name = "peft over bitsandbytes nf4"
    if have_bnb():
        import peft
        seq = nn.Sequential(bnb_linear4bit(lin, device, dtype))
        seq.is_loaded_in_4bit = True
        layers[peft_name] = peft.get_peft_model(
            seq, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])).base_model.model[0]
    else:
        not_run[peft_name] = "not run: bitsandbytes (or peft) is not installed here"
    for layer in layers.values():
        layer.train()

    def step(layer):
        def run():
            x.grad = None
            layer(x).backward(dy)
        return run

    auto_ran = {}
    for fmt in ("nf4", "int8"):  # what auto runs, before timing (its first call tunes on CUDA)
        before = dict(dispatch.calls)
        step(layers[f"fused_lora, {fmt} base, auto"])()
        auto_ran[fmt] = ", ".join(f"{op} -> {row}" for (op, row), n in sorted(dispatch.calls.items())
                                  if op.startswith("quant") and n > before.get((op, row), 0))
    rounds = {}
    ms = time_variants({k: step(m) for k, m in layers.items()}, device, reps=reps, rounds=rounds)

    def ratio(name, base):
        """name's time over base's: on CPU the median of the ratios within each round (paired), else of medians."""
        if name in rounds and base in rounds:
            return statistics.median(a / b for a, b in zip(rounds[name], rounds[base]))
        return ms[name] / ms[base]

    rows = []
    for name in list(layers) + list(not_run):
        if name in not_run:
            rows.append({"variant": name, "ms": not_run[name], "ratio_to_dense_base": "", "ratio_to_chunked_torch": "",
                         "peak_MiB": "", "note": ""})
            continue
        _, peak = memory_mib(lambda: layers[name](x), lambda out: out.backward(dy), device)
        fmt = next((f for f in ("nf4", "int8") if f"{f} base" in name), None)
        chunked = f"fused_lora, {fmt} base, chunked torch" if fmt else None
        rows.append({"variant": name, "ms": round(ms[name], 3),
                     "ratio_to_dense_base": round(ratio(name, f"{dense} alone (floor)"), 3),
                     "ratio_to_chunked_torch": round(ratio(name, chunked), 3) if chunked in ms else "",
                     "peak_MiB": round(peak, 1), "note": f"auto ran {auto_ran[fmt]}" if name.endswith("auto") else ""})
    return rows


def chunked_dequantize(data, dtype: torch.dtype) -> torch.Tensor:
    """The torch row's dequantization (row chunks of core.formats.common.CHUNK_ELEMENTS, fp32 then cast), into
    one buffer (QuantizedWeight.dequantize's way)."""
    out = torch.empty(data.shape, dtype=dtype, device=data.packed.device)
    for start, stop in formats.row_chunks(*data.shape):
        out[start:stop] = formats.dequantize_rows(data, start, stop).to(dtype)
    return out


def one_shot_dequantize(data, dtype: torch.dtype) -> torch.Tensor:
    """The whole weight at once with the reference's lean ops (core.formats.dequantize_rows), then cast."""
    return formats.dequantize_rows(data, 0, data.shape[0]).to(dtype)


def dequant_table(M: int, K: int, N: int, device: str, dtype: torch.dtype, reps: int, layer_rows: list) -> list[dict]:
    """Dequantizing the whole N x K weight into `dtype`, each exact candidate (bit for bit the reference:
    asserted), and the share of the NF4 layer's forward + backward it takes (two dequantizations a step:
    forward, then dX in backward) on the row that runs it."""
    torch.manual_seed(0)
    w = torch.randn(N, K, device=device) * K ** -0.5
    data = quantize_nf4(w).data()  # nested, blocks of 64 (bitsandbytes' QLoRA default)
    ref = data.dequantize_rows(0, N).to(dtype)
    candidates = {"chunked core.formats (the torch row's chunks, into one buffer)": chunked_dequantize,
                  "one shot (dequantize_rows(0, N), then cast)": one_shot_dequantize,
                  "core.formats.dequantize (dequant-once off CUDA)": formats.dequantize}
    compiled = torch.compile(one_shot_dequantize, dynamic=False)
    candidates["torch.compile(one shot)"] = compiled
    if device.startswith("cuda"):
        candidates["one Triton launch (dequant-once on CUDA)"] = dequant_once.dequantize
    if have_bnb() and not device.startswith("cuda"):
        import bitsandbytes.functional as bnbf
        q, state = bnbf.quantize_4bit(w.float(), quant_type="nf4", blocksize=64, compress_statistics=True)
        state.dtype = dtype
        candidates["bitsandbytes dequantize_4bit (its own packed weight; for scale)"] = \
            lambda data, dtype: bnbf.dequantize_4bit(q, state)
    rows, fns = [], {}
    for name, fn in candidates.items():
        try:
            t0 = time.perf_counter()
            got = fn(data, dtype)
            first = time.perf_counter() - t0
        except Exception as err:  # torch.compile without a compiler, ...
            rows.append({"candidate": name, "ms": f"not run: {type(err).__name__}: {str(err)[:120]}",
                         "first_call_s": "", "exact": "", "share_of_nf4_layer": ""})
            continue
        exact = "bitsandbytes' own weight" if name.startswith("bitsandbytes") else bool(torch.equal(got, ref))
        assert exact, f"{name} is not the reference bit for bit"
        fns[name] = (lambda fn=fn: fn(data, dtype))
        rows.append({"candidate": name, "ms": None, "first_call_s": round(first, 2), "exact": exact,
                     "share_of_nf4_layer": ""})
    ms = time_variants(fns, device, reps=reps)
    layer_ms = {r["variant"]: r["ms"] for r in layer_rows}
    share_of = {"core.formats.dequantize (dequant-once off CUDA)": "fused_lora, nf4 base, dequant-once",
                "one Triton launch (dequant-once on CUDA)": "fused_lora, nf4 base, dequant-once",
                "chunked core.formats (the torch row's chunks, into one buffer)": "fused_lora, nf4 base, chunked torch"}
    for row in rows:
        if row["ms"] is None:
            row["ms"] = round(ms[row["candidate"]], 3)
            layer = share_of.get(row["candidate"])
            on = layer_ms.get(layer) if layer else None
            if device.startswith("cuda") and layer and "off CUDA" in row["candidate"]:
                on = None  # on CUDA that row dequantizes with the Triton launch
            row["share_of_nf4_layer"] = (f"{2 * row['ms'] / on:.1%} of '{layer}'" if isinstance(on, float) else "")
    return rows


def finetune_table(size: str, batch: int, seq: int, r: int, device: str, dtype: torch.dtype, reps: int) -> list[dict]:
    base = build_llama(size, dtype=dtype, device=device)
    vocab = base.config.vocab_size
    cfg = dict(r=r, lora_alpha=2 * r, target_modules=LLAMA_TARGETS)
    dense = f"fused_lora, {str(dtype).replace('torch.', '')} base"
    models = {dense: get_lora_model(copy.deepcopy(base), LoraConfig(**cfg)),
              "fused_lora, nf4 base": get_lora_model(quantize_model(copy.deepcopy(base), "nf4",
                                                                    target_modules=LLAMA_TARGETS), LoraConfig(**cfg))}
    if have_bnb():
        import peft
        qbase = copy.deepcopy(base)
        for name in [n for n, m in qbase.named_modules() if type(m) is nn.Linear and n.split(".")[-1] in LLAMA_TARGETS]:
            parent, _, child = name.rpartition(".")
            setattr(qbase.get_submodule(parent), child, bnb_linear4bit(qbase.get_submodule(name), device, dtype))
        qbase.is_loaded_in_4bit = True
        models["peft over bitsandbytes nf4"] = peft.get_peft_model(qbase, peft.LoraConfig(**cfg))
    del base
    tokens = next(counting_batches(vocab, batch, seq, device=device))
    steps = {}
    for name, model in models.items():
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def run(model=model, opt=opt):
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps[name] = run
    ms = time_variants(steps, device, reps=reps, warmup=1)
    ref = ms[dense]
    return [{"variant": k, "ms": round(v, 2), "ratio_to_dense_base": round(v / ref, 3)} for k, v in ms.items()]


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--shape", type=int, nargs=3, metavar=("M", "K", "N"), action="append", default=None,
                   help="a layer shape (repeat for several)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--model", default=None, help="Llama size for the fine-tune step: small (CPU default) or 1b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["memory", "layer", "dequant", "finetune"])
    p.add_argument("--out", default="benchmarks/out/quant")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    shapes = args.shape or ([(8192, 4096, 4096), (8192, 4096, 14336)] if cuda else [(1024, 1024, 1024)])
    model = args.model or ("1b" if cuda else "small")
    seq = args.seq or (1024 if cuda else 128)
    reps = args.reps or (10 if cuda else 5)
    print(f"# bench_quant {datetime.date.today()}: {environment(args.device)}, fused_lora {fused_lora.__version__}, "
          f"dtype {str(dtype).replace('torch.', '')}, backend {os.environ.get('FUSED_LORA_BACKEND', 'auto')}, "
          f"{dispatch.NO_TRANSIENT_WEIGHT_ENV_VAR}={os.environ.get(dispatch.NO_TRANSIENT_WEIGHT_ENV_VAR, '')!r}, "
          f"torch threads {torch.get_num_threads()}")
    if "memory" not in args.skip:
        M, K, N = shapes[0]
        rows = memory_table(K, N, args.device, dtype)
        print(f"\n## bytes per parameter held by the base ({N}x{K})\n" + markdown(rows))
        write_csv(os.path.join(args.out, "memory.csv"), rows)
    for M, K, N in shapes:
        tag = f"{M}x{K}x{N}"
        layer_rows = []
        if "layer" not in args.skip:
            layer_rows = layer_table(M, K, N, args.rank, args.device, dtype, reps)
            print(f"\n## one layer, forward + backward, M={M} K={K} N={N} r={args.rank}\n" + markdown(layer_rows))
            write_csv(os.path.join(args.out, f"layer_{tag}.csv"), layer_rows)
        if "dequant" not in args.skip:
            rows = dequant_table(M, K, N, args.device, dtype, reps, layer_rows)
            print(f"\n## dequantizing the whole NF4 weight (nested, blocks of 64), {N}x{K} to "
                  f"{str(dtype).replace('torch.', '')}\n" + markdown(rows))
            write_csv(os.path.join(args.out, f"dequant_{tag}.csv"), rows)
    if "finetune" not in args.skip:
        rows = finetune_table(model, args.batch, seq, args.rank, args.device, dtype, reps)
        print(f"\n## fine-tune step, Llama '{model}', batch {args.batch} x {seq}, r={args.rank}\n" + markdown(rows))
        write_csv(os.path.join(args.out, "finetune.csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
