"""Process-group plumbing for running RoSA under ``torchrun`` or ``accelerate launch`` (PyTorch DDP).

Both launchers export ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK`` (and the rendezvous address); that is all
``rosa train`` reads. Everything else a data-parallel RoSA run needs beyond plain DDP is here: the integer
support buffers are kept out of DDP's buffer broadcast (each rank sets the same mask itself; a broadcast of the
old, replaced tensors would be wasted work at best), and DDP looks for unused parameters because the sparse
values take no part in the forward until the mask exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .sparse.delta import SUPPORT_BUFFERS


@dataclass(frozen=True)
class ProcessContext:
    """Where this process stands: its rank among ``world`` processes and the device it trains on."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this process initialised the group, so it also tears it down

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world_size() -> int:
    """Processes in the current default group; 1 when torch.distributed is not in use."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0 of the current default group (the only rank that writes files); True without a group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def init_from_env() -> ProcessContext:
    """Join the process group the launcher describes (gloo on CPU, NCCL on GPUs); a single process otherwise.

    The training device is ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE") or 1)
    local_rank = int(os.environ.get("LOCAL_RANK") or 0)
    owns = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        if not dist.is_available():
            raise RuntimeError(f"WORLD_SIZE is {world} but this PyTorch build has no torch.distributed")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
        owns = True
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return ProcessContext(rank=rank, world=world, local_rank=local_rank, device=device, owns_group=owns)


def close(ctx: ProcessContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: ProcessContext) -> None:
    if ctx.distributed:
        dist.barrier()


def support_buffer_names(model: nn.Module) -> list[str]:
    """Names (as ``model.named_buffers()`` gives them) of every RoSA support buffer."""
    return [name for name, _ in model.named_buffers() if any(f".{b}." in f".{name}" for b in SUPPORT_BUFFERS)]


def wrap_ddp(model: nn.Module, ctx: ProcessContext) -> nn.Module:
    """``DistributedDataParallel`` set up for RoSA (see the module docstring); the model unchanged for one process."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, support_buffer_names(model))
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


def shard(items: list[Any], ctx: ProcessContext) -> list[Any]:
    """This rank's contiguous share of a global batch (shares differ in size by at most one)."""
    per, extra = divmod(len(items), ctx.world)
    start = ctx.rank * per + min(ctx.rank, extra)
    return items[start : start + per + (ctx.rank < extra)]


def all_reduce_sum(values: list[float], ctx: ProcessContext) -> list[float]:
    """Element-wise sum over ranks (float64, on the device the backend needs)."""
    if not ctx.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def from_main(obj: Any, ctx: ProcessContext) -> Any:
    """Rank 0's ``obj`` on every rank (what the others pass is ignored)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: Any, ctx: ProcessContext) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world
    dist.all_gather_object(out, obj)
    return out
