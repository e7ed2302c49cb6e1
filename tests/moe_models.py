"""Tiny transformers mixture-of-experts models built from configs (random weights, no download), for the expert
LoRA tests: one decoder layer, 4 experts, top-2, hidden size 16. Weights are drawn N(0, 0.2) (the models' own
init, std 0.02, would leave the experts' contribution below fp32 rounding of the logits)."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

VOCAB, HIDDEN, EXPERTS, TOP_K = 64, 16, 4, 2
PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def _common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def _build(kind: str, experts: int = EXPERTS):
    t = transformers
    if kind == "qwen3_moe":
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**_common(intermediate_size=32, moe_intermediate_size=8,
                                                                num_experts=experts, num_experts_per_tok=TOP_K)))
    if kind == "qwen3_moe_dense0":  # two layers, the first a dense MLP (mlp_only_layers): real *_proj Linears
        return t.Qwen3MoeForCausalLM(t.Qwen3MoeConfig(**{**_common(intermediate_size=32, moe_intermediate_size=8,
                                                                   num_experts=experts, num_experts_per_tok=TOP_K,
                                                                   mlp_only_layers=[0]), "num_hidden_layers": 2}))
    if kind == "mixtral":
        return t.MixtralForCausalLM(t.MixtralConfig(**_common(intermediate_size=8, num_local_experts=EXPERTS,
                                                             num_experts_per_tok=TOP_K)))
    if kind == "olmoe":
        cfg = _common(intermediate_size=8, num_experts=EXPERTS, num_experts_per_tok=TOP_K)
        cfg.pop("head_dim")
        return t.OlmoeForCausalLM(t.OlmoeConfig(**cfg))
    if kind == "qwen2_moe":
        return t.Qwen2MoeForCausalLM(t.Qwen2MoeConfig(**_common(
            intermediate_size=32, moe_intermediate_size=8, shared_expert_intermediate_size=8, num_experts=EXPERTS,
            num_experts_per_tok=TOP_K)))
    if kind == "gpt_oss":  # transposed (experts, in, out) stacks, biases, gate and up interleaved
        return t.GptOssForCausalLM(t.GptOssConfig(**_common(intermediate_size=8, num_local_experts=EXPERTS,
                                                            num_experts_per_tok=TOP_K,
                                                            layer_types=["full_attention"])))
    raise ValueError(kind)


KINDS = ["qwen3_moe", "mixtral", "olmoe", "qwen2_moe", "gpt_oss"]


def tiny_moe(kind: str, seed: int = 0, dtype=torch.float32, experts: int = EXPERTS):
    """A tiny MoE causal LM of `kind` with N(0, 0.2) weights (norms' weights 1); `experts` for qwen3_moe."""
    torch.manual_seed(seed)
    model = _build(kind, experts)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.2)
    return model.to(dtype).eval()


def experts_of(model):
    """The (one) experts module of a tiny MoE model."""
    return next(m for n, m in model.named_modules() if n.endswith("mlp.experts"))


def token_ids(batch: int = 2, seq: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def standalone_experts(kind: str, seed: int = 0):
    """An experts module alone (its class from transformers, built from the model's config), for the flags no
    causal LM above has: "nemotron_h" (has_gate=False: up_proj, act_fn) and "muse_spark" (has_post_expert_norm)."""
    if kind == "nemotron_h":
        from transformers.models.nemotron_h.configuration_nemotron_h import NemotronHConfig
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts
        module = NemotronHExperts(NemotronHConfig(hidden_size=HIDDEN, moe_intermediate_size=8,
                                                  n_routed_experts=EXPERTS, num_experts_per_tok=TOP_K))
    elif kind == "muse_spark":
        from transformers.models.muse_spark.configuration_muse_spark import MuseSparkTextConfig
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts
        module = MuseSparkExperts(MuseSparkTextConfig(hidden_size=HIDDEN, moe_hidden_size=HIDDEN, num_attention_heads=2,
                                                      num_key_value_heads=1, head_dim=8, moe_intermediate_size=8,
                                                      num_local_experts=EXPERTS))
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, 0.3)
    return module


def routing(tokens: int = 7, experts: int = EXPERTS, top_k: int = TOP_K, seed: int = 2, only=None):
    """hidden_states (tokens, HIDDEN), top_k_index and top_k_weights (tokens, top_k) as a router gives them (distinct
    experts per token, weights summing to 1); `only`: every token's first choice is that expert."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, HIDDEN, generator=g)
    index = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    if only is not None:
        index = torch.tensor([[only] + [e for e in range(experts) if e != only][:top_k - 1]] * tokens)
    weights = torch.rand(tokens, top_k, generator=g).softmax(-1)
    return x, index, weights


def train_side_by_side(a, b, seed: int, steps: int = 20) -> None:
    """`steps` AdamW steps (lr 1e-2) of two models on the same random token batches, asserting their losses agree
    at every step (1e-4 relative)."""
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (a, b)]
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids = torch.randint(0, VOCAB, (2, 6), generator=g)
        losses = []
        for model, opt in zip((a, b), opts):
            opt.zero_grad()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), (step, losses)
