"""Fine-tuning a Llama-shaped model with fused_lora, on synthetic tokens (no download).

    python -m fused_lora finetune --size tiny --steps 40 --out ./my_adapter
    torchrun --nproc-per-node 2 -m fused_lora finetune [--fsdp]      # several processes

Builds a transformers Llama from a config with random weights, adapts q/k/v/o and the MLP
projections, trains the adapters with AdamW on token sequences that follow a learnable rule
(each sequence counts up from a random start by a random stride, modulo the vocabulary), shows a
progress line with loss and tokens/s, and saves the adapter in peft's format. Needs `transformers`.
Under torchrun each process trains on its rows of every batch (see fused_lora/distributed.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import time
from typing import Callable, Iterator, Optional

import torch

from . import backends, distributed
from .config import LoraConfig
from .model import get_lora_model

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_SIZES = {
    # A few hundred thousand parameters: tests and the CPU example.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    # About 4M parameters: the CPU benchmark (big enough that matmuls, not Python, dominate).
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2048),
    # About 1.1B parameters: the GPU benchmark's model (TinyLlama's shape).
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
}


def build_llama(size: str = "tiny", dtype=torch.float32, device="cpu", seed: int = 0, max_positions: int = 4096):
    """A LlamaForCausalLM with random weights from one of LLAMA_SIZES (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(LLAMA_SIZES)}")
    config = LlamaConfig(**LLAMA_SIZES[size], max_position_embeddings=max_positions,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device: the 1B model's init is slow on a CPU
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def counting_batches(vocab: int, batch: int, seq: int, seed: int = 0, device="cpu") -> Iterator[torch.Tensor]:
    """Endless batches of token ids: start + stride * position (mod vocab), stride in 1..4."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 5, (batch, 1), generator=g)
        yield ((start + stride * pos) % vocab).to(device)


class SettingError(ValueError):
    """A fine-tuning setting that cannot work, found before anything is built.

    `setting` names the argument of `finetune` (None when the message names it itself); the command
    line reports it as its flag (lora_dropout -> --lora-dropout).
    """

    def __init__(self, setting: Optional[str], problem: str):
        super().__init__(f"{setting}: {problem}" if setting else problem)
        self.setting, self.problem = setting, problem


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite: training stopped and nothing was saved."""


def _check_int(name: str, value, minimum: int, why: str = "") -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise SettingError(name, f"must be an integer >= {minimum}{why}, got {value!r}")


def _total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_settings(size: str = "tiny", steps: int = 40, batch: int = 8, seq: int = 64, r: int = 16,
                   lora_alpha: float = 32, lora_dropout: float = 0.0, lr: float = 2e-3, out: Optional[str] = None,
                   device: Optional[str] = None, engine: Optional[str] = None, log_every: int = 0,
                   world: Optional[int] = None) -> tuple[torch.device, LoraConfig]:
    """The device and LoraConfig `finetune` would use; SettingError for any setting that cannot work.

    `world` is the number of processes (default: the launcher's WORLD_SIZE, else 1).
    """
    world = distributed.launched_world_size() if world is None else world
    if size not in LLAMA_SIZES:
        raise SettingError("size", f"unknown size {size!r}; one of {', '.join(LLAMA_SIZES)}")
    _check_int("steps", steps, 1)
    _check_int("batch", batch, 1)
    if batch % world:
        raise SettingError("batch", f"{batch} sequences do not split evenly over {world} processes")
    _check_int("seq", seq, 2, " (the next-token loss needs two tokens)")
    _check_int("log_every", log_every, 0)
    for name, value in (("lr", lr), ("lora_alpha", lora_alpha)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            raise SettingError(name, f"must be a finite number > 0, got {value!r}")
    try:
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=LLAMA_TARGETS,
                            task_type="CAUSAL_LM")
    except (TypeError, ValueError) as err:  # LoraConfig's own rules, reported in its words
        raise SettingError(None, str(err)) from None
    if engine is not None:
        if engine not in distributed.ENGINES:
            raise SettingError("engine", f"one of {', '.join(distributed.ENGINES)}, got {engine!r}")
        if world < 2:
            raise SettingError(engine, "needs several processes: launch with torchrun --nproc-per-node N")
    try:
        dev = distributed.resolve_device(device)
    except ValueError as err:
        raise SettingError("device", str(err)) from None
    # The float32 logits and their gradient alone: a floor on the memory one step needs.
    need = 2 * (batch // world) * seq * LLAMA_SIZES[size]["vocab_size"] * 4
    have = _total_memory(dev)
    if need > have:
        raise SettingError("batch", f"{batch // world} x {seq} tokens per process need at least {need / 1e9:,.0f} GB "
                           f"for the logits alone; {dev} has {have / 1e9:,.0f} GB: lower batch or seq")
    try:  # the backend forced by FUSED_LORA_BACKEND must run on this device, before anything is built
        backends.choose_backend(dev, torch.bfloat16 if dev.type == "cuda" else torch.float32, r)
    except (backends.BackendUnavailable, ValueError) as err:
        raise SettingError(None, f"{backends.ENV_VAR}: {err}") from None
    if out is not None:
        if os.path.exists(out) and not os.path.isdir(out):
            raise SettingError("out", f"{out!r} exists and is not a directory")
        _check_writable(out)
    return dev, config


def _check_writable(out: str) -> None:
    """Write (and remove) a file in `out`, or in its nearest existing parent when it does not exist
    yet: permission bits (os.access) say nothing of e.g. /proc, or a read-only mount. Nothing is
    created that stays, and processes of one torchrun job probing at once do not collide."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=".fused_lora-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise SettingError("out", f"cannot write the adapter to {out!r}: {err.strerror or err}") from None


def train_step(model, optimizer, tokens: torch.Tensor) -> torch.Tensor:
    """Forward with next-token loss, backward, optimizer step; returns the (detached) loss."""
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _progress(step: int, steps: int, loss: float, tok_s: float, width: int = 24) -> str:
    done = int(width * step / steps)
    return f"  step {step:4d}/{steps} [{'#' * done}{'.' * (width - done)}] loss {loss:7.4f}  {tok_s:,.0f} tok/s"


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def finetune(size: str = "tiny", steps: int = 40, batch: int = 8, seq: int = 64, r: int = 16,
             lora_alpha: float = 32, lora_dropout: float = 0.0, lr: float = 2e-3, out: Optional[str] = None,
             device: Optional[str] = None, dtype: Optional[torch.dtype] = None, engine: Optional[str] = None,
             log_every: int = 0, log: Callable[[str], None] = print, stream=sys.stdout) -> list[float]:
    """Train LoRA adapters on a Llama-shaped model; returns the loss per step (of the whole batch).

    On a terminal the progress line is redrawn in place; elsewhere (a log file, a pipe) a line is
    written every `log_every` steps (0: about ten lines per run) and at the last step.
    Settings that cannot work raise SettingError before anything is built. A NaN or infinite loss
    raises TrainingDiverged and nothing is saved.

    In a process group of several processes (torchrun), `batch` is the global batch and each
    process trains on its share of every batch, under DDP (engine="ddp", the default there) or
    FSDP2 (engine="fsdp"). Only rank 0 logs and saves.
    """
    world = distributed.world_size()
    device, config = check_settings(size, steps, batch, seq, r, lora_alpha, lora_dropout, lr, out, device,
                                    engine, log_every, world)
    engine = engine or ("ddp" if world > 1 else None)
    lead = distributed.rank() == 0
    if not lead:
        log, stream = (lambda *_: None), None
    tty = _is_terminal(stream)
    every = log_every or max(1, steps // 10)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_llama(size, dtype=dtype, device=device, max_positions=max(4096, seq))
    lora = get_lora_model(model, config)
    trainable, total = lora.get_nb_trainable_parameters()
    log(f"Llama '{size}' on {device} ({dtype}): {total:,} parameters, {trainable:,} trainable "
        f"(r={r}, alpha={lora_alpha}, dropout={lora_dropout})")
    if engine:
        log(f"{world} processes ({distributed.ENGINE_NAMES[engine]} over {distributed.backend_for(device)}), each training on "
            f"{batch // world} of the {batch} sequences of every batch")
    trained = distributed.wrap(lora, engine, device) if engine else lora
    # After wrapping: FSDP2 replaces the parameters with sharded ones.
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=lr)
    data = counting_batches(model.config.vocab_size, batch, seq, device=device)
    lora.train()
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        loss = distributed.mean_over_processes(train_step(trained, opt, distributed.shard(next(data)))).item()
        if not math.isfinite(loss):  # the same value on every process: all stop together
            if tty:
                stream.write("\n")
            raise TrainingDiverged(f"the loss became {loss} at step {step}: training stopped, no adapter saved "
                                   f"(lower lr={lr} or lora_alpha={lora_alpha})")
        losses.append(loss)
        if stream is not None and (tty or step % every == 0 or step == steps):
            line = _progress(step, steps, loss, step * batch * seq / (time.perf_counter() - start))
            stream.write(f"\r{line}" if tty else f"{line}\n")
            stream.flush()
    if tty:
        stream.write("\n")
    log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - start:.1f} s")
    if out:
        _save(lora, out, engine, log)
    return losses


def _save(lora, out: str, engine: Optional[str], log) -> None:
    """Rank 0 writes the adapter; under FSDP2 every process first gathers the whole parameters."""
    gathered = distributed.full_parameters(lora) if engine == "fsdp" else contextlib.nullcontext()
    with gathered:
        if distributed.rank() == 0:
            lora.save_pretrained(out)
            log(f"adapter saved to {out} (peft format: adapter_model.safetensors, adapter_config.json)")
    if distributed.active():
        torch.distributed.barrier()  # no process exits (and tears down the group) before the file is written
