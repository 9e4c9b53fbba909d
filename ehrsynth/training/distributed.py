"""PyTorch's own distributed engine, used when the loop runs under ``torchrun`` (no home-made one).

Outside torchrun every function is a no-op for a world of one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    owns_group: bool = False


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def setup() -> World:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA), or stay single-process."""
    size = int(os.environ.get("WORLD_SIZE", 1))
    if size <= 1:
        return World()
    owns = False
    if not torch_dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank())
        torch_dist.init_process_group(backend=backend)
        owns = True
    return World(rank=torch_dist.get_rank(), size=torch_dist.get_world_size(), owns_group=owns)


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process world, else ``model`` itself."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()) or torch_dist.get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def mean_across(value: torch.Tensor, world: World) -> float:
    """The mean of a scalar tensor over all processes, as a Python float (a host sync: call rarely)."""
    if world.size > 1:
        value = value.detach().clone()
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.SUM)
        value /= world.size
    return float(value)


def gather_rng_states(world: World, generator: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """Every process's random streams, in rank order (a collective: all ranks must call it): torch's global CPU
    stream, the loop's ``generator``, and the global stream of the process's GPU when it trains on one."""
    state = {"torch_cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if generator.device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(generator.device)
    if world.size == 1:
        return [state]
    states: list[dict[str, torch.Tensor] | None] = [None] * world.size
    torch_dist.all_gather_object(states, state)
    return [s for s in states if s is not None]


def any_across(flags: list[bool], world: World) -> list[bool]:
    """Each flag true on any process (a collective): decisions taken from a clock must agree on every rank."""
    if world.size == 1:
        return list(flags)
    values = torch.tensor([float(f) for f in flags])
    if torch_dist.get_backend() == "nccl":
        values = values.cuda()
    torch_dist.all_reduce(values, op=torch_dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def barrier(world: World) -> None:
    if world.size > 1:
        torch_dist.barrier()


def teardown(world: World) -> None:
    if world.owns_group:
        torch_dist.destroy_process_group()
