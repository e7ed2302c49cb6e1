"""Command line: `python -m fused_lora demo | finetune | info`, also installed as `fused-lora`.

Bad settings are refused before any work starts, with argparse's usage line and a one-line
"error: argument --x: ..." (exit status 2); a run that fails later (a NaN loss, out of memory, a
model transformers cannot load, a full disk) ends with one "error: ..." line (exit status 1); a
missing package, with one line naming it and the extra that installs it (exit status 1); Ctrl-C
during finetune, with one "interrupted at step N" line (exit status 130).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from ..core.version import __version__
from .. import dispatch
from . import distributed
from . import demo as demo_module
from . import finetune as ft
from .distributed import SettingError

FORMAT = argparse.ArgumentDefaultsHelpFormatter
DEFAULT_OUT = "fused_lora_adapter"  # relative to the working directory; .gitignore lists it
SCRIPT = "fused-lora"  # the console script pip installs (pyproject.toml)
# Flags whose argument names differ from the function's parameter.
FLAG_OF = {"engine": "--fsdp"}


def _prog() -> str:
    """How the command was called: the console script by its name, else `python -m fused_lora`."""
    return SCRIPT if sys.argv and os.path.basename(sys.argv[0]) == SCRIPT else "python -m fused_lora"


def _parser(prog: str) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog=prog, formatter_class=FORMAT,
                                     description="fused_lora: LoRA layers with fused kernels. Commands: "
                                     "demo, finetune, info; `<command> --help` for each.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,finetune,info}")
    device_help = "cpu, cuda or cuda:N; auto: cuda when available, else cpu"

    demo = sub.add_parser("demo", formatter_class=FORMAT, help="the tutorial walk-through on a small MLP",
                          description="The tutorial walk-through: LoRA on a small MLP, end to end (~15 s on a CPU). "
                          "Needs only the package (no extra).")
    demo.add_argument("--device", default="auto", help=device_help)

    ft_parser = sub.add_parser(
        "finetune", formatter_class=FORMAT, help="train LoRA adapters on your model and data (or synthetic ones)",
        description="Train LoRA adapters on a local transformers model (--model DIR; nothing is downloaded) with a "
        "local data file (--data FILE), or on a Llama-shaped model with random weights (--size) and synthetic "
        "counting sequences, then save the adapter in peft's format in --out, with a checkpoint (adapter, "
        "optimizer and RNG state) that --resume continues from. Ctrl-C saves the adapter trained so far, and "
        "a checkpoint, in --out (in a single process; under torchrun the last checkpoint stays), and "
        "--resume continues from it. Under `torchrun --nproc-per-node N -m fused_lora finetune` each of "
        "the N processes trains on its share of every batch (DDP, or FSDP2 with --fsdp; NCCL on CUDA, gloo "
        "on CPU); rank 0 prints and saves. Needs transformers: pip install 'fused_lora[hf]'.")
    ft_parser.add_argument("--model", metavar="DIR", default=argparse.SUPPRESS,
                           help="a local transformers model directory (config.json and weights, e.g. written by "
                           "save_pretrained), loaded with AutoModelForCausalLM (default: a Llama of --size with "
                           "random weights)")
    ft_parser.add_argument("--size", default=argparse.SUPPRESS,
                           help="without --model: tiny (CPU, seconds; the default), small (~4M parameters) or "
                           "1b (TinyLlama's shape, for a GPU)")
    ft_parser.add_argument("--data", metavar="FILE", default=argparse.SUPPRESS,
                           help='JSONL with one example per line, {"input_ids": [...]} or {"text": "..."}, or '
                           "a text file with one example per line; text is tokenized with --model's tokenizer "
                           "(and its EOS token ends each example). Examples longer than --seq are split. "
                           "Default: synthetic counting sequences")
    ft_parser.add_argument("--eval-split", type=float, default=0.1,
                           help="share of the examples held out; their loss is measured before and after "
                           "training (0: no eval)")
    ft_parser.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ft_parser.add_argument("--batch", type=int, default=8,
                           help="sequences per step, over all processes (divisible by the number of processes)")
    ft_parser.add_argument("--seq", type=int, default=64, help="tokens per sequence (at least 2)")
    ft_parser.add_argument("--r", type=int, default=16, help="LoRA rank")
    ft_parser.add_argument("--lora-alpha", type=float, default=32, help="LoRA scaling numerator: s = alpha / r")
    ft_parser.add_argument("--lora-dropout", type=float, default=0.0,
                           help="dropout on the LoRA branch's input, in [0, 1)")
    ft_parser.add_argument("--target-modules", default=argparse.SUPPRESS,
                           help="comma-separated module names to adapt, or all-linear (default: the Llama's "
                           "q/k/v/o and MLP projections; all-linear with --model)")
    ft_parser.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate")
    ft_parser.add_argument("--seed", type=int, default=0,
                           help="seeds the adapter's initialisation, the data order, the eval split and dropout")
    ft_parser.add_argument("--out", default=DEFAULT_OUT,
                           help="directory of the adapter and its checkpoint (created if missing; the default, "
                           "under the working directory, is ignored by git in this repository). One that holds "
                           "an adapter is refused unless --resume or --overwrite")
    ft_parser.add_argument("--resume", action="store_true",
                           help="continue from the last checkpoint in --out (same settings; --steps is the total)")
    ft_parser.add_argument("--overwrite", action="store_true",
                           help="start afresh in an --out that holds an adapter, replacing it and its checkpoint")
    ft_parser.add_argument("--save-every", type=int, default=ft.DEFAULT_SAVE_EVERY,
                           help="steps between checkpoints in --out (0: only at the end); only the last is kept")
    ft_parser.add_argument("--device", default="auto",
                           help=device_help + " (under torchrun, cuda means cuda:LOCAL_RANK)")
    ft_parser.add_argument("--fsdp", action="store_true",
                           help="under torchrun: shard parameters with FSDP2 (fully_shard) instead of DDP "
                           "(a --quantize'd base is sharded too)")
    ft_parser.add_argument("--quantize", choices=("nf4", "int8"), default=None,
                           help="QLoRA: quantize the base's Linear layers (all but the output layer) to NF4 "
                           "(double quantization, blocks of 64: every in_features a multiple of 64) or int8 "
                           "before training the adapters over it")
    ft_parser.add_argument("--log-every", type=int, default=0,
                           help="when the output is not a terminal, print progress every N steps; 0: about ten lines")

    sub.add_parser("info", formatter_class=FORMAT, help="which backend runs where, and why",
                   description="Print versions, what is measured of the speed and what is the target, and which "
                   "backend (torch or triton) runs each device and dtype, with the reasons when triton cannot.")
    return parser, sub.choices


def main(argv=None) -> int:
    parser, commands = _parser(_prog())
    args = parser.parse_args(argv)
    device = None if getattr(args, "device", "auto") == "auto" else args.device
    if args.command == "demo":
        return _demo(commands["demo"], device)
    if args.command == "finetune":
        return _finetune(commands["finetune"], args, device)
    _info()
    return 0


def _refuse(parser: argparse.ArgumentParser, err: SettingError):
    """argparse's answer to a bad flag (usage, one error line, exit 2) for a SettingError, naming the
    flag of the setting (lora_dropout -> --lora-dropout)."""
    flags = {a.dest: a.option_strings[0] for a in parser._actions if a.option_strings}
    flags.update({k: v for k, v in FLAG_OF.items() if v in flags.values()})
    parser.error(f"argument {flags[err.setting]}: {err.problem}" if err.setting in flags else str(err))


def _error(parser: argparse.ArgumentParser, message: str, status: int = 1) -> int:
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return status


def _interrupted_before_training(parser: argparse.ArgumentParser) -> int:
    """The one wording of a Ctrl-C before training started (checking the settings, building the model):
    an interrupt is not an error, as "interrupted at step N" is not."""
    print(f"{parser.prog}: interrupted before training started: nothing saved", file=sys.stderr)
    return 130


def _demo(parser: argparse.ArgumentParser, device) -> int:
    try:  # the checks finetune makes: the device, and the backend FUSED_LORA_BACKEND forces
        resolved = distributed.check_device(device, demo_module.DTYPE, demo_module.RANK)
    except SettingError as err:
        _refuse(parser, err)
    demo_module.run(device=str(resolved))
    return 0


def _finetune(parser: argparse.ArgumentParser, args, device) -> int:
    targets = getattr(args, "target_modules", None)
    if targets is not None and targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    settings = dict(size=getattr(args, "size", None), steps=args.steps, batch=args.batch, seq=args.seq, r=args.r,
                    lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, lr=args.lr, out=args.out,
                    device=device, engine="fsdp" if args.fsdp else None, log_every=args.log_every,
                    model=getattr(args, "model", None), data=getattr(args, "data", None),
                    eval_split=args.eval_split, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                    save_every=args.save_every, target_modules=targets, quantize=args.quantize)
    try:
        plan = ft.check_settings(**settings, world=distributed.launched_world_size())
    except SettingError as err:
        _refuse(parser, err)
    except ft.MissingDependency as err:
        return _error(parser, str(err))
    except KeyboardInterrupt:
        return _interrupted_before_training(parser)
    with distributed.process_group(plan.device):
        try:
            ft.train(plan)
        except SettingError as err:  # found once the model is built (target modules it does not have)
            _refuse(parser, err)
        except (ft.TrainingDiverged, ft.ModelLoadError, ft.SaveError) as err:
            return _error(parser, str(err))
        except torch.OutOfMemoryError:
            return _error(parser, f"out of memory on {plan.device} at --batch {args.batch} --seq {args.seq}: "
                          "lower --batch or --seq")
        except ft.TrainingInterrupted as stop:
            if stop.saved:
                where = (f"the adapter trained so far is saved to {stop.saved}, with {stop.checkpoint}: "
                         "--resume continues from it")
            else:
                where = stop.why
            print(f"{parser.prog}: interrupted at step {stop.step} of {stop.steps}: {where}", file=sys.stderr)
            return 130
        except KeyboardInterrupt:  # while the model was being loaded or built (train turns any later one into
            return _interrupted_before_training(parser)  # TrainingInterrupted, saying what is saved)
    return 0


def _info() -> None:
    print(f"fused_lora {__version__}, torch {torch.__version__}, triton installed: {dispatch.triton_installed()}")
    # What is measured, and what is only the goal (the README's opening says the same).
    print("speed, measured: on a CPU, the adapted layer's and a fine-tuning step's time as ratios to the base "
          "layer and peft (benchmarks/RESULTS.md)")
    print("speed on a GPU: the target, not yet measured: an adapted layer costing what the frozen base layer costs")
    print(dispatch.report())  # the implementations, what runs where and why, auto's choices and timings

