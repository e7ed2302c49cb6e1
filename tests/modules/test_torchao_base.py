"""A frozen base held as torchao's NF4Tensor (torchtune's QLoRA: an nn.Linear whose weight is an NF4Tensor
parameter), against the real torchao: our dequantization of its packed data equals get_original_weight()
bit for bit; layers and models adapted over it match a float64 reference on torchao's dequantized weights
(and peft's LoRA on them); the same adapter over bitsandbytes' NF4 of the same weights stays close;
adapters save and load; unload gives the very NF4 layers back; bad input is refused by name.
"""
import copy
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
from fused_lora.cli.finetune import LLAMA_TARGETS, counting_batches  # noqa: E402
from fused_lora.core.formats import dequantize_rows  # noqa: E402
from fused_lora.modules.convert_bnb import as_quantized_linear, is_quantized_base  # noqa: E402
from fused_lora.ops.quant import lora_linear_quant  # noqa: E402
from test_qlora_against_peft import bnb_quantize, lora_grads, tiny_llama  # noqa: E402
from utils import assert_close_rule  # noqa: E402

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

def _formula(x, W, b, A, B, s, dtype):
    """x W^T + b + s (x A^T) B^T computed by autograd in `dtype`, with its gradients in x, A, B."""
    x, A, B = (t.detach().to(dtype).requires_grad_() for t in (x, A, B))
    y = x @ W.to(dtype).t() + s * (x @ A.t()) @ B.t()
    return (y + b.to(dtype) if b is not None else y), (x, A, B)


@pytest.mark.parametrize("backend,dtype", [("torch", torch.float32), ("torch", torch.bfloat16),  # the interpreter:
                                           ("triton", torch.float32), ("triton", torch.float16)])  # no bf16
def test_layer_matches_float64_reference(backend, dtype):
    """FusedLoRALinear over an NF4Tensor Linear: output and gradients against the float64 formula on torchao's
    dequantized weight, by the project's rule (error <= 2 x the eager same-dtype formula's error + atol)."""
    base = nf4_linear(256, 96, dtype)
    layer = FusedLoRALinear.from_linear(base, r=8, lora_alpha=16, init_lora_weights=False, backend=backend)
    assert layer.quantized and layer.weight.dtype == dtype
    x = torch.randn(2, 5, 256, dtype=dtype, requires_grad=True)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    results = []
    for precision in (dtype, torch.float64):
        out, (xr, Ar, Br) = _formula(x, base.weight.get_original_weight(), base.bias, layer.lora_A, layer.lora_B,
                                     layer.scaling, precision)
        out.backward(dy.to(precision))
        results.append((out, xr.grad, Ar.grad, Br.grad))
    got = (y, x.grad, layer.lora_A.grad, layer.lora_B.grad)
    for what, g, eager, ref in zip(("y", "dx", "dA", "dB"), got, *results):
        assert_close_rule(g, eager, ref, dtype, what)


class FrozenNF4Linear(nn.Linear):
    """torchtune's frozen NF4 Linear (torchtune.modules.low_precision.nf4_linear; torchtune is not installed
    here), as torchtune writes it: the weight swapped for its NF4Tensor, forward by torchao's linear_nf4."""
    __module__ = "torchtune.modules.low_precision.nf4_linear"

    def __init__(self, in_dim, out_dim, bias=False, dtype=None):
        super().__init__(in_dim, out_dim, bias=bias, dtype=dtype)
        self.weight.requires_grad_(False)
        torch.utils.swap_tensors(self.weight, nn.Parameter(to_nf4(self.weight.detach()), requires_grad=False))

    def forward(self, x):
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
        out = linear_nf4(input=x, weight=self.weight)
        return out + self.bias if self.bias is not None else out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torchtune_frozen_nf4_linear_computes_as_torchao(dtype):
    """Accepted (its forward is nn.Linear's function); adapted (B nonzero), the layer computes torchao's own
    forward plus the low-rank term."""
    torch.manual_seed(0)
    base = FrozenNF4Linear(256, 64, bias=True, dtype=dtype)
    layer = FusedLoRALinear.from_linear(base, r=4, init_lora_weights=False)
    x = torch.randn(3, 256, dtype=dtype)
    with torch.no_grad():
        A, B = layer.lora_A.to(dtype), layer.lora_B.to(dtype)
        want = base(x) + layer.scaling * (x @ A.t()) @ B.t()  # the eager same-dtype error scale
        ref = _formula(x, base.weight.get_original_weight(), base.bias, layer.lora_A, layer.lora_B, layer.scaling,
                       torch.float64)[0]
        assert_close_rule(layer(x), want, ref, dtype, "y")  # within twice torchao's own error


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
        for ours_p, theirs_p in ((layer.lora_A, theirs.lora_A["default"].weight),
                                 (layer.lora_B, theirs.lora_B["default"].weight)):
            torch.testing.assert_close(ours_p.grad.double(), theirs_p.grad, atol=1e-5, rtol=1e-4)


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


def test_llama_adapter_saves_loads_merges_and_unloads(tmp_path):
    model = torchao_llama()
    nf4_layers = {n: m for n, m in model.named_modules() if is_quantized_base(m)}
    ours = get_lora_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, init_lora_weights=False))
    tokens = next(counting_batches(256, 2, 12, seed=3))
    ours(input_ids=tokens, labels=tokens).loss.backward()
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p -= 0.5 * p.grad
        expected = ours(input_ids=tokens).logits
    ours.save_pretrained(tmp_path)
    again = LoraModel.from_pretrained(torchao_llama(), tmp_path)  # the same NF4 bytes, the adapter from the file
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens).logits, expected)
        merged = again.merge_and_unload()  # 16-bit nn.Linear holding dequantize(W) + s B A, as peft's
        proj = merged.model.layers[1].mlp.down_proj
        assert type(proj) is nn.Linear and not isinstance(proj.weight, NF4Tensor) and proj.weight.dtype == torch.float32
        torch.testing.assert_close(merged(input_ids=tokens).logits, expected, atol=1e-5, rtol=1e-5)
    back = ours.unload()  # the very NF4 layers, their NF4Tensors as they were
    assert {n: m for n, m in back.named_modules() if is_quantized_base(m)} == nf4_layers
    assert all(isinstance(m.weight, NF4Tensor) for m in nf4_layers.values())


def test_same_adapter_over_bitsandbytes_nf4_stays_close():
    """The same adapter trained over torchao's NF4 and over bitsandbytes' NF4 of the same float weights.
    The bases differ by delta = max relative (Frobenius) difference of their dequantized weights (two rounding
    rules: torchao's 4-decimal levels and int8 scales, bitsandbytes' exact levels and 8-bit dynamic-code
    scales; about 0.7% here). A relative change delta of each W moves each layer's output by at most delta
    relative (|dW x| <= delta |W| |x|), which the residual stream does not compound over two layers: the logits
    stay within delta of each other at every step, and the adapter updates (gradients through the same
    weights) within 2 delta."""
    bnb = pytest.importorskip("bitsandbytes")
    plain = tiny_llama()
    tao = nf4_model(copy.deepcopy(plain), LLAMA_TARGETS)
    theirs = bnb_quantize(copy.deepcopy(plain), LLAMA_TARGETS, "nf4", nested=True).train()
    delta = 0.0
    for name, m in tao.named_modules():
        if is_quantized_base(m):
            q = theirs.get_submodule(name).weight
            w_tao, w_bnb = m.weight.get_original_weight(), bnb.functional.dequantize_4bit(q.data, q.quant_state)
            delta = max(delta, ((w_tao - w_bnb).norm() / w_tao.norm()).item())
    assert 0 < delta < 0.02
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LLAMA_TARGETS, init_lora_weights=False)
    models = [get_lora_model(tao, config), get_lora_model(theirs, config)]
    params = [[p for p in m.parameters() if p.requires_grad] for m in models]
    with torch.no_grad():
        for a, b in zip(*params):
            b.copy_(a)
    start = [p.detach().clone() for p in params[0]]
    optimizers = [torch.optim.SGD(p, lr=0.1) for p in params]
    for _, tokens in zip(range(5), counting_batches(256, 4, 16)):
        out = [m(input_ids=tokens, labels=tokens) for m in models]
        assert (out[0].logits - out[1].logits).norm() <= delta * out[0].logits.norm()
        assert abs(out[0].loss.item() - out[1].loss.item()) <= delta * out[0].loss.item()
        for o, opt in zip(out, optimizers):
            opt.zero_grad()
            o.loss.backward()
            opt.step()
    for a, b, s in zip(*params, start):
        assert (a - b).norm() <= 2 * delta * (a - s).norm()


# ------------------------------------------------------------------ refusals

def _refused(linear, match):
    with pytest.raises(ValueError, match=match):
        FusedLoRALinear.from_linear(linear)
    with pytest.raises(ValueError, match=match):
        get_lora_model(nn.Sequential(linear), LoraConfig(target_modules=["0"]))
    assert isinstance(linear.weight, NF4Tensor)  # nothing changed


def test_block_size_we_cannot_take():
    # torchao needs only numel % block_size == 0; a row of 48 elements is no whole number of our blocks
    _refused(nf4_linear(48, 4, block_size=64), "block_size 64 with in_features 48")


def test_nf4_tensor_on_meta():
    linear = nn.Linear(256, 64, device="meta")
    linear.weight = nf4_weight(linear.weight)
    _refused(linear, "meta device")


def test_float64_nf4_tensor():
    _refused(nf4_linear(256, 64, dtype=torch.float64), "float64 is not supported")


def test_transposed_nf4_tensor():
    linear = nf4_linear(128, 128)
    linear.weight = nn.Parameter(linear.weight.t(), requires_grad=False)
    _refused(linear, "strided view")


def test_subclass_with_its_own_forward():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)
    linear = Doubled(256, 64)
    linear.weight = nf4_weight(linear.weight)
    _refused(linear, "overrides nn.Linear's forward")


def test_inconsistent_nf4_tensor():
    linear = nf4_linear(256, 64)
    linear.weight.quantized_scalers = linear.weight.quantized_scalers[:-1]
    _refused(linear, "quantized_scalers holds 255")


def test_hooks_dora_modules_to_save_and_merge_refused():
    linear = nf4_linear(256, 64)
    handle = linear.register_forward_hook(lambda *args: None)
    _refused(linear, "forward_hooks")
    handle.remove()
    with pytest.raises(ValueError, match="quantized base"):
        FusedLoRALinear.from_linear(linear, use_dora=True)
    with pytest.raises(ValueError, match="modules_to_save"):
        get_lora_model(nn.Sequential(nn.Linear(64, 64), linear),
                       LoraConfig(target_modules=["0"], modules_to_save=["1"]))


def test_fsdp_row_shard_reads_bit_exact():
    """torch.split along rows (how FSDP shards an NF4Tensor) gives shards holding their part of the packed data."""
    shard = torch.split(to_nf4(torch.randn(256, 256), 64, 256), 128, dim=0)[1]
    linear = nn.Linear(256, 128, bias=False)
    linear.weight = nn.Parameter(shard, requires_grad=False)
    assert torch.equal(as_quantized_linear(linear).weight.dequantize(), shard.get_original_weight())


def test_quantize_model_leaves_nf4_layers_alone():
    """quantize_model skips Linears that are already quantized (torchao's too), naming them when nothing is left."""
    model = nn.Sequential(nf4_linear(256, 64), nn.Linear(64, 64), nn.Linear(64, 8))
    fused_lora.quantize_model(model, target_modules=["0", "1"])
    assert isinstance(model[0].weight, NF4Tensor) and isinstance(model[1], fused_lora.QuantizedLinear)
    with pytest.raises(ValueError, match="already quantized: '0'"):
        fused_lora.quantize_model(nn.Sequential(nf4_linear(256, 64)), target_modules=["0"])
