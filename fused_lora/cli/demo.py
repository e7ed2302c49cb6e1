"""The tutorial walk-through: LoRA on a small MLP, end to end, on data it makes itself.

    python -m fused_lora demo

Pre-trains an MLP, adapts seq.0 and seq.2 with rank-3 LoRA, fine-tunes on the same and on a new
task, checks the base did not move, adds modules_to_save, merges and unloads, saves the adapter in
peft's format, reloads it onto a fresh copy, and prints the LoRA paper's amplification factor.
"""
from __future__ import annotations

import copy
import math
import os
import tempfile
import time

import torch
from torch import nn

from ..core.analysis import amplification_factor, low_rank_approx
from ..peft_compat.config import LoraConfig
from .distributed import check_device
from ..peft_compat.model import LoraModel, get_lora_model

# The demo's LoRA rank and dtype: what the backend FUSED_LORA_BACKEND forces is checked against, up front.
RANK = 3
DTYPE = torch.float32

# Within this many points of always answering the majority class, an accuracy is chance level
# (200 eval rows: one standard deviation of a coin's accuracy is 3.5 points).
CHANCE_MARGIN = 0.1


class MLP(nn.Module):
    """The tutorial's model: 20 -> 2000 -> 200 -> 2, log-softmax; 442,602 parameters."""

    def __init__(self, num_units_hidden: int = 2000):
        super().__init__()
        self.seq = nn.Sequential(
            nn.Linear(20, num_units_hidden), nn.ReLU(),
            nn.Linear(num_units_hidden, 200), nn.ReLU(),
            nn.Linear(200, 2), nn.LogSoftmax(dim=-1),
        )

    def forward(self, X):
        return self.seq(X)


def make_task(kind: str, n: int):
    """(X, y) for the tutorial's tasks: 'sin' (y = sin(sum x) > 0) and 'sum' (y = sum x > 10)."""
    X = torch.rand(n, 20)
    y = (torch.sin(X.sum(1)) > 0).long() if kind == "sin" else (X.sum(1) > 10).long()
    return X, y


def _loaders(X, y, n_train, batch_size=64):
    train = torch.utils.data.TensorDataset(X[:n_train], y[:n_train])
    evald = torch.utils.data.TensorDataset(X[n_train:], y[n_train:])
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True),
            torch.utils.data.DataLoader(evald, batch_size=batch_size))


def train(model, loaders, epochs, lr=0.002, device="cpu", log=print):
    """Adam + NLL on log-probabilities (CrossEntropy of the tutorial), printing losses per epoch."""
    train_dl, eval_dl = loaders
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    loss_fn = nn.NLLLoss()
    history = []
    for epoch in range(epochs):
        model.train()
        total = count = 0
        for X, y in train_dl:
            X, y = X.to(device), y.to(device)
            loss = loss_fn(model(X), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + loss.item() * len(y), count + len(y)
        model.eval()
        with torch.no_grad():
            ev = sum(loss_fn(model(X.to(device)), y.to(device)).item() * len(y) for X, y in eval_dl)
        history.append((total / count, ev / len(eval_dl.dataset)))
        log(f"  epoch {epoch + 1:2d}/{epochs}  train loss {history[-1][0]:.4f}  eval loss {history[-1][1]:.4f}")
    return history


def accuracy(model, X, y, device="cpu") -> float:
    """Share of rows whose most likely class is the label (model in eval mode)."""
    model.eval()
    with torch.no_grad():
        return (model(X.to(device)).argmax(-1) == y.to(device)).float().mean().item()


def _compare_on_new_task(lora, pretrained, loaders, X_eval, y_eval, eval_loss, device, log) -> dict:
    """Says what step 6 shows: the adapter's eval accuracy beside always answering the majority
    class, full fine-tuning of the pre-trained model and a fresh MLP, each given the same 10 epochs."""
    quiet = lambda line: None  # noqa: E731
    full = copy.deepcopy(pretrained)
    train(full, loaders, 10, device=device, log=quiet)
    scratch = MLP().to(device)
    train(scratch, loaders, 10, device=device, log=quiet)
    acc = {"adapter": accuracy(lora, X_eval, y_eval, device),
           "majority": max(float((y_eval == 1).float().mean()), float((y_eval == 0).float().mean())),
           "full_finetune": accuracy(full, X_eval, y_eval, device),
           "from_scratch": accuracy(scratch, X_eval, y_eval, device)}
    log(f"  eval accuracy after 10 epochs: the adapter {acc['adapter']:.0%}; always the majority class "
        f"{acc['majority']:.0%}; full fine-tuning of the pre-trained model {acc['full_finetune']:.0%}; "
        f"the same MLP trained from scratch {acc['from_scratch']:.0%}")
    if acc["adapter"] < acc["majority"] + CHANCE_MARGIN:
        log(f"  The adapter ends at chance level: eval loss {eval_loss:.3f}, against ln 2 = {math.log(2):.3f} for "
            "answering 50/50. Its falling loss only unlearned the old task's confident answers.")
        if acc["full_finetune"] < acc["majority"] + CHANCE_MARGIN <= acc["from_scratch"]:
            log("  Full fine-tuning does no better in the same 10 epochs while a fresh MLP learns the rule: "
                "the features pre-trained for sin(sum x) do not serve sum(x) > 10. LoRA adapts the features "
                "a base has; this base lacks the ones the new task needs.")
    else:
        log("  The adapter learned the new task: it beats always answering the majority class by "
            f"{acc['adapter'] - acc['majority']:.0%}.")
    return acc


def _counts(model) -> tuple[int, int]:
    return (sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()))


def run(device: str | None = None, log=print) -> dict:
    """The whole walk-through; returns the figures it printed (for tests).

    Before anything runs, the device and the backend FUSED_LORA_BACKEND forces are checked as
    `finetune` checks them: SettingError (a ValueError) naming the problem, e.g. cuda without CUDA."""
    device = str(check_device(device, DTYPE, RANK))
    start = time.perf_counter()
    figures = {}

    log("1. Data")
    torch.manual_seed(0)
    X, y = make_task("sin", 1000)
    figures["class_counts"] = (int((y == 0).sum()), int((y == 1).sum()))
    log(f"  X: {tuple(X.shape)}, y: {figures['class_counts'][0]} zeros, {figures['class_counts'][1]} ones; "
        "800 train / 200 eval, batch 64")
    loaders = _loaders(X, y, 800)

    log("2. Model")
    model = MLP().to(device)
    figures["base_params"] = _counts(model)[1]
    log(f"  {figures['base_params']:,} parameters, all trainable")

    log("3. Pre-training, 20 epochs")
    figures["pretrain"] = train(model, loaders, 20, device=device, log=log)
    pretrained = copy.deepcopy(model)

    log(f"4. LoRA: r={RANK} on seq.0 and seq.2")
    config = LoraConfig(r=RANK, target_modules=["seq.0", "seq.2"])
    lora = get_lora_model(copy.deepcopy(pretrained), config)
    lora.print_trainable_parameters()
    figures["lora_counts"] = lora.get_nb_trainable_parameters()
    layer0 = lora.model.seq[0]
    log(f"  seq.0: lora_A {tuple(layer0.lora_A.shape)}, lora_B {tuple(layer0.lora_B.shape)}, "
        f"nonzeros in B @ A at init: {int(torch.count_nonzero(layer0.lora_B @ layer0.lora_A))}")
    probe = X[800:].to(device)
    with torch.no_grad():
        figures["starts_at_base"] = torch.equal(lora(probe), pretrained(probe))
    log(f"  adapted model starts equal to the base: {figures['starts_at_base']}")

    log("5. Fine-tuning 5 epochs on the same task")
    figures["same_task"] = train(lora, loaders, 5, device=device, log=log)

    log("6. A new task: y = sum(x) > 10, 300 train / 200 eval, 10 epochs")
    X2, y2 = make_task("sum", 500)
    new_loaders = _loaders(X2, y2, 300)
    figures["new_task"] = train(lora, new_loaders, 10, device=device, log=log)
    figures["new_task_accuracy"] = _compare_on_new_task(lora, pretrained, new_loaders, X2[300:], y2[300:],
                                                        figures["new_task"][-1][1], device, log)

    log("7. What moved")
    base_state = pretrained.state_dict()
    unchanged = all(torch.equal(t, base_state[k]) for k, t in lora.model.state_dict().items()
                    if "lora_" not in k)
    moved = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    figures["base_unchanged"] = unchanged
    log(f"  every base tensor equal to the pre-trained copy: {unchanged}; trained: {', '.join(moved)}")

    log("8. modules_to_save=['seq.4']: a full trainable copy of the last layer")
    with_head = get_lora_model(copy.deepcopy(pretrained),
                               LoraConfig(r=RANK, target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"]))
    with_head.print_trainable_parameters()
    figures["with_head_counts"] = with_head.get_nb_trainable_parameters()

    log("9. Merge and unload")
    with torch.no_grad():
        adapted_out = lora(probe)
    merged = copy.deepcopy(lora).merge_and_unload()
    figures["merged_counts"] = _counts(merged)
    with torch.no_grad():
        figures["merged_matches"] = torch.allclose(merged(probe), adapted_out, atol=1e-5, rtol=1e-5)
    plain = not any("lora" in type(m).__name__.lower() for m in merged.modules())
    log(f"  {figures['merged_counts'][1]:,} parameters, {figures['merged_counts'][0]} trainable, plain nn modules: "
        f"{plain}; same outputs as the adapted model: {figures['merged_matches']}")

    log("10. Save the adapter, reload it onto a fresh copy of the pre-trained model")
    with tempfile.TemporaryDirectory() as tmp:
        lora.save_pretrained(tmp)
        size = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        base_size = sum(t.numel() * t.element_size() for t in pretrained.state_dict().values())
        figures["adapter_bytes"] = size
        log(f"  adapter_model.safetensors: {size / 1000:.1f} kB for {figures['lora_counts'][0]:,} parameters "
            f"(the base model's tensors: {base_size / 1e6:.2f} MB)")
        reloaded = LoraModel.from_pretrained(copy.deepcopy(pretrained), tmp).merge_and_unload()
    with torch.no_grad():
        figures["reload_matches"] = torch.allclose(reloaded(probe), merged(probe), atol=1e-6, rtol=1e-6)
    log(f"  reloaded and merged: outputs equal the merged model's: {figures['reload_matches']}")

    log("11. Extras")
    l2 = lora.model.seq[2]
    figures["amplification"] = amplification_factor(l2.delta_weight(), l2.weight, l2.r)
    log(f"  amplification factor of seq.2 (LoRA paper, section 7): {figures['amplification']:.2f}")
    m = torch.randn(5, 5, generator=torch.Generator().manual_seed(0))
    for rank in (1, 2, 5):
        err = torch.linalg.matrix_norm(m - low_rank_approx(m, rank)).item()
        log(f"  rank-{rank} approximation of a random 5 x 5 matrix: Frobenius error {err:.4f}")
    figures["seconds"] = time.perf_counter() - start
    log(f"done in {figures['seconds']:.1f} s on {device}")
    return figures
