"""A transformers Llama (tiny config, random weights) adapted by fused_lora against peft.

Same adapters give the same logits and gradients; 20 AdamW steps give the same losses; adapters
move both ways; activation checkpointing with dropout regenerates the same masks.
"""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

from fused_lora import LoraConfig, LoraModel, get_lora_model  # noqa: E402
from fused_lora.cli.finetune import LLAMA_TARGETS, build_llama, counting_batches  # noqa: E402

# fp32 on CPU; fused_lora and peft order the same sums differently (addmm_ into Y vs a separate
# add), so values agree to rounding, which AdamW's normalisation can amplify for tiny gradients.
LOGIT_TOL = dict(atol=1e-5, rtol=1e-5)
LOSS_RTOL = 1e-4


def pair(tmp_path, dropout=0.0):
    """The same Llama adapted by fused_lora and by peft, with identical (non-zero) adapters."""
    base = build_llama("tiny", seed=0)
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout,
                                                           target_modules=LLAMA_TARGETS, init_lora_weights=False))
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    return ours, theirs


def lora_grads(model):
    """Adapter gradients keyed 'layers.<i>.<block>.<proj>.lora_A|B' for fused_lora and peft alike."""
    def key(name):
        return name[name.index("layers."):].replace(".default.weight", "")
    return {key(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def test_logits_and_gradients_match_peft(tmp_path):
    ours, theirs = pair(tmp_path)
    tokens = next(counting_batches(256, 2, 16))
    out1, out2 = ours(input_ids=tokens, labels=tokens), theirs(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(out1.logits, out2.logits, **LOGIT_TOL)
    out1.loss.backward()
    out2.loss.backward()
    g1, g2 = lora_grads(ours), lora_grads(theirs)
    assert g1.keys() == g2.keys() and len(g1) == 2 * 7 * 2
    for k, v in g1.items():
        torch.testing.assert_close(v, g2[k], atol=1e-6, rtol=1e-4, msg=k)


def test_twenty_adamw_steps_match_peft(tmp_path):
    ours, theirs = pair(tmp_path)
    losses = []
    for model in (ours, theirs):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        data = counting_batches(256, 4, 16, seed=1)
        run = []
        for _ in range(20):
            tokens = next(data)
            loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[0][-1] < losses[0][0]
    for a, b in zip(*losses):
        assert a == pytest.approx(b, rel=LOSS_RTOL)


def test_peft_adapter_loads_on_llama(tmp_path):
    base = build_llama("tiny", seed=0)
    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS,
                                                                  init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    ours = LoraModel.from_pretrained(copy.deepcopy(base), tmp_path)
    tokens = next(counting_batches(256, 2, 12))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=tokens).logits, pm(input_ids=tokens).logits, **LOGIT_TOL)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointing_with_dropout_gives_same_gradients(use_reentrant):
    def grads(checkpointing):
        model = build_llama("tiny", seed=0)
        lm = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.2, target_modules=LLAMA_TARGETS,
                                              init_lora_weights=False))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        lm.train()
        tokens = next(counting_batches(256, 2, 16))
        torch.manual_seed(1234)
        lm(input_ids=tokens, labels=tokens).loss.backward()
        return {n: p.grad.clone() for n, p in lm.named_parameters() if p.requires_grad}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and len(plain) == 28
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], msg=k)
