"""Command line: `python -m fused_lora demo | finetune | info`.

Bad settings are refused before any work starts, with argparse's usage line and a one-line
"error: ..." (exit status 2); a run that fails later (a NaN loss, out of memory) ends with one
"error: ..." line and exit status 1.
"""
from __future__ import annotations

import argparse
import sys

FORMAT = argparse.ArgumentDefaultsHelpFormatter
DEFAULT_OUT = "fused_lora_adapter"  # relative to the working directory; .gitignore lists it


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="python -m fused_lora", formatter_class=FORMAT,
                                     description="fused_lora: LoRA layers with fused kernels. Commands: "
                                     "demo, finetune, info; `<command> --help` for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,finetune,info}")
    device_help = "cpu, cuda or cuda:N; auto: cuda when available, else cpu"

    demo = sub.add_parser("demo", formatter_class=FORMAT, help="the tutorial walk-through on a small MLP",
                          description="The tutorial walk-through: LoRA on a small MLP, end to end (~15 s on a CPU).")
    demo.add_argument("--device", default="auto", help=device_help)

    ft = sub.add_parser(
        "finetune", formatter_class=FORMAT, help="train LoRA adapters on a Llama-shaped model (synthetic data)",
        description="Train LoRA adapters (q/k/v/o and MLP projections) of a Llama-shaped model with random "
        "weights on synthetic counting sequences, then save the adapter in peft's format. Under "
        "`torchrun --nproc-per-node N -m fused_lora finetune` each of the N processes trains on its "
        "share of every batch (DDP, or FSDP2 with --fsdp; NCCL on CUDA, gloo on CPU); rank 0 prints and saves.")
    ft.add_argument("--size", default="tiny", help="model size: tiny (CPU, seconds), small (~4M parameters), "
                    "or 1b (TinyLlama's shape, for a GPU)")
    ft.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ft.add_argument("--batch", type=int, default=8,
                    help="sequences per step, over all processes (divisible by the number of processes)")
    ft.add_argument("--seq", type=int, default=64, help="tokens per sequence (at least 2)")
    ft.add_argument("--r", type=int, default=16, help="LoRA rank")
    ft.add_argument("--lora-alpha", type=float, default=32, help="LoRA scaling numerator: s = alpha / r")
    ft.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA branch's input, in [0, 1)")
    ft.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    ft.add_argument("--out", default=DEFAULT_OUT, help="directory the adapter is saved to (created if missing; "
                    "the default, under the working directory, is ignored by git in this repository)")
    ft.add_argument("--device", default="auto", help=device_help + " (under torchrun, cuda means cuda:LOCAL_RANK)")
    ft.add_argument("--fsdp", action="store_true",
                    help="under torchrun: shard parameters with FSDP2 (fully_shard) instead of DDP")
    ft.add_argument("--log-every", type=int, default=0,
                    help="when the output is not a terminal, print progress every N steps; 0: about ten lines")

    sub.add_parser("info", formatter_class=FORMAT, help="which backend runs where, and why",
                   description="Print versions and which backend (torch or triton) runs each device and dtype, "
                   "with the reasons when triton cannot.")
    return parser, sub.choices


def main(argv=None) -> int:
    parser, commands = _parser()
    args = parser.parse_args(argv)
    device = None if getattr(args, "device", "auto") == "auto" else args.device
    if args.command == "demo":
        return _demo(commands["demo"], device)
    if args.command == "finetune":
        return _finetune(commands["finetune"], args, device)
    _info()
    return 0


def _demo(parser: argparse.ArgumentParser, device) -> int:
    from .distributed import resolve_device
    try:
        resolved = resolve_device(device)
    except ValueError as err:
        parser.error(f"argument --device: {err}")
    from .demo import run
    run(device=str(resolved))
    return 0


def _finetune(parser: argparse.ArgumentParser, args, device) -> int:
    import torch

    from . import distributed
    from .finetune import SettingError, TrainingDiverged, check_settings, finetune
    settings = dict(size=args.size, steps=args.steps, batch=args.batch, seq=args.seq, r=args.r,
                    lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lr=args.lr, out=args.out,
                    device=device, engine="fsdp" if args.fsdp else None, log_every=args.log_every)
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    flags["engine"] = "--fsdp"
    try:
        resolved, _ = check_settings(**settings, world=distributed.launched_world_size())
    except SettingError as err:
        where = f"argument {flags[err.setting]}: {err.problem}" if err.setting in flags else str(err)
        parser.error(where)
    settings["device"] = str(resolved)
    with distributed.process_group(resolved):
        try:
            finetune(**settings)
        except TrainingDiverged as err:
            print(f"{parser.prog}: error: {err}", file=sys.stderr)
            return 1
        except torch.OutOfMemoryError:
            print(f"{parser.prog}: error: out of memory on {resolved} at --batch {args.batch} --seq {args.seq} "
                  f"(--size {args.size}): lower --batch or --seq", file=sys.stderr)
            return 1
    return 0


def _info() -> None:
    import torch

    from . import __version__, backends
    print(f"fused_lora {__version__}, torch {torch.__version__}, triton installed: {backends.triton_installed()}")
    print(backends.report())  # the implementations, what runs where and why, auto's choices and timings


if __name__ == "__main__":
    sys.exit(main())
