"""Training in several processes with torch's own engines: DDP, or FSDP2 (`fully_shard`).

    torchrun --nproc-per-node 2 -m fused_lora finetune            # DDP
    torchrun --nproc-per-node 2 -m fused_lora finetune --fsdp     # FSDP2

torchrun starts one process per device and sets RANK, WORLD_SIZE and LOCAL_RANK. Each process
builds the same model (same seed), trains on its own rows of every global batch (`shard`), and the
engine averages the gradients, so N processes compute what one process computes on the full batch.
The backend follows the device: NCCL for CUDA (one GPU per process, `cuda:LOCAL_RANK`), gloo for
the CPU. Only rank 0 prints and saves.
"""
from __future__ import annotations

import contextlib
import inspect
import os
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import dispatch
from ..modules.quantized import QuantizedWeight, shardable_quantized

ENGINES = ("ddp", "fsdp")
ENGINE_NAMES = {"ddp": "DDP", "fsdp": "FSDP2"}


class SettingError(ValueError):
    """A setting of `finetune` or `demo` that cannot work, found before anything is built.

    `setting` names the argument (None when the message names what is wrong itself, e.g. the
    FUSED_LORA_BACKEND variable); the command line reports it as its flag (lora_dropout -> --lora-dropout).
    """

    def __init__(self, setting: Optional[str], problem: str):
        super().__init__(f"{setting}: {problem}" if setting else problem)
        self.setting, self.problem = setting, problem


def launched_world_size() -> int:
    """How many processes torchrun (or another launcher setting WORLD_SIZE) started; 1 otherwise."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def active() -> bool:
    """True when this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def resolve_device(requested: Optional[str]) -> torch.device:
    """The device this process trains on; ValueError naming the problem when it cannot be used.

    None means CUDA when available, else the CPU. Under torchrun a bare "cuda" means this process's
    GPU, cuda:LOCAL_RANK.
    """
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(requested)
    except (RuntimeError, ValueError):
        raise ValueError(f"{requested!r} is not a device: use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{requested!r}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"{requested!r}: CUDA is not available here ({why}); use cpu")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{requested!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_device(requested: Optional[str], dtype: torch.dtype, rank: int) -> torch.device:
    """The device to run on (`resolve_device`), with the backend FUSED_LORA_BACKEND forces checked to
    run there for `dtype` and LoRA rank `rank`: the checks `finetune` and `demo` both make before
    building anything. SettingError("device", ...) or SettingError(None, "FUSED_LORA_BACKEND: ...")."""
    try:
        device = resolve_device(requested)
    except ValueError as err:
        raise SettingError("device", str(err)) from None
    try:
        dispatch.choose_backend(device, dtype, rank)
    except (dispatch.BackendUnavailable, ValueError) as err:
        raise SettingError(None, f"{dispatch.ENV_VAR}: {err}") from None
    return device


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Joins the process group torchrun describes (when it started several processes and none is
    initialised yet) and leaves it at the end; does nothing in a single process."""
    created = False
    if launched_world_size() > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend_for(device), device_id=device if device.type == "cuda" else None)
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def shard(batch: torch.Tensor) -> torch.Tensor:
    """This process's rows of a global batch (contiguous, equal-sized blocks, in rank order)."""
    n, w = batch.shape[0], world_size()
    if n % w:
        raise ValueError(f"a batch of {n} rows does not split evenly over {w} processes")
    per = n // w
    return batch[rank() * per:(rank() + 1) * per]


def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The mean of `t` over all processes (`t` itself in a single process)."""
    if not active():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / world_size()


def sum_over_processes(t: torch.Tensor) -> torch.Tensor:
    """The sum of `t` over all processes (`t` itself in a single process)."""
    if not active():
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def whole(t: torch.Tensor) -> torch.Tensor:
    """`t` whole: an FSDP2 shard (a DTensor) gathered from every process (a collective), anything else as is."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def placed_like(t: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A whole tensor shaped like `param`, placed as `param` is: sharded like an FSDP2 parameter (a
    collective: every process calls it, with the same tensor), else on its device."""
    mesh = getattr(param, "device_mesh", None)
    if mesh is None:
        return t.to(param.device)
    from torch.distributed.tensor import distribute_tensor
    return distribute_tensor(t.to(param.device), mesh, param.placements)


def wrap(model: nn.Module, engine: str, device: torch.device) -> nn.Module:
    """The module to train: `model` in DDP, or `model` sharded in place by FSDP2.

    FSDP2 shards every block of each nn.ModuleList (a transformer's layers) as its own unit, then
    the rest at the root, so only one block's parameters are gathered at a time. A quantized base is
    sharded too: its packed codes and scales are held as frozen Parameters first (`shardable_quantized`),
    so each process holds its share of them and the whole of a block's only while the block runs.
    DDP keeps a quantized base as buffers, the same on every process, and is told not to send them at
    every forward (`forward_sync_buffers=False`, or `broadcast_buffers=False` on a torch without it; a
    language model's other buffers are not trained either).
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if engine == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        options = {}
        if any(isinstance(m, QuantizedWeight) for m in model.modules()):
            known = inspect.signature(DistributedDataParallel).parameters
            options["forward_sync_buffers" if "forward_sync_buffers" in known else "broadcast_buffers"] = False
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       **options)
    from torch.distributed.fsdp import fully_shard
    shardable_quantized(model)
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block)
    fully_shard(model)
    return model


@contextlib.contextmanager
def full_parameters(model: nn.Module) -> Iterator[None]:
    """Within the block every parameter of an FSDP2-sharded model is whole (gathered on every
    process; a collective, so all processes must enter), so the model can be saved as usual."""
    from torch.distributed.fsdp import FSDPModule
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for m in units:
        m.unshard()
    try:
        yield
    finally:
        for m in units:
            m.reshard()
