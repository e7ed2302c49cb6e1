"""LoRA on a mixture-of-experts block (issue 20 item 7): fused_lora's expert LoRA against peft's target_parameters
and the base block without LoRA (the floor), in one run.

    python benchmarks/bench_moe.py                 # CPU fp32: 8 experts, top-2, 512 tokens, hidden 512, expert 1024
    python benchmarks/bench_moe.py --gpu-suite     # CUDA bf16: 16 experts, top-2, 8192 tokens, hidden 2048, expert 1536
    python benchmarks/bench_moe.py --tokens 512 --experts 16 --top-k 4 --hidden 2048 --intermediate 768
                                                   # CPU, a Qwen3-MoE-like expert width (its hidden and expert sizes)

The CPU default is a toy width, chosen to run in seconds: there the low-rank products' share of the FLOPs,
1.5 r (K + N) / (K N) per projection, is 5.9%, against 2.7% at the Qwen3-MoE-like width above.

The block is transformers' Qwen3MoeExperts (its gate_up_proj (E, 2I, H) and down_proj (E, H, I) stacks) with fixed
top-k routing (indices and weights from a random router, the weights requiring grad as a router's do); the input
requires grad. LoRA r=16 (alpha 32) on gate_up_proj and down_proj. Variants:

    base         the block alone, transformers' "grouped_mm" experts implementation (torch's grouped GEMM where it
                 runs, transformers' per-expert loop elsewhere): the floor
    base eager   the block alone, transformers' "eager" implementation (its loop over the experts hit)
    fused_lora   get_lora_model(LoraConfig(target_parameters=[...])): the "fused_lora" implementation, each projection
                 x_e W_e^T + s B_e A_e x_e through fused_lora.ops.grouped, W + s B A never formed
    peft         peft's target_parameters (ParamWrapper: W + s B A folded into each stack on every forward, then the
                 "grouped_mm" implementation)
    patch_peft   the peft model after fused_lora.patch_peft (the grouped op on peft's tensors)

Reported: forward and forward+backward medians and their ratios to the base (and fused_lora's to peft), from one
run; memory held after forward and the forward+backward peak, each above what existed before (harness.memory_mib),
and the peak over the base's, beside what the issue allows fused_lora (the LoRA parameters, their gradients and
O(tokens x r) activations: `allowance`, computed here as params + grads + 4 x rows x r per projection) and what
peft's fold costs (one expert stack per adapted parameter: `stacks`). Writes a CSV.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import bench_device, environment, memory_mib, time_variants, write_csv  # noqa: E402

from fused_lora import LoraConfig, get_lora_model, patch_peft  # noqa: E402
from fused_lora.modules.experts import register_experts_implementation  # noqa: E402
from fused_lora.peft_compat.experts import from_peft_A, from_peft_B  # noqa: E402

OUT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
PARAMS = ["experts.gate_up_proj", "experts.down_proj"]
HEADER = (f"{'variant':<12} {'fwd ms':>9} {'fwd x':>7} {'f+b ms':>9} {'f+b x':>7} {'vs peft':>8} {'held MiB':>9} "
          f"{'peak MiB':>9} {'over base':>10}")


class Block(nn.Module):
    """The experts module of an MoE layer under a name peft and fused_lora can target (`experts.*`)."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return self.experts(hidden_states, top_k_index, top_k_weights)


def experts_module(E: int, H: int, I: int, dtype, device, implementation: str) -> nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts
    config = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2)
    config._experts_implementation = implementation
    torch.manual_seed(0)
    module = Qwen3MoeExperts(config)
    with torch.no_grad():
        module.gate_up_proj.normal_(0, H ** -0.5)
        module.down_proj.normal_(0, I ** -0.5)
    return module.to(device=device, dtype=dtype).requires_grad_(False)


def routing(T: int, E: int, k: int, H: int, dtype, device):
    """hidden_states (T, H) and a router's top-k choice (indices, softmaxed weights) of random logits."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype).requires_grad_(True)
    logits = torch.randn(T, E, generator=g)
    weights, index = logits.softmax(-1).topk(k, dim=-1)
    weights = (weights / weights.sum(-1, keepdim=True)).to(device=device, dtype=dtype).requires_grad_(True)
    return x, index.to(device), weights


def variants(E, H, I, r, dtype, device) -> dict[str, nn.Module]:
    import peft
    register_experts_implementation()
    out = {"base": Block(experts_module(E, H, I, dtype, device, "grouped_mm")),
           "base eager": Block(experts_module(E, H, I, dtype, device, "eager"))}
    out["fused_lora"] = get_lora_model(Block(experts_module(E, H, I, dtype, device, "grouped_mm")),
                                       LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=PARAMS,
                                                  init_lora_weights=False), autocast_adapter_dtype=False)
    out["peft"] = peft.get_peft_model(Block(experts_module(E, H, I, dtype, device, "grouped_mm")),
                                      peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=[],
                                                      target_parameters=PARAMS, init_lora_weights=False),
                                      autocast_adapter_dtype=False)
    out["patch_peft"] = patch_peft(copy.deepcopy(out["peft"]), verbose=False)
    for m in out.values():
        m.train()
    return out


def allowance_MiB(T: int, k: int, E: int, H: int, I: int, r: int, itemsize: int) -> dict[str, float]:
    """What the issue allows fused_lora above the base (LoRA params + grads + O(rows x r)), and peft's fold (one
    expert stack per adapted parameter), in MiB."""
    params = E * r * (H + 2 * I) + E * r * (I + H)  # gate_up: A (E, r, H), B (E, 2I, r); down: A (E, r, I), B (E, H, r)
    rows = T * k
    return {"lora_params": params * itemsize / 2**20,
            "allowance": (2 * params + 4 * rows * r * 2) * itemsize / 2**20,
            "stacks": E * (2 * I * H + H * I) * itemsize / 2**20}


@torch.no_grad()
def check_against_peft(models: dict, x, index, weights) -> float:
    """Give fused_lora's model peft's adapter (its factors in our layout) and return the largest difference of the
    block's outputs relative to the output's scale (both then compute the same function)."""
    ours, theirs = models["fused_lora"], models["peft"]
    layers = {param: layer for _, param, layer in ours.expert_layers()}
    wrapper = theirs.base_model.model.experts
    while hasattr(wrapper, "parameter_name"):
        layer = layers[wrapper.parameter_name]
        layer.lora_A.copy_(from_peft_A(wrapper.lora_A["default"].weight, layer.num_experts))
        layer.lora_B.copy_(from_peft_B(wrapper.lora_B["default"].weight, layer.num_experts))
        wrapper = wrapper.base_layer
    want = theirs(x, index, weights).float()
    return ((ours(x, index, weights).float() - want).abs().max() / want.abs().max()).item()


def bench(T, E, k, H, I, r, dtype, device, reps):
    x, index, weights = routing(T, E, k, H, dtype, device)
    dy = torch.randn(T, H, device=device, dtype=dtype)
    fns, mems = {}, {}
    models = variants(E, H, I, r, dtype, device)
    error = check_against_peft(models, x, index, weights)
    tolerance = 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
    print(f"# correctness: fused_lora's block against peft's with the same adapter: max |difference| / max |output| "
          f"= {error:.2e} ({'ok' if error <= tolerance else 'MISMATCH'}, tolerance {tolerance:g})")
    if not error <= tolerance:
        raise SystemExit(1)
    for name, m in models.items():
        def fwd(m=m):
            with torch.no_grad():
                m(x, index, weights)

        def fwdbwd(m=m):
            m(x, index, weights).backward(dy)
            x.grad = weights.grad = None
            for p in m.parameters():
                p.grad = None
        fwdbwd()  # warm (autotuning, first-call checks)
        fns[(name, "fwd")], fns[(name, "fwdbwd")] = fwd, fwdbwd
        mems[name] = memory_mib(lambda m=m: m(x, index, weights), lambda y: y.backward(dy), device)
        x.grad = weights.grad = None
        for p in m.parameters():
            p.grad = None
    ms = time_variants(fns, device, reps=reps)
    base_f, base_fb = ms[("base", "fwd")], ms[("base", "fwdbwd")]
    rows = []
    for name in mems:
        rows.append(dict(T=T, E=E, top_k=k, H=H, I=I, r=r, variant=name, fwd_ms=round(ms[(name, "fwd")], 3),
                         fwd_x=round(ms[(name, "fwd")] / base_f, 3), fwdbwd_ms=round(ms[(name, "fwdbwd")], 3),
                         fwdbwd_x=round(ms[(name, "fwdbwd")] / base_fb, 3),
                         fwdbwd_vs_peft=round(ms[(name, "fwdbwd")] / ms[("peft", "fwdbwd")], 3),
                         held_MiB=round(mems[name][0], 2), peak_MiB=round(mems[name][1], 2),
                         peak_over_base_MiB=round(mems[name][1] - mems["base"][1], 2)))
    return rows


def format_row(row: dict) -> str:
    return (f"{row['variant']:<12} {row['fwd_ms']:>9} {row['fwd_x']:>7} {row['fwdbwd_ms']:>9} {row['fwdbwd_x']:>7} "
            f"{row['fwdbwd_vs_peft']:>8} {row['held_MiB']:>9} {row['peak_MiB']:>9} {row['peak_over_base_MiB']:>10}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu-suite", action="store_true", help="CUDA, bf16, the GPU shape")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--experts", type=int)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--intermediate", type=int)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", default=os.path.join(OUT_DIR, "moe.csv"))
    args = ap.parse_args(argv)
    device = bench_device(ap, args.gpu_suite)
    gpu = device == "cuda"
    T, E, H, I = (8192, 16, 2048, 1536) if gpu else (512, 8, 512, 1024)
    T, E, H, I = args.tokens or T, args.experts or E, args.hidden or H, args.intermediate or I
    dtype = torch.bfloat16 if gpu else torch.float32
    if not gpu:
        torch.set_num_threads(args.threads)
    print(f"# {environment(device)}; {dtype}" + ("" if gpu else f"; {args.threads} thread(s)"))
    print(f"# MoE block: {T} tokens, top-{args.top_k} of {E} experts, hidden {H}, expert intermediate {I}; "
          f"LoRA r={args.rank} on gate_up_proj and down_proj")
    rows = bench(T, E, args.top_k, H, I, args.rank, dtype, device, args.reps)
    print(HEADER)
    for row in rows:
        print(format_row(row))
    a = allowance_MiB(T, args.top_k, E, H, I, args.rank, torch.empty((), dtype=dtype).element_size())
    get = {row["variant"]: row for row in rows}
    print(f"# memory over the base (fwd+bwd peak): fused_lora {get['fused_lora']['peak_over_base_MiB']} MiB "
          f"(allowance: LoRA params + grads + 4 x rows x r per projection = {a['allowance']:.2f} MiB; the LoRA "
          f"params alone {a['lora_params']:.2f} MiB), peft {get['peft']['peak_over_base_MiB']} MiB (the two adapted "
          f"stacks are {a['stacks']:.2f} MiB)")
    target = 1.10 if gpu else 1.15
    fl = get["fused_lora"]
    print(f"# targets: fused_lora f+b <= {target}x the base: {fl['fwdbwd_x']} ({'met' if fl['fwdbwd_x'] <= target else 'NOT met'}); "
          f"faster than peft: {fl['fwdbwd_vs_peft']} ({'met' if fl['fwdbwd_vs_peft'] < 1 else 'NOT met'}); "
          f"memory within the allowance: {'met' if fl['peak_over_base_MiB'] <= a['allowance'] else 'NOT met'}")
    for row in rows:
        row.update(allowance_MiB=round(a["allowance"], 2), stacks_MiB=round(a["stacks"], 2))
    write_csv(args.out, rows)
    print(f"# wrote {args.out}")


if __name__ == "__main__":
    main()
