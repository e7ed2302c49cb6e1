"""The command line: bad settings give argparse's usage and one error line (exit 2), never a
traceback, a NaN run or a saved adapter; --help explains every flag with its default; progress
output suits terminals and log files alike."""
import io
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from fused_lora.__main__ import DEFAULT_OUT, main  # noqa: E402
from fused_lora.finetune import TrainingDiverged, finetune  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _refused(capsys, argv) -> str:
    """Runs the command line, expects a usage error, and returns its one error line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err and err.startswith("usage: python -m fused_lora ")
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.mark.parametrize("args, names", [
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "ten"], "--steps"),
    (["--batch", "0"], "--batch"),
    (["--seq", "1"], "--seq"),
    (["--r", "0"], "r "),
    (["--lora-alpha", "nan"], "--lora-alpha"),
    (["--lora-alpha", "inf"], "--lora-alpha"),
    (["--lora-dropout", "1"], "lora_dropout"),
    (["--lora-dropout", "-0.5"], "lora_dropout"),
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--size", "huge"], "--size"),
    (["--batch", "100000000"], "--batch"),  # terabytes of logits: refused before allocating anything
    (["--log-every", "-1"], "--log-every"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--fsdp"], "--fsdp"),  # FSDP needs several processes
])
def test_finetune_refuses_bad_settings(capsys, tmp_path, args, names):
    line = _refused(capsys, ["finetune", "--steps", "1", "--out", str(tmp_path / "a"), *args])
    assert line.startswith("python -m fused_lora finetune: error: ") and names in line
    assert not (tmp_path / "a").exists()


def test_cuda_requested_without_cuda(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(capsys, ["finetune", "--device", "cuda", "--out", str(tmp_path / "a")])
    assert "--device" in line and "CUDA is not available" in line
    line = _refused(capsys, ["demo", "--device", "cuda"])
    assert line.startswith("python -m fused_lora demo: error: argument --device") and "CUDA is not available" in line


def test_library_functions_refuse_bad_settings_before_building_anything(monkeypatch, tmp_path):
    import fused_lora.finetune as ft
    from fused_lora.demo import run
    monkeypatch.setattr(ft, "build_llama", lambda *a, **k: pytest.fail("built a model"))
    with pytest.raises(ft.SettingError, match="steps: must be an integer >= 1, got 0"):
        finetune(steps=0, out=str(tmp_path / "a"))
    with pytest.raises(ft.SettingError, match="lora_dropout"):
        finetune(lora_dropout=1.0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        finetune(device="cuda")
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(device="cuda", log=lambda s: pytest.fail("started the demo"))


def test_out_of_memory_is_one_error_line(monkeypatch, capsys):
    import fused_lora.finetune as ft

    def oom(**kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    monkeypatch.setattr(ft, "finetune", oom)
    assert main(["finetune", "--device", "cpu", "--batch", "64"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("python -m fused_lora finetune: error: out of memory on cpu at --batch 64 --seq 64 "
                           "(--size tiny): lower --batch or --seq")


def test_out_that_is_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "f").write_text("x")
    assert "--out" in _refused(capsys, ["finetune", "--out", str(tmp_path / "f")])


def test_command_exit_status_and_no_traceback():
    res = subprocess.run([sys.executable, "-m", "fused_lora", "finetune", "--steps", "0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1].startswith("python -m fused_lora finetune: error: argument --steps")


@pytest.mark.parametrize("command", ["finetune", "demo", "info"])
def test_help_explains_every_flag_with_its_default(capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    parser_flags = {"finetune": ["--size", "--steps", "--batch", "--seq", "--r", "--lora-alpha", "--lora-dropout",
                                 "--lr", "--out", "--device", "--fsdp", "--log-every"],
                    "demo": ["--device"], "info": []}[command]
    for flag in parser_flags:
        assert flag in text
    if command == "finetune":
        assert "optimizer steps (default: 100)" in text and "(default: fused_lora_adapter)" in text
        assert "LoRA rank (default: 16)" in text and "torchrun" in text
    if command == "demo":
        assert "(default: auto)" in text


def test_info_runs(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("fused_lora ") and "cpu float32 r<=16, auto -> torch" in out
    assert "tuned choices" in out  # auto's choices (and timings) on CUDA, none on this CPU


def test_default_output_directory_is_ignored_by_git():
    with open(os.path.join(ROOT, ".gitignore")) as f:
        patterns = {line.strip() for line in f}
    assert f"{DEFAULT_OUT}/" in patterns


def test_nan_loss_stops_training_and_saves_nothing(tmp_path, capsys):
    # alpha = 1e30: once B has moved from zero, the LoRA term overflows.
    with pytest.raises(TrainingDiverged, match="the loss became nan at step [0-9]+: training stopped, no adapter saved"):
        finetune(steps=5, batch=2, seq=8, lora_alpha=1e30, out=str(tmp_path / "a"), device="cpu",
                 log=lambda s: None, stream=io.StringIO())
    assert not (tmp_path / "a").exists()
    argv = ["finetune", "--steps", "5", "--batch", "2", "--seq", "8", "--lora-alpha", "1e30", "--device", "cpu",
            "--out", str(tmp_path / "b")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("python -m fused_lora finetune: error: the loss became nan")
    assert not (tmp_path / "b").exists()


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_redrawn_on_a_terminal_and_one_line_per_report_elsewhere():
    log_file = io.StringIO()
    finetune(steps=20, batch=2, seq=8, device="cpu", log=lambda s: None, stream=log_file)
    lines = log_file.getvalue().splitlines()
    assert "\r" not in log_file.getvalue()
    assert [line.split("/")[0].split()[-1] for line in lines] == [str(s) for s in range(2, 21, 2)]
    log_file = io.StringIO()
    finetune(steps=5, batch=2, seq=8, device="cpu", log_every=2, log=lambda s: None, stream=log_file)
    assert [line.split("/")[0].split()[-1] for line in log_file.getvalue().splitlines()] == ["2", "4", "5"]
    terminal = _Terminal()
    finetune(steps=3, batch=2, seq=8, device="cpu", log=lambda s: None, stream=terminal)
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")


def test_an_unwritable_output_and_an_impossible_backend_are_refused_before_training(capsys, monkeypatch, tmp_path):
    """Permission bits do not tell whether the adapter can be written (/proc as root, read-only
    mounts), and a forced backend that cannot run here would fail only after building the model."""
    import fused_lora.finetune as ft
    monkeypatch.setattr(ft, "build_llama", lambda *a, **k: pytest.fail("built a model"))
    line = _refused(capsys, ["finetune", "--steps", "1", "--out", "/proc/fused_lora_adapter"])
    assert "--out" in line and "cannot write the adapter" in line
    assert not os.path.exists("/proc/fused_lora_adapter")
    monkeypatch.setenv("FUSED_LORA_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    line = _refused(capsys, ["finetune", "--steps", "1", "--out", str(tmp_path / "a")])
    assert "FUSED_LORA_BACKEND" in line and "triton" in line
    assert not (tmp_path / "a").exists()
    ft._check_writable(str(tmp_path / "new" / "dir"))  # a writable place: the probe leaves nothing behind
    assert not (tmp_path / "new").exists()
