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

from fused_lora.cli.main import DEFAULT_OUT, main  # noqa: E402
from fused_lora.cli.finetune import TrainingDiverged, finetune  # noqa: E402
from utils import REPO_ROOT  # noqa: E402

ROOT = REPO_ROOT


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
    (["--r", "0"], "--r"),  # issue 18 item 20: LoraConfig's rules answer by flag too
    (["--r", "-2"], "--r"),
    (["--lora-alpha", "nan"], "--lora-alpha"),
    (["--lora-alpha", "inf"], "--lora-alpha"),
    (["--lora-dropout", "1"], "--lora-dropout"),
    (["--lora-dropout", "1.0"], "--lora-dropout"),
    (["--lora-dropout", "-0.5"], "--lora-dropout"),
    (["--lora-dropout", "nan"], "--lora-dropout"),
    (["--lr", "0"], "--lr"),
    (["--lr=-1e-3"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--size", "huge"], "--size"),
    (["--batch", "100000000"], "--batch"),  # terabytes of logits: refused before allocating anything
    (["--log-every", "-1"], "--log-every"),
    (["--device", "tpu"], "--device"),
    (["--device", "cuda:99"], "--device"),
    (["--fsdp"], "--fsdp"),  # FSDP needs several processes
    (["--quantize", "fp4"], "--quantize"),
    (["--quantize", "nf4"], "--quantize"),  # the tiny Llama's MLP (176) is not a whole number of NF4 blocks
    (["--eval-split", "1"], "--eval-split"),
    (["--eval-split", "-0.1"], "--eval-split"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**31)], "--seed"),
    (["--save-every", "-1"], "--save-every"),
    (["--target-modules", ""], "--target-modules"),
    (["--size", "tiny", "--model", "."], "--size"),  # the model directory's config gives the shape
    (["--model", "/nonexistent/model"], "--model"),
    (["--data", "/nonexistent/data.jsonl"], "--data"),
    (["--resume", "--overwrite"], "--overwrite"),
])
def test_finetune_refuses_bad_settings(capsys, tmp_path, args, names):
    """Every bad flag is answered as argparse answers its own: "error: argument --x: ..." (issue 18
    item 20 for --r and --lora-dropout, which answered "error: LoraConfig: ...")."""
    line = _refused(capsys, ["finetune", "--steps", "1", "--out", str(tmp_path / "a"), *args])
    assert line.startswith(f"python -m fused_lora finetune: error: argument {names}: "), line
    assert not (tmp_path / "a").exists()


def test_cuda_requested_without_cuda(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    line = _refused(capsys, ["finetune", "--device", "cuda", "--out", str(tmp_path / "a")])
    assert "--device" in line and "CUDA is not available" in line
    line = _refused(capsys, ["demo", "--device", "cuda"])
    assert line.startswith("python -m fused_lora demo: error: argument --device") and "CUDA is not available" in line


def test_library_functions_refuse_bad_settings_before_building_anything(monkeypatch, tmp_path):
    import fused_lora.cli.finetune as ft
    from fused_lora.cli.demo import run
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


def test_out_of_memory_is_one_error_line(monkeypatch, capsys, tmp_path):
    import fused_lora.cli.finetune as ft

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
    monkeypatch.setattr(ft, "train", oom)
    assert main(["finetune", "--device", "cpu", "--batch", "64", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.strip() == ("python -m fused_lora finetune: error: out of memory on cpu at --batch 64 --seq 64: "
                           "lower --batch or --seq")


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
    parser_flags = {"finetune": ["--model", "--size", "--data", "--eval-split", "--steps", "--batch", "--seq", "--r",
                                 "--lora-alpha", "--lora-dropout", "--target-modules", "--lr", "--seed", "--out",
                                 "--resume", "--overwrite", "--save-every", "--device", "--fsdp", "--log-every"],
                    "demo": ["--device"], "info": []}[command]
    for flag in parser_flags:
        assert flag in text
    if command == "finetune":
        assert "optimizer steps (default: 100)" in text and "(default: fused_lora_adapter)" in text
        assert "LoRA rank (default: 16)" in text and "torchrun" in text
        assert "(default: 0.1)" in text and "nothing is downloaded" in text
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
        finetune(steps=5, batch=2, seq=8, lora_alpha=1e30, out=str(tmp_path / "a"), device="cpu", eval_split=0,
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
    finetune(steps=20, batch=2, seq=8, device="cpu", eval_split=0, log=lambda s: None, stream=log_file)
    lines = log_file.getvalue().splitlines()
    assert "\r" not in log_file.getvalue()
    assert [line.split("/")[0].split()[-1] for line in lines] == [str(s) for s in range(2, 21, 2)]
    log_file = io.StringIO()
    finetune(steps=5, batch=2, seq=8, device="cpu", eval_split=0, log_every=2, log=lambda s: None, stream=log_file)
    assert [line.split("/")[0].split()[-1] for line in log_file.getvalue().splitlines()] == ["2", "4", "5"]
    terminal = _Terminal()
    finetune(steps=3, batch=2, seq=8, device="cpu", eval_split=0, log=lambda s: None, stream=terminal)
    assert terminal.getvalue().count("\r") == 3 and terminal.getvalue().endswith("\n")


def test_an_unwritable_output_and_an_impossible_backend_are_refused_before_training(capsys, monkeypatch, tmp_path):
    """Permission bits do not tell whether the adapter can be written (/proc as root, read-only
    mounts), and a forced backend that cannot run here would fail only after building the model."""
    import fused_lora.cli.finetune as ft
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


def test_an_output_name_too_long_is_refused_before_training(capsys, monkeypatch, tmp_path):
    """issue 18 item 12: `--out <a 300-byte name>` trained to the end, then died in save_pretrained.
    Every name the run will write (the directory, its parents still to be made, the checkpoints inside)
    is checked first: one error line, nothing built."""
    import fused_lora.cli.finetune as ft
    monkeypatch.setattr(ft, "build_llama", lambda *a, **k: pytest.fail("built a model"))
    for out in (tmp_path / ("a" * 300), tmp_path / ("b" * 300) / "adapter"):
        line = _refused(capsys, ["finetune", "--steps", "1", "--out", str(out)])
        assert line.startswith("python -m fused_lora finetune: error: argument --out: ") and "too long" in line
        assert "300 bytes" in line
    # Each name fits, the whole path does not (PATH_MAX): the files inside it could not be opened.
    deep = tmp_path.joinpath(*["c" * 200] * 21)
    line = _refused(capsys, ["finetune", "--steps", "1", "--out", str(deep)])
    assert "argument --out: " in line and "too long" in line
    assert not (tmp_path / ("c" * 200)).exists()
    with pytest.raises(ft.SettingError, match="out: .*too long"):
        finetune(steps=1, out=str(tmp_path / ("a" * 300)))


def test_an_empty_out_is_refused(capsys, monkeypatch):
    """issue 18 item 16: `--out ''` trained and silently saved nothing."""
    import fused_lora.cli.finetune as ft
    monkeypatch.setattr(ft, "build_llama", lambda *a, **k: pytest.fail("built a model"))
    line = _refused(capsys, ["finetune", "--steps", "1", "--out", ""])
    assert line == "python -m fused_lora finetune: error: argument --out: must not be empty"
    with pytest.raises(ft.SettingError, match="out: must not be empty"):
        finetune(steps=1, out="")


def test_help_says_what_an_interrupt_does(capsys):
    """issue 18 item 16: --help says that Ctrl-C saves the adapter trained so far (and how to resume)."""
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Ctrl-C" in text and "saves the adapter trained so far" in text and "--resume" in text


@pytest.mark.parametrize("value, problem", [("bogus", "unknown backend 'bogus'"),
                                            ("triton", "the triton backend was requested but cannot run")])
def test_demo_checks_the_forced_backend_first_as_finetune_does(capsys, monkeypatch, tmp_path, value, problem):
    """issue 18 item 15: FUSED_LORA_BACKEND that cannot run here gave `demo` 10 s of pre-training and a
    90-line traceback; now demo and finetune refuse it up front with the same line."""
    import fused_lora.cli.demo as demo
    import fused_lora.cli.finetune as ft
    monkeypatch.setattr(demo, "MLP", lambda *a, **k: pytest.fail("started the demo"))
    monkeypatch.setattr(ft, "build_llama", lambda *a, **k: pytest.fail("built a model"))
    monkeypatch.setenv("FUSED_LORA_BACKEND", value)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the triton row cannot run on this CPU then
    demo_line = _refused(capsys, ["demo", "--device", "cpu"])
    ft_line = _refused(capsys, ["finetune", "--device", "cpu", "--out", str(tmp_path / "a")])
    assert demo_line.startswith("python -m fused_lora demo: error: FUSED_LORA_BACKEND: ") and problem in demo_line
    assert demo_line.split("demo: ", 1)[1] == ft_line.split("finetune: ", 1)[1]
    with pytest.raises(ft.SettingError, match=f"FUSED_LORA_BACKEND: .*{problem}"):
        demo.run(device="cpu", log=lambda s: pytest.fail("started the demo"))


def test_finetune_without_transformers_is_one_error_line(capsys, monkeypatch, tmp_path):
    """issue 18 item 14: with the minimal install (no transformers) the command says which package and
    which extra it needs, in one line, instead of a traceback."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` now fails as if absent
    assert main(["finetune", "--steps", "1", "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("python -m fused_lora finetune: error: finetune needs transformers, which is not "
                          "installed: pip install 'fused_lora[hf]'")


def test_lora_trainer_without_transformers_names_the_extra():
    """issue 18 item 14: `from fused_lora import LoraTrainer` without transformers raises an ImportError
    naming the package and the extra (the rest of the package imports without it)."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import fused_lora\n"
            "try:\n"
            "    from fused_lora import LoraTrainer\n"
            "except ImportError as err:\n"
            "    print(type(err).__name__, err)\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == ("ImportError fused_lora.LoraTrainer needs transformers, which is not installed: "
                                  "pip install 'fused_lora[hf]'")


def test_the_extras_the_messages_name_exist():
    """The extras named by the messages and the README are in pyproject.toml, with the packages they
    stand for; the demo's needs are the package's own dependencies (no extra)."""
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert any(dep.startswith("transformers") for dep in extras["hf"])
    assert set(extras["hf"]) <= set(extras["test"])
    assert {"bitsandbytes>=0.45", "torchao>=0.9"} <= set(extras["quant"])
    assert not any(dep.split("[")[0].split(">")[0].split("=")[0] in ("transformers", "peft")
                   for dep in project["dependencies"])
    assert project["scripts"]["fused-lora"] == "fused_lora.cli.main:main"


def test_info_says_what_is_measured_and_what_is_the_target(capsys):
    """issue 18 item 30: `info` does not state the GPU goal as a measured fact: it says what is
    measured (CPU ratios against the base and peft, benchmarks/RESULTS.md) and that the GPU ratios
    are the target, not yet measured."""
    assert main(["info"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "measured: on a CPU" in text and "benchmarks/RESULTS.md" in text
    assert "the base layer and peft" in text
    assert "on a GPU: the target, not yet measured" in text


def test_the_console_script_names_itself(capsys, monkeypatch):
    """`fused-lora` (the console script pip installs) is `python -m fused_lora` under its own name."""
    monkeypatch.setattr(sys, "argv", ["/venv/bin/fused-lora", "finetune", "--steps", "0"])
    with pytest.raises(SystemExit):
        main()
    err = capsys.readouterr().err
    assert err.startswith("usage: fused-lora finetune ") and "fused-lora finetune: error: argument --steps" in err
