"""FSDP2 over a quantized base: the bytes of it each process holds, before and after the base is sharded.

    torchrun --nproc-per-node 2 benchmarks/bench_fsdp_quant.py               # CPU, gloo (~1 min)
    torchrun --nproc-per-node 2 benchmarks/bench_fsdp_quant.py --device cuda # NCCL, one GPU per process

For each model (a tiny Llama whose in_features NF4's blocks of 64 divide, and finetune's 'small') and each
format (NF4 with double quantization, int8), LoRA r=16 on the 7 projections, FSDP2 per decoder layer and at
the root, as `fused_lora.cli.distributed.wrap` does:
  before   fully_shard over the model as it is: the quantized tensors are buffers, left whole on every
           process (what wrap did before the base was made shardable)
  after    `distributed.wrap`: `shardable_quantized` first, so FSDP2 shards them
Per process: the bytes of quantized base held (`held_quantized_nbytes`: the storage of every QuantizedWeight's
tensors) whole before sharding, between layers (after a layer's forward, FSDP2's gathered copy freed: the
most over the steps), inside a layer (while it runs: the most), after the last step; as shares of the whole
base. And the mean step time (after the first), "after" over "before": the cost of gathering the base.
Rank 0 prints the table (markdown) and writes benchmarks/out/fsdp_quant.csv.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import environment, write_csv  # noqa: E402

from fused_lora import LoraConfig, get_lora_model, quantize_model  # noqa: E402
from fused_lora.cli import distributed  # noqa: E402
from fused_lora.cli.finetune import LLAMA_SIZES, LLAMA_TARGETS, counting_batches, train_step  # noqa: E402
from fused_lora.modules.quantized import held_quantized_nbytes  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out", "fsdp_quant.csv")
MODELS = {"tiny-64": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256),
          "small": LLAMA_SIZES["small"]}


def shard_as_before(model: torch.nn.Module) -> None:
    """FSDP2 as wrap applied it before: per nn.ModuleList block, then the root, the quantized buffers as they are."""
    from torch.distributed.fsdp import fully_shard
    for module in list(model.modules()):
        if isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)


def measure(model_name: str, fmt: str, mode: str, device: torch.device, steps: int, batch: int, seq: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**MODELS[model_name], attn_implementation="sdpa", use_cache=False)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    quantize_model(model, fmt)
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS))
    whole = held_quantized_nbytes(lora)
    if mode == "before":
        shard_as_before(lora)
    else:
        distributed.wrap(lora, "fsdp", device)
    seen = {"between": 0, "inside": 0}

    def note(key):
        def hook(*_):
            seen[key] = max(seen[key], held_quantized_nbytes(lora))
        return hook
    for layer in lora.model.model.layers:  # after fully_shard: FSDP2's own hooks run around these
        layer.register_forward_pre_hook(note("inside"))
        layer.register_forward_hook(note("between"))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-3)
    batches = counting_batches(config.vocab_size, batch, seq)
    times = []
    for _ in range(steps):
        ids = distributed.shard(next(batches)).to(device)
        dist.barrier()
        start = time.perf_counter()
        train_step(lora, opt, {"input_ids": ids, "labels": ids})
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"model": model_name, "format": fmt, "mode": mode, "rank": distributed.rank(), "whole": whole,
            "between": seen["between"], "inside": seen["inside"], "after_step": held_quantized_nbytes(lora),
            "step_s": statistics.mean(times[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=64)
    args = parser.parse_args()
    device = distributed.resolve_device(args.device)
    if distributed.launched_world_size() < 2:
        sys.exit("run under torchrun with several processes: torchrun --nproc-per-node 2 " + sys.argv[0])
    rows = []
    with distributed.process_group(device):
        lead = distributed.rank() == 0
        for model_name in MODELS:
            for fmt in ("nf4", "int8"):
                for mode in ("before", "after"):
                    got = measure(model_name, fmt, mode, device, args.steps, args.batch, args.seq)
                    every = [None] * distributed.world_size()
                    dist.all_gather_object(every, got)
                    rows += every
    if not lead:
        return
    world = max(r["rank"] for r in rows) + 1
    print(f"{environment(args.device)}; {world} processes, {distributed.backend_for(device)}; "
          f"{args.batch} x {args.seq} tokens a step, {args.steps} steps")
    print("| model | format | quantized base | FSDP2 | rank | between layers | inside a layer | after the steps "
          "| step time, after / before |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        before = next(b for b in rows if b["mode"] == "before" and b["rank"] == r["rank"]
                      and b["model"] == r["model"] and b["format"] == r["format"])
        ratio = "" if r["mode"] == "before" else f"{r['step_s'] / before['step_s']:.2f}x"
        share = {k: f"{r[k]:,} ({r[k] / r['whole']:.3f})" for k in ("between", "inside", "after_step")}
        print(f"| {r['model']} | {r['format']} | {r['whole']:,} B | {r['mode']} | {r['rank']} | {share['between']} "
              f"| {share['inside']} | {share['after_step']} | {ratio} |")
    write_csv(OUT, rows)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
