"""Several processes (torch.distributed, gloo, 2 CPU processes): DDP and FSDP2 train exactly what one
process trains on the full batch, over a 16-bit base and over a quantized one (which FSDP2 shards: each
process holds about half of its bytes), and `python -m fused_lora finetune` runs under torchrun.

The worker (tests/distributed_worker.py) is launched once for the module: torchrun's start is most of the
cost of these tests."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from fused_lora.cli import distributed  # noqa: E402
from fused_lora.cli.finetune import LLAMA_SIZES, SettingError, check_settings, counting_batches, finetune  # noqa: E402

from utils import REPO_ROOT, launch_failure, llama_quantized_bytes  # noqa: E402  (tests/ is on sys.path: conftest.py)
ROOT = REPO_ROOT
sys.path.insert(0, os.path.join(ROOT, "tests"))
from distributed_worker import (QUANTIZED_FORMATS, QUANTIZED_LLAMA, SETTINGS, command_args,  # noqa: E402
                                quantized_training)

# Tolerance. The processes sum the same float32 numbers in another order (each half of the batch,
# then the all-reduce / reduce-scatter), so the gradients differ from one process's in the last bits
# (~1e-7 relative): the losses agree to ~1e-6. AdamW then divides each element's gradient by its own
# running magnitude, so an element whose gradient is near zero (it happens in lora_A) turns that
# rounding difference into a different step of up to lr: a handful of elements may differ by up
# to lr per step (seen: 2 of 1024 by 1.7e-5), while the tensor as a whole agrees to ~1e-6
# relative. So each tensor must agree to 1e-4 relative in Frobenius norm, and every element to
# within one step (lr). A real defect (a process on the wrong rows or on the whole batch without
# averaging, gradients not synchronised, a step missed) moves whole tensors by ~lr per element,
# i.e. ~1e-2 relative or more, and the losses in the 3rd decimal.
REL = 1e-4


def _torchrun(args, out_dir, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, timeout=timeout, env=env, cwd=out_dir)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: one process, the full batch."""
    out = tmp_path_factory.mktemp("single")
    losses = finetune(**SETTINGS, out=str(out), log=lambda s: None, stream=None)
    return losses, load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def single_int8(tmp_path_factory):
    """The reference over an int8 base: one process, the full batch."""
    out = tmp_path_factory.mktemp("single_int8")
    losses = finetune(**SETTINGS, quantize="int8", out=str(out), log=lambda s: None, stream=None)
    return losses, load_file(out / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    """The worker's runs (two processes), launched once: the directory of its results."""
    out = tmp_path_factory.mktemp("worker")
    res = _torchrun([os.path.join(ROOT, "tests", "distributed_worker.py"), str(out)], out, timeout=400)
    assert res.returncode == 0, launch_failure(res.stderr)
    return out


def _result(out, name):
    with open(out / f"{name}.json") as f:
        return json.load(f)


def _assert_same_adapter(path, reference):
    got = load_file(path)
    assert got.keys() == reference.keys() and len(got) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for key, ref in reference.items():
        diff = got[key] - ref
        assert diff.norm() <= REL * ref.norm(), (key, diff.norm().item(), ref.norm().item())
        assert diff.abs().max() <= SETTINGS["lr"], key
    # The adapters did train (B starts at zero): each lora_B moved far beyond the tolerance.
    assert min(t.norm().item() for k, t in reference.items() if "lora_B" in k) > 1e-2


def test_ddp_and_fsdp2_equal_one_process_on_the_full_batch(single, worker):
    losses, adapter = single
    full = next(counting_batches(256, SETTINGS["batch"], SETTINGS["seq"])).tolist()
    for engine in ("ddp", "fsdp"):
        got = _result(worker, engine)
        # Each process trained on its own half of the batch, the halves making the whole batch.
        assert got["rows"] == [full[:2], full[2:]]
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
        _assert_same_adapter(worker / engine / "adapter_model.safetensors", adapter)


def test_ddp_over_a_quantized_base_equals_one_process(single_int8, worker):
    """finetune(quantize="int8") under DDP (the packed buffers whole on each process, not broadcast)."""
    losses, adapter = single_int8
    assert _result(worker, "ddp-int8")["losses"] == pytest.approx(losses, abs=1e-5)
    _assert_same_adapter(worker / "ddp-int8" / "adapter_model.safetensors", adapter)


@pytest.mark.parametrize("fmt", QUANTIZED_FORMATS)
def test_fsdp2_shards_the_quantized_base(fmt, worker, tmp_path):
    """Each process holds about half of the quantized base's bytes (its own storage: packed codes, scales
    and tables) except while a block runs, when that block's are gathered whole; the losses and the adapter
    are one process's on the full batch."""
    got = _result(worker, f"fsdp-{fmt}")
    one = quantized_training(fmt, str(tmp_path / "single"))
    assert one["whole"] == llama_quantized_bytes(QUANTIZED_LLAMA, fmt) and one["block"] == one["whole"] // 2
    for rank in got["bytes"]:
        whole, block = rank["whole"], rank["block"]
        assert whole == one["whole"] and rank["block"] == one["block"]
        # Sharded on dim 0 over 2 processes (FSDP2 pads a shard to an equal size: a few bytes over half).
        for when in ("sharded", "between", "after"):
            assert 0.45 * whole <= rank[when] <= 0.55 * whole, (when, rank)
        # While a block runs its share is gathered whole, and no other block's: half of it more than between.
        assert rank["between"] + 0.45 * block <= rank["inside"] <= rank["between"] + 0.55 * block, rank
    # One process holds the whole base always (the measure sees what it should).
    assert one["sharded"] == one["between"] == one["inside"] == one["after"] == one["whole"]
    assert got["losses"] == pytest.approx(one["losses"], abs=1e-5)
    _assert_same_adapter(worker / f"fsdp-{fmt}" / "adapter_model.safetensors",
                         load_file(tmp_path / "single" / "adapter_model.safetensors"))


def test_finetune_command_under_torchrun(single, tmp_path):
    res = _torchrun(["-m", "fused_lora", *command_args("adapter")], tmp_path)
    assert res.returncode == 0, launch_failure(res.stderr)
    # Only rank 0 prints (one progress line per step here) and saves.
    assert res.stdout.count(f"step    {SETTINGS['steps']}/{SETTINGS['steps']}") == 1
    assert "2 processes (DDP over gloo), each training on 2 of the 4 sequences" in res.stdout
    assert res.stdout.count("adapter saved to adapter") == 1
    _assert_same_adapter(tmp_path / "adapter" / "adapter_model.safetensors", single[1])


def test_finetune_command_fsdp2_over_a_quantized_base(single_int8, worker):
    """`finetune --fsdp --quantize int8` in the worker's two processes (the command's main(), what `python -m
    fused_lora` runs; launching it on its own as above would cost another torchrun start): rank 0 alone
    prints, saying what it holds of the int8 base (about half), and the adapter is one process's."""
    got = _result(worker, "command")
    assert got["status"] == [0, 0]
    printed, other = got["printed"]
    assert other == ""
    assert "2 processes (FSDP2 over gloo), each training on 2 of the 4 sequences" in printed
    assert "base quantized to int8" in printed and printed.count("adapter saved to ") == 1
    whole, held = (int(n.replace(",", "")) for n in re.search(
        r"quantized base \(int8\): ([\d,]+) bytes; FSDP2 shards it: this process holds ([\d,]+)", printed).groups())
    assert whole == llama_quantized_bytes(LLAMA_SIZES["tiny"])
    assert 0.45 * whole <= held <= 0.55 * whole
    _assert_same_adapter(worker / "command" / "adapter_model.safetensors", single_int8[1])


def test_batch_must_split_evenly_over_the_processes():
    with pytest.raises(SettingError, match="3 sequences do not split evenly over 2 processes"):
        check_settings(batch=3, world=2)
    with pytest.raises(SettingError, match="needs several processes"):
        check_settings(engine="fsdp", world=1)
    check_settings(batch=4, world=2, engine="fsdp")


def test_quantize_setting():
    """--quantize takes nf4 or int8; nf4 where a built-in Llama's in_features are not multiples of its
    blocks of 64 is refused before anything is built, naming the dimension and the sizes that fit."""
    with pytest.raises(SettingError, match=r"quantize: one of nf4, int8, got 'fp4'"):
        check_settings(quantize="fp4")
    with pytest.raises(SettingError, match=r"quantize: nf4 needs .* multiple of its block size 64; Llama 'tiny' "
                                           r"has intermediate_size 176: use int8, or a size whose layers fit \(small, 1b\)"):
        check_settings(quantize="nf4")
    assert check_settings(quantize="int8").quantize == "int8"
    assert check_settings(size="small", quantize="nf4").quantize == "nf4"
    assert check_settings().quantize is None


def test_nccl_on_cuda_gloo_on_cpu():
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
