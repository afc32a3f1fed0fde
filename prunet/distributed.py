"""Several processes, one run: torchrun's environment, PyTorch's process group, the few collectives prunet needs.

``torchrun --nproc_per_node N -m prunet run RECIPE`` starts N copies of the run. Each
reads the same recipe and data and computes the same thing, except that training
shards every batch over the ranks and ``DistributedDataParallel`` averages the
gradients, so the weights stay identical on every rank; prune steps then compute
identical masks everywhere (checked after every step with :func:`mask_digest`).
Evaluation is summed over the ranks; only rank 0 prints and writes files.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

__all__ = ["SINGLE", "RankFailed", "Ranks", "agree", "broadcast_buffers", "all_reduce_sum", "broadcast_object", "from_env", "gather_objects",
           "init_process_group", "mask_digest", "shutdown"]


@dataclass(frozen=True)
class Ranks:
    """Where this process stands in a run: its rank, how many there are, its index on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


SINGLE = Ranks()


def from_env() -> Ranks:
    """The ranks torchrun (or any launcher setting ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) gave this process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, got RANK={rank}, WORLD_SIZE={world}")
    return Ranks(rank, world, local)


def init_process_group(ranks: Ranks, device: torch.device | None = None) -> bool:
    """Join the process group of a distributed run; True if this call did.

    The group has ``gloo`` for CPU tensors and, where CUDA is present, ``nccl`` for CUDA
    tensors, so every rank joins it alike whatever device the recipe names (a resumed run's
    ranks learn it only after joining). Does nothing for a single process, or when the
    caller already initialised a group.
    """
    if not ranks.distributed or dist.is_initialized():
        return False
    if device is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=ranks.rank, world_size=ranks.world_size)
    return True


def shutdown(together: bool = True) -> None:
    """Leave the process group; ``together``: once every rank has come here (a barrier first).

    Ranks that leave at different moments can abort in gloo's teardown (a peer's connection
    closing under a rank still tearing down its own), so a run that finished, or that every rank
    stopped alike (an agreed error), leaves together. A rank that failed alone leaves at once:
    the others may never reach a barrier.
    """
    if not dist.is_initialized():
        return
    if together:
        try:
            if dist.get_backend() == "gloo":
                dist.monitored_barrier(timeout=timedelta(seconds=60))  # never a hang: a peer gone is an error
            else:
                dist.barrier()
        except RuntimeError:  # a peer already gone: leave anyway
            pass
    dist.destroy_process_group()


def _device() -> torch.device:
    """The device collectives of the default group run on (``nccl`` needs CUDA tensors)."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: Sequence[float], ranks: Ranks) -> list[float]:
    """Each value summed over the ranks (float64), the same result on every rank."""
    if not ranks.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def gather_objects(obj: Any, ranks: Ranks) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ranks.distributed:
        return [obj]
    out: list[Any] = [None] * ranks.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, ranks: Ranks, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (the others pass anything)."""
    if not ranks.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


class RankFailed(ValueError):
    """Another rank failed a step every rank must pass; that rank says why (this one stays quiet)."""

    quiet = True


def agree(ranks: Ranks, error: BaseException | None) -> None:
    """A step every rank must pass: if it failed on any rank, raise on all of them.

    The ranks that failed raise their own error; the others raise :class:`RankFailed`,
    instead of waiting forever at the next collective. Of the ranks that failed with the
    same message only the first one is meant to print it (the others' errors get ``quiet``).
    """
    if not ranks.distributed:
        if error is not None:
            raise error
        return
    told = gather_objects(None if error is None else str(error), ranks)
    failed = [(r, msg) for r, msg in enumerate(told) if msg is not None]
    if error is not None:
        first = next(r for r, msg in failed if msg == str(error))
        try:
            error.quiet = first != ranks.rank
        except AttributeError:  # an exception type without a __dict__
            pass
        raise error
    if failed:
        r, msg = failed[0]
        raise RankFailed(f"rank {r} failed: {msg}")


def broadcast_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (batch-norm statistics: DDP syncs them only at the start of a forward)."""
    if not ranks.distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=0)


def mask_digest(masks: dict[str, torch.Tensor]) -> str:
    """A SHA-256 of every mask (names, shapes and bits): equal digests mean bit-identical masks."""
    h = hashlib.sha256()
    for name in sorted(masks):
        m = masks[name].detach().to("cpu", torch.bool).contiguous()
        h.update(name.encode())
        h.update(str(tuple(m.shape)).encode())
        h.update(m.numpy().tobytes())
    return h.hexdigest()
