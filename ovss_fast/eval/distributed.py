"""torch.distributed for evaluation: one process per GPU (or CPU process), launched by torchrun.

``torchrun --nproc_per_node=K [--nnodes=M ...] -m ovss_fast eval ...`` sets WORLD_SIZE,
RANK and LOCAL_RANK; with WORLD_SIZE > 1 the process group is initialised here (NCCL
when the evaluation runs on CUDA, gloo on the CPU), rank r evaluates images r, r + K,
r + 2K, ... and the int64 confusion matrices are summed across ranks, so the result is
the single-process one exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ovss_fast.errors import InputError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # process-group backend, None when not distributed
    owns_group: bool = False  # initialised here, so destroyed here

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> list[int]:
        """This rank's item indices out of 0..n-1 (round robin: rank, rank + world, ...)."""
        return list(range(self.rank, n, self.world_size))

    def all_reduce(self, t: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) a tensor over ranks; returns it on its original device. No-op in one process."""
        if self.world_size == 1:
            return t
        comm = t.to(self.device) if self.backend == "nccl" else t.cpu()
        dist.all_reduce(comm, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return comm.to(t.device)

    def gather_objects(self, items: list) -> list:
        """Concatenate a picklable list from every rank (rank order); the list itself in one process."""
        if self.world_size == 1:
            return list(items)
        out: list = [None] * self.world_size
        dist.all_gather_object(out, list(items))
        return [x for part in out for x in part]

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value.strip() else default
    except ValueError as err:
        raise InputError(f"environment variable {name}={value!r} is not an integer") from err


def setup(device: str | torch.device | None = None) -> DistContext:
    """Read torchrun's environment and, with WORLD_SIZE > 1, initialise the process group.

    device: None picks cuda:LOCAL_RANK when CUDA is available, else the CPU; an
    explicit "cuda" also becomes cuda:LOCAL_RANK under torchrun.
    """
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if device is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device={str(device)!r} but CUDA is not available here; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world <= 1:
        return DistContext(device=dev)
    if dist.is_initialized():
        return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                           device=dev, backend=str(dist.get_backend()), owns_group=False)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank,
                       device=dev, backend=backend, owns_group=True)


__all__ = ["DistContext", "setup"]
