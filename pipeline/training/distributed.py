"""Data parallelism of the training stage: torchrun starts one process per GPU (WORLD_SIZE > 1);
each process takes its share of every global batch, sums that a loss needs over the whole batch go
through a ``Reducer``, and gradients are averaged with one flat all-reduce per step (methods whose
frozen/unfrozen phases change which parameters train cannot use a DDP wrapper, which fixes them
at construction)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Reducer:
    """Sum / max of a tensor over the data-parallel processes (identity on one process)."""

    distributed: bool = False

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.SUM) if self.distributed else tensor

    def max(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._reduce(tensor, dist.ReduceOp.MAX) if self.distributed else tensor

    @staticmethod
    def _reduce(tensor: torch.Tensor, op: dist.ReduceOp) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.all_reduce(out, op=op)
        return out


LOCAL = Reducer()


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def reducer(self) -> Reducer:
        return Reducer(distributed=self.world > 1)


def init_processes(device: torch.device) -> Processes:
    """torchrun sets WORLD_SIZE/RANK; gloo on CPU, nccl on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Processes(0, 1)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Processes(dist.get_rank(), world)


def average_gradients(parameters: list[torch.nn.Parameter], processes: Processes) -> None:
    """Mean of the gradients over processes, in one flat all-reduce."""
    if processes.world <= 1:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= processes.world
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()
