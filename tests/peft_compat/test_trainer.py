"""A LoraModel in transformers' Trainer: default arguments, peft-format checkpoints, resume, gradient
checkpointing (fused_lora/trainer.py)."""
import os

import peft
import pytest
import torch
from transformers import Trainer, TrainingArguments

from fused_lora import AdapterError, LoraConfig, LoraModel, LoraTrainer, get_lora_model, lora_trainer_class
from fused_lora.cli.finetune import build_llama, counting_batches

VOCAB = 256  # LLAMA_SIZES["tiny"]


def tokens_dataset(n=16, seq=12):
    """A list of examples with one column the model does not take (Trainer must drop it)."""
    batches = counting_batches(VOCAB, 1, seq, seed=3)
    return [{"input_ids": t[0], "labels": t[0], "source_id": i} for i, t in zip(range(n), batches)]


def lora_llama(dropout=0.0):
    return get_lora_model(build_llama("tiny"), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                          target_modules=["q_proj", "v_proj", "down_proj"]))


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=2, learning_rate=1e-2,
                report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=0)
    base.update(kw)
    return TrainingArguments(**base)


def adapter(lm):
    return {n: p.detach().clone() for n, p in lm.named_parameters() if p.requires_grad}


def test_plain_trainer_with_default_arguments_trains(tmp_path):
    # Before: "The batch received was empty ... keys expected by the model: args,kwargs".
    lm = lora_llama()
    before = adapter(lm)
    Trainer(model=lm, args=args(tmp_path, max_steps=2), train_dataset=tokens_dataset()).train()
    after = adapter(lm)
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_forward_has_the_model_signature():
    import inspect
    lm = lora_llama()
    params = inspect.signature(lm.forward).parameters
    assert list(params) == list(inspect.signature(lm.get_base_model().forward).parameters)
    assert "input_ids" in params and "labels" in params


def test_checkpoints_and_save_model_are_peft_adapters(tmp_path):
    lm = lora_llama()
    trainer = LoraTrainer(model=lm, args=args(tmp_path, save_strategy="steps", save_steps=2),
                          train_dataset=tokens_dataset())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    x = torch.arange(10)[None] % VOCAB
    lm.eval()
    with torch.no_grad():
        want = lm(input_ids=x).logits
    for d in (tmp_path / "checkpoint-4", tmp_path / "final"):
        files = set(os.listdir(d))
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not files & {"model.safetensors", "pytorch_model.bin"}
        ours = LoraModel.from_pretrained(build_llama("tiny"), d)
        theirs = peft.PeftModel.from_pretrained(build_llama("tiny"), d)
        with torch.no_grad():
            torch.testing.assert_close(ours(input_ids=x).logits, want)
            torch.testing.assert_close(theirs(input_ids=x).logits, want)
    assert {"optimizer.pt", "trainer_state.json"} <= set(os.listdir(tmp_path / "checkpoint-2"))


def test_resume_equals_uninterrupted_run(tmp_path):
    full = lora_llama()
    LoraTrainer(model=full, args=args(tmp_path / "a", save_strategy="steps", save_steps=2),
                train_dataset=tokens_dataset()).train()
    resumed = lora_llama()  # the same initial adapter (same seed), then checkpoint-2's weights and optimizer
    init = adapter(resumed)
    trainer = LoraTrainer(model=resumed, args=args(tmp_path / "b"), train_dataset=tokens_dataset())
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want, got = adapter(full), adapter(resumed)
    assert any(not torch.equal(init[k], got[k]) for k in got)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_resume_refuses_another_adapter(tmp_path):
    LoraTrainer(model=lora_llama(), args=args(tmp_path / "a", max_steps=2, save_strategy="steps", save_steps=2),
                train_dataset=tokens_dataset()).train()
    other = get_lora_model(build_llama("tiny"), LoraConfig(r=2, target_modules=["q_proj", "v_proj", "down_proj"]))
    trainer = LoraTrainer(model=other, args=args(tmp_path / "b"), train_dataset=tokens_dataset())
    with pytest.raises(AdapterError, match="r=4"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))


def test_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain, ckpt = lora_llama(dropout=0.1), lora_llama(dropout=0.1)
    LoraTrainer(model=plain, args=args(tmp_path / "a", max_steps=2), train_dataset=tokens_dataset()).train()
    LoraTrainer(model=ckpt, args=args(tmp_path / "b", max_steps=2, gradient_checkpointing=True),
                train_dataset=tokens_dataset()).train()
    assert ckpt.get_base_model().is_gradient_checkpointing
    want, got = adapter(plain), adapter(ckpt)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def test_evaluation_reports_the_loss(tmp_path):
    trainer = LoraTrainer(model=lora_llama(), args=args(tmp_path), eval_dataset=tokens_dataset(4))
    assert trainer.label_names == ["labels"]
    assert "eval_loss" in trainer.evaluate()


def test_trainer_full_model_checkpoint_is_named_on_load(tmp_path):
    lm = lora_llama()
    Trainer(model=lm, args=args(tmp_path, max_steps=1), train_dataset=tokens_dataset()).save_model(str(tmp_path / "m"))
    with pytest.raises(AdapterError, match="LoraTrainer"):
        LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "m")


def test_lora_trainer_class():
    assert lora_trainer_class(Trainer) is LoraTrainer
    with pytest.raises(TypeError):
        lora_trainer_class(int)


def offline_tokenizer():
    """A word-level tokenizer over the tiny Llama's 256 ids, built in memory (no download)."""
    import transformers
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    vocab = {f"t{i}": i for i in range(VOCAB)}
    vocab["<pad>"], vocab["<eos>"] = 0, 1
    tok = Tokenizer(WordLevel(vocab, unk_token="<pad>"))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    SFT = lora_trainer_class(trl.SFTTrainer)
    assert lora_trainer_class(trl.SFTTrainer) is SFT
    lm = lora_llama()
    before = adapter(lm)
    data = datasets.Dataset.from_dict({"input_ids": [ex["input_ids"].tolist() for ex in tokens_dataset(8)]})
    trainer = SFT(model=lm, args=trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                                                report_to=[], bf16=False, save_strategy="no"),
                  train_dataset=data, processing_class=offline_tokenizer())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert any(not torch.equal(before[k], v) for k, v in adapter(lm).items())
    assert "adapter_model.safetensors" in os.listdir(tmp_path / "final")
    assert "model.safetensors" not in os.listdir(tmp_path / "final")
    LoraModel.from_pretrained(build_llama("tiny"), tmp_path / "final")


def test_load_best_model_at_end_loads_the_best_checkpoints_adapter(tmp_path):
    from safetensors.torch import load_file
    lm = lora_llama()
    trainer = LoraTrainer(model=lm, args=args(tmp_path, max_steps=4, save_strategy="steps", save_steps=1,
                                              eval_strategy="steps", eval_steps=1, load_best_model_at_end=True,
                                              # "best" = highest loss: an early checkpoint, not the final model
                                              metric_for_best_model="eval_loss", greater_is_better=True),
                          train_dataset=tokens_dataset(), eval_dataset=tokens_dataset(4))
    trainer.train()
    assert not trainer.state.best_model_checkpoint.endswith("checkpoint-4")  # else the test proves nothing
    best = load_file(os.path.join(trainer.state.best_model_checkpoint, "adapter_model.safetensors"))
    for name, layer in lm.lora_layers():
        assert torch.equal(layer.lora_A.detach(), best[f"base_model.model.{name}.lora_A.weight"])
        assert torch.equal(layer.lora_B.detach(), best[f"base_model.model.{name}.lora_B.weight"])


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_forward_and_its_signature(how):
    import copy
    import inspect
    import io
    lm = lora_llama()
    if how == "deepcopy":
        twin = copy.deepcopy(lm)
    else:
        buf = io.BytesIO()
        torch.save(lm, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert "input_ids" in inspect.signature(twin.forward).parameters
    with torch.no_grad():
        for _, layer in twin.lora_layers():
            layer.lora_B.fill_(0.3)
        x = torch.arange(8)[None]
        assert not torch.equal(twin(input_ids=x).logits, lm(input_ids=x).logits)


def test_resume_of_an_adapter_not_named_default(tmp_path):
    """peft's layout saves such an adapter in checkpoint-N/<its name>: resuming must find it there."""
    def named():
        return LoraModel(build_llama("tiny"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
                         adapter_name="task")
    full = named()
    LoraTrainer(model=full, args=args(tmp_path / "a", save_strategy="steps", save_steps=2),
                train_dataset=tokens_dataset()).train()
    assert os.path.isfile(tmp_path / "a" / "checkpoint-2" / "task" / "adapter_model.safetensors")
    resumed = named()
    LoraTrainer(model=resumed, args=args(tmp_path / "b"), train_dataset=tokens_dataset()).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    want, got = adapter(full), adapter(resumed)
    for k in want:
        torch.testing.assert_close(got[k], want[k], msg=k)


def with_first(t, value):
    out = t.clone()
    out.view(-1)[0] = value
    return out


SPOILS = [(lambda t: with_first(t, float("nan")), r"holds NaN or inf \(1 NaN, 0 inf "),
          (lambda t: with_first(t, float("inf")), r"holds NaN or inf \(0 NaN, 1 inf "),
          (lambda t: t.to(torch.int32), "has dtype torch.int32, not floating point"),
          (lambda t: with_first(t.double(), 1e300), r"holds 1e\+300, beyond the range of torch.float32")]


def test_resume_and_best_model_check_the_checkpoint_as_from_pretrained_does(tmp_path):
    """resume_from_checkpoint and load_best_model_at_end load a checkpoint's adapter with every check of
    from_pretrained: NaN, inf, a non-float lora_B, a value beyond the model's dtype are each refused,
    the model unchanged (issue 18 item 3: they loaded, the int32 one cast silently)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    LoraTrainer(model=lora_llama(), args=args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1),
                train_dataset=tokens_dataset()).train()
    ckpt = tmp_path / "a" / "checkpoint-1"
    path = ckpt / "adapter_model.safetensors"
    with safe_open(path, framework="pt") as f:
        metadata, sound = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in sound if k.endswith("v_proj.lora_B.weight"))
    lm = lora_llama()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    trainer = LoraTrainer(model=lm, args=args(tmp_path / "b"), train_dataset=tokens_dataset())
    for spoil, match in SPOILS:
        save_file({**sound, key: spoil(sound[key])}, path, metadata=metadata)
        with pytest.raises(AdapterError, match=rf"'{key}' {match}"):
            trainer.train(resume_from_checkpoint=str(ckpt))
        trainer.state.best_model_checkpoint = str(ckpt)  # the path load_best_model_at_end takes
        with pytest.raises(AdapterError, match=rf"'{key}' {match}"):
            trainer._load_best_model()
        assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())


@pytest.mark.parametrize("how", ["resume", "best_model"])
def test_a_checkpoint_without_an_adapter_file_is_refused(tmp_path, how):
    """A checkpoint holding transformers' model.safetensors (what a plain Trainer writes for a LoraModel)
    instead of the adapter: Trainer's own loading would take its state dict with none of the adapter
    loader's checks (a NaN lora_B loaded silently); refused naming the file, the model unchanged.
    Issue 18, attacker re-trial, finding 2."""
    from safetensors.torch import save_file
    trained = lora_llama()
    LoraTrainer(model=trained, args=args(tmp_path / "a", max_steps=1, save_strategy="steps", save_steps=1),
                train_dataset=tokens_dataset()).train()
    ckpt = tmp_path / "a" / "checkpoint-1"
    state = {k: v.detach().clone().contiguous() for k, v in trained.state_dict().items()}
    key = next(k for k in state if "lora_B" in k)
    state[key].view(-1)[0] = float("nan")
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        os.remove(ckpt / name)
    save_file(state, ckpt / "model.safetensors")
    lm = lora_llama()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    trainer = LoraTrainer(model=lm, args=args(tmp_path / "b"), train_dataset=tokens_dataset())
    with pytest.raises(AdapterError, match=r"checkpoint-1: holds no adapter \(adapter_model.safetensors, .*\) for "
                                           r"this LoraModel, only model.safetensors .*nothing was loaded"):
        if how == "resume":
            trainer.train(resume_from_checkpoint=str(ckpt))
        else:
            trainer.state.best_model_checkpoint = str(ckpt)  # the path load_best_model_at_end takes
            trainer._load_best_model()
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
