"""The fine-tuning example: trains, shows progress, saves an adapter peft can load."""
import io
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fused_lora import LoraModel  # noqa: E402
from fused_lora.finetune import build_llama, finetune  # noqa: E402


def test_finetune_lowers_loss_and_saves_adapter(tmp_path):
    stream, lines = io.StringIO(), []
    losses = finetune(size="tiny", steps=30, batch=4, seq=32, lr=5e-3, out=str(tmp_path), device="cpu",
                      log=lines.append, stream=stream)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert "tok/s" in stream.getvalue() and "step   30/30" in stream.getvalue()
    loaded = LoraModel.from_pretrained(build_llama("tiny"), tmp_path)
    assert loaded.get_nb_trainable_parameters()[1] > loaded.get_nb_trainable_parameters()[0] == 0
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path)
    tokens = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, pm(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)


def test_finetune_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fused_lora", "finetune", "--steps", "3", "--device", "cpu",
                          "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, check=True)
    assert "adapter saved" in out.stdout and (tmp_path / "a" / "adapter_model.safetensors").exists()
