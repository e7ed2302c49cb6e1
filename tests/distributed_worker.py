"""Run by tests/cli/test_distributed.py under torchrun: the same fine-tuning with DDP, then FSDP2.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT_DIR

Rank 0 writes OUT_DIR/<engine>/ (the adapter) and OUT_DIR/<engine>.json (the losses, and the rows
each process trained on in the first step).
"""
import json
import os
import sys

import torch.distributed as dist

from fused_lora.cli import distributed
from fused_lora.cli.finetune import counting_batches, finetune

SETTINGS = dict(size="tiny", steps=4, batch=4, seq=16, lr=5e-3, device="cpu")


def main(out: str) -> None:
    dist.init_process_group("gloo")
    first = distributed.shard(next(counting_batches(256, SETTINGS["batch"], SETTINGS["seq"])))
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, first.tolist())
    for engine in distributed.ENGINES:
        losses = finetune(**SETTINGS, engine=engine, out=os.path.join(out, engine), log=lambda s: None, stream=None)
        if dist.get_rank() == 0:
            with open(os.path.join(out, f"{engine}.json"), "w") as f:
                json.dump({"losses": losses, "rows": rows}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
