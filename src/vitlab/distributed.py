"""torchrun support: one process per device, gloo on CPU, NCCL on GPUs.

``torchrun --nproc_per_node N -m vitlab train ...`` starts N copies of the command; each finds
its rank in the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), and
:func:`setup` joins them into one process group. Without torchrun everything here is a no-op
for a world of one, so the rest of vitlab calls these helpers unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

_T = TypeVar("_T")


@dataclass(frozen=True)
class World:
    """Where this process stands among the processes of one job."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0, the only process that writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether the job runs as more than one process."""
        return self.world_size > 1


def setup(device: str = "auto") -> World:
    """Join the torchrun process group if there is one; pick this process's device.

    ``device`` is ``auto`` (the GPU of this rank when there is one, else the CPU), ``cpu`` or
    ``cuda``. Calling it again returns the same world.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return World(rank, dist.get_world_size() if dist.is_initialized() else 1, dev)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes, in place (float64 stays float64); no-op for one process."""
    if _several():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _several() -> bool:
    """Whether this process is one of a process group of more than one."""
    return dist.is_initialized() and dist.get_world_size() > 1


def finish() -> None:
    """Leave the process group once every process is done (a no-op outside torchrun).

    A process that exits while gloo's threads still run aborts ("terminate called without an
    active exception"), so a job that finished its work waits for the others, then closes the group.
    """
    if dist.is_initialized():
        if _several():
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Wait until every process of the job gets here; a no-op for one process."""
    if _several():
        dist.barrier()


def broadcast_object(obj: _T) -> _T:
    """``obj`` as rank 0 has it, on every process."""
    if not _several():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def current() -> World:
    """The world of an already set-up job (a world of one outside torchrun)."""
    if not dist.is_initialized():
        return World()
    nccl = dist.get_backend() == "nccl"  # NCCL runs on this rank's GPU, gloo on the CPU
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device)


def all_reduce_fields(obj: object, names: tuple[str, ...]) -> None:
    """Sum the named running sums of an accumulator over all processes, in place.

    A field may be a tensor, an int or float, or a dict of either (keyed alike on every
    process: every rank saw the same layers). Used by the analyses' accumulators, whose results
    are functions of such sums only, so the reduced accumulator equals one fed every batch.
    """
    if not _several():
        return
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, dict):
            for key in sorted(value):
                value[key] = _reduced(value[key])
        else:
            setattr(obj, name, _reduced(value))


def _reduced(value: torch.Tensor | int | float) -> torch.Tensor | int | float:
    if isinstance(value, torch.Tensor):
        return all_reduce_sum(value.clone())
    return type(value)(all_reduce_sum(torch.tensor([value], dtype=torch.float64)).item())
