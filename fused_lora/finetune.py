"""Fine-tuning a Llama-shaped model with fused_lora, on synthetic tokens (no download).

    python -m fused_lora finetune --size tiny --steps 40 --out ./my_adapter

Builds a transformers Llama from a config with random weights, adapts q/k/v/o and the MLP
projections, trains the adapters with AdamW on token sequences that follow a learnable rule
(each sequence counts up from a random start by a random stride, modulo the vocabulary), shows a
progress line with loss and tokens/s, and saves the adapter in peft's format. Needs `transformers`.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, Iterator, Optional

import torch

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


def train_step(model, optimizer, tokens: torch.Tensor) -> torch.Tensor:
    """Forward with next-token loss, backward, optimizer step; returns the (detached) loss."""
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _progress(step: int, steps: int, loss: float, tok_s: float, width: int = 24) -> str:
    done = int(width * step / steps)
    return f"\r  step {step:4d}/{steps} [{'#' * done}{'.' * (width - done)}] loss {loss:7.4f}  {tok_s:,.0f} tok/s"


def finetune(size: str = "tiny", steps: int = 40, batch: int = 8, seq: int = 64, r: int = 16,
             lora_alpha: float = 32, lora_dropout: float = 0.0, lr: float = 2e-3, out: Optional[str] = None,
             device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
             log: Callable[[str], None] = print, stream=sys.stdout) -> list[float]:
    """Train LoRA adapters on a Llama-shaped model; returns the loss per step."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    model = build_llama(size, dtype=dtype, device=device)
    lora = get_lora_model(model, LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                                            target_modules=LLAMA_TARGETS, task_type="CAUSAL_LM"))
    trainable, total = lora.get_nb_trainable_parameters()
    log(f"Llama '{size}' on {device} ({dtype}): {total:,} parameters, {trainable:,} trainable "
        f"(r={r}, alpha={lora_alpha}, dropout={lora_dropout})")
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=lr)
    data = counting_batches(model.config.vocab_size, batch, seq, device=device)
    lora.train()
    losses, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        losses.append(train_step(lora, opt, next(data)).item())
        stream.write(_progress(step, steps, losses[-1], step * batch * seq / (time.perf_counter() - start)))
        stream.flush()
    stream.write("\n")
    log(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - start:.1f} s")
    if out:
        lora.save_pretrained(out)
        log(f"adapter saved to {out} (peft format: adapter_model.safetensors, adapter_config.json)")
    return losses
