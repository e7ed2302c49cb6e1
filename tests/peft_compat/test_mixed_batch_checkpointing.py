"""Activation (gradient) checkpointing with mixed batches in training: the LoraModel's adapter_names
do not reach a layer recomputed in backward, so that recomputation must fail loudly, never give an
adapter another's gradients; names passed to the layers themselves survive recomputation."""
import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from fused_lora import FusedLoRALinear, LoraConfig, get_lora_model
from fused_lora.cli.finetune import build_llama

TOKENS = torch.arange(30).reshape(3, 10) * 7 % 128
TARGETS = ["q_proj", "v_proj"]
NAMES = ["other", "default", "__base__"]


def two_adapters():
    lm = get_lora_model(build_llama("tiny"), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    lm.add_adapter("other", LoraConfig(r=2, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False))
    lm.set_requires_grad(["default", "other"])
    return lm.train()


def grads(lm):
    layer = lm.model.model.layers[0].self_attn.q_proj
    return [None if t.grad is None else t.grad.clone() for n in ("default", "other") for t in layer.adapter_weights(n)]


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_checkpointed_mixed_batch_training_raises_instead_of_wrong_gradients(use_reentrant):
    # Before: reentrant checkpointing recomputed every layer with the active adapter alone ("default"
    # got wrong gradients, "other" none) without a word; non-reentrant raised torch's CheckpointError
    # about a different number of saved tensors, which does not say why.
    lm = two_adapters()
    plain = copy.deepcopy(lm)
    lm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        lm.model.enable_input_require_grads()
    with pytest.raises(RuntimeError, match="checkpointing recomputes this layer in backward without the adapter_names"):
        lm(input_ids=TOKENS, adapter_names=NAMES).logits.square().sum().backward()
    # without names, checkpointed training still gives the plain model's gradients (the mark is cleared)
    lm.zero_grad(set_to_none=True)
    lm(input_ids=TOKENS).logits.square().sum().backward()
    plain(input_ids=TOKENS).logits.square().sum().backward()
    for got, want in zip(grads(lm), grads(plain)):
        assert (got is None) == (want is None)
        if got is not None:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_names_given_to_the_layer_survive_checkpointing(use_reentrant):
    torch.manual_seed(0)
    layer = FusedLoRALinear(16, 8, r=4, init_lora_weights=False)
    layer.add_adapter("other", r=2, lora_alpha=6, init_lora_weights=False)
    layer.set_requires_grad(["default", "other"])
    names = ["other", "__base__", "default"]
    results = []
    for run in (lambda t: layer(t, adapter_names=names),
                lambda t: checkpoint(lambda u: layer(u, adapter_names=names), t, use_reentrant=use_reentrant)):
        layer.zero_grad(set_to_none=True)
        x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        y = run(x)
        y.square().sum().backward()
        results.append([y.detach(), x.grad, *(p.grad for p in layer.parameters() if p.requires_grad)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want)
