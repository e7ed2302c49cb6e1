"""The fine-tuning command: a local transformers model directory and a local data file (no download),
an eval split, a seed, checkpoints that resume exactly, an interrupt that saves what was trained,
and an --out that is never silently overwritten (issue 18 items 12, 16 and 25).

The "local model directory" of these tests is a tiny Llama built from a config and written with
save_pretrained, with a word-level tokenizer built from a small vocabulary: nothing is downloaded."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from fused_lora import LoraModel  # noqa: E402
from fused_lora.cli.finetune import LLAMA_SIZES, SettingError, TrainingInterrupted, build_llama, finetune
from utils import REPO_ROOT, launch_failure, llama_quantized_bytes  # noqa: E402

ROOT = REPO_ROOT
QUIET = dict(log=lambda s: None, stream=None)
FAST = dict(batch=2, seq=8, device="cpu", eval_split=0)  # a few milliseconds a step on the tiny Llama
WORDS = [f"w{i}" for i in range(60)]


def _tokenizer():
    """A word-level tokenizer over WORDS (ids 4..63) with [UNK]=0, [PAD]=1, <s>=2, </s>=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "<s>", "</s>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A local transformers model directory: a tiny Llama (random weights, seed 7) and a tokenizer."""
    path = tmp_path_factory.mktemp("tiny_llama")
    build_llama("tiny", seed=7).save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def bare_model_dir(tmp_path_factory):
    """The same kind of model directory without a tokenizer."""
    path = tmp_path_factory.mktemp("tiny_llama_bare")
    build_llama("tiny", seed=7).save_pretrained(path)
    return path


def _sentences(n=40, seed=0):
    """Counting sentences over WORDS: w{s} w{s+k} w{s+2k} ..., 3 to 12 words."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start, stride, length = (int(torch.randint(0, 60, (), generator=g)), int(torch.randint(1, 4, (), generator=g)),
                                 int(torch.randint(3, 13, (), generator=g)))
        out.append(" ".join(WORDS[(start + stride * i) % 60] for i in range(length)))
    return out


def _ids_of(sentence):
    """What the tokenizer gives for a sentence, and the EOS the command appends (id 3)."""
    return [4 + int(w[1:]) for w in sentence.split()] + [3]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_finetune_lowers_loss_and_saves_adapter(tmp_path):
    """The synthetic run learns (train and eval loss fall), says so in its summary with the eval loss
    (issue 18 item 25), names the backend once, shows an ETA on each progress line, and saves an adapter
    that fused_lora and peft load alike."""
    stream, lines = io.StringIO(), []
    run = finetune(size="tiny", steps=30, batch=4, seq=32, lr=5e-3, out=str(tmp_path / "a"), device="cpu",
                   log=lines.append, stream=stream)
    losses = list(run)
    assert len(losses) == 30 and sum(losses[-5:]) < sum(losses[:5])
    assert run.eval_loss_start is not None and run.eval_loss < run.eval_loss_start
    summary = next(line for line in lines if line.startswith("loss "))
    assert f"eval loss {run.eval_loss_start:.4f} -> {run.eval_loss:.4f} (32 held-out sequences)" in summary
    assert sum("backend:" in line for line in lines) == 1 and "backend: torch" in lines  # the CPU's row
    progress = stream.getvalue().splitlines()
    assert "step   30/30" in progress[-1]
    assert all("tok/s  ETA " in line and "backend" not in line for line in progress)
    assert progress[-1].endswith("ETA 0:00")
    loaded = LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "a")
    assert loaded.get_nb_trainable_parameters()[1] > loaded.get_nb_trainable_parameters()[0] == 0
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(build_llama("tiny"), tmp_path / "a")
    tokens = torch.arange(10).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=tokens).logits, pm(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
    # The eval set is eval_split of SYNTHETIC_EVAL_POOL sequences; with eval_split=0 there is none.
    run = finetune(steps=1, **QUIET, **FAST)  # eval_split=0
    assert run.eval_loss is None and run.eval_loss_start is None


def test_finetune_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fused_lora", "finetune", "--steps", "3", "--device", "cpu",
                          "--out", str(tmp_path / "a")], capture_output=True, text=True, timeout=300, check=True,
                         cwd=ROOT)
    assert "adapter saved" in out.stdout and (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_a_local_model_directory_and_token_ids(model_dir, tmp_path):
    """issue 18 item 25: --model DIR (a transformers directory, loaded with local_files_only) and
    --data FILE of token ids; the adapter fits that model, for fused_lora and for peft."""
    from transformers import AutoModelForCausalLM
    rows = [{"input_ids": _ids_of(s)} for s in _sentences(40)]
    data = _write_jsonl(tmp_path / "ids.jsonl", rows)
    lines = []
    run = finetune(model=str(model_dir), data=str(data), steps=25, batch=4, seq=16, lr=1e-2, eval_split=0.1,
                   out=str(tmp_path / "a"), device="cpu", log=lines.append, stream=None)
    text = "\n".join(lines)
    assert "40 examples" in text and "36 train, 4 eval" in text
    assert run.eval_loss < run.eval_loss_start and sum(list(run)[-5:]) < sum(list(run)[:5])
    base = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    loaded = LoraModel.from_pretrained(base, tmp_path / "a")
    peft = pytest.importorskip("peft")
    pm = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True),
                                        tmp_path / "a")
    tokens = torch.tensor([_ids_of(_sentences(1, seed=5)[0])])
    with torch.no_grad():
        got, want = loaded(input_ids=tokens).logits, pm(input_ids=tokens).logits
        fresh = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)(input_ids=tokens).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - fresh).abs().max() > 1e-3  # the adapter trained (it is not the base)


def test_text_is_tokenized_with_the_model_directorys_tokenizer(model_dir, tmp_path):
    """Plain text lines, JSONL "text" and the same tokens as JSONL "input_ids" train identically (the
    tokenizer's ids, with its EOS at each example's end): one data pipeline."""
    sentences = _sentences(20)
    plain = tmp_path / "plain.txt"
    plain.write_text("\n".join(sentences) + "\n\n")  # blank lines are not examples
    texts = _write_jsonl(tmp_path / "texts.jsonl", [{"text": s} for s in sentences])
    ids = _write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": _ids_of(s)} for s in sentences])
    runs = [list(finetune(model=str(model_dir), data=str(path), steps=3, seq=16, **QUIET,
                          **{k: v for k, v in FAST.items() if k != "seq"})) for path in (plain, texts, ids)]
    assert runs[0] == runs[1] == runs[2]


def test_text_without_a_tokenizer_is_refused(bare_model_dir, tmp_path):
    data = tmp_path / "t.txt"
    data.write_text("w1 w2 w3\n")
    with pytest.raises(SettingError, match="data: .*text.*tokenizer") as err:
        finetune(model=str(bare_model_dir), data=str(data), **QUIET, **FAST)
    assert err.value.setting == "data"
    with pytest.raises(SettingError, match="data: .*text.*--model"):
        finetune(data=str(data), **QUIET, **FAST)  # the synthetic Llama has no tokenizer either


@pytest.mark.parametrize("content, problem", [
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2, 300]}\n',
     "line 2: token id 300 is outside the model's vocabulary"),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, -1, 3]}\n', "line 2: token id -1 is outside"),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2.5]}\n', "line 2: input_ids must be a list of integers"),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [true, 2]}\n', "line 2: input_ids must be a list of integers"),
    ('{"input_ids": [1, 2, 3]}\n{"ids": [1, 2]}\n', 'line 2: expected an object with "input_ids" or "text"'),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, 2]\n', "line 2: not JSON"),
    ('{"input_ids": [1, 2, 3]}\n[1, 2]\n', 'line 2: expected an object with "input_ids" or "text"'),
    # issue 18, attacker re-trial, finding 8: a RecursionError traceback before
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": ' + "[" * 100000 + "]" * 100000 + "}\n",
     "line 2: its JSON is nested too deeply"),
    ('{"input_ids": [1, 2, 3]}\n{"input_ids": [1, ' + "9" * 5000 + "]}\n", "line 2: not JSON"),
    ("", "holds no examples"),
    ("\n \n", "holds no examples"),
    ('{"input_ids": [5]}\n', "no sequence of at least 2 tokens"),
])
def test_bad_data_files_are_refused_by_line(tmp_path, content, problem):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    with pytest.raises(SettingError, match="data: ") as err:
        finetune(data=str(data), out=str(tmp_path / "a"), **QUIET, **FAST)
    assert problem in str(err.value)
    assert not (tmp_path / "a").exists()


def test_data_that_is_not_a_regular_file_is_refused_without_reading(tmp_path):
    """A FIFO is refused at once (reading it would wait for a writer); so is a directory or a missing file."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for path, problem in ((fifo, "not a regular file"), (tmp_path, "not a regular file"),
                          (tmp_path / "missing.jsonl", "does not exist")):
        with pytest.raises(SettingError, match=f"data: .*{problem}"):
            finetune(data=str(path), **QUIET, **FAST)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"w1 w2\n\xff\xfe w3\n")
    with pytest.raises(SettingError, match="data: .*not UTF-8"):
        finetune(data=str(bad), **QUIET, **FAST)


def test_model_must_be_a_local_transformers_directory(tmp_path, monkeypatch, bare_model_dir):
    """Nothing is downloaded: a hub name is refused as a missing directory; so is a directory without
    config.json or without weights. All before anything is built."""
    import fused_lora.cli.finetune as ft
    monkeypatch.setattr(ft, "build_llama", lambda *a, **k: pytest.fail("built a model"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SettingError, match="model: 'gpt2' is not a directory .*nothing is downloaded"):
        finetune(model="gpt2", **QUIET, **FAST)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SettingError, match="model: .* has no config.json"):
        finetune(model=str(tmp_path / "empty"), **QUIET, **FAST)
    (tmp_path / "config_only").mkdir()
    (tmp_path / "config_only" / "config.json").write_text((bare_model_dir / "config.json").read_text())
    with pytest.raises(SettingError, match="model: .* holds no weights"):
        finetune(model=str(tmp_path / "config_only"), **QUIET, **FAST)
    with pytest.raises(SettingError, match="size: not with a model directory"):
        finetune(model=str(bare_model_dir), size="small", **QUIET, **FAST)


def test_quantize_a_model_directory(bare_model_dir):
    """quantize="int8" quantizes the model directory's Linears (all but lm_head) and trains over them: the log
    gives the base's bytes, N x K codes and N fp32 scales per layer. NF4 is refused by name where a layer's
    in_features is not a whole number of its blocks of 64 (the tiny Llama's down_proj, 176), nothing trained."""
    lines = []
    finetune(model=str(bare_model_dir), steps=1, quantize="int8", log=lines.append, stream=None, **FAST)
    assert "base quantized to int8" in lines[0]
    assert f"quantized base (int8): {llama_quantized_bytes(LLAMA_SIZES['tiny']):,} bytes" in lines
    with pytest.raises(SettingError, match=r"quantize: quantize_model: layer 'model.layers.0.mlp.down_proj': .*"
                                           r"multiple of the block size") as err:
        finetune(model=str(bare_model_dir), quantize="nf4", **QUIET, **FAST)
    assert err.value.setting == "quantize"


def test_seed(tmp_path):
    """--seed decides the adapter's initialisation, the data order and the eval split: the same seed
    repeats a run exactly, another seed gives another run."""
    settings = {**FAST, "eval_split": 0.05}
    a, b, c = (finetune(steps=3, seed=seed, **QUIET, **settings) for seed in (1, 1, 2))
    assert list(a) == list(b) and a.eval_loss == b.eval_loss
    assert list(a) != list(c) and a.eval_loss != c.eval_loss


def _adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _assert_same_adapter(path_a, path_b):
    a, b = _adapter(path_a), _adapter(path_b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_interrupt_saves_what_was_trained_and_resume_continues_exactly(tmp_path, model_dir, monkeypatch):
    """issue 18 items 16 and 25. With dropout (the masks follow torch's RNG, saved in the checkpoint) and
    a data file (the order follows the seed and the step): 6 steps straight; 3 steps; 6 steps interrupted
    in the 4th; each resumed to 6 steps. The interrupted run saved the adapter of step 3, and every
    resumed run ends bit for bit where the straight run ends, with the same losses."""
    import fused_lora.cli.finetune as ft
    data = _write_jsonl(tmp_path / "ids.jsonl", [{"input_ids": _ids_of(s)} for s in _sentences(30)])
    settings = dict(model=str(model_dir), data=str(data), lora_dropout=0.1, seq=16, batch=2, device="cpu",
                    save_every=2, **QUIET)
    straight = finetune(steps=6, out=str(tmp_path / "straight"), **settings)
    three = finetune(steps=3, out=str(tmp_path / "three"), **settings)
    assert list(three) == list(straight)[:3]

    real_step, calls = ft.loss_and_grads, []

    def interrupted_in_step_4(*args, **kwargs):  # a Ctrl-C in the 4th step's forward
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)
    monkeypatch.setattr(ft, "loss_and_grads", interrupted_in_step_4)
    with pytest.raises(TrainingInterrupted) as stop:
        finetune(steps=6, out=str(tmp_path / "stopped"), **settings)
    monkeypatch.setattr(ft, "loss_and_grads", real_step)
    assert stop.value.step == 3 and stop.value.saved
    assert isinstance(stop.value, KeyboardInterrupt)  # a library caller still sees a Ctrl-C
    _assert_same_adapter(tmp_path / "stopped", tmp_path / "three")
    # One checkpoint is kept: the last (step 2's went when step 3's was written at the interrupt).
    assert sorted(p.name for p in (tmp_path / "stopped").iterdir() if p.name.startswith("checkpoint")) == \
        ["checkpoint-3"]

    for name in ("three", "stopped"):
        resumed = finetune(steps=6, out=str(tmp_path / name), resume=True, **settings)
        assert list(resumed) == list(straight)  # steps 1-3 from the checkpoint, 4-6 trained now
        assert resumed.eval_loss == straight.eval_loss and resumed.eval_loss_start == straight.eval_loss_start
        _assert_same_adapter(tmp_path / name, tmp_path / "straight")


def test_a_ctrl_c_during_the_optimizer_step_waits_for_its_end(tmp_path, monkeypatch):
    """A SIGINT that arrives while AdamW updates the parameters takes effect once the step is done: the
    adapter saved at the interrupt is exactly the adapter of that many steps, never half a step."""
    real_step, calls = torch.optim.AdamW.step, []

    def signalled_in_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt at the next bytecode, if let
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", signalled_in_step_3)
    with pytest.raises(TrainingInterrupted) as stop:
        finetune(steps=6, out=str(tmp_path / "stopped"), **QUIET, **FAST)
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert stop.value.step == 3
    finetune(steps=3, out=str(tmp_path / "three"), **QUIET, **FAST)
    _assert_same_adapter(tmp_path / "stopped", tmp_path / "three")


def _signalled_during_checkpoints(monkeypatch, at_step):
    """A SIGINT (a Ctrl-C) sent while checkpoint-<at_step> is being written."""
    import fused_lora.cli.finetune as ft
    real = ft._write_checkpoint

    def write(lora, out, step, *args):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return real(lora, out, step, *args)
    monkeypatch.setattr(ft, "_write_checkpoint", write)


def _outcome(run):
    """run()'s result, or the KeyboardInterrupt it raised (caught here: a plain one must not stop pytest)."""
    try:
        return run()
    except KeyboardInterrupt as stop:
        return stop


def test_a_second_ctrl_c_during_the_interrupt_s_save_is_reported_truly(tmp_path, monkeypatch):
    """Ctrl-C in step 3, and again while the interrupt's save runs: the save completes and the run reports
    "interrupted at step 2 ... saved" (before: a plain KeyboardInterrupt left the save and the command said
    "interrupted before training started: nothing saved" with the adapter on disk). Issue 18, attacker
    re-trial, finding 3."""
    import fused_lora.cli.finetune as ft
    real_step, calls = ft.loss_and_grads, []

    def interrupted_in_step_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)
    monkeypatch.setattr(ft, "loss_and_grads", interrupted_in_step_3)
    _signalled_during_checkpoints(monkeypatch, at_step=2)
    stop = _outcome(lambda: finetune(steps=6, out=str(tmp_path / "a"), **QUIET, **FAST))
    assert isinstance(stop, TrainingInterrupted), repr(stop)
    assert stop.step == 2 and stop.saved == str(tmp_path / "a") and stop.checkpoint.endswith("checkpoint-2")
    assert (tmp_path / "a" / "checkpoint-2" / "trainer_state.json").exists()
    LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "a")


def test_a_ctrl_c_during_the_last_save_lets_the_run_end(tmp_path, monkeypatch):
    """A Ctrl-C while the run's final adapter and checkpoint are written: the save completes and the run
    ends as it would have (before: a plain KeyboardInterrupt, reported as "interrupted before training
    started: nothing saved"). Issue 18, attacker re-trial, finding 3, sibling."""
    _signalled_during_checkpoints(monkeypatch, at_step=3)
    run = _outcome(lambda: finetune(steps=3, out=str(tmp_path / "a"), **QUIET, **FAST))
    assert not isinstance(run, BaseException), repr(run)
    assert len(list(run)) == 3 and (tmp_path / "a" / "checkpoint-3" / "trainer_state.json").exists()


@pytest.mark.parametrize("where", ["check_settings", "train"])
def test_a_ctrl_c_before_training_has_one_wording(capsys, monkeypatch, tmp_path, where):
    """A Ctrl-C while the settings are checked and one while the model is built print the same line (before:
    "error: interrupted ..." in the first case only). Issue 18, attacker re-trial, finding 3."""
    import fused_lora.cli.finetune as ft
    from fused_lora.cli.main import main

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(ft, where, interrupt)
    assert main(["finetune", "--steps", "2", "--device", "cpu", "--out", str(tmp_path / "a")]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "python -m fused_lora finetune: interrupted before training started: nothing saved"


def test_resume_refuses_other_settings_and_a_finished_run(tmp_path):
    out = str(tmp_path / "a")
    finetune(steps=2, out=out, **QUIET, **FAST)
    for changed, setting in ((dict(r=8), "r"), (dict(seq=16), "seq"), (dict(seed=3), "seed"),
                             (dict(lora_dropout=0.1), "lora_dropout"), (dict(quantize="int8"), "quantize")):
        with pytest.raises(SettingError, match="the checkpoint at step 2 was trained with") as err:
            finetune(steps=4, out=out, resume=True, **{**QUIET, **FAST, **changed})
        assert err.value.setting == setting
    with pytest.raises(SettingError, match="steps: the checkpoint in .* is at step 2") as err:
        finetune(steps=2, out=out, resume=True, **QUIET, **FAST)
    with pytest.raises(SettingError, match="resume: .* holds no checkpoint"):
        finetune(steps=2, out=str(tmp_path / "new"), resume=True, **QUIET, **FAST)
    with pytest.raises(SettingError, match="overwrite: not with resume"):
        finetune(steps=4, out=out, resume=True, overwrite=True, **QUIET, **FAST)
    # A checkpoint missing a file, or with one that does not read, is refused by name.
    os.rename(os.path.join(out, "checkpoint-2", "optimizer.safetensors"), tmp_path / "optimizer.safetensors")
    with pytest.raises(SettingError, match="resume: .*checkpoint-2 lacks optimizer.safetensors"):
        finetune(steps=4, out=out, resume=True, **QUIET, **FAST)
    (tmp_path / "a" / "checkpoint-2" / "optimizer.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    with pytest.raises(SettingError, match="resume: cannot resume from .*checkpoint-2"):
        finetune(steps=4, out=out, resume=True, **QUIET, **FAST)
    os.replace(tmp_path / "optimizer.safetensors", os.path.join(out, "checkpoint-2", "optimizer.safetensors"))
    # lr may change on resume (e.g. lower after a divergence): said in the log.
    lines = []
    finetune(steps=3, out=out, resume=True, lr=1e-3, log=lines.append, stream=None,
             **{k: v for k, v in FAST.items()})
    assert any("resuming from" in line and "step 2" in line for line in lines)


@pytest.mark.parametrize("change, problem", [
    (lambda s: "[" * 100000 + "]" * 100000, "its JSON is nested too deeply"),
    (lambda s: json.dumps({**json.loads(s), "step": 10 ** 400}), "losses holds 2 values for step 1000000000"),
    (lambda s: json.dumps({**json.loads(s), "losses": {"a": 1}}), "losses is not a list of finite numbers"),
    (lambda s: json.dumps({**json.loads(s), "losses": ["x", 1.0]}), "losses is not a list of finite numbers"),
    (lambda s: json.dumps({**json.loads(s), "lr": "fast"}), "lr 'fast' is not a finite number"),
    (lambda s: json.dumps({**json.loads(s), "eval_loss_start": 10 ** 400}), "eval_loss_start 1000"),
    (lambda s: json.dumps({**json.loads(s), "settings": [1]}), "settings is not an object"),
    (lambda s: "[1]", "not a format-1 trainer state"),
], ids=["nested", "huge-step", "losses-dict", "losses-str", "lr-str", "eval-huge-int", "settings-list", "list"])
def test_a_trainer_state_of_the_wrong_shape_is_refused_by_name(tmp_path, change, problem):
    """A checkpoint's trainer_state.json that parses but cannot be resumed from (deep nesting, a 401-digit
    step, wrong types where numbers are formatted) is one SettingError naming the file, never a traceback.
    Issue 18, attacker re-trial, findings 4 and 8, siblings (untrusted JSON)."""
    out = tmp_path / "a"
    finetune(steps=2, out=str(out), **QUIET, **FAST)
    path = out / "checkpoint-2" / "trainer_state.json"
    path.write_text(change(path.read_text()))
    with pytest.raises(SettingError, match=rf"resume: cannot read {path}: .*{re.escape(problem)}"):
        finetune(steps=4, out=str(out), resume=True, **QUIET, **FAST)


def test_an_unbounded_number_setting_is_refused_by_name(tmp_path):
    """lr or eval_split an int beyond any float: a SettingError (before: OverflowError from math.isfinite)."""
    for name in ("lr", "eval_split"):
        with pytest.raises(SettingError, match=name):
            finetune(steps=1, **{**QUIET, **FAST, name: 10 ** 400})


def test_out_is_never_silently_overwritten(tmp_path):
    """issue 18 item 25: an --out holding an adapter is refused unless --resume or --overwrite; an --out
    holding anything this command did not write is refused even with --overwrite."""
    out = tmp_path / "a"
    finetune(steps=2, out=str(out), **QUIET, **FAST)
    before = _adapter(out)
    with pytest.raises(SettingError, match="out: .* already holds an adapter .*--resume.*--overwrite") as err:
        finetune(steps=2, out=str(out), **QUIET, **FAST)
    assert err.value.setting == "out"
    for key, t in _adapter(out).items():
        assert torch.equal(t, before[key])
    finetune(steps=3, out=str(out), overwrite=True, seed=5, **QUIET, **FAST)
    assert any(not torch.equal(t, before[k]) for k, t in _adapter(out).items())
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-3"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(SettingError, match="out: .* holds files this command did not write: notes.txt"):
            finetune(steps=2, out=str(tmp_path / "mine"), overwrite=overwrite, **QUIET, **FAST)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    finetune(steps=1, out=str(tmp_path / "empty"), **QUIET, **FAST)  # an empty directory is a new one


def test_another_process_s_writability_probe_is_not_a_foreign_file(tmp_path):
    """Under torchrun every process checks --out: one process's writability probe (`.fused_lora-probe-*`, there
    for an instant) is this command's own file, not one that makes --out "hold files this command did not
    write" (seen once in CI: rank 0 refused rank 1's probe and the FSDP2 resume test failed). A file of any other
    name still is."""
    out = tmp_path / "a"
    out.mkdir()
    (out / ".fused_lora-probe-k3x9q1ab").write_text("")  # another process's probe, caught mid-check
    finetune(steps=1, out=str(out), **QUIET, **FAST)
    (out / ".fused_lora-probe-notes").write_text("")
    (out / "notes.txt").write_text("")
    with pytest.raises(SettingError, match="holds files this command did not write: notes.txt: choose"):
        finetune(steps=1, out=str(out), overwrite=True, **QUIET, **FAST)


def test_a_checkpoint_half_written_is_never_resumed_from(tmp_path, monkeypatch):
    """Checkpoints are written in a staging directory and renamed in whole: a failure (or a crash)
    while writing step 4's leaves step 2's as the last, which --resume uses; the leftover staging
    directory is ignored and removed by the next checkpoint."""
    import fused_lora.cli.finetune as ft
    out = tmp_path / "a"
    real = ft.save_file
    calls = []

    def failing_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(ft, "save_file", failing_second)
    with pytest.raises(OSError, match="No space left"):
        finetune(steps=6, save_every=2, out=str(out), **QUIET, **FAST)
    monkeypatch.setattr(ft, "save_file", real)
    names = sorted(p.name for p in out.iterdir())
    assert "checkpoint-2" in names and "checkpoint-4" not in names
    os.makedirs(out / ".checkpoint-4.tmp-12345-abcdefgh")  # as a kill -9 would leave it
    lines = []
    finetune(steps=6, save_every=2, out=str(out), resume=True, log=lines.append, stream=None, **FAST)
    assert any("resuming from" in line and "checkpoint-2" in line for line in lines)
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-6"]


def test_ctrl_c_in_the_command_is_one_line_and_saves(tmp_path):
    """issue 18 item 16: a real SIGINT during `finetune`: exit status 130, no traceback, one line
    "interrupted at step N" naming where the adapter trained so far is, which loads."""
    out = tmp_path / "a"
    # SIGINT's default restored in the child: a shell without job control starts background jobs with
    # SIGINT ignored, and then Python would not turn it into KeyboardInterrupt.
    proc = subprocess.Popen([sys.executable, "-m", "fused_lora", "finetune", "--steps", "100000", "--batch", "2",
                             "--seq", "8", "--device", "cpu", "--log-every", "1", "--eval-split", "0", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        for line in proc.stdout:
            if "step    3/" in line or time.monotonic() > deadline:
                break
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    # (Installed third-party packages may print warnings on import: the command's own lines are counted.)
    ours = [line for line in stderr.splitlines() if "fused_lora" in line and "site-packages" not in line]
    assert len(ours) == 1 and stderr.strip().splitlines()[-1] == ours[0], stderr
    assert ours[0].startswith("python -m fused_lora finetune: interrupted at step ")
    step = int(ours[0].split("interrupted at step ")[1].split()[0])
    assert step >= 3 and f"saved to {out}" in ours[0] and "--resume" in ours[0]
    LoraModel.from_pretrained(build_llama("tiny"), out)
    assert (out / f"checkpoint-{step}" / "adapter_model.safetensors").exists()


def test_resume_under_fsdp2_equals_one_process(tmp_path):
    """Resuming under FSDP2 (2 processes): the optimizer's state is gathered whole into the checkpoint and
    sharded again on loading. 2 steps, then resumed to 4, give what one process trains in 4 steps, to the
    tolerance of tests/cli/test_distributed.py (the processes sum in another order: 1e-4 relative in norm,
    every element within one step, lr)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          os.path.join(ROOT, "tests", "finetune_resume_worker.py"), str(tmp_path)],
                         capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert res.returncode == 0, launch_failure(res.stderr)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from finetune_resume_worker import SETTINGS
    single = finetune(steps=4, out=str(tmp_path / "single"), **{k: v for k, v in SETTINGS.items() if k != "engine"})
    with open(tmp_path / "losses.json") as f:
        assert json.load(f) == pytest.approx(list(single), abs=1e-5)
    got, want = _adapter(tmp_path / "adapter"), _adapter(tmp_path / "single")
    assert got.keys() == want.keys()
    for key, ref in want.items():
        diff = got[key] - ref
        assert diff.norm() <= 1e-4 * ref.norm() and diff.abs().max() <= SETTINGS["lr"], key
    assert min(t.norm().item() for k, t in want.items() if "lora_B" in k) > 1e-2  # it trained
