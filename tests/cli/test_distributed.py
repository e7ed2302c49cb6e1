"""Several processes (torch.distributed, gloo, 2 CPU processes): DDP and FSDP2 train exactly what one
process trains on the full batch, and `python -m fused_lora finetune` runs under torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from fused_lora.cli import distributed  # noqa: E402
from fused_lora.cli.finetune import SettingError, check_settings, counting_batches, finetune  # noqa: E402

from utils import REPO_ROOT  # noqa: E402  (tests/ is on sys.path: conftest.py)
ROOT = REPO_ROOT
sys.path.insert(0, os.path.join(ROOT, "tests"))
from distributed_worker import SETTINGS  # noqa: E402

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


def _assert_same_adapter(path, reference):
    got = load_file(path)
    assert got.keys() == reference.keys() and len(got) == 2 * 7 * 2  # A and B of 7 projections in 2 layers
    for key, ref in reference.items():
        diff = got[key] - ref
        assert diff.norm() <= REL * ref.norm(), (key, diff.norm().item(), ref.norm().item())
        assert diff.abs().max() <= SETTINGS["lr"], key
    # The adapters did train (B starts at zero): each lora_B moved far beyond the tolerance.
    assert min(t.norm().item() for k, t in reference.items() if "lora_B" in k) > 1e-2


def test_ddp_and_fsdp2_equal_one_process_on_the_full_batch(single, tmp_path):
    res = _torchrun([os.path.join(ROOT, "tests", "distributed_worker.py"), str(tmp_path)], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    losses, adapter = single
    full = next(counting_batches(256, SETTINGS["batch"], SETTINGS["seq"])).tolist()
    for engine in ("ddp", "fsdp"):
        with open(tmp_path / f"{engine}.json") as f:
            got = json.load(f)
        # Each process trained on its own half of the batch, the halves making the whole batch.
        assert got["rows"] == [full[:2], full[2:]]
        assert got["losses"] == pytest.approx(losses, abs=1e-5)
        _assert_same_adapter(tmp_path / engine / "adapter_model.safetensors", adapter)


def test_finetune_command_under_torchrun(single, tmp_path):
    args = ["-m", "fused_lora", "finetune", "--steps", str(SETTINGS["steps"]), "--batch", str(SETTINGS["batch"]),
            "--seq", str(SETTINGS["seq"]), "--lr", str(SETTINGS["lr"]), "--device", "cpu", "--out", "adapter"]
    res = _torchrun(args, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    # Only rank 0 prints (one progress line per step here) and saves.
    assert res.stdout.count(f"step    {SETTINGS['steps']}/{SETTINGS['steps']}") == 1
    assert "2 processes (DDP over gloo), each training on 2 of the 4 sequences" in res.stdout
    assert res.stdout.count("adapter saved to adapter") == 1
    _assert_same_adapter(tmp_path / "adapter" / "adapter_model.safetensors", single[1])


def test_batch_must_split_evenly_over_the_processes():
    with pytest.raises(SettingError, match="3 sequences do not split evenly over 2 processes"):
        check_settings(batch=3, world=2)
    with pytest.raises(SettingError, match="needs several processes"):
        check_settings(engine="fsdp", world=1)
    check_settings(batch=4, world=2, engine="fsdp")


def test_nccl_on_cuda_gloo_on_cpu():
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl"
    assert distributed.backend_for(torch.device("cpu")) == "gloo"
