"""Shared test helpers: random LoRA problems and the tolerance rule."""
from __future__ import annotations

import os
import re

import pytest
import torch

from fused_lora.core.reference import lora_linear_ref
from fused_lora.dispatch import registry as dispatch_registry

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/ sits at the root

# atol added to the "2x eager error" rule (below), per dtype. fp32 needs only rounding slack;
# fp16/bf16 slack covers outputs where eager happens to round exactly.
ATOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2,
        # fp32 through TF32 tensor cores (Triton's default for fp32 tl.dot on a GPU) rounds inputs to
        # 10 mantissa bits, like fp16, while eager fp32 is near exact: fp16-level slack, doubled.
        "tf32": 5e-3}


def make_problem(M, K, N, r, dtype=torch.float32, device="cpu", bias=True, seed=0, requires_grad=True):
    """x, W, b, A, B with O(1) outputs; A and B both nonzero so every term matters."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype).to(device)
        return t.requires_grad_(requires_grad)

    x = rnd(M, K)
    w = rnd(N, K, scale=K ** -0.5)
    b = rnd(N) if bias else None
    a = rnd(r, K, scale=K ** -0.5)
    bb = rnd(N, r, scale=r ** -0.5)
    return x, w, b, a, bb


def to64(*ts):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in ts]


def assert_close_rule(out, out_eager, out64, dtype, what="", atol_key=None):
    """flash-attention's rule: |out - ref64| <= 2 |eager same-precision - ref64| + atol (max norm)."""
    out, out_eager, out64 = out.double(), out_eager.double(), out64.double()
    err = (out - out64).abs().max().item() if out.numel() else 0.0
    base = (out_eager - out64).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, out64.abs().max().item()) if out.numel() else 1.0
    bound = 2 * base + ATOL[atol_key or dtype] * scale
    assert err <= bound, f"{what}: max error {err:.3e} > bound {bound:.3e} (eager error {base:.3e}, {dtype})"


def ref_forward_backward(x, w, b, a, bb, scaling, dy, keep=None, p=0.0):
    """Reference output and gradients (x, W, b, A, B) by autograd on the eager formula."""
    y = lora_linear_ref(x, w, b, a, bb, scaling, keep, p)
    params = [t for t in (x, w, b, a, bb) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(y, params, dy, allow_unused=True) if params else []
    it = iter(grads)
    return y.detach(), [next(it) if (t is not None and t.requires_grad) else None for t in (x, w, b, a, bb)]


def backend_module(name):
    """The module of implementation row `name` (its op functions and keep_mask)."""
    from fused_lora import dispatch
    return dispatch.get(name).load()


def check_op_against_reference(backend, M, K, N, r, dtype, p=0.0, device="cpu", bias=True,
                               trainable_base=False, seed=7, scaling=0.5, noncontiguous=False):
    """Forward and every gradient of the op on `backend` against the float64 reference."""
    from fused_lora import dispatch as backends
    from fused_lora.ops.lora import lora_linear

    x, w, b, a, bb = make_problem(M, K, N, r, dtype, device, bias, seed=seed)
    if noncontiguous:  # same values, column-major storage
        x = x.detach().t().contiguous().t().requires_grad_(True)
        assert not x.is_contiguous() or M <= 1
    if not trainable_base:
        w.requires_grad_(False)
        if b is not None:
            b.requires_grad_(False)
    seed_t = torch.tensor(1234 + seed, dtype=torch.int64)
    keep = backend_module(backend).keep_mask(1234 + seed, (M, K), p, device) if p > 0 else None
    dy = torch.randn(M, N, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64).to(dtype).to(device)

    before = backends.calls[("bwd", backend)]
    y = lora_linear(x, w, b, a, bb, scaling, p, seed_t, backend=backend)
    ins = (x, w, b, a, bb)
    needs = [t is not None and t.requires_grad for t in ins]
    got = torch.autograd.grad(y, [t for t, n in zip(ins, needs) if n], dy)
    assert backends.calls[("bwd", backend)] == before + 1, "backward did not run on the requested backend"

    y_eager, g_eager = ref_forward_backward(x, w, b, a, bb, scaling, dy, keep, p)
    y64, g64 = ref_forward_backward(*to64(*ins), scaling, dy.double(), keep, p)
    assert y.shape == (M, N) and y.dtype == dtype
    tf32 = "tf32" if (dtype == torch.float32 and backend == "triton" and str(device).startswith("cuda")) else None
    assert_close_rule(y, y_eager, y64, dtype, "y", tf32)
    it = iter(got)
    for name, n, ge, g6 in zip(("dx", "dW", "db", "dA", "dB"), needs, g_eager, g64):
        if n:
            assert_close_rule(next(it), ge, g6, dtype, name, tf32)


def float64_op_case(p, bias, backend="torch"):
    """(f, inputs) for gradcheck/gradgradcheck: the op on a small float64 problem, every input
    differentiable, a fixed seed (so every evaluation draws the same dropout mask)."""
    from fused_lora.ops.lora import lora_linear

    x, w, b, a, bb = make_problem(5, 7, 6, 3, torch.float64, bias=bias, seed=3)
    seed = torch.tensor(99, dtype=torch.int64)

    def f(x, w, b, a, bb):
        return lora_linear(x, w, b, a, bb, 1.5, p, seed, backend=backend)

    return f, (x, w, b if bias else None, a, bb)


def mixed_batch_keeps(row_adapter, K, specs, seed, keep_mask):
    """The M x K keep masks of a mixed batch by the ops' documented rule, for a backend's `keep_mask`:
    adapter a's own rows, in increasing order, drawn by keep_mask(adapter_seed(seed, a), (m_a, K),
    p_a); None for an adapter without dropout. `specs`: (rank, p) per adapter."""
    from fused_lora.torch_row.multi import adapter_seed
    keeps = []
    for a, (_, p) in enumerate(specs):
        if p == 0.0:
            keeps.append(None)
            continue
        rows = (row_adapter == a).nonzero().squeeze(1)
        keep = torch.zeros(row_adapter.shape[0], K, dtype=torch.bool, device=row_adapter.device)
        keep[rows] = keep_mask(adapter_seed(seed, a), (rows.numel(), K), p, row_adapter.device)
        keeps.append(keep)
    return keeps


def auto_on_cpu(tmp_path, monkeypatch):
    """The real table under the interpreter with auto timing on the CPU and a timer that finds each
    row faster than the one before, so the last row timed (triton-onepass) wins unless refused; the
    registry is installed as backends.REGISTRY (undone by monkeypatch) and returned."""
    from fused_lora import dispatch as backends
    from fused_lora.dispatch import Registry
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []

    def each_faster(fn):
        fn()
        calls.append(1)
        return 10.0 - len(calls)

    reg = Registry(timer=each_faster, cache_directory=str(tmp_path), tuned_devices=("cpu",),
                   name_of=lambda d: "test-device")
    monkeypatch.setattr(dispatch_registry, "REGISTRY", reg)
    return reg


def peft_llama_with_head(r_other: int, targets=("q_proj", "v_proj")):
    """peft over the tiny Llama: a first adapter training a copy of lm_head (modules_to_save, its weight
    scaled so it differs from the original), and a second adapter "other" of rank r_other without one."""
    import peft
    from fused_lora.cli.finetune import build_llama
    ref = peft.get_peft_model(build_llama("tiny"), peft.LoraConfig(r=4, target_modules=list(targets),
                                                                   init_lora_weights=False, modules_to_save=["lm_head"]))
    with torch.no_grad():
        ref.base_model.model.lm_head.modules_to_save["default"].weight.mul_(1.5)
    ref.add_adapter("other", peft.LoraConfig(r=r_other, target_modules=list(targets), init_lora_weights=False))
    return ref


def compiled_and_eager_mixed(layer, x, names, dy, adapters, backend="inductor"):
    """A mixed batch (adapter_names `names`) forward+backward through torch.compile(layer, fullgraph=True) and
    through the layer itself: for each, [y, dx, (db if the bias trains), dA and dB of every adapter in
    `adapters` (None where it got no gradient)]."""
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    outs = []
    for fn in (compiled, layer):
        xi = x.clone().requires_grad_(True)
        y = fn(xi, adapter_names=names)
        y.backward(dy)
        params = [t for n in adapters for t in layer.adapter_weights(n)]
        db = [layer.bias.grad.clone()] if layer.bias is not None and layer.bias.requires_grad else []
        outs.append([y.detach(), xi.grad, *db] + [None if p.grad is None else p.grad.clone() for p in params])
        layer.zero_grad(set_to_none=True)
    return outs


def two_random_adapters(g: torch.Generator, K: int, N: int) -> list:
    """Two (A, B, scaling, dropout_p) adapters of ranks 4 and 2, random, requiring grad, with dropout."""
    def rnd(*shape):
        return torch.randn(*shape, generator=g).requires_grad_()
    return [(rnd(4, K), rnd(N, 4), 0.5, 0.3), (rnd(2, K), rnd(N, 2), 2.0, 0.6)]


def with_a_wrong_element(forward, at=(3, 5), by=1.0):
    """`forward` (returning (Y, H)) with one element of Y off by `by`: a miscompiled tile edge, say."""
    def wrong(*args):
        y, h = forward(*args)
        y[at] += by
        return y, h
    return wrong


TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: through TRITON_INTERPRET=1


def needs_triton(device=TRITON_DEVICE, dtype=torch.float32, rank: int = 16):
    """A skipif mark for tests of the Triton kernels: skipped, naming why, where Triton cannot run them
    (CI sets FUSED_LORA_NO_SKIPS=1, so there a skip fails the run)."""
    from fused_lora import dispatch as backends
    reasons = backends.triton_not_supported_reasons(torch.device(device), dtype, rank)
    return pytest.mark.skipif(reasons != [], reason="Triton cannot run here: " + "; ".join(reasons))


def mlp_adapter(alpha, seed, hidden: int = 64):
    """A LoraModel (r=2 on seq.0 and seq.2) over the demo's MLP (torch.manual_seed(0) weights), its A and B
    random from `seed`: adapters of one `hidden` share keys and shapes and differ in alpha and values, so a
    pair mixing two saves would load silently and compute wrong."""
    from fused_lora import LoraConfig, get_lora_model
    from fused_lora.cli.demo import MLP
    torch.manual_seed(0)
    lm = get_lora_model(MLP(num_units_hidden=hidden), LoraConfig(r=2, lora_alpha=alpha,
                                                                 target_modules=["seq.0", "seq.2"],
                                                                 init_lora_weights=False))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lm.lora_layers():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g))
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g))
    return lm


def llama_quantized_bytes(config: dict, fmt: str = "int8") -> int:
    """The bytes of a Llama's projections (q, k, v, o, gate, up, down in every layer; `config`: finetune.LLAMA_SIZES'
    keys) quantized by quantize_model's defaults. int8: N x K codes and N fp32 scales each. NF4 with double
    quantization in blocks of 64: N x K / 2 bytes of codes, a uint8 absmax index per block, an fp32 scale per 256
    blocks, the 16 + 256 fp32 code tables and the fp32 offset."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = h // config["num_attention_heads"] * config["num_key_value_heads"]
    shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)]  # (N, K)
    if fmt == "int8":
        each = [n * k + 4 * n for n, k in shapes]
    else:
        each = [n * k // 2 + n * k // 64 + 4 * -(-(n * k // 64) // 256) + 4 * (16 + 256 + 1) for n, k in shapes]
    return config["num_hidden_layers"] * sum(each)


def launch_failure(stderr: str) -> str:
    """What a failed torchrun launch printed, for an assertion message: every rank's lines naming an error
    first (the rank that crashed; the others then only report a closed connection, and the tail alone shows
    theirs), then the tail."""
    errors = [line for line in stderr.splitlines() if re.search(r"\[rank\d+\]:.*(Error|Exception)\b", line)
              or re.search(r"terminate called|what\(\):|Fatal Python error|Segmentation fault|Aborted", line)]
    return "\n".join(errors[-20:]) + "\n...\n" + stderr[-2000:]


def quantized_adapted_layer(fmt: str, nested: bool = True, seed: int = 0):
    """FusedLoRALinear (r 4, alpha 8, lora_B drawn N(0, 1)) over nn.Linear(128, 64) quantized to `fmt` ("nf4"
    with or without the nested absmax, or "int8"), from torch.manual_seed(seed)."""
    from torch import nn
    from fused_lora import FusedLoRALinear, QuantizedLinear
    torch.manual_seed(seed)
    kwargs = dict(double_quant=nested) if fmt == "nf4" else {}
    layer = FusedLoRALinear.from_linear(QuantizedLinear.from_linear(nn.Linear(128, 64), fmt, **kwargs), r=4,
                                        lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    return layer


def one_batch_losses(model, tokens, steps: int = 20, lr: float = 1e-3) -> list:
    """The losses of `steps` AdamW steps (on the trainable parameters) of a causal LM learning one batch."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses
