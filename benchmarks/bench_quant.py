"""A quantized (QLoRA) base: bytes per parameter held by the base, and step times against the dense base.

One run measures, on one device, with ratios to the dense (unquantized: fp32 on CPU, bf16 on CUDA) frozen
base measured in the same run:
  1. bytes per parameter held by the base weight: fused_lora NF4 (double quant and not), int8,
     bitsandbytes' Linear4bit (its packed data and quant state), the dense weight;
  2. one LoRA layer, forward + backward (dX and the adapter's gradients): the frozen dense nn.Linear
     alone (the floor), fused_lora over the dense base, over NF4, over int8, and peft over bitsandbytes'
     Linear4bit (NF4, double quant), with the peak memory above the inputs;
  3. one fine-tuning step (forward, backward, AdamW on the adapters) of a Llama-shaped model from a config:
     fused_lora over the dense base, fused_lora over NF4 (quantize_model), peft over bitsandbytes NF4.

CPU defaults are scaled down to run in about a minute (say so when quoting them): layer 1024x1024x1024,
r=16, the "small" Llama (4M parameters, batch 2 x 128). On CUDA: --shape 8192 4096 4096 and --model 1b.
Usage: python benchmarks/bench_quant.py [--device cuda] [--dtype bfloat16] [--shape M K N] [--rank 16]
       [--model small|1b] [--batch 2] [--seq 128] [--out benchmarks/out/quant]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from harness import environment, memory_mib, time_variants, write_csv  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import FusedLoRALinear, LoraConfig, QuantizedLinear, get_lora_model, quantize_model  # noqa: E402
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


def layer_table(M: int, K: int, N: int, r: int, device: str, dtype: torch.dtype, reps: int) -> list[dict]:
    torch.manual_seed(0)
    lin = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    dense = f"{str(dtype).replace('torch.', '')} base"
    layers = {f"{dense} alone (floor)": lin,
              f"fused_lora, {dense}": FusedLoRALinear.from_linear(copy.deepcopy(lin), r=r, lora_alpha=2 * r),
              "fused_lora, nf4 base": FusedLoRALinear.from_linear(QuantizedLinear.from_linear(lin, "nf4"), r=r,
                                                                  lora_alpha=2 * r),
              "fused_lora, int8 base": FusedLoRALinear.from_linear(QuantizedLinear.from_linear(lin, "int8"), r=r,
                                                                   lora_alpha=2 * r)}
    if have_bnb():
        import peft
        seq = nn.Sequential(bnb_linear4bit(lin, device, dtype))
        seq.is_loaded_in_4bit = True
        layers["peft over bitsandbytes nf4"] = peft.get_peft_model(
            seq, peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["0"])).base_model.model[0]
    for layer in layers.values():
        layer.train()

    def step(layer):
        def run():
            x.grad = None
            layer(x).backward(dy)
        return run

    ms = time_variants({k: step(m) for k, m in layers.items()}, device, reps=reps)
    floor = ms[f"{dense} alone (floor)"]
    rows = []
    for name, layer in layers.items():
        _, peak = memory_mib(lambda: layer(x), lambda out: out.backward(dy), device)
        rows.append({"variant": name, "ms": round(ms[name], 3), "ratio_to_dense_base": round(ms[name] / floor, 3),
                     "peak_MiB": round(peak, 1)})
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
    p.add_argument("--shape", type=int, nargs=3, metavar=("M", "K", "N"), default=None)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--model", default=None, help="Llama size for the fine-tune step: small (CPU default) or 1b")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=["memory", "layer", "finetune"])
    p.add_argument("--out", default="benchmarks/out/quant")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    M, K, N = args.shape or ((8192, 4096, 4096) if cuda else (1024, 1024, 1024))
    model = args.model or ("1b" if cuda else "small")
    seq = args.seq or (1024 if cuda else 128)
    reps = args.reps or (10 if cuda else 5)
    print(f"# bench_quant {datetime.date.today()}: {environment(args.device)}, fused_lora {fused_lora.__version__}, "
          f"dtype {str(dtype).replace('torch.', '')}, backend {os.environ.get('FUSED_LORA_BACKEND', 'auto')}")
    if "memory" not in args.skip:
        rows = memory_table(K, N, args.device, dtype)
        print(f"\n## bytes per parameter held by the base ({N}x{K})\n" + markdown(rows))
        write_csv(os.path.join(args.out, "memory.csv"), rows)
    if "layer" not in args.skip:
        rows = layer_table(M, K, N, args.rank, args.device, dtype, reps)
        print(f"\n## one layer, forward + backward, M={M} K={K} N={N} r={args.rank}\n" + markdown(rows))
        write_csv(os.path.join(args.out, "layer.csv"), rows)
    if "finetune" not in args.skip:
        rows = finetune_table(model, args.batch, seq, args.rank, args.device, dtype, reps)
        print(f"\n## fine-tune step, Llama '{model}', batch {args.batch} x {seq}, r={args.rank}\n" + markdown(rows))
        write_csv(os.path.join(args.out, "finetune.csv"), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
