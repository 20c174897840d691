"""Training on several processes and machines: torchrun and DistributedDataParallel.

    torchrun --nproc_per_node 4 -m aligna train CONFIG                      # 4 GPUs (or 4 CPU processes)
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d \\
             --rdzv_endpoint HOST:29500 --rdzv_id RUN -m aligna train CONFIG  # on each of 2 machines

torchrun starts one process per device and tells each its place in the job through the
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); aligna reads it, joins
the process group (nccl on CUDA, gloo on a CPU) and wraps the model in DDP. Nothing about
addresses or ports is aligna's: they are torchrun's rendezvous. Without torchrun the job is
one process and nothing here is used.

How an update is split (`Trainer` applies it): every rank computes the same deterministic
batch order for an epoch; an update takes the next `world * accumulate` batches and rank r
the `accumulate` of them at r * accumulate. The loss is summed over tokens and divided by
the target tokens of the whole update, summed over all ranks (each rank counts them itself:
it knows every batch of the update), so an update is the same whatever the world size: 2 processes
equal 1 process with `train.accumulate: 2`. Rank 0 alone validates, logs, writes TensorBoard
and checkpoints; the others wait for its decisions (`broadcast`).

A rank that dies ends the job: torchrun stops the others and exits non-zero, naming the
rank; `--resume` continues from the last complete checkpoint. A rank that stops with an
error (rank 0 on bad input: a model directory in the way, a damaged dev set) leaves the
others waiting in a collective, which then fails: they stop with `PeerStopped`, one line
each, and the first rank's message says why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(minutes=60)  # the longest one rank waits for the others (rank 0 validating)


class PeerStopped(RuntimeError):
    """This rank's collective failed because another process of the job stopped or left."""


@contextmanager
def _collective(what: str) -> Iterator[None]:
    try:
        yield
    except RuntimeError as e:  # gloo: "Connection closed by peer"; nccl: the watchdog's timeout
        if isinstance(e, torch.OutOfMemoryError):  # this rank's own failure
            raise
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]
        raise PeerStopped(f"rank {dist.get_rank()} stopped: {what} failed ({reason}), most often because another "
                          "process of this job stopped first (its message says why) or left") from e  # fmt: skip


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The rank that validates, logs and writes."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment() -> World:
    """The place of this process in a torchrun job (one process without torchrun)."""
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return World()
    try:
        world = World(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError(
            f"RANK={os.environ['RANK']!r}, WORLD_SIZE={os.environ['WORLD_SIZE']!r}: not integers "
            "(start distributed training with torchrun)"
        ) from None
    if not 0 <= world.rank < world.size:
        raise ValueError(f"RANK {world.rank} is outside WORLD_SIZE {world.size}")
    return world


def device_for(world: World, device: torch.device) -> torch.device:
    """One device per process: cuda:LOCAL_RANK on a GPU machine, the CPU otherwise."""
    if not world.distributed or device.type != "cuda":
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise ValueError(
            f"LOCAL_RANK {world.local_rank} but this machine has {torch.cuda.device_count()} CUDA devices: "
            "start at most one process per GPU (--nproc_per_node)"
        )
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def join(world: World, device: torch.device) -> None:
    """Join torchrun's process group: nccl on CUDA, gloo on a CPU."""
    if world.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)


def leave(together: bool = False) -> None:
    """Leave the process group (idempotent). `together`: this rank ended well, so first wait for
    every rank to be done with the group (a barrier): no rank then tears its connections down
    while another is still in a collective or still writing."""
    if not dist.is_initialized():
        return
    try:
        if together:
            barrier()
    finally:
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over every rank (the values themselves in one process)."""
    if not dist.is_initialized():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    with _collective("a sum over the ranks"):
        dist.all_reduce(t)
    return t.tolist()


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    with _collective("waiting for rank 0's decision"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any]:
    """Every rank's `value`, in rank order, on every rank."""
    if not dist.is_initialized():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    with _collective("gathering every rank's value"):
        dist.all_gather_object(out, value)
    return out


def barrier() -> None:
    if dist.is_initialized():
        with _collective("waiting for the other ranks"):
            dist.barrier()
