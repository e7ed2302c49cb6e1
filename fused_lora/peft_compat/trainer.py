"""Training a LoraModel with transformers' Trainer, or any Trainer subclass (TRL's SFTTrainer, ...).

    trainer = fused_lora.LoraTrainer(model=lora_model, args=TrainingArguments(...), ...)
    SFT = fused_lora.lora_trainer_class(trl.SFTTrainer)           # the same for another Trainer class

Plain `Trainer(model=lora_model)` trains (LoraModel.forward carries the wrapped model's signature,
so the default `remove_unused_columns=True` keeps the right batch columns), but cannot checkpoint
it properly: Trainer recognises only `PreTrainedModel` and peft's `PeftModel` (plain `isinstance`
checks in `_save`, `_load_from_checkpoint`, `_load_best_model`), so for any other module it saves
the full state dict as model.safetensors and resumes from that. Making a LoraModel pass those
checks would mean pretending to be one of those classes, and every other branch behind the same
checks (peft's `load_adapter`/`active_adapters` calls, `PreTrainedModel.save_pretrained` arguments)
would then run on an object that is not one. A callback cannot do it either: `on_save` runs after
the full model is written, `save_model()` calls no callback, and resuming loads the model before
any callback runs. (It also reads label names from the model's class, LoraModel, which names
none, so evaluation would report no loss.) So the smallest mechanism that is right in every path is a Trainer subclass
overriding exactly those three methods (plus the label names Trainer reads from the model class):

- checkpoints (`save_steps`) and `save_model()` hold the adapter in peft's format
  (adapter_model.safetensors + adapter_config.json, no model.safetensors), which
  `LoraModel.from_pretrained` and `peft.PeftModel.from_pretrained` load;
- `resume_from_checkpoint` and `load_best_model_at_end` load the checkpoint's adapter weights into
  the model in place, checked first as `from_pretrained` checks a file (keys, shapes, dtypes, NaN
  and inf, values beyond the model's dtype: AdapterError, the model unchanged); the optimizer,
  scheduler and RNG states are Trainer's own. A checkpoint without an adapter file (the model.safetensors
  a plain Trainer writes for a LoraModel) is refused with AdapterError rather than loaded unchecked;
- `label_names` and `can_return_loss` come from the wrapped model's class, as for a peft model, so
  evaluation reports its loss;
- TRL's trainers patch the model they get with a fused LM head (`trl.trainer.utils.add_fused_lm_head`)
  whose forward calls `model.base_model` as transformers' backbone; a LoraModel's `base_model` has
  peft's meaning (the LoraModel itself), so, as TRL does for a peft model, the patch is moved to the
  wrapped model (`get_base_model()`), with the same settings.

Anything else (gradient checkpointing, mixed precision, DDP) is Trainer's, unchanged. DeepSpeed and
FSDP checkpoints are Trainer's own formats and are not converted.
"""
from __future__ import annotations

import functools
import inspect
import os

import torch
from transformers import Trainer
from transformers.utils.generic import can_return_loss, find_labels

from .adapters import WEIGHTS_NAME, AdapterError, load_weights_into
from .model import LoraModel

TRAINING_ARGS_NAME = "training_args.bin"  # transformers.trainer's name for the saved TrainingArguments
# transformers' names for a model's full state in a checkpoint (weights and their shard indexes)
FULL_STATE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                    "pytorch_model.bin.index.json")


class LoraTrainerMixin:
    """Mix into a transformers Trainer class (before it) to checkpoint a LoraModel as a peft adapter;
    see the module docstring. With any other model the Trainer behaves as it did."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if isinstance(self.model, LoraModel):
            base = type(self.model.get_base_model())  # Trainer read them from LoraModel, which names none
            if self.args.label_names is None:
                self.label_names = find_labels(base)
            self.can_return_loss = can_return_loss(base)
            _move_trl_lm_head(self.model)

    def _save(self, output_dir=None, state_dict=None) -> None:
        if not isinstance(self.model, LoraModel):
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        self.model.save_pretrained(output_dir)  # the adapter's own tensors; Trainer's state_dict is not needed
        # The rest as Trainer._save does it: the tokenizer/processor and the training arguments.
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        elif getattr(self.data_collator, "tokenizer", None) is not None:
            self.data_collator.tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        target = model if model is not None else self.model
        if self._loads_adapter(target, resume_from_checkpoint):
            load_weights_into(target, resume_from_checkpoint)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if self._loads_adapter(self.model, best):
            load_weights_into(self.model, best)
            return
        super()._load_best_model()

    def _loads_adapter(self, model, directory) -> bool:
        """Whether to load `directory` as this LoraModel's adapter checkpoint (False: Trainer's own loading, for
        any other model and for DeepSpeed / FSDP checkpoints, Trainer's formats). A checkpoint of a LoraModel
        without an adapter file (e.g. the model.safetensors a plain Trainer writes) is refused: Trainer would
        load its state dict with none of the adapter loader's checks (NaN, dtypes, the compute range)."""
        if not isinstance(model, LoraModel) or getattr(self, "is_deepspeed_enabled", False) \
                or getattr(self, "is_fsdp_enabled", False):
            return False
        if _holds_adapter(model, directory):
            return True
        held = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
        found = [n for n in held if n in FULL_STATE_NAMES]
        raise AdapterError(f"{directory}: holds no adapter ({WEIGHTS_NAME}, at the top or in "
                           f"{model.first_adapter}/) for this LoraModel"
                           + (f", only {', '.join(found)} (transformers' full model state, what a plain Trainer "
                              f"writes for a model it does not know)" if found else "")
                           + ": a LoraModel resumes from the checkpoints LoraTrainer writes (peft's adapter format), "
                             "checked as from_pretrained checks an adapter; nothing was loaded")


def _holds_adapter(model, directory) -> bool:
    """Whether `directory` is a checkpoint of this LoraModel's adapters, in peft's layout: the first
    adapter at the top, or in a sub-directory named after it when it is not called "default"."""
    return isinstance(model, LoraModel) and any(
        os.path.isfile(os.path.join(d, WEIGHTS_NAME)) for d in (directory, os.path.join(directory, model.first_adapter)))


def _move_trl_lm_head(lora_model: LoraModel) -> None:
    """If TRL put its fused LM head on the LoraModel, put it on the wrapped model instead (see above)."""
    func = getattr(lora_model.__dict__.get("forward"), "__func__", None)
    # functools.wraps gave TRL's function LoraModel.forward's names: its globals tell where it is from.
    if (func is None or func.__code__ is LoraModel.forward.__code__
            or not func.__globals__.get("__name__", "").startswith("trl.")):
        return
    try:
        from trl.trainer.utils import add_fused_lm_head
        settings = inspect.getclosurevars(func).nonlocals
        kwargs = {k: settings[k] for k in list(inspect.signature(add_fused_lm_head).parameters)[1:]}
    except (ImportError, KeyError, TypeError, ValueError) as err:
        raise RuntimeError(f"a TRL trainer replaced the LoraModel's forward with {func.__qualname__}, which "
                           f"fused_lora cannot move to the wrapped model ({err!r}); this TRL version is not "
                           "supported with a LoraModel: use peft with fused_lora.patch_peft(model)") from err
    del lora_model.__dict__["forward"]
    lora_model.expose_forward_signature()
    add_fused_lm_head(lora_model.get_base_model(), **kwargs)


@functools.lru_cache(maxsize=None)
def lora_trainer_class(trainer_class: type) -> type:
    """`trainer_class` (transformers' Trainer or a subclass, e.g. trl.SFTTrainer) with LoraTrainerMixin:
    a LoraModel trained with it is checkpointed as a peft adapter. The same class for the same argument."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"lora_trainer_class expects transformers.Trainer or a subclass, got {trainer_class!r}")
    if issubclass(trainer_class, LoraTrainerMixin):
        return trainer_class
    if trainer_class is Trainer:
        return LoraTrainer
    return type(f"Lora{trainer_class.__name__}", (LoraTrainerMixin, trainer_class),
                {"__module__": __name__, "__doc__": f"{trainer_class.__name__} checkpointing a LoraModel as a "
                                                    "peft adapter (fused_lora.peft_compat.trainer.LoraTrainerMixin)."})


class LoraTrainer(LoraTrainerMixin, Trainer):
    """transformers.Trainer whose checkpoints, save_model() and resume handle a LoraModel as a peft
    adapter (see fused_lora.peft_compat.trainer)."""
