"""DoRA against LoRA, fused_lora's and peft's, in one run: one layer and one fine-tuning step.

    python benchmarks/bench_dora.py                  # CPU: layer 2048x1024x1024 r=16 fp32, Llama "small" step
    python benchmarks/bench_dora.py --gpu-suite      # CUDA: layer 8192x4096x4096 r=16 bf16, Llama "1b" step

Layer variants (frozen base, input requiring grad, dropout 0): the base nn.Linear, fused_lora's LoRA
and DoRA layers, peft's LoRA and DoRA layers, and peft's DoRA patched by fused_lora.patch_peft.
Forward and forward+backward medians, memory held after forward and the forward+backward peak.
The ratios the issue's targets name are printed last: fused_lora DoRA / fused_lora LoRA (target
<= 1.05, time and held memory) beside peft DoRA / peft LoRA. The fine-tuning step (forward,
backward, AdamW step of every adapted Linear of a Llama-shaped model, target_modules all-linear)
compares the same four adapters. Writes CSV under benchmarks/out/.
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

from fused_lora import FusedLoRALinear, LoraConfig, get_lora_model, patch_peft  # noqa: E402
from fused_lora.cli.finetune import build_llama, counting_batches  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def layer_variants(K, N, r, dtype, device):
    import peft
    torch.manual_seed(0)
    base = nn.Linear(K, N, device=device, dtype=dtype).requires_grad_(False)
    out = {"base": base}
    for name, use_dora in (("fused_lora LoRA", False), ("fused_lora DoRA", True)):
        out[name] = FusedLoRALinear.from_linear(copy.deepcopy(base), r=r, lora_alpha=2 * r, init_lora_weights=False,
                                                use_dora=use_dora)
    for name, use_dora in (("peft LoRA", False), ("peft DoRA", True)):
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], init_lora_weights=False,
                              use_dora=use_dora)
        out[name] = peft.get_peft_model(Holder(copy.deepcopy(base)), cfg, autocast_adapter_dtype=False)
    out["patch_peft DoRA"] = patch_peft(copy.deepcopy(out["peft DoRA"]), verbose=False)
    for m in out.values():
        m.train()
    return out


def bench_layer(M, K, N, r, dtype, device, reps):
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(M, N, device=device, dtype=dtype)
    fns, mems = {}, {}
    for name, m in layer_variants(K, N, r, dtype, device).items():
        def fwd(m=m):
            m(x)

        def fwdbwd(m=m):
            m(x).backward(dy)
            x.grad = None
            for q in m.parameters():
                q.grad = None
        fwdbwd()
        fns[(name, "fwd")], fns[(name, "fwdbwd")] = fwd, fwdbwd
        mems[name] = memory_mib(lambda m=m: m(x), lambda y: y.backward(dy), device)
    ms = time_variants(fns, device, reps=reps)
    rows = []
    for name in mems:
        rows.append(dict(kind="layer", M=M, K=K, N=N, r=r, variant=name, fwd_ms=round(ms[(name, "fwd")], 4),
                         fwdbwd_ms=round(ms[(name, "fwdbwd")], 4),
                         fwdbwd_x_base=round(ms[(name, "fwdbwd")] / ms[("base", "fwdbwd")], 3),
                         held_MiB=round(mems[name][0], 2), peak_MiB=round(mems[name][1], 2)))
    return rows


def finetune_models(size, r, dtype, device):
    import peft
    out = {}
    for name, use_dora in (("fused_lora LoRA", False), ("fused_lora DoRA", True)):
        out[name] = get_lora_model(build_llama(size, dtype=dtype, device=device),
                                   LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", use_dora=use_dora))
    for name, use_dora in (("peft LoRA", False), ("peft DoRA", True)):
        out[name] = peft.get_peft_model(build_llama(size, dtype=dtype, device=device),
                                        peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear",
                                                        use_dora=use_dora), autocast_adapter_dtype=False)
    return out


def bench_finetune(size, batch, seq, r, dtype, device, reps):
    tokens = next(counting_batches(build_llama(size).config.vocab_size, batch, seq, device=device))
    fns = {}
    for name, model in finetune_models(size, r, dtype, device).items():
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

        def step(model=model, opt=opt):
            model(input_ids=tokens, labels=tokens).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        fns[name] = step
    ms = time_variants(fns, device, reps=reps)
    return [dict(kind=f"finetune {size} {batch}x{seq}", M=batch * seq, K="", N="", r=r, variant=name,
                 fwd_ms="", fwdbwd_ms=round(t, 3), fwdbwd_x_base="", held_MiB="", peak_MiB="")
            for name, t in ms.items()]


def ratio(rows, kind, a, b, key):
    get = {r["variant"]: r[key] for r in rows if r["kind"] == kind}
    return get[a] / get[b] if get.get(b) else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-suite", action="store_true")
    ap.add_argument("--shape", type=int, nargs=3, metavar=("M", "K", "N"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-finetune", action="store_true")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="CPU threads (on a machine shared with other work, 1 avoids OpenMP wake-up stalls "
                         "that cost every small op tens of ms)")
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "dora.csv"))
    args = ap.parse_args(argv)
    device = bench_device(ap, args.gpu_suite)
    gpu = device == "cuda"
    M, K, N = args.shape or ((8192, 4096, 4096) if gpu else (2048, 1024, 1024))
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(args.threads)
    print(f"# {environment(device)}; {dtype}" + ("" if gpu else f"; {args.threads} thread(s)"))
    rows = bench_layer(M, K, N, args.rank, dtype, device, args.reps)
    if not args.no_finetune:
        size, batch, seq = ("1b", 4, 1024) if gpu else ("small", 4, 128)
        rows += bench_finetune(size, batch, seq, args.rank, dtype, device, max(3, args.reps // 2))
    print(f"{'kind':<26} {'variant':<17} {'fwd ms':>9} {'f+b ms':>9} {'f+b/base':>9} {'held MiB':>9} {'peak MiB':>9}")
    for r in rows:
        print(f"{r['kind'] + ('' if r['K'] == '' else f' {M}x{K}x{N} r{args.rank}'):<26} {r['variant']:<17} "
              f"{r['fwd_ms']!s:>9} {r['fwdbwd_ms']!s:>9} {r['fwdbwd_x_base']!s:>9} {r['held_MiB']!s:>9} "
              f"{r['peak_MiB']!s:>9}")
    ft = next((r["kind"] for r in rows if r["kind"].startswith("finetune")), None)
    print("# ratios (target: fused_lora DoRA / fused_lora LoRA <= 1.05)")
    for what, kind, key in (("layer fwd+bwd", "layer", "fwdbwd_ms"), ("layer forward", "layer", "fwd_ms"),
                            ("layer held memory", "layer", "held_MiB")) + ((("fine-tune step", ft, "fwdbwd_ms"),)
                                                                           if ft else ()):
        print(f"#   {what:<18} fused_lora DoRA/LoRA {ratio(rows, kind, 'fused_lora DoRA', 'fused_lora LoRA', key):.3f}"
              f"   peft DoRA/LoRA {ratio(rows, kind, 'peft DoRA', 'peft LoRA', key):.3f}"
              f"   fused_lora DoRA/peft DoRA {ratio(rows, kind, 'fused_lora DoRA', 'peft DoRA', key):.3f}")
    write_csv(args.out, rows)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
