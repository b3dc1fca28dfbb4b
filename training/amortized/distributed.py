"""Data-parallel training under torchrun: process-group set-up, gradient averaging, loss means over ranks."""

from __future__ import annotations

import os

import torch


def init_distributed() -> tuple[int, int]:
    """(rank, world size): torchrun sets WORLD_SIZE; gloo works on CPUs, nccl is used on GPUs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (torch.distributed.get_rank() if world > 1 else 0), world


def average_gradients(module: torch.nn.Module) -> None:
    """Every rank ends with the mean of the ranks' gradients (parameters stay identical everywhere)."""
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        torch.distributed.all_reduce(p.grad)
        p.grad /= torch.distributed.get_world_size()


def mean_over_ranks(values: dict[str, torch.Tensor], names: list[str], world: int) -> dict[str, float]:
    """Per-term values as one process with the whole batch would have computed them (absent: no rank has
    it)."""
    stacked = torch.stack([values[n].float() if n in values else torch.zeros(()) for n in names])
    present = torch.tensor([float(n in values) for n in names])
    if world > 1:
        torch.distributed.all_reduce(stacked)
        torch.distributed.all_reduce(present)
        stacked = stacked / world
    return {n: v for n, v, p in zip(names, stacked.tolist(), present.tolist()) if p > 0}
