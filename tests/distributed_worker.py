"""Run by tests/cli/test_distributed.py under torchrun: the same fine-tuning with DDP, then FSDP2, over a
16-bit base and over quantized ones.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR

Rank 0 writes OUT_DIR/<run>/ (the adapter) and OUT_DIR/<run>.json (the losses, the rows each process
trained on in the first step, and for the quantized FSDP2 runs the bytes of quantized base each process held).
Runs: "ddp" and "fsdp" (finetune over the tiny Llama), "ddp-int8" (finetune with quantize="int8"),
"fsdp-nf4" / "fsdp-int8" (`quantized_training`: every projection of a Llama whose in_features are
multiples of NF4's block of 64 quantized, FSDP2 over it, the bytes measured around each block's forward),
and "command" (the finetune command's `main(["finetune", *COMMAND_FLAGS, ...])`, what `python -m fused_lora`
runs, in these processes: the group is already there, which the command then uses; each process's exit
status and printed lines in OUT_DIR/command.json, the progress lines, written to the terminal's stream, aside).
"""
import contextlib
import io
import json
import os
import sys

import torch
import torch.distributed as dist

from fused_lora.cli import distributed
from fused_lora.cli import main as command
from fused_lora.cli.finetune import LLAMA_TARGETS, counting_batches, finetune, train_step
from fused_lora.modules.quantized import held_quantized_nbytes
from fused_lora.peft_compat.config import LoraConfig
from fused_lora.peft_compat.model import get_lora_model
from fused_lora.peft_compat.quantize import quantize_model

SETTINGS = dict(size="tiny", steps=4, batch=4, seq=16, lr=5e-3, device="cpu")
# The tiny Llama with an MLP of 128 (finetune's tiny has 176, which NF4's blocks of 64 do not divide).
QUANTIZED_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)
QUANTIZED_FORMATS = ("nf4", "int8")
COMMAND_FLAGS = ["--fsdp", "--quantize", "int8"]


def command_args(out: str) -> list:
    """The finetune command's arguments for SETTINGS, saving to `out`."""
    return ["finetune", "--steps", str(SETTINGS["steps"]), "--batch", str(SETTINGS["batch"]), "--seq",
            str(SETTINGS["seq"]), "--lr", str(SETTINGS["lr"]), "--device", SETTINGS["device"], "--out", out]


def quantized_training(quant_type: str, out: str) -> dict:
    """LoRA (r=16 on the 7 projections) over a Llama whose projections are quantized to `quant_type`, SETTINGS'
    steps, batch, seq and lr: in one process on the full batch, or (in a process group) under FSDP2 through
    `distributed.wrap`, each process on its share. Saves the adapter to `out` (rank 0). Returns the losses and
    this process's bytes of quantized base: `whole` (before sharding), `block` (the largest block's, before
    sharding), `sharded` (after sharding), `between` (the most held after any block's forward, its gathered
    copy freed), `inside` (the most held while a block runs), `after` (after the last step)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(**QUANTIZED_LLAMA, attn_implementation="sdpa", use_cache=False)
    model = quantize_model(LlamaForCausalLM(config), quant_type)
    lora = get_lora_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    whole = held_quantized_nbytes(lora)
    block = max(held_quantized_nbytes(b) for b in lora.model.model.layers)
    fsdp = distributed.active()
    if fsdp:
        distributed.wrap(lora, "fsdp", torch.device("cpu"))
    sharded = held_quantized_nbytes(lora)
    seen = {"between": 0, "inside": 0}

    def note(key):
        def hook(*_):
            seen[key] = max(seen[key], held_quantized_nbytes(lora))
        return hook
    # Registered after fully_shard: FSDP2's pre-forward hook (prepended) has gathered the block when "inside"
    # is read, and its post-forward hook has freed the gathered copy when "between" is.
    for layer in lora.model.model.layers:
        layer.register_forward_pre_hook(note("inside"))
        layer.register_forward_hook(note("between"))
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=SETTINGS["lr"])
    batches = counting_batches(QUANTIZED_LLAMA["vocab_size"], SETTINGS["batch"], SETTINGS["seq"])
    losses = []
    for _ in range(SETTINGS["steps"]):
        ids = distributed.shard(next(batches))
        local = train_step(lora, opt, {"input_ids": ids, "labels": ids})
        losses.append(distributed.mean_over_processes(local).item())
    after = held_quantized_nbytes(lora)
    with distributed.full_parameters(lora) if fsdp else contextlib.nullcontext():
        if distributed.rank() == 0:
            lora.save_pretrained(out)
    if fsdp:
        dist.barrier()
    return {"losses": losses, "whole": whole, "block": block, "sharded": sharded, "after": after, **seen}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    first = distributed.shard(next(counting_batches(256, SETTINGS["batch"], SETTINGS["seq"])))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, first.tolist())
    results = {}
    for engine in distributed.ENGINES:
        results[engine] = {"losses": finetune(**SETTINGS, engine=engine, out=os.path.join(out, engine),
                                              log=lambda s: None, stream=None),
                           "rows": rows}
    # DDP over a quantized base: the packed buffers stay whole on every process, not broadcast each step
    results["ddp-int8"] = {"losses": finetune(**SETTINGS, engine="ddp", quantize="int8",
                                              out=os.path.join(out, "ddp-int8"), log=lambda s: None, stream=None)}
    for fmt in QUANTIZED_FORMATS:
        got = quantized_training(fmt, os.path.join(out, f"fsdp-{fmt}"))
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, got)
        results[f"fsdp-{fmt}"] = {"losses": got["losses"], "bytes": [{k: v for k, v in r.items() if k != "losses"}
                                                                     for r in per_rank]}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        status = command.main(command_args(os.path.join(out, "command")) + COMMAND_FLAGS)
    each = [None] * dist.get_world_size()
    dist.all_gather_object(each, (status, printed.getvalue()))
    results["command"] = {"status": [e[0] for e in each], "printed": [e[1] for e in each]}
    if dist.get_rank() == 0:
        for name, result in results.items():
            with open(os.path.join(out, f"{name}.json"), "w") as f:
                json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
