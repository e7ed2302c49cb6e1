"""A save killed at any instant leaves the old adapter or the new one, never a mixed pair, and no
temporary files pile up in the adapter directory.

Children are forked (torch is already imported here, so each costs milliseconds) and killed with a
real SIGKILL at random moments; a second test stops a child deterministically after each filesystem
step of the save, so every boundary is covered whatever the random delays hit.
"""
import os
import random
import signal
import time

import pytest
import torch

from fused_lora import AdapterError, LoraModel
from fused_lora.peft_compat.adapters import adapter_state
from fused_lora.cli.demo import MLP
from utils import mlp_adapter

X = torch.rand(4, 20, generator=torch.Generator().manual_seed(5))


def base():
    torch.manual_seed(0)
    return MLP(num_units_hidden=64)


def adapter(alpha, seed):
    """Same keys and shapes, different alpha and weights: a pair mixing two saves would load silently."""
    return mlp_adapter(alpha, seed, hidden=64)


A, B = adapter(4, 1), adapter(16, 2)


def which(directory):
    """'A' or 'B' if the directory loads as exactly that adapter; 'refused' if cleanly refused."""
    try:
        lm = LoraModel.from_pretrained(base(), directory)
    except AdapterError:
        return "refused"
    state = adapter_state(lm)
    for name, ref in (("A", A), ("B", B)):
        want = adapter_state(ref)
        if (lm.peft_config["default"].lora_alpha == ref.peft_config["default"].lora_alpha and state.keys() == want.keys()
                and all(torch.equal(state[k], want[k]) for k in want)):
            with torch.no_grad():
                torch.testing.assert_close(lm(X), ref(X), rtol=0, atol=0)
            return name
    return "MIXED"


def saving_child(directory, first):
    pid = os.fork()
    if pid:
        return pid
    try:  # the child: save alternately, until killed
        order = (A, B) if first == "A" else (B, A)
        while True:
            for lm in order:
                lm.save_pretrained(directory)
    finally:
        os._exit(0)


def leftovers(tmp_path, directory):
    """Files in the adapter directory beyond the adapter, and staging entries beside it."""
    extra = sorted(set(os.listdir(directory)) - {"adapter_config.json", "adapter_model.safetensors"}) \
        if os.path.isdir(directory) else []
    siblings = [n for n in os.listdir(tmp_path) if n != os.path.basename(directory)]
    return extra, siblings


def test_random_sigkills_leave_old_or_new(tmp_path):
    directory = str(tmp_path / "adapter")
    rng = random.Random(1234)
    seen, ever_complete = [], False
    for i in range(20):
        pid = saving_child(directory, "AB"[i % 2])
        time.sleep(rng.uniform(0.0, 0.08))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = which(directory)
        assert got in ("A", "B") or (got == "refused" and not ever_complete), f"kill {i}: {got}"
        ever_complete |= got in ("A", "B")
        seen.append(got)
        extra, siblings = leftovers(tmp_path, directory)
        assert extra == [], f"kill {i}: temporary files in the adapter directory: {extra}"
        assert len(siblings) <= 2, f"kill {i}: staging entries pile up beside the adapter: {siblings}"
    assert {"A", "B"} & set(seen), seen


@pytest.mark.parametrize("beside", [True, False], ids=["staging-beside", "staging-inside"])
@pytest.mark.parametrize("step", range(3))
def test_stop_after_each_step_of_a_save(tmp_path, monkeypatch, step, beside):
    """The child saves B over A and dies just before its `step`-th rename. Whatever the step, the
    directory is A or B. Staging goes beside the directory, or inside it where the parent is
    another filesystem or read-only (forced here)."""
    import fused_lora.peft_compat.adapters as adapters
    monkeypatch.setattr(adapters, "_stage_beside", lambda d: beside)
    directory = str(tmp_path / "adapter")
    A.save_pretrained(directory)
    assert which(directory) == "A"
    pid = os.fork()
    if not pid:
        try:
            real, calls = os.replace, [0]

            def replace(src, dst):
                if calls[0] == step:
                    os._exit(0)  # dies as abruptly as a kill: no cleanup, no finally blocks
                calls[0] += 1
                real(src, dst)
            os.replace = replace
            B.save_pretrained(directory)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert which(directory) in ("A", "B")
    if beside:
        assert leftovers(tmp_path, directory)[0] == []
    A.save_pretrained(directory)  # a later save cleans what the dead one left
    assert which(directory) == "A"
    assert leftovers(tmp_path, directory) == ([], [])


def test_saving_through_a_symlink_stages_beside_the_real_directory(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "links" / "adapter")
    B.save_pretrained(tmp_path / "links" / "adapter")
    assert which(tmp_path / "links" / "adapter") == "B"
    assert sorted(os.listdir(tmp_path / "real")) == ["adapter_config.json", "adapter_model.safetensors"]
    assert os.listdir(tmp_path / "links") == ["adapter"] and sorted(os.listdir(tmp_path)) == ["links", "real"]


def test_mismatched_pair_is_refused(tmp_path):
    """Weights of one save with the config of another (e.g. copied by hand) are refused."""
    A.save_pretrained(tmp_path / "a")
    B.save_pretrained(tmp_path / "b")
    os.replace(tmp_path / "b" / "adapter_config.json", tmp_path / "a" / "adapter_config.json")
    with pytest.raises(AdapterError, match="different saves"):
        LoraModel.from_pretrained(base(), tmp_path / "a")


@pytest.mark.parametrize("record", ["[" * 50_000, "[1]", "not json"])
def test_damaged_header_record_is_refused(tmp_path, record):
    from safetensors.torch import load_file, save_file
    A.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    save_file(tensors, tmp_path / "adapter_model.safetensors",
              metadata={"format": "pt", "fused_lora.adapter_config": record})
    with pytest.raises(AdapterError, match="damaged"):
        LoraModel.from_pretrained(base(), tmp_path)
