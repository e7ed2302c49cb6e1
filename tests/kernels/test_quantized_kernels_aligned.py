"""The NF4 kernels' fast path (ALIGNED: rows of whole absmax blocks, the layout every fused_lora.modules.quantized
and bitsandbytes weight has) and the general path's fixed flag set, against the reference on the
dequantized weight (test_quant_kernels' rule: W = wq.dequantize_rows cast to the compute dtype, then
the float64 reference; on CPU through TRITON_INTERPRET=1)."""
import pytest
import torch

from fused_lora.kernels.quantized.launchers import aligned_nf4
from test_quantized_kernels import DTYPES, bnb_nf4, check_against_reference, random_nf4, _gen, pytestmark  # noqa: F401


def _gpu_tiles(monkeypatch, forward=(32, 32, 64), dx=(32, 128, 32)):
    """Run the kernels with the GPU configs' W runs: 64 columns per forward step, 128 per dX tile
    (two 64-column runs, each its own absmax), where the interpreter's own config has 32."""
    from fused_lora.kernels import configs
    from fused_lora.kernels.quantized import launchers as quant
    tiles = {"quant_forward": configs._cfg(*forward, 4, 1, group=2), "quant_dx": configs._cfg(*dx, 4, 1, group=2)}
    monkeypatch.setattr(configs, "quant_candidates", lambda name, *args: [tiles[name]])
    quant._tuned.cache_clear()


@pytest.fixture
def gpu_tiles(monkeypatch):
    from fused_lora.kernels.quantized import launchers as quant
    _gpu_tiles(monkeypatch)
    yield
    monkeypatch.undo()
    quant._tuned.cache_clear()


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)  # bf16 too on CUDA
def test_aligned_path_with_gpu_runs(nested, blocksize, dtype, gpu_tiles):
    # K = 3 blocks of 64 (or 1.5 / 0.75 of the larger blocks: K = 192 is a multiple of 64 only, so
    # blocksize 128 and 256 use K = 256 and 512). The last dX tile of 128 columns at K = 192 has
    # its second run outside the weight; N odd, M not a multiple of the tiles.
    K = {64: 192, 128: 256, 256: 512}[blocksize]
    wq = random_nf4(37, K, blocksize, nested, seed=21)
    assert aligned_nf4(wq)
    check_against_reference(wq, 45, 5, dtype, p=0.0, bias=False)
    check_against_reference(wq, 19, 3, dtype, p=0.2, bias=True)


@pytest.mark.parametrize("nested", [False, True])
def test_aligned_path_interpreter_tiles(nested):
    # The interpreter's config: 32-column runs in both kernels, several per block.
    wq = random_nf4(34, 128, 64, nested, seed=22)
    assert aligned_nf4(wq)
    check_against_reference(wq, 37, 4, torch.float32, p=0.0, bias=True)
    check_against_reference(wq, 37, 4, torch.float16, p=0.1, bias=False)


@pytest.mark.parametrize("blocksize,nested", [(64, True), (128, False), (256, True)])
def test_aligned_path_on_bitsandbytes_data(blocksize, nested, gpu_tiles):
    w = torch.randn(40, 256, generator=_gen(23)) * 256 ** -0.5
    wq = bnb_nf4(w, blocksize, nested)
    assert aligned_nf4(wq)
    check_against_reference(wq, 33, 8, torch.float32, p=0.0)
    check_against_reference(wq, 33, 8, torch.float16, p=0.1, bias=False)


@pytest.mark.parametrize("nested", [False, True])
def test_general_path_without_bias_or_dropout(nested, gpu_tiles):
    # Rows of part blocks (K = 70; odd K = 45): the general path, compiled with a bias and with the
    # low-rank term of dX through memory only; the launcher passes zeros and G A there.
    for K in (70, 45):
        wq = random_nf4(34, K, 64, nested, seed=24)
        assert not aligned_nf4(wq)
        check_against_reference(wq, 29, 4, torch.float32, p=0.0, bias=False)


def test_aligned_flag_is_what_the_launcher_passes():
    from fused_lora.kernels.quantized.launchers import _weight_args
    from test_quantized_kernels import random_int8
    assert _weight_args(random_nf4(8, 128, 64))[2]["ALIGNED"] is True
    assert _weight_args(random_nf4(8, 128, 128, nested=True))[2]["ALIGNED"] is True
    assert _weight_args(random_nf4(8, 192, 128))[2]["ALIGNED"] is False  # rows end inside a block
    assert _weight_args(random_int8(8, 128))[2]["ALIGNED"] is False


def test_every_flag_set_the_launchers_pass_is_compiled_by_the_gate(monkeypatch):
    # The general NF4 path is compiled with one flag set only (HAS_BIAS, LOW_RANK_IN_DX): the
    # launchers must never pass another, for any format, bias or dropout.
    import itertools
    from fused_lora.kernels import compile_check
    from fused_lora.kernels.quantized import launchers as quant
    from test_quantized_kernels import lora_inputs, make_weight
    seen = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                keys = {k for f in compile_check.FLAGS[self.name] for k in f}
                seen.append((self.name, {k: v for k, v in kwargs.items() if k in keys}))
            return launch

    monkeypatch.setattr(quant, "_quant_launcher", lambda name, x: Recorder(name))
    for fmt, K, bias, p in itertools.product(("nf4", "nf4-nested", "int8"), (128, 70), (True, False), (0.0, 0.3)):
        wq = make_weight(fmt, 16, K, seed=25)
        x, b, a, bb, dy = lora_inputs(8, K, 16, 2, torch.float32, bias)
        y, h = quant.forward_quant(x, wq, b, a, bb, 0.5, p, 3)
        quant.backward_quant(dy, x, wq, a, bb, h, 0.5, p, 3, True, True)
    assert len(seen) == 2 * 3 * 2 * 2 * 2
    for name, flags in seen:
        assert flags in compile_check.FLAGS[name], (name, flags)
