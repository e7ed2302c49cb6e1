"""Fine-tuning with fused_lora: your transformers model on your data, or a Llama with random weights on
synthetic tokens. Nothing is downloaded.

    python -m fused_lora finetune --model DIR --data FILE --steps 200 --out my_adapter
    python -m fused_lora finetune --size tiny --steps 40 --out my_adapter        # synthetic
    torchrun --nproc-per-node 2 -m fused_lora finetune ... [--fsdp]              # several processes
    python -m fused_lora finetune --size small --quantize nf4                     # QLoRA: a quantized base

`--model DIR` is a local transformers model directory (config.json and weights, loaded with
AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True)); without it a Llama of one of
LLAMA_SIZES is built with random weights. `--data FILE` is JSONL, one example per line as
{"input_ids": [...]} or {"text": "..."}, or plain text, one example per line; text is tokenized
with the tokenizer in the model directory (its special tokens, and its EOS token closing each
example). Examples longer than `seq` tokens are split into pieces of `seq` tokens. Without
--data the model learns synthetic sequences (each counts up from a random start by a random
stride, modulo the vocabulary). `eval_split` of the examples (after a shuffle by the seed) are held
out: their mean next-token loss is measured before and after training. The adapters are trained
with AdamW; the adapter is saved in peft's format. `quantize` ("nf4" or "int8") quantizes the base's
Linear layers first (`quantize_model`'s defaults: all but the output layer; NF4 with double quantization
in blocks of 64, so every quantized layer's in_features must be a multiple of 64) and trains the adapters
over it (QLoRA); FSDP2 shards the quantized base with the other parameters.

Checkpoints: `out/checkpoint-<step>/` holds the adapter (peft's format), the optimizer's state and
the RNG states (optimizer.safetensors) and trainer_state.json (the step, the losses so far, the
settings). Each is written in a staging directory and renamed into place whole, so the last
complete one is always there; only the last is kept. `resume` continues from it exactly: the
data order follows the seed and the step, the dropout masks the restored RNG, so an interrupted and
resumed run ends where an uninterrupted run ends. An interrupt (Ctrl-C) saves the adapter trained
so far and a checkpoint (in a single process).

Under torchrun each process trains on its rows of every batch (see fused_lora/distributed.py).
Needs transformers (`pip install 'fused_lora[hf]'`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Optional, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import dispatch
from ..core.files import missing_extra, name_max, path_max
from . import distributed
from ..peft_compat.adapters import CONFIG_NAME, WEIGHTS_NAME, load_weights_into
from ..peft_compat.config import LoraConfig
from .distributed import SettingError
from ..peft_compat.model import get_lora_model
from ..peft_compat.quantize import quantize_model
from ..core.formats import FORMATS, QuantizationError
from ..modules.quantized import held_quantized_nbytes

__all__ = ["finetune", "check_settings", "train", "Plan", "TrainingRun", "SettingError", "TrainingDiverged",
           "TrainingInterrupted", "ModelLoadError", "SaveError", "MissingDependency", "read_data", "Data",
           "build_llama", "counting_batches", "train_step", "loss_and_grads", "LLAMA_SIZES", "LLAMA_TARGETS"]

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA_SIZES = {
    # A few hundred thousand parameters: tests and the CPU example.
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
    # About 4M parameters: the CPU benchmark (big enough that matmuls, not Python, dominate).
    "small": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, vocab_size=2048),
    # About 1.1B parameters: the GPU benchmark's model (TinyLlama's shape).
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
               num_key_value_heads=4, vocab_size=32000),
}
DEFAULT_SAVE_EVERY = 50
# The synthetic stream has no size: its eval set is eval_split x this many sequences.
SYNTHETIC_EVAL_POOL = 320
SEED_LIMIT = 2**31  # seeds in [0, 2^31): the eval stream's seed is seed + 2^31, apart from every training seed
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "trainer_state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
CHECKPOINT_FORMAT = 1
_CHECKPOINT = re.compile(r"checkpoint-([0-9]+)")
# The weights files transformers reads (safetensors, or its own pickle format loaded with weights_only).
MODEL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# Settings a resumed run shares with its checkpoint: they decide what the adapter is and which data
# each step sees. lr may change (e.g. lower after a divergence); steps, device, engine, logging too.
RESUME_SAME = ("model", "size", "data", "r", "lora_alpha", "lora_dropout", "target_modules", "seq", "batch", "seed",
               "eval_split", "quantize")
NF4_BLOCKSIZE = 64  # quantize_model's default block size: the NF4 base's in_features must be multiples of it
IGNORE = -100  # label of a position without a next-token loss (padding), as transformers' loss reads it


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite: training stopped, and nothing more was saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training. `step`: the last step done; `saved`: the directory the adapter trained
    so far was saved to (with a checkpoint to resume from), or None, with `why` saying why not.
    A KeyboardInterrupt, so that a caller of `finetune` still sees a Ctrl-C."""

    def __init__(self, step: int, steps: int, saved: Optional[str], checkpoint: Optional[str], why: str = ""):
        super().__init__(f"interrupted at step {step} of {steps}")
        self.step, self.steps, self.saved, self.checkpoint, self.why = step, steps, saved, checkpoint, why


class ModelLoadError(RuntimeError):
    """The model directory passed the checks but transformers could not load it."""


class SaveError(OSError):
    """The adapter or a checkpoint could not be written (disk full, permissions): training stopped.
    The last complete checkpoint is still in place."""


class MissingDependency(ImportError):
    """A package a feature needs is not installed; the message names the package and the extra."""


def _require_transformers(feature: str = "finetune") -> None:
    try:
        import transformers  # noqa: F401
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] != "transformers":
            raise
        raise MissingDependency(missing_extra(feature, "transformers", "hf")) from None


def build_llama(size: str = "tiny", dtype=torch.float32, device="cpu", seed: int = 0, max_positions: int = 4096):
    """A LlamaForCausalLM with random weights from one of LLAMA_SIZES (SDPA attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if size not in LLAMA_SIZES:
        raise ValueError(f"unknown size {size!r}; one of {', '.join(LLAMA_SIZES)}")
    config = LlamaConfig(**LLAMA_SIZES[size], max_position_embeddings=max_positions,
                         attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the target device: the 1B model's init is slow on a CPU
        model = LlamaForCausalLM(config)
    return model.to(dtype=dtype)


def load_model(directory: str, dtype: torch.dtype, device: torch.device):
    """AutoModelForCausalLM from a local directory (never downloads), in `dtype` on `device`."""
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError, ... for a bad directory
        raise ModelLoadError(f"cannot load the model in {directory!r}: {err}") from err
    model.config.use_cache = False  # no KV cache while training
    return model.to(device)


def counting_batches(vocab: int, batch: int, seq: int, seed: int = 0, device="cpu") -> Iterator[torch.Tensor]:
    """Endless batches of token ids: start + stride * position (mod vocab), stride in 1..4."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq)
    while True:
        start = torch.randint(0, vocab, (batch, 1), generator=g)
        stride = torch.randint(1, 5, (batch, 1), generator=g)
        yield ((start + stride * pos) % vocab).to(device)


# ---------------------------------------------------------------- data files

@dataclasses.dataclass
class Data:
    """The token sequences of a data file (`read_data`): `train` and `eval` hold pieces of at most
    `seq` tokens of the training and the held-out examples."""
    path: str
    kind: str
    examples: int
    train_examples: int
    eval_examples: int
    train: list
    eval: list
    split: int  # examples longer than seq, split into pieces
    dropped: int  # pieces of fewer than 2 tokens (no next-token loss), left out
    digest: str  # sha256 of the file: a resumed run checks it trains on the same data
    pad_id: int = 0


def _tokenizer_of(model_dir: Optional[str], path: str):
    if model_dir is None:
        raise SettingError("data", f"{path!r} holds text, which needs a tokenizer: give --model DIR with one, or "
                           'token ids as JSONL ({"input_ids": [...]} per line)')
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # no tokenizer files, or ones transformers cannot read
        raise SettingError("data", f"{path!r} holds text, which needs a tokenizer, and the model directory "
                           f"{model_dir!r} has none that loads ({type(err).__name__}: {str(err)[:200]}): give token "
                           'ids as JSONL ({"input_ids": [...]} per line)') from None


def _examples(path: str, lines: list) -> tuple[list, str]:
    """(line number, token ids or text) per example, and what kind of file it is."""
    if not lines[0][1].lstrip().startswith("{"):
        return [(n, line.rstrip("\r")) for n, line in lines], "text lines"
    found = []
    for n, line in lines:
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise SettingError("data", f"{path}: line {n}: not JSON ({err})") from None
        except RecursionError:  # nesting deeper than the parser's recursion allows
            raise SettingError("data", f"{path}: line {n}: its JSON is nested too deeply") from None
        if not isinstance(obj, dict) or ("input_ids" in obj) == ("text" in obj):
            raise SettingError("data", f'{path}: line {n}: expected an object with "input_ids" or "text", not both '
                               '("input_ids": a list of token ids, "text": a string)')
        if "input_ids" in obj:
            ids = obj["input_ids"]
            if not isinstance(ids, list) or not all(type(t) is int for t in ids):
                raise SettingError("data", f"{path}: line {n}: input_ids must be a list of integers")
            found.append((n, ids))
        elif isinstance(obj["text"], str):
            found.append((n, obj["text"]))
        else:
            raise SettingError("data", f"{path}: line {n}: text must be a string")
    kinds = {isinstance(v, str) for _, v in found}
    return found, "JSONL, " + ("text and token ids" if len(kinds) == 2 else "text" if True in kinds else "token ids")


def read_data(path: str, vocab_size: int, seq: int, eval_split: float = 0.1, seed: int = 0,
              model_dir: Optional[str] = None) -> Data:
    """Read and check a data file (see the module doc); SettingError("data", ...) naming the line of any
    problem. Only regular files are read (a FIFO would wait for a writer)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise SettingError("data", f"{path!r} does not exist") from None
    except OSError as err:
        raise SettingError("data", f"cannot read {path!r}: {err.strerror or err}") from None
    if not stat.S_ISREG(mode):
        raise SettingError("data", f"{path!r} is not a regular file")
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise SettingError("data", f"cannot read {path!r}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SettingError("data", f"{path!r} is not UTF-8 text (byte {err.start})") from None
    lines = [(n, line) for n, line in enumerate(text.split("\n"), 1) if line.strip()]
    if not lines:
        raise SettingError("data", f"{path!r} holds no examples")
    found, kind = _examples(path, lines)
    pad_id = 0
    if any(isinstance(v, str) for _, v in found):
        tokenizer = _tokenizer_of(model_dir, path)
        eos = tokenizer.eos_token_id
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        encoded = []
        for n, v in found:
            if isinstance(v, str):
                v = list(tokenizer(v)["input_ids"])
                if eos is not None and (not v or v[-1] != eos):
                    v.append(eos)  # the example ends here: the model learns where examples end
            encoded.append((n, v))
        found = encoded
    for n, ids in found:
        bad = next((t for t in ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise SettingError("data", f"{path}: line {n}: token id {bad} is outside the model's vocabulary "
                               f"(0 to {vocab_size - 1})")
    count = len(found)
    n_eval = 0 if eval_split == 0 else max(1, round(eval_split * count))
    if n_eval >= count:
        raise SettingError("eval_split", f"{path!r} holds {count} example{'s' * (count != 1)}: holding out "
                           f"{n_eval} leaves none to train on (eval_split 0: no eval)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])

    def pieces(ids_list):
        out, split, dropped = [], 0, 0
        for ids in ids_list:
            split += len(ids) > seq
            for i in range(0, len(ids), seq):
                piece = ids[i:i + seq]
                if len(piece) >= 2:
                    out.append(piece)
                else:
                    dropped += 1
        return out, split, dropped
    train, split_t, dropped_t = pieces([ids for i, (_, ids) in enumerate(found) if i not in held])
    held_out, split_e, dropped_e = pieces([ids for i, (_, ids) in enumerate(found) if i in held])
    if not train:
        raise SettingError("data", f"{path!r}: no sequence of at least 2 tokens to train on (the next-token loss "
                           "needs two)")
    return Data(path, kind, count, count - n_eval, n_eval, train, held_out, split_t + split_e, dropped_t + dropped_e,
                hashlib.sha256(raw).hexdigest(), pad_id)


def _pad(pieces: list, pad_id: int) -> dict:
    """input_ids, attention_mask and labels (IGNORE at padding) of sequences padded on the right."""
    width = max(len(p) for p in pieces)
    ids = torch.full((len(pieces), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(pieces), width), dtype=torch.long)
    for i, p in enumerate(pieces):
        ids[i, :len(p)] = torch.tensor(p, dtype=torch.long)
        mask[i, :len(p)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, IGNORE)}


def _file_batches(data: Data, batch: int, seed: int, first: int) -> Iterator[dict]:
    """Batches of training pieces from batch number `first` on. Epoch e visits every piece once, in
    an order drawn from (seed, e): batch k is a function of k, so a resumed run sees what an
    uninterrupted run would have seen."""
    n, orders = len(data.train), {}
    k = first
    while True:
        rows = []
        for position in range(k * batch, (k + 1) * batch):
            epoch = position // n
            if epoch not in orders:
                orders.clear()
                g = torch.Generator().manual_seed((seed << 32) ^ epoch)
                orders[epoch] = torch.randperm(n, generator=g).tolist()
            rows.append(data.train[orders[epoch][position % n]])
        yield _pad(rows, data.pad_id)
        k += 1


# ---------------------------------------------------------------- settings

@dataclasses.dataclass
class Plan:
    """A fine-tuning run, every setting checked (`check_settings`); `train(plan)` runs it."""
    steps: int
    batch: int
    seq: int
    lr: float
    out: Optional[str]
    engine: Optional[str]
    log_every: int
    save_every: int
    world: int
    seed: int
    eval_split: float
    device: torch.device
    dtype: torch.dtype
    config: LoraConfig
    model: Optional[str]
    size: Optional[str]
    vocab_size: int
    data: Optional[Data]
    overwrite: bool
    record: dict  # the settings a checkpoint records (RESUME_SAME)
    resume_from: Optional[str] = None  # the checkpoint directory to continue from
    quantize: Optional[str] = None  # the base's format ("nf4", "int8"), None for a 16-bit base
    resume_state: Optional[dict] = None


def _check_int(name: str, value, minimum: int, why: str = "", below: Optional[int] = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum or (below and value >= below):
        bound = f">= {minimum}" + (f" and < {below}" if below else "")
        raise SettingError(name, f"must be an integer {bound}{why}, got {value!r}")


def _is_number(value) -> bool:
    """A finite real number (an int beyond any float is not: math.isfinite would raise OverflowError)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _total_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _model_config(directory: str):
    """The transformers config of a local model directory; SettingError("model", ...) for anything
    that is not one (a hub name, no config.json, no weights, no causal-LM head)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    if not os.path.isdir(directory):
        raise SettingError("model", f"{directory!r} is not a directory (nothing is downloaded: give a local "
                           "transformers model directory, e.g. one written by save_pretrained)")
    if not os.path.isfile(os.path.join(directory, "config.json")):
        raise SettingError("model", f"{directory!r} has no config.json: not a transformers model directory")
    if not any(os.path.isfile(os.path.join(directory, name)) for name in MODEL_WEIGHTS):
        raise SettingError("model", f"{directory!r} holds no weights ({', '.join(MODEL_WEIGHTS)})")
    try:
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as err:  # transformers' errors for a config it cannot read are of many types
        raise SettingError("model", f"cannot read {directory!r}/config.json: {str(err)[:300]}") from None
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise SettingError("model", f"{directory!r}: transformers has no causal language model for "
                           f"model_type {config.model_type!r} (AutoModelForCausalLM)")
    vocab = getattr(config, "vocab_size", None)
    if not isinstance(vocab, int) or vocab < 2:
        raise SettingError("model", f"{directory!r}: config.json gives no vocabulary size (vocab_size)")
    return config


def _check_output_names(out: str, steps: int) -> None:
    """Every name the run writes fits the filesystem: each directory still to be made and the names
    written inside `out` (NAME_MAX), and the longest path (PATH_MAX). save_pretrained checks its own
    directory only when it saves, at the end of the run."""
    path = os.path.abspath(out)
    existing, missing = path, []
    while not os.path.exists(existing):
        existing, name = os.path.split(existing)
        missing.append(name)
    # Inside out: the checkpoint, its staging directory (mkdtemp adds 8 characters) and save_pretrained's
    # staging of the adapter in it (".<name>.fused_lora-staging-<pid>-<8 characters>").
    staging = f".{CHECKPOINT_PREFIX}{steps}.tmp-12345678"
    inside = [f"{CHECKPOINT_PREFIX}{steps}", staging, f"{staging}.fused_lora-staging-{os.getpid()}-12345678"]
    limit = name_max(existing)
    for name in reversed(missing):
        size = len(os.fsencode(name))
        if size > limit:
            raise SettingError("out", f"the directory name {name[:40]!r}... is too long ({size} bytes; the "
                               f"filesystem takes {limit}): choose a shorter --out")
    longest = os.path.join(path, inside[-1], WEIGHTS_NAME)
    size, limit = len(os.fsencode(longest)), path_max(existing)
    if size >= limit:
        raise SettingError("out", f"the path is too long: the files written inside it have paths of {size} bytes, "
                           f"the filesystem takes fewer than {limit}: choose a shorter --out")
    for name in inside:
        if len(os.fsencode(name)) > name_max(existing):
            raise SettingError("out", f"the file name {name!r} is too long for this filesystem")


PROBE_PREFIX = ".fused_lora-probe-"  # `_check_writable`'s file, there for an instant (another process's, under torchrun)


def _check_writable(out: str) -> None:
    """Write (and remove) a file in `out`, or in its nearest existing parent when it does not exist
    yet: permission bits (os.access) say nothing of e.g. /proc, or a read-only mount. Nothing is
    created that stays, and processes of one torchrun job probing at once do not collide."""
    path = os.path.abspath(out)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        fd, probe = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise SettingError("out", f"cannot write the adapter to {out!r}: {err.strerror or err}") from None


def _ours(name: str) -> bool:
    """A name this command writes in `out`: the adapter's files, checkpoints, staging directories, and the
    writability probe of another process of the same job checking `out` at the same moment."""
    return (name in (WEIGHTS_NAME, CONFIG_NAME) or bool(_CHECKPOINT.fullmatch(name)) or name.startswith(PROBE_PREFIX)
            or (name.startswith(".") and ("fused_lora-staging-" in name or name.startswith(f".{CHECKPOINT_PREFIX}"))))


def checkpoints(out: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in `out`, by step (staging directories are not)."""
    found = []
    try:
        names = os.listdir(out)
    except OSError:
        return []
    for name in names:
        m = _CHECKPOINT.fullmatch(name)
        if m and os.path.isdir(os.path.join(out, name)):
            found.append((int(m.group(1)), os.path.join(out, name)))
    return sorted(found)


def _check_out(out: str, steps: int, resume: bool, overwrite: bool) -> Optional[str]:
    """The checks on `out`; returns the checkpoint to resume from, if resuming."""
    if out == "":
        raise SettingError("out", "must not be empty")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SettingError("out", f"{out!r} exists and is not a directory")
    _check_output_names(out, steps)
    _check_writable(out)
    entries = os.listdir(out) if os.path.isdir(out) else []
    foreign = sorted(e for e in entries if not _ours(e))
    if foreign:
        more = f" and {len(foreign) - 3} more" if len(foreign) > 3 else ""
        raise SettingError("out", f"{out!r} holds files this command did not write: {', '.join(foreign[:3])}{more}: "
                           "choose a new or empty directory")
    found = checkpoints(out)
    if resume:
        if not found:
            raise SettingError("resume", f"{out!r} holds no checkpoint to resume from")
        return found[-1][1]
    if not overwrite and (found or WEIGHTS_NAME in entries or CONFIG_NAME in entries):
        what = "an adapter" + (f" and a checkpoint at step {found[-1][0]}" if found else "")
        raise SettingError("out", f"{out!r} already holds {what}: --resume continues from its last checkpoint, "
                           "--overwrite starts afresh (replacing them), or choose another directory")
    return None


def _read_state(checkpoint: str) -> dict:
    """A checkpoint's trainer_state.json, its other files present; SettingError("resume", ...) otherwise."""
    missing = [n for n in (WEIGHTS_NAME, CONFIG_NAME, OPTIMIZER_NAME, STATE_NAME)
               if not os.path.isfile(os.path.join(checkpoint, n))]
    if missing:
        raise SettingError("resume", f"{checkpoint} lacks {', '.join(missing)}: not a checkpoint this command wrote")
    path = os.path.join(checkpoint, STATE_NAME)
    try:
        with open(path) as f:
            state = json.load(f)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a format-{CHECKPOINT_FORMAT} trainer state")
        problem = _state_problem(state)
        if problem:
            raise ValueError(f"not a format-{CHECKPOINT_FORMAT} trainer state ({problem})")
        return state
    except RecursionError:
        raise SettingError("resume", f"cannot read {path}: its JSON is nested too deeply") from None
    except (OSError, ValueError) as err:
        raise SettingError("resume", f"cannot read {path}: {err}") from None


def _state_problem(state: dict) -> Optional[str]:
    """What in a trainer_state.json has the wrong type for resuming (the values are used as numbers), or None."""
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step {step!r:.40} is not an integer >= 0"
    losses = state.get("losses")
    if not isinstance(losses, list) or not all(_is_number(v) for v in losses):
        return "losses is not a list of finite numbers"
    if len(losses) < step:
        return f"losses holds {len(losses)} values for step {step!r:.40}"
    for name in ("eval_loss_start", "lr"):
        if state.get(name) is not None and not _is_number(state[name]):
            return f"{name} {state[name]!r:.40} is not a finite number"
    if not isinstance(state.get("settings", {}), dict):
        return "settings is not an object"
    return None


def check_settings(size: Optional[str] = None, steps: int = 40, batch: int = 8, seq: int = 64, r: int = 16,
                   lora_alpha: float = 32, lora_dropout: float = 0.0, lr: float = 2e-3, out: Optional[str] = None,
                   device: Optional[str] = None, engine: Optional[str] = None, log_every: int = 0,
                   world: Optional[int] = None, *, model: Optional[str] = None, data: Optional[str] = None,
                   eval_split: float = 0.1, seed: int = 0, resume: bool = False, overwrite: bool = False,
                   save_every: int = DEFAULT_SAVE_EVERY, target_modules=None,
                   dtype: Optional[torch.dtype] = None, quantize: Optional[str] = None) -> Plan:
    """The run `finetune` would make, every setting checked; SettingError for any that cannot work,
    before anything is built (the data file is read and tokenized here). `world` is the number of
    processes (default: the launcher's WORLD_SIZE, else 1). See `finetune` for the settings."""
    world = distributed.launched_world_size() if world is None else world
    if model is None:
        size = "tiny" if size is None else size
        if size not in LLAMA_SIZES:
            raise SettingError("size", f"unknown size {size!r}; one of {', '.join(LLAMA_SIZES)}")
    elif size is not None:
        raise SettingError("size", "not with a model directory: its config gives the shape")
    _check_int("steps", steps, 1)
    _check_int("batch", batch, 1)
    if batch % world:
        raise SettingError("batch", f"{batch} sequences do not split evenly over {world} processes")
    _check_int("seq", seq, 2, " (the next-token loss needs two tokens)")
    _check_int("log_every", log_every, 0)
    _check_int("save_every", save_every, 0)
    _check_int("seed", seed, 0, below=SEED_LIMIT)
    _check_int("r", r, 1)
    for name, value in (("lr", lr), ("lora_alpha", lora_alpha)):
        if not _is_number(value) or value <= 0:
            raise SettingError(name, f"must be a finite number > 0, got {value!r}")
    for name, value in (("lora_dropout", lora_dropout), ("eval_split", eval_split)):
        if not _is_number(value) or not 0 <= value < 1:
            raise SettingError(name, f"must be a number in [0, 1), got {value!r}")
    try:
        resolved = distributed.resolve_device(device)
    except ValueError as err:
        raise SettingError("device", str(err)) from None
    dtype = dtype or (torch.bfloat16 if resolved.type == "cuda" else torch.float32)
    dev = distributed.check_device(device, dtype, r)  # with the backend FUSED_LORA_BACKEND forces, as demo does
    if target_modules is None:
        target_modules = LLAMA_TARGETS if model is None else "all-linear"
    try:
        config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                            task_type="CAUSAL_LM")
    except (TypeError, ValueError) as err:  # what is left of LoraConfig's rules: those on target_modules
        raise SettingError("target_modules" if "target_modules" in str(err) else None, str(err)) from None
    if quantize is not None:
        if quantize not in FORMATS:
            raise SettingError("quantize", f"one of {', '.join(FORMATS)}, got {quantize!r}")
        if quantize == "nf4" and model is None:  # a model directory's layers are checked when it is quantized
            dims = ("hidden_size", "intermediate_size")  # the in_features of q/k/v/o, gate/up, and down_proj
            odd = [f"{k} {LLAMA_SIZES[size][k]}" for k in dims if LLAMA_SIZES[size][k] % NF4_BLOCKSIZE]
            if odd:
                fit = [n for n, c in LLAMA_SIZES.items() if all(c[k] % NF4_BLOCKSIZE == 0 for k in dims)]
                raise SettingError("quantize", f"nf4 needs every quantized layer's in_features to be a multiple of "
                                   f"its block size {NF4_BLOCKSIZE}; Llama {size!r} has {', '.join(odd)}: use int8, "
                                   f"or a size whose layers fit ({', '.join(fit)})")
    if engine is not None:
        if engine not in distributed.ENGINES:
            raise SettingError("engine", f"one of {', '.join(distributed.ENGINES)}, got {engine!r}")
        if world < 2:
            raise SettingError(engine, "needs several processes: launch with torchrun --nproc-per-node N")
    if (resume or overwrite) and out is None:
        raise SettingError("resume" if resume else "overwrite", "needs out, the directory of the run")
    if resume and overwrite:
        raise SettingError("overwrite", "not with resume: --resume continues the run in out, --overwrite replaces it")
    _require_transformers()
    model_config = _model_config(model) if model is not None else None
    vocab = model_config.vocab_size if model_config is not None else LLAMA_SIZES[size]["vocab_size"]
    # The float32 logits and their gradient alone: a floor on the memory one step needs.
    need = 2 * (batch // world) * seq * vocab * 4
    have = _total_memory(dev)
    if need > have:
        raise SettingError("batch", f"{batch // world} x {seq} tokens per process need at least {need / 1e9:,.0f} GB "
                           f"for the logits alone; {dev} has {have / 1e9:,.0f} GB: lower batch or seq")
    checkpoint = _check_out(out, steps, resume, overwrite) if out is not None else None
    data_found = read_data(data, vocab, seq, eval_split, seed, model) if data is not None else None
    record = {"model": None if model is None else _sha256(os.path.join(model, "config.json")),
              "size": size if model is None else None,
              "data": None if data_found is None else data_found.digest,
              "r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout,
              "target_modules": target_modules if isinstance(target_modules, str) else list(target_modules),
              "seq": seq, "batch": batch, "seed": seed, "eval_split": eval_split, "quantize": quantize}
    state = None
    if checkpoint is not None:
        state = _read_state(checkpoint)
        saved = state.get("settings", {})
        for name in RESUME_SAME:
            if saved.get(name) != record[name]:
                what = {"model": "the model directory's config.json", "data": "the data file"}.get(name)
                change = (f"another {what} (its contents differ)" if what else
                          f"{name}={saved.get(name)!r} (now {record[name]!r})")
                raise SettingError(name, f"the checkpoint at step {state['step']} was trained with {change}: resume "
                                   "with the same settings, or --overwrite to start afresh")
        if steps <= state["step"]:
            raise SettingError("steps", f"the checkpoint in {out!r} is at step {state['step']}: steps={steps} leaves "
                               "nothing to train (give more steps to go on)")
    return Plan(steps=steps, batch=batch, seq=seq, lr=lr, out=out, engine=engine, log_every=log_every,
                save_every=save_every, world=world, seed=seed, eval_split=eval_split, device=dev, dtype=dtype,
                config=config, model=model, size=size, vocab_size=vocab, data=data_found, overwrite=overwrite,
                record=record, resume_from=checkpoint, resume_state=state, quantize=quantize)


# ---------------------------------------------------------------- training

def loss_and_grads(model, batch: dict) -> torch.Tensor:
    """Forward with next-token loss and backward; returns the (detached) loss."""
    loss = model(**batch).loss
    loss.backward()
    return loss.detach()


def train_step(model, optimizer, batch: dict) -> torch.Tensor:
    """Forward with next-token loss, backward, optimizer step; returns the (detached) loss. A Ctrl-C
    during the optimizer's step waits for its end: the parameters are never left half-updated."""
    loss = loss_and_grads(model, batch)
    with interrupts_deferred():
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block a Ctrl-C (SIGINT) waits for the block's end, then acts as it would have. Outside
    the main thread (where no signal handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending and previous is not signal.SIG_IGN:
            if callable(previous):
                previous(signal.SIGINT, None)  # Python's default handler raises KeyboardInterrupt
            else:
                raise KeyboardInterrupt


def through_interrupts(save: Callable[[], Any]) -> Any:
    """save() with Ctrl-C deferred to its end and then dropped; returns what save() returns. The save an
    interrupt triggers (or the one that ends the run) completes, and a further Ctrl-C pressed meanwhile
    cannot turn a saved run into one reported as unsaved."""
    done = []
    try:
        with interrupts_deferred():
            done.append(save())
    except KeyboardInterrupt:
        if not done:
            raise
    return done[0]


def evaluate(model, sequences: list, batch: int, device: torch.device, pad_id: int = 0) -> Optional[float]:
    """The mean next-token loss over `sequences` (lists of token ids), per predicted token, in eval mode.
    Every process runs the same number of forwards (FSDP's gathers are collectives): the last chunk is
    filled with rows that count for nothing."""
    if not sequences:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    try:
        with torch.no_grad():
            for i in range(0, len(sequences), batch):
                chunk = list(sequences[i:i + batch])
                real = len(chunk)
                chunk += [chunk[0]] * (batch - real)
                padded = _pad(chunk, pad_id)
                padded["labels"][real:] = IGNORE
                part = {k: distributed.shard(v).to(device) for k, v in padded.items()}
                labels = part.pop("labels")
                logits = model(**part).logits[:, :-1]
                target = labels[:, 1:]
                keep = target != IGNORE
                if keep.any():
                    total += F.cross_entropy(logits[keep].float(), target[keep], reduction="sum").double()
                    count += keep.sum()
    finally:
        model.train(was_training)
    total, count = distributed.sum_over_processes(total), distributed.sum_over_processes(count)
    return (total / count).item() if count.item() else None


def _progress(step: int, steps: int, loss: float, tok_s: float, eta: float, width: int = 24) -> str:
    done = int(width * step / steps)
    return (f"  step {step:4d}/{steps} [{'#' * done}{'.' * (width - done)}] loss {loss:7.4f}  {tok_s:,.0f} tok/s"
            f"  ETA {_duration(eta)}")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _is_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class TrainingRun(list):
    """The loss of every step from step 1 (a list; a resumed run's earlier losses come from its
    checkpoint), with `eval_loss_start` and `eval_loss` (the held-out loss before and after training;
    None without an eval split), `seconds` (this call's training time) and `saved` (where the adapter went)."""

    def __init__(self, losses, eval_loss_start=None, eval_loss=None, seconds=0.0, saved=None):
        super().__init__(losses)
        self.eval_loss_start, self.eval_loss, self.seconds, self.saved = eval_loss_start, eval_loss, seconds, saved


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"rng::cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["rng::cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(tensors: dict, device: torch.device) -> None:
    torch.set_rng_state(tensors["rng::cpu"])
    if device.type == "cuda" and "rng::cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng::cuda"], device)


def _optimizer_tensors(lora, optimizer) -> dict[str, torch.Tensor]:
    """The optimizer's state by parameter name, whole tensors on the CPU. Under FSDP2 each is gathered
    (a collective: every process calls this, in the same order)."""
    out = {}
    for name, p in lora.named_parameters():
        if p.requires_grad:
            for key, value in sorted(optimizer.state.get(p, {}).items()):
                out[f"{name}::{key}"] = distributed.whole(value).detach().cpu().contiguous()
    return out


def _load_optimizer(lora, optimizer, tensors: dict, where: str) -> None:
    """Load `_optimizer_tensors`' output into a fresh optimizer over the same parameters."""
    index = {id(p): i for i, p in enumerate(optimizer.param_groups[0]["params"])}
    by_name: dict[str, dict] = {}
    for key, t in tensors.items():
        if not key.startswith("rng::"):
            name, _, part = key.rpartition("::")
            by_name.setdefault(name, {})[part] = t
    state = {}
    for name, p in lora.named_parameters():
        if p.requires_grad:
            if name not in by_name:
                raise SettingError("resume", f"{where}: no optimizer state for {name!r}")
            state[index[id(p)]] = {k: t if t.dim() == 0 else distributed.placed_like(t, p)
                                   for k, t in by_name.pop(name).items()}
    if by_name:
        raise SettingError("resume", f"{where}: optimizer state for {next(iter(by_name))!r}, not in this model")
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_checkpoint(lora, out: str, step: int, tensors: dict, state: dict) -> str:
    """Rank 0: checkpoint-<step> written whole in a staging directory, then renamed into place; the
    older checkpoints and staging directories left by a crash are removed after."""
    os.makedirs(out, exist_ok=True)
    final = os.path.join(out, f"{CHECKPOINT_PREFIX}{step}")
    if os.path.isdir(final):
        # Written by this run at this very step (an interrupt right after a periodic checkpoint): the
        # same state. (An --overwrite run cleared the directory; a resumed one starts past every checkpoint.)
        return final
    staging = tempfile.mkdtemp(prefix=f".{CHECKPOINT_PREFIX}{step}.tmp-", dir=out)
    try:
        lora.save_pretrained(staging)
        save_file(tensors, os.path.join(staging, OPTIMIZER_NAME))
        with open(os.path.join(staging, STATE_NAME), "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(os.path.join(staging, OPTIMIZER_NAME))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 would make the checkpoint private, unlike the adapter
        os.chmod(os.path.join(staging, OPTIMIZER_NAME), 0o666 & ~umask)
        _fsync(staging)
        os.rename(staging, final)
        _fsync(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if path != final and (_CHECKPOINT.fullmatch(name) or name.startswith(f".{CHECKPOINT_PREFIX}")):
            shutil.rmtree(path, ignore_errors=True)
    return final


def _clear(out: str) -> None:
    """--overwrite: remove what an earlier run left in `out` (only this command's files are there)."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)


def _save(lora, optimizer, plan: Plan, step: int, state: dict, rng: dict, adapter: bool,
          log: Callable[[str], None]) -> Optional[str]:
    """The adapter in `out` (when `adapter`) and checkpoint-<step>; every process calls it (FSDP2 gathers
    the parameters and the optimizer's state), rank 0 writes. Returns the checkpoint's path on rank 0."""
    tensors = {**_optimizer_tensors(lora, optimizer), **rng}
    gathered = distributed.full_parameters(lora) if plan.engine == "fsdp" else contextlib.nullcontext()
    path = None
    with gathered:
        if distributed.rank() == 0:
            with interrupts_deferred():
                try:
                    if adapter:
                        lora.save_pretrained(plan.out)
                        log(f"adapter saved to {plan.out} (peft format: {WEIGHTS_NAME}, {CONFIG_NAME})")
                    path = _write_checkpoint(lora, plan.out, step, tensors, state)
                except OSError as err:
                    raise SaveError(err.errno, f"could not write to {plan.out!r}: {err.strerror or err} (the last "
                                    "complete checkpoint is still there)") from err
    if distributed.active():
        torch.distributed.barrier()  # no process exits (and tears down the group) before the files are written
    return path


def finetune(size: Optional[str] = None, steps: int = 40, batch: int = 8, seq: int = 64, r: int = 16,
             lora_alpha: float = 32, lora_dropout: float = 0.0, lr: float = 2e-3, out: Optional[str] = None,
             device: Optional[str] = None, dtype: Optional[torch.dtype] = None, engine: Optional[str] = None,
             log_every: int = 0, log: Callable[[str], None] = print, stream=sys.stdout, *,
             model: Optional[str] = None, data: Optional[str] = None, eval_split: float = 0.1, seed: int = 0,
             resume: bool = False, overwrite: bool = False, save_every: int = DEFAULT_SAVE_EVERY,
             target_modules: Union[None, str, list] = None, quantize: Optional[str] = None) -> TrainingRun:
    """Train LoRA adapters (see the module doc); returns a TrainingRun (the loss per step, the eval losses).

    model: a local transformers model directory (default: a Llama of `size`, "tiny" unless given, with
    random weights). data: a data file (default: synthetic sequences). eval_split: the share of the
    examples held out (0: no eval). target_modules: LoraConfig's (default: the Llama's attention and MLP
    projections, or "all-linear" with `model`). out: the directory of the adapter and its checkpoint
    (None: nothing is saved); an `out` holding an adapter is refused unless `resume` (continue from its
    last checkpoint) or `overwrite` (start afresh, replacing it). save_every: steps between checkpoints
    (0: only at the end; an interrupt also writes one). quantize: "nf4" or "int8" quantizes the base's
    Linear layers (all but the output layer) before adapting them (QLoRA; NF4 needs in_features that are
    multiples of 64); None keeps the base in `dtype`.

    On a terminal the progress line is redrawn in place; elsewhere (a log file, a pipe) a line is
    written every `log_every` steps (0: about ten lines per run) and at the last step. Settings that
    cannot work raise SettingError before anything is built. A NaN or infinite loss raises
    TrainingDiverged and nothing more is saved. Ctrl-C raises TrainingInterrupted after saving the
    adapter trained so far (single process, with `out`).

    In a process group of several processes (torchrun), `batch` is the global batch and each
    process trains on its share of every batch, under DDP (engine="ddp", the default there) or
    FSDP2 (engine="fsdp"), which shards a quantized base too. Only rank 0 logs and saves.
    """
    plan = check_settings(size, steps, batch, seq, r, lora_alpha, lora_dropout, lr, out, device, engine, log_every,
                          distributed.world_size(), model=model, data=data, eval_split=eval_split, seed=seed,
                          resume=resume, overwrite=overwrite, save_every=save_every, target_modules=target_modules,
                          dtype=dtype, quantize=quantize)
    return train(plan, log=log, stream=stream)


def _eval_sequences(plan: Plan) -> list:
    if plan.data is not None:
        return plan.data.eval
    if plan.eval_split == 0:
        return []
    n = max(1, round(plan.eval_split * SYNTHETIC_EVAL_POOL))
    return next(counting_batches(plan.vocab_size, n, plan.seq, seed=plan.seed + SEED_LIMIT)).tolist()


def _describe_data(plan: Plan, eval_count: int) -> str:
    d = plan.data
    if d is None:
        held = f"; eval: {eval_count} held-out sequences" if eval_count else "; no eval (eval_split 0)"
        return f"data: synthetic counting sequences of {plan.seq} tokens{held}"
    notes = [f"{d.split:,} examples longer than {plan.seq} tokens split into pieces"] if d.split else []
    notes += [f"{d.dropped:,} pieces of 1 token left out (no next-token loss)"] if d.dropped else []
    return (f"data: {d.path}: {d.examples:,} examples ({d.kind}): {d.train_examples:,} train, "
            f"{d.eval_examples:,} eval; "
            f"{len(d.train):,} training sequences of up to {plan.seq} tokens" + "".join(f"; {n}" for n in notes))


def train(plan: Plan, log: Callable[[str], None] = print, stream=sys.stdout) -> TrainingRun:
    """Run a checked plan (`check_settings`); see `finetune`."""
    world = distributed.world_size()
    if world != plan.world:
        raise SettingError(None, f"the plan is for {plan.world} processes; this process group has {world}")
    engine = plan.engine or ("ddp" if world > 1 else None)
    lead = distributed.rank() == 0
    if not lead:
        log, stream = (lambda *_: None), None
    tty = _is_terminal(stream)
    device, dtype = plan.device, plan.dtype
    torch.manual_seed(plan.seed)
    if plan.model is None:
        model = build_llama(plan.size, dtype=dtype, device=device, seed=plan.seed, max_positions=max(4096, plan.seq))
        what = f"Llama '{plan.size}' (random weights)"
    else:
        model = load_model(plan.model, dtype, device)
        what = f"{plan.model} ({type(model).__name__})"
    if plan.quantize is not None:
        try:  # every layer is quantized before any is replaced: a refusal leaves nothing half-done
            quantize_model(model, plan.quantize)
        except (QuantizationError, TypeError, ValueError) as err:  # e.g. an in_features NF4's blocks do not divide
            raise SettingError("quantize", str(err)) from None
        what += f", base quantized to {plan.quantize}"
    try:
        lora = get_lora_model(model, plan.config)
    except ValueError as err:  # target_modules that match nothing (or something not adaptable) in this model
        raise SettingError("target_modules", str(err)) from None
    start, losses, eval_start, resumed = 0, [], None, {}
    if plan.resume_from is not None:
        try:  # the adapter checked as any adapter is (keys, shapes, dtypes, finite values) before it is copied
            load_weights_into(lora, plan.resume_from)
            resumed = load_file(os.path.join(plan.resume_from, OPTIMIZER_NAME))
        except Exception as err:  # AdapterError, a missing or unreadable optimizer.safetensors (SafetensorError)
            raise SettingError("resume", f"cannot resume from {plan.resume_from}: {err}") from None
        start, losses = plan.resume_state["step"], list(plan.resume_state["losses"])
        eval_start = plan.resume_state.get("eval_loss_start")
    trainable, total = lora.get_nb_trainable_parameters()
    c = plan.config
    log(f"{what} on {device} ({str(dtype).replace('torch.', '')}): {total:,} parameters, {trainable:,} trainable "
        f"(r={c.r}, alpha={c.lora_alpha}, dropout={c.lora_dropout})")
    forced = f" (forced by {dispatch.ENV_VAR})" if os.environ.get(dispatch.ENV_VAR) else ""
    log(f"backend: {dispatch.describe(device, dtype, c.r)}{forced}")
    eval_set = _eval_sequences(plan)
    log(_describe_data(plan, len(eval_set)))
    if plan.resume_from is not None:
        was = plan.resume_state.get("lr")
        log(f"resuming from {plan.resume_from} (step {start} of {plan.steps})"
            + (f"; lr {plan.lr:g} (the checkpoint's run had {was:g})" if was is not None and was != plan.lr else ""))
    if engine:
        log(f"{world} processes ({distributed.ENGINE_NAMES[engine]} over {distributed.backend_for(device)}), each "
            f"training on {plan.batch // world} of the {plan.batch} sequences of every batch")
    whole = held_quantized_nbytes(lora)
    trained = distributed.wrap(lora, engine, device) if engine else lora
    if plan.quantize is not None:
        held = held_quantized_nbytes(lora)
        share = (f"; FSDP2 shards it: this process holds {held:,} ({100 * held / whole:.1f}%)" if engine == "fsdp"
                 else f"; every process holds it whole ({distributed.ENGINE_NAMES[engine]})" if engine else "")
        log(f"quantized base ({plan.quantize}): {whole:,} bytes{share}")
    # After wrapping: FSDP2 replaces the parameters with sharded ones.
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=plan.lr)
    if resumed:
        _load_optimizer(lora, opt, resumed, plan.resume_from)
        _set_rng_state(resumed, device)
    if plan.data is None:
        synthetic = counting_batches(plan.vocab_size, plan.batch, plan.seq, seed=plan.seed)
        for _ in range(start):  # the batches the checkpoint's run trained on
            next(synthetic)
        batches = ({"input_ids": t, "labels": t} for t in synthetic)
    else:
        batches = _file_batches(plan.data, plan.batch, plan.seed, start)
    pad_id = plan.data.pad_id if plan.data is not None else 0
    if plan.overwrite and lead:
        _clear(plan.out)
    lora.train()
    if eval_set and start == 0:
        eval_start = evaluate(trained, eval_set, plan.batch, device, pad_id)
    every = plan.log_every or max(1, plan.steps // 10)
    began, tokens, done, rng = time.perf_counter(), 0, start, _rng_state(device)
    drawn = 0  # the longest progress line drawn on the terminal: a shorter one is padded over it

    def state_at(step):
        return {"format": CHECKPOINT_FORMAT, "step": step, "steps": plan.steps, "losses": losses[:step],
                "eval_loss_start": eval_start, "lr": plan.lr, "settings": plan.record}
    try:
        for step in range(start + 1, plan.steps + 1):
            global_batch = next(batches)
            part = {k: distributed.shard(v).to(device) for k, v in global_batch.items()}
            local = loss_and_grads(trained, part)  # a Ctrl-C here: the step is not taken
            # The update and its record are one: a Ctrl-C during either takes effect after both, so an
            # interrupt saves the parameters of exactly the steps it counts.
            with interrupts_deferred():
                opt.step()
                opt.zero_grad(set_to_none=True)
                loss = distributed.mean_over_processes(local).item()
                if math.isfinite(loss):
                    losses.append(loss)
                    done, rng = step, _rng_state(device)
            if not math.isfinite(loss):  # the same value on every process: all stop together
                if tty:
                    stream.write("\n")
                raise TrainingDiverged(f"the loss became {loss} at step {step}: training stopped, no adapter saved "
                                       f"(lower lr={plan.lr} or lora_alpha={c.lora_alpha})")
            mask = global_batch.get("attention_mask")
            tokens += int(mask.sum()) if mask is not None else global_batch["input_ids"].numel()
            if stream is not None and (tty or step % every == 0 or step == plan.steps):
                elapsed = time.perf_counter() - began
                line = _progress(step, plan.steps, loss, tokens / elapsed,
                                 elapsed / (step - start) * (plan.steps - step))
                stream.write(f"\r{line.ljust(drawn)}" if tty else f"{line}\n")
                stream.flush()
                drawn = max(drawn, len(line))
            if plan.out and plan.save_every and step % plan.save_every == 0 and step < plan.steps:
                _save(lora, opt, plan, step, state_at(step), rng, adapter=False, log=log)
        if tty:
            stream.write("\n")
        eval_end = evaluate(trained, eval_set, plan.batch, device, pad_id) if eval_set else None
        seconds = time.perf_counter() - began
        summary = f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {seconds:.1f} s"
        if eval_end is not None:
            summary += f"; eval loss {eval_start:.4f} -> {eval_end:.4f} ({len(eval_set):,} held-out sequences)"
        log(summary)
        checkpoint = None
        if plan.out:  # a Ctrl-C during the last save waits for it and is dropped: the run has ended
            checkpoint = through_interrupts(
                lambda: _save(lora, opt, plan, plan.steps, state_at(plan.steps), rng, adapter=True, log=log))
            if checkpoint:
                log(f"checkpoint {checkpoint} (optimizer and RNG state: --resume with more --steps goes on from it)")
    except KeyboardInterrupt:
        # Every Ctrl-C after set-up ends here, and the report says what is on disk: a further Ctrl-C during
        # the interrupt's save waits for the save and is dropped (through_interrupts).
        def stop():
            if tty:
                stream.write("\n")
            if done == start:
                return None, None, ("nothing trained yet, nothing saved" if start == 0 else
                                    f"nothing trained since the checkpoint at step {start}, which is still there")
            if not plan.out:
                return None, None, "no out directory: nothing saved"
            if distributed.active():
                return None, None, "under torchrun an interrupt saves nothing: the last checkpoint in out is still there"
            return plan.out, _save(lora, opt, plan, done, state_at(done), rng, adapter=True, log=lambda s: None), ""
        saved, checkpoint, why = through_interrupts(stop)
        raise TrainingInterrupted(done, plan.steps, saved, checkpoint, why) from None
    return TrainingRun(losses, eval_start, eval_end, seconds, plan.out)
