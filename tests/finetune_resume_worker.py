"""Run by tests/cli/test_finetune.py under torchrun (2 processes, gloo): FSDP2 fine-tuning for 2 steps, then
resumed from its checkpoint to 4 steps, in the same processes.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/finetune_resume_worker.py OUT_DIR

Rank 0 writes OUT_DIR/losses.json (the resumed run's losses); the adapter is in OUT_DIR/adapter.
"""
import json
import os
import sys

import torch.distributed as dist

from fused_lora.cli.finetune import finetune

SETTINGS = dict(size="tiny", batch=4, seq=16, lr=5e-3, device="cpu", eval_split=0, engine="fsdp",
                log=lambda s: None, stream=None)


def main(out: str) -> None:
    dist.init_process_group("gloo")
    adapter = os.path.join(out, "adapter")
    finetune(steps=2, out=adapter, **SETTINGS)
    losses = finetune(steps=4, out=adapter, resume=True, **SETTINGS)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "losses.json"), "w") as f:
            json.dump(list(losses), f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
