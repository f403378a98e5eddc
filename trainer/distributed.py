"""The one module that owns distributed setup: torchrun, the deepspeed launcher or a plain process.

Everything else asks `world()` / `is_main()`; nothing else reads RANK or WORLD_SIZE. Both launchers export
RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT (torchrun also LOCAL_WORLD_SIZE; the deepspeed
launcher needs `--no_local_rank` because Hydra rejects the `--local_rank=N` argument it would append). A plain
`python -m ...` is world size 1: `init()` then sets the rendezvous variables itself (DeepSpeed would otherwise
look for mpi4py). Device and backend follow the hardware: `cuda:<LOCAL_RANK>` + NCCL with GPUs, CPU + gloo without.
"""
from __future__ import annotations

from datetime import timedelta
import os
import socket
import time
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.distributed as dist

from trainer import compat
from trainer.run.errors import ConfigError


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key, "")
    try:
        return int(value) if value.strip() else default
    except ValueError:
        raise ConfigError(f"environment variable {key}={value!r} is not an integer") from None


def world() -> World:
    """The process's place in the job, read from the launcher's environment (single process if none).

    Reads the environment only: no process-group work, so it is safe before `init()` (config checks use it).
    """
    rank, world_size = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"launcher environment is inconsistent: RANK={rank}, WORLD_SIZE={world_size}")
    if torch.cuda.is_available():
        visible = torch.cuda.device_count()
        if visible > 1 and local_rank >= visible:
            raise ConfigError(f"LOCAL_RANK={local_rank} but this node has {visible} GPUs: "
                             f"start at most that many processes per node")
        index = local_rank if visible > 1 else 0  # one visible GPU: a scheduler gave each process its own
        return World(rank, local_rank, world_size, torch.device("cuda", index), "nccl")
    return World(rank, local_rank, world_size, torch.device("cpu"), "gloo")


def is_main() -> bool:
    return world().rank == 0


def launched() -> bool:
    """Started by a launcher (torchrun, deepspeed), which exports LOCAL_RANK; asked before `init()`, which
    exports the same variables for a plain process."""
    return "LOCAL_RANK" in os.environ


def local_world_size() -> int:
    """Processes on this node (torchrun exports LOCAL_WORLD_SIZE; 1 otherwise)."""
    return _env_int("LOCAL_WORLD_SIZE", 1)


def node_rank() -> Optional[int]:
    """This node's index in a job that spans several nodes (torchrun's GROUP_RANK, else NODE_RANK), None on one
    node: no more ranks than processes here. Without LOCAL_WORLD_SIZE (the deepspeed launcher) the job counts as
    one node."""
    size = _env_int("WORLD_SIZE", 1)
    if size <= _env_int("LOCAL_WORLD_SIZE", size):
        return None
    return _env_int("GROUP_RANK", _env_int("NODE_RANK", 0))


DEFAULT_TIMEOUT_S = 600.0  # trainer.collective_timeout_s


def init(timeout_s: float = DEFAULT_TIMEOUT_S) -> World:
    """Initialise torch.distributed for DeepSpeed at any world size, including a bare `python -m ...`.

    `timeout_s` bounds every collective: a rank that stalls (stopped, swapping, a hung device) makes its peers'
    next collective fail after that long instead of torch's 30 minutes (gloo) or a hang."""
    if "RANK" not in os.environ:  # plain process: give DeepSpeed the rendezvous it expects (no mpi4py)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    w = world()
    if w.device.type == "cuda":
        torch.cuda.set_device(w.device)
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        compat.skip_shm_comm_build()
    if not dist.is_initialized():
        import deepspeed

        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if restart not in (None, "0"):
            _init_after_elastic_restart(w, int(restart), timeout_s)
        deepspeed.init_distributed(dist_backend=w.backend, auto_mpi_discovery=False,  # adopts an existing group
                                   timeout=timedelta(seconds=timeout_s))
    return w


def _init_after_elastic_restart(w: World, attempt: int, timeout_s: float) -> None:
    """After an elastic restart the launcher's store still holds the dead attempt's peer addresses, and the
    new default group would try to connect to them; namespace this attempt's keys so it starts clean."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), w.world_size,
                          is_master=False, timeout=timedelta(minutes=5))
    dist.init_process_group(w.backend, store=dist.PrefixStore(f"/restart_{attempt}", store), rank=w.rank,
                            world_size=w.world_size, timeout=timedelta(seconds=timeout_s))


def world_size() -> int:
    """Ranks in the initialised process group (1 before `init()` or without one)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce; the flag itself at world size 1)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)], device=world().device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_text(text: str, max_bytes: int = 128) -> str:
    """Rank 0's `text` (at most `max_bytes` of UTF-8) on every rank: one broadcast of a fixed-size byte tensor,
    nothing unpickled."""
    if world_size() == 1:
        return text
    data = text.encode()[:max_bytes]
    t = torch.zeros(max_bytes + 1, dtype=torch.uint8, device=world().device)
    t[0] = len(data)
    t[1:1 + len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    dist.broadcast(t, src=0)
    raw = t.cpu()
    return bytes(raw[1:1 + int(raw[0])].tolist()).decode()


def mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """Element-wise mean of `t` over all ranks (one all-reduce; `t` itself at world size 1)."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.div_(world_size())


def hydra_rank_overrides() -> List[str]:
    """Extra Hydra overrides for ranks other than 0: they share rank 0's fixed run directory (`hydra.run.dir`
    is `run_dir`), so they neither rewrite its `.hydra/` config copies nor append to its log; each writes its
    own `<job>.rank<N>.log` there instead."""
    rank = _env_int("RANK", 0)
    if rank == 0:
        return []
    return ["hydra.output_subdir=null",
            f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/${{hydra.job.name}}.rank{rank}.log"]


def unresponsive_ranks(wait_s: float = 3.0) -> List[int]:
    """After a failed collective: the ranks that do not answer a roll call through the rendezvous store
    within `wait_s` (stalled or dead). Every surviving rank signs in, so survivors name the same ranks."""
    if not dist.is_initialized():
        return []
    try:
        store = compat.default_store()
        me, size = dist.get_rank(), dist.get_world_size()
        prefix = f"rollcall/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        store.set(f"{prefix}/{me}", "1")
        deadline = time.monotonic() + wait_s
        missing = list(range(size))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"{prefix}/{r}"])]
            time.sleep(0.1)
        return missing
    except Exception:  # the store itself may be gone with the launcher: the caller still reports the timeout
        return []


def is_collective_failure(exc: BaseException) -> bool:
    """A failure of the process group itself (timeout, lost peer), as opposed to an error of our own code."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Timed out", "timed out", "Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
