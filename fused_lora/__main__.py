"""Command line: `python -m fused_lora demo | finetune | info`."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_lora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the tutorial walk-through on a small MLP")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    ft = sub.add_parser("finetune", help="train LoRA adapters on a Llama-shaped model (synthetic data)")
    ft.add_argument("--size", default="tiny", help="model size: tiny (CPU, seconds), small, or 1b (GPU)")
    ft.add_argument("--steps", type=int, default=100)
    ft.add_argument("--batch", type=int, default=8)
    ft.add_argument("--seq", type=int, default=64)
    ft.add_argument("--r", type=int, default=16)
    ft.add_argument("--lora-alpha", type=float, default=32)
    ft.add_argument("--lora-dropout", type=float, default=0.0)
    ft.add_argument("--lr", type=float, default=5e-3)
    ft.add_argument("--out", default="fused_lora_adapter", help="where the adapter is saved")
    ft.add_argument("--device", default=None)
    sub.add_parser("info", help="which backend runs where, and why")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run
        run(device=args.device)
    elif args.command == "finetune":
        from .finetune import finetune
        finetune(size=args.size, steps=args.steps, batch=args.batch, seq=args.seq, r=args.r,
                 lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lr=args.lr, out=args.out,
                 device=args.device)
    elif args.command == "info":
        _info()
    return 0


def _info() -> None:
    import torch

    from . import __version__, backends
    print(f"fused_lora {__version__}, torch {torch.__version__}, triton installed: {backends.triton_installed()}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dtype in (torch.float32, torch.bfloat16):
            name = backends.describe(torch.device(dev), dtype, 16)
            reasons = backends.triton_not_supported_reasons(torch.device(dev), dtype, 16)
            why = f" (triton: {'; '.join(reasons)})" if reasons else ""
            print(f"  {dev} {dtype}: {name}{why}")


if __name__ == "__main__":
    sys.exit(main())
