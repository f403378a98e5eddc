"""The one module that owns distributed setup: torchrun, the deepspeed launcher or a plain process.

Everything else asks `is_main()` / `world()`; nothing else reads RANK or WORLD_SIZE.
"""
from __future__ import annotations

import importlib
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(key: str, default: int) -> int:
    return int(os.environ.get(key, default))


def world() -> World:
    """The process's place in the job, read from the launcher's environment (single process if none)."""
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if torch.cuda.is_available():
        return World(rank, local_rank, world_size, torch.device("cuda", local_rank), "nccl")
    return World(rank, local_rank, world_size, torch.device("cpu"), "gloo")


def is_main() -> bool:
    return world().rank == 0


def init() -> World:
    """Initialise torch.distributed for DeepSpeed at any world size, including a bare `python -m ...`."""
    if "RANK" not in os.environ:  # plain process: give DeepSpeed the rendezvous it expects (no mpi4py)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    w = world()
    if w.device.type == "cuda":
        torch.cuda.set_device(w.device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed would JIT-compile its shared-memory comm op (~1 min) on first CPU use; gloo suffices.
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    if not dist.is_initialized():
        import deepspeed

        deepspeed.init_distributed(dist_backend=w.backend, auto_mpi_discovery=False)
    return w


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
