"""A frozen base held as torchao's NF4Tensor (torchtune's QLoRA: an nn.Linear whose weight is an NF4Tensor
parameter), against the real torchao: our dequantization of its packed data equals get_original_weight()
bit for bit; layers and models adapted over it match a float64 reference on torchao's dequantized weights
(and peft's LoRA on them); the same adapter over bitsandbytes' NF4 of the same weights stays close;
adapters save and load; unload gives the very NF4 layers back; bad input is refused by name.
"""
import copy
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

torchao = pytest.importorskip("torchao")  # in the test extra: CI fails on a skip
peft = pytest.importorskip("peft")
from torchao.quantization import to_nf4  # noqa: E402

import fused_lora  # noqa: E402
from fused_lora import FusedLoRALinear, LoraConfig, LoraModel, get_lora_model  # noqa: E402
from fused_lora.finetune import LLAMA_TARGETS, counting_batches  # noqa: E402
from fused_lora.quant import QuantizationError, dequantize_rows  # noqa: E402
from fused_lora.quant_convert import as_quantized_linear, is_quantized_base  # noqa: E402
from fused_lora.quant_ops import lora_linear_quant  # noqa: E402
from test_quant_peft import bnb_quantize, lora_grads, tiny_llama  # noqa: E402

NF4Tensor = type(to_nf4(torch.randn(64, 64), 64, 64))


def nf4_weight(w: torch.Tensor, block_size: int = 64, scaler_block_size=None) -> nn.Parameter:
    """w as torchtune holds a frozen base: a non-trainable NF4Tensor parameter. scaler_block_size: torchao's
    default 256 where it divides the number of blocks, else the largest divisor of it up to 256."""
    n_blocks = w.numel() // block_size
    sbs = scaler_block_size or max(d for d in range(1, 257) if n_blocks % d == 0)
    return nn.Parameter(to_nf4(w.detach(), block_size, sbs), requires_grad=False)


def nf4_linear(K, N, dtype=torch.float32, bias=True, block_size=64, scaler_block_size=None, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(K, N, bias=bias, dtype=dtype)
    linear.weight = nf4_weight(linear.weight, block_size, scaler_block_size)
    if bias:
        linear.bias.requires_grad_(False)
    return linear


def nf4_model(model: nn.Module, names) -> nn.Module:
    """Every nn.Linear called one of `names` gets its weight as an NF4Tensor (what torchtune's QLoRA builders do)."""
    for name, m in model.named_modules():
        if type(m) is nn.Linear and name.split(".")[-1] in names:
            m.weight = nf4_weight(m.weight)
    return model


def plain_copy(model: nn.Module, dtype=torch.float64) -> nn.Module:
    """A copy of `model` in `dtype` whose NF4Tensor weights are plain tensors holding torchao's dequantization
    (get_original_weight()). The NF4Tensors are set aside during the deepcopy: torchao's clone re-quantizes."""
    held = {name: m._parameters["weight"] for name, m in model.named_modules()
            if type(m) is nn.Linear and isinstance(m._parameters.get("weight"), NF4Tensor)}
    for name in held:
        model.get_submodule(name)._parameters["weight"] = None
    try:
        out = copy.deepcopy(model).to(dtype)
    finally:
        for name, w in held.items():
            model.get_submodule(name)._parameters["weight"] = w
    for name, w in held.items():
        out.get_submodule(name).weight = nn.Parameter(w.get_original_weight().to(dtype), requires_grad=False)
    return out


# ------------------------------------------------------------------ the packed data, bit for bit

SHAPES = [  # (N, K, block_size, scaler_block_size): torchao needs numel % block == 0, n_blocks % scaler_block == 0
    (64, 256, 64, 256),  # torchtune's defaults
    (6, 128, 64, 3),  # a scaler block that is not a power of two
    (40, 32, 64, 5),  # torchao's blocks span two rows: read as blocks of 32, each scale twice
    (8, 96, 32, 3),  # in_features not a power of two
    (3, 1024, 256, 4),  # odd rows, large blocks
    (5, 2048, 1024, 10),
    (33, 192, 64, 99),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("N,K,block,sbs", SHAPES)
def test_dequantization_bit_exact(N, K, block, sbs, dtype, monkeypatch):
    torch.manual_seed(N * K + block)
    w = torch.randn(N, K, dtype=dtype) * torch.rand(N, 1, dtype=dtype) * 3  # rows of different scales
    t = to_nf4(w, block, sbs)
    linear = nn.Linear(K, N, bias=False, dtype=dtype)
    linear.weight = nn.Parameter(t, requires_grad=False)
    expected = t.get_original_weight()
    # the conversion never dequantizes the weight (no 16-bit copy): torchao's own paths to one would raise
    monkeypatch.setattr(NF4Tensor, "get_original_weight", lambda self: pytest.fail("a 16-bit copy was made"))
    qw = as_quantized_linear(linear).weight
    monkeypatch.undo()
    assert qw.packed.data_ptr() == t.quantized_data.data_ptr()  # torchao's bytes, shared
    assert qw.dtype == dtype and not qw.nested
    assert qw.absmax.numel() == N * K // qw.blocksize and K % qw.blocksize == 0
    assert torch.equal(qw.dequantize(dtype), expected)  # the PyTorch path's chunks
    assert torch.equal(qw.data().dequantize_rows(0, N).to(dtype), expected)  # the layout's reference
    assert torch.equal(dequantize_rows(qw.data(), 1, N).to(dtype), expected[1:])  # a chunk not at row 0


def test_bytes_per_parameter():
    """torchao's packed bytes plus one fp32 scale per block of 64 (the repacked scales): 0.5625 + the code table."""
    qw = as_quantized_linear(nf4_linear(1024, 256)).weight
    assert qw.nbytes() == 1024 * 256 // 2 + 4 * 1024 * 256 // 64 + 16 * 4
    assert qw.bytes_per_param() < 0.563


def test_importing_fused_lora_does_not_import_torchao():
    code = ("import sys, torch, fused_lora\n"
            "m = fused_lora.get_lora_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), "
            "fused_lora.LoraConfig(r=2, target_modules=['0']))\n"
            "m(torch.randn(2, 8))\n"
            "assert 'torchao' not in sys.modules, 'torchao imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ one layer

def _reference(x, W, b, A, B, s):
    """float64: x W^T + b + s (x A^T) B^T, with its gradients in x, A, B by autograd."""
    x, A, B = (t.detach().double().requires_grad_() for t in (x, A, B))
    y = x @ W.double().t() + s * (x @ A.t()) @ B.t()
    return (y + b.double() if b is not None else y), (x, A, B)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_layer_matches_float64_reference(dtype, tol, backend):
    """FusedLoRALinear over an NF4Tensor Linear: output and gradients equal the float64 formula on torchao's
    dequantized weight (tolerance: the compute dtype's rounding; bf16 runs on the torch row only on CPU)."""
    if backend == "triton" and dtype == torch.bfloat16:
        dtype, tol = torch.float16, 3e-3  # the interpreter has no bf16
    base = nf4_linear(256, 96, dtype)
    layer = FusedLoRALinear.from_linear(base, r=8, lora_alpha=16, init_lora_weights=False, backend=backend)
    assert layer.quantized and layer.weight.dtype == dtype
    x = torch.randn(2, 5, 256, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    y64, (x64, A64, B64) = _reference(x, base.weight.get_original_weight(), base.bias, layer.lora_A, layer.lora_B,
                                      layer.scaling)
    y64.backward(dy.double())
    for got, want in ((y, y64), (x.grad, x64.grad), (layer.lora_A.grad, A64.grad), (layer.lora_B.grad, B64.grad)):
        torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=tol)


def test_triton_row_agrees_with_torch_on_the_converted_weight():
    """The converted layout is plain NF4 (fp32 absmax, torchao's levels as the code table): the kernels take it."""
    qw = as_quantized_linear(nf4_linear(128, 64)).weight
    x, A, B = torch.randn(16, 128), torch.randn(8, 128) * 0.1, torch.randn(64, 8) * 0.1
    torch.testing.assert_close(lora_linear_quant(x, qw, None, A, B, 0.5, backend="triton"),
                               lora_linear_quant(x, qw, None, A, B, 0.5, backend="torch"), atol=1e-5, rtol=1e-5)


def test_merge_refused_to_linear_and_unload():
    base = nf4_linear(128, 64)
    layer = FusedLoRALinear.from_linear(base, r=4, init_lora_weights=False)
    with pytest.raises(ValueError, match="quantized"):
        layer.merge()
    merged = layer.to_linear()
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32
    want = base.weight.get_original_weight().double() + layer.scaling * layer.lora_B.double() @ layer.lora_A.double()
    torch.testing.assert_close(merged.weight.double(), want, atol=1e-6, rtol=0)
    model = get_lora_model(nn.Sequential(base), LoraConfig(r=4, target_modules=["0"]))
    back = model.unload()
    assert back[0] is base and isinstance(base.weight, NF4Tensor)  # the very layer, its NF4Tensor as it was


# ------------------------------------------------------------------ models

class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(128, 256)
        self.down = nn.Linear(256, 128)
        self.head = nn.Linear(128, 10)

    def forward(self, x):
        return self.head(torch.relu(self.down(torch.relu(self.up(x)))))


def test_mlp_matches_float64_reference():
    """get_lora_model over an MLP whose Linears hold NF4Tensors (fp32) against peft's LoRA, in float64, on a copy
    holding torchao's dequantized weights, with the same adapter."""
    torch.manual_seed(0)
    model = nf4_model(MLP(), ["up", "down"])
    config = dict(r=4, lora_alpha=8, target_modules=["up", "down", "head"], init_lora_weights=False)
    ref = peft.get_peft_model(plain_copy(model), peft.LoraConfig(**config))
    ours = get_lora_model(model, LoraConfig(**config))
    assert [n for n, layer in ours.lora_layers() if layer.quantized] == ["up", "down"]
    with torch.no_grad():
        for name, layer in ours.lora_layers():
            theirs = ref.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(6, 128)
    y, y64 = ours(x), ref(x.double())
    torch.testing.assert_close(y.double(), y64, atol=1e-5, rtol=1e-5)
    y.square().sum().backward()
    y64.square().sum().backward()
    for name, layer in ours.lora_layers():
        theirs = ref.base_model.model.get_submodule(name)
        torch.testing.assert_close(layer.lora_A.grad.double(), theirs.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(layer.lora_B.grad.double(), theirs.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


def torchao_llama(seed=0):
    return nf4_model(tiny_llama(seed).train(), LLAMA_TARGETS)


def test_llama_matches_float64_peft_reference(tmp_path):
    """A transformers Llama (fp32, random weights) whose attention and MLP Linears hold NF4Tensors, adapted by
    fused_lora; the adapter saved, loaded by peft into a float64 copy holding torchao's dequantized weights:
    logits and every LoRA gradient agree to fp32 rounding."""
    model = torchao_llama()
    reference_base = plain_copy(model)
    ours = get_lora_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    assert sum(layer.quantized for _, layer in ours.lora_layers()) == 14
    ours.save_pretrained(tmp_path)
    ref = peft.PeftModel.from_pretrained(reference_base, tmp_path, is_trainable=True)
    tokens = next(counting_batches(256, 2, 16))
    out, out64 = ours(input_ids=tokens, labels=tokens), ref(input_ids=tokens, labels=tokens)
    torch.testing.assert_close(out.logits.double(), out64.logits, atol=2e-5, rtol=1e-5)
    out.loss.backward()
    out64.loss.backward()
    g, g64 = lora_grads(ours), lora_grads(ref)
    assert g.keys() == g64.keys() and len(g) == 28
    for k, v in g.items():
        torch.testing.assert_close(v.double(), g64[k], atol=1e-6, rtol=1e-4, msg=k)
