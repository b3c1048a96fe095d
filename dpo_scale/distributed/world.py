"""The process group: joining it (deepspeed launcher, torchrun, srun or a plain process), leaving it, and the few
collectives the loop calls outside the engine.

One process or many: under the `deepspeed` launcher, torchrun or srun the rank variables are read from the
environment; a plain `python` process becomes a world of one on a local port.
"""

from __future__ import annotations

import os
import socket
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from dpo_scale.config import ConfigError
from dpo_scale.distributed.sequence_parallel import release_groups


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(timeout_s: int) -> World:
    """Join (or create) the process group. Collectives time out after `timeout_s`, so a dead rank ends the job."""
    # DeepSpeed calls torch.distributed's deprecated *_tensor collectives on every step; the warning is not ours
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    _adopt_slurm_variables()
    if "RANK" not in os.environ:  # a plain process: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    wait_for_op_builds(int(os.environ["RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), local_rank, dist.get_world_size(), device)


# Ops DeepSpeed compiles on first use with torch.utils.cpp_extension: the shared-memory collectives of its CPU
# backend (built inside init_distributed on CPU) and the CPU Adam of optimizer offload.
COMPILED_OPS = ("deepspeed_shm_comm", "cpu_adam")
BUILD_TAKES_AT_MOST_S = 600  # the shm op builds in ~1 minute on 2 cores, cpu_adam in ~2


def wait_for_op_builds(rank: int) -> None:
    """torch guards each build with a bare `lock` file in the op's build directory, held open by the building
    process and deleted when it ends. A build killed half way leaves the file, and every later launch waits for it
    forever without a word. Here: wait (saying so) while a build may be running; stop with a message when the lock is
    older than a build could take and no process on this machine holds it open. (Age matters because the directory
    may be shared by nodes, whose builds this machine cannot see.)"""
    from torch.utils.cpp_extension import _get_build_directory  # the directory torch's build itself uses

    for op in COMPILED_OPS:
        lock = Path(_get_build_directory(op, verbose=False)) / "lock"
        announced = False
        while (age := _age_s(lock)) is not None:
            if age > BUILD_TAKES_AT_MOST_S and not _held_open(lock):
                raise ConfigError(
                    f"{lock} is left from a build of DeepSpeed's {op} op that was interrupted ({age / 60:.0f} minutes "
                    "old, no process holds it): every launch would wait for it forever. Fix: delete it "
                    f"(rm {lock}) and launch again; the op is rebuilt on the next launch"
                )
            if not announced:
                print(
                    f"rank {rank}: waiting for a build of DeepSpeed's {op} op to finish ({lock} is {age:.0f} s old). "
                    f"If no build is running, an earlier launch was interrupted while building: rm {lock}", flush=True
                )  # fmt: skip
                announced = True
            time.sleep(1)


def _age_s(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _held_open(path: Path) -> bool:
    """Whether any process on this machine that we may inspect has `path` open (Linux /proc)."""
    target = str(path.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                return True
        except OSError:  # another user's process, or one that ended while we looked
            continue
    return False


def _adopt_slurm_variables() -> None:
    """`srun` sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; torch.distributed reads RANK / WORLD_SIZE."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close() -> None:
    if dist.is_initialized():
        dist.barrier()  # every rank has mapped every other rank's shared-memory buffer long before this
        deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's references to its groups
    release_groups()
    _unlink_shared_memory()


def abort() -> None:
    """Leave the process group after an error on this rank, without waiting for the others."""
    if dist.is_initialized():
        deepspeed.comm.destroy_process_group()
    release_groups()
    _unlink_shared_memory()


def _unlink_shared_memory() -> None:
    """DeepSpeed's CPU all-reduce creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank> (~68 MB)
    per rank and never removes it: a day of runs filled 21 GB of a 24 GB machine. Each rank unlinks its own; the
    memory is freed when the last process that maps it exits."""
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        return
    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    prefix = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{address}_{port}"
    for rank in {os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")}:
        try:
            os.unlink(f"{prefix}_{rank}")
        except FileNotFoundError:
            pass


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place. A sync point: called only at the log interval and on rare events."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_to_all(value: object) -> list[object]:
    """Every rank's `value`, in rank order, on every rank (pickled between our own ranks only). For small objects:
    a few hundred generated token lists at an evaluation."""
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
