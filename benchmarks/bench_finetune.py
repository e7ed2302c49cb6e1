"""One fine-tuning step of a Llama-shaped model: the floor, peft and fused_lora, in one run.

    python benchmarks/bench_finetune.py            # CPU: 'small' config, fp32, 4 x 256 tokens (~1-2 min)
    python benchmarks/bench_finetune.py --size 1b  # CUDA: hidden 2048, 16 layers, bf16, 4 x 2048 tokens

Variants, each with gradient checkpointing off and on:
  floor       every weight frozen, gradient still flowing to the input (all dX GEMMs, no weight
              gradients): what a LoRA costing nothing would cost
  peft        LoRA r=16, alpha 32 on q,k,v,o,gate,up,down, AdamW on the adapters, dropout 0 / 0.1
  patch_peft  the peft model, patched by fused_lora.patch_peft (peft's layers, fused_lora's op)
  fused_lora  the same adapters through fused_lora's own model
Prints step time, tokens/s, peak memory and ratios to the floor and to peft; writes a CSV.
Peak memory: on CUDA the allocator's peak over a step (weights included, as in the anchors); on
CPU the peak of what a step allocates beyond what was there before it.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, write_csv  # noqa: E402

from fused_lora import LoraConfig, get_lora_model, patch_peft  # noqa: E402
from fused_lora.cli.finetune import LLAMA_TARGETS, build_llama, counting_batches  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "finetune.csv")


def make_variant(name, base, p):
    """(model to call, optimizer or None, whether to feed input embeddings that require grad)."""
    model = copy.deepcopy(base)
    if name == "floor":
        model.requires_grad_(False)
        return model, None, True
    if name in ("peft", "patch_peft"):
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=p,
                                                           target_modules=LLAMA_TARGETS),
                                    autocast_adapter_dtype=False)
        if name == "patch_peft":
            patch_peft(model, verbose=False)
    else:
        model = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=p, target_modules=LLAMA_TARGETS),
                               autocast_adapter_dtype=False)
    params = [q for q in model.parameters() if q.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-4), False


def step_fn(model, opt, grad_input, tokens):
    embed = model.get_input_embeddings()

    def step():
        embeds = embed(tokens)
        if grad_input:
            embeds = embeds.detach().requires_grad_(True)
        loss = model(inputs_embeds=embeds, labels=tokens).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
    return step


def measure(step, device, steps, warmup):
    for _ in range(warmup):
        step()
    times = []
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
        cur = peak = 0
        for e in sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                        key=lambda e: e.start_ns()):
            cur += e.nbytes()
            peak = max(peak, cur)
        peak /= 2**30
    return statistics.median(times), peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default=None, help="tiny, small (CPU default) or 1b (CUDA default)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence (256 on CPU, 2048 on CUDA)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.1])
    ap.add_argument("--checkpointing", choices=["off", "on", "both"], default="both")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    size = args.size or ("1b" if gpu else "small")
    seq = args.seq or (2048 if gpu else 256)
    steps = args.steps or (10 if gpu else 8)
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(os.cpu_count() or 1)
    base = build_llama(size, dtype=dtype, device=device, max_positions=max(seq, 128))
    tokens = next(counting_batches(base.config.vocab_size, args.batch, seq, device=device))
    print(f"# {environment(device)}; Llama '{size}', {dtype}, batch {args.batch} x {seq} tokens")
    print(f"{'variant':<12} {'p':>4} {'ckpt':>5} {'step ms':>9} {'tokens/s':>10} {'peak GiB':>9} {'x floor':>8} {'x peft':>7}")
    ckpts = {"off": [False], "on": [True], "both": [False, True]}[args.checkpointing]
    names = ["floor"] + ([] if args.no_peft else ["peft", "patch_peft"]) + ["fused_lora"]
    rows = []
    for ckpt in ckpts:
        floor_ms, peft_ms = None, {}
        for name in names:
            for p in ([0.0] if name == "floor" else args.dropouts):
                model, opt, grad_input = make_variant(name, base, p)
                if ckpt:
                    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
                model.train()
                ms, peak = measure(step_fn(model, opt, grad_input, tokens), device, steps, warmup=3)
                floor_ms = ms if name == "floor" else floor_ms
                if name == "peft":
                    peft_ms[p] = ms
                row = dict(variant=name, dropout=p, checkpointing=ckpt, step_ms=round(ms, 2),
                           tokens_per_s=round(args.batch * seq / ms * 1e3), peak_GiB=round(peak, 3),
                           x_floor=round(ms / floor_ms, 3), x_peft=round(ms / peft_ms[p], 3) if p in peft_ms else "")
                rows.append(row)
                xp = f"{row['x_peft']:.2f}" if row["x_peft"] != "" else "-"
                print(f"{name:<12} {p:>4} {'on' if ckpt else 'off':>5} {ms:>9.2f} {row['tokens_per_s']:>10,} "
                      f"{peak:>9.3f} {row['x_floor']:>8.2f} {xp:>7}")
                del model, opt
                gc.collect()
                if gpu:
                    torch.cuda.empty_cache()
    write_csv(args.out, rows)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
