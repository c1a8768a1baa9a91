"""Process-group helpers: ``torchrun`` setup, rank queries, and reductions that are no-ops in one process.

Every distributed call in tokenlab goes through here, so losses and methods run unchanged in one CPU process.
``init_distributed`` reads the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the
group with gloo on CPU or NCCL on GPU; the group timeout (``train.dist_timeout_s``) makes a rank that waits for a
dead peer fail with an error instead of hanging forever (``torchrun`` then stops the remaining workers).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "all_gather_objects",
    "all_reduce_mean",
    "all_reduce_sum",
    "barrier",
    "broadcast_module",
    "broadcast_object",
    "cleanup_distributed",
    "init_distributed",
    "is_distributed",
    "is_main_process",
    "is_peer_failure",
    "local_rank",
    "rank",
    "world_size",
]

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 outside ``torch.distributed``)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes (1 outside ``torch.distributed``)."""
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's rank on its node (``LOCAL_RANK`` set by ``torchrun``, else 0)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def is_main_process() -> bool:
    """Whether this is rank 0, the one that writes files and logs."""
    return rank() == 0


def init_distributed(device: torch.device, timeout_s: float = 600.0) -> bool:
    """Join the ``torchrun`` process group when launched by it; returns True when distributed.

    Raises:
        ValueError: launched with several processes on CUDA but fewer visible GPUs than local ranks.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        if local_rank() >= torch.cuda.device_count():
            raise ValueError(f"local rank {local_rank()} has no GPU ({torch.cuda.device_count()} visible)")
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    logger.info("rank %d/%d joined the %s process group (timeout %ss)", rank(), world_size(), backend, timeout_s)
    return True


def is_peer_failure(err: BaseException) -> bool:
    """True for a collective that failed because another rank stopped answering (timed out or closed its socket)."""
    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset by peer")
    )


def cleanup_distributed() -> None:
    """Leave the process group (a no-op outside ``torch.distributed``)."""
    if is_distributed():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op outside ``torch.distributed``)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor); ``t`` itself in one process."""
    if not is_distributed():
        return t
    t = t.detach().clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor); ``t`` itself in one process."""
    if not is_distributed():
        return t
    return all_reduce_sum(t) / world_size()


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` in one process."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0, parameters: bool = True) -> None:
    """Copy rank ``src``'s parameters (unless ``parameters=False``) and buffers into ``module`` on every rank.

    Ranks seed differently (for their augmentations), so their freshly built models differ; DDP broadcasts at wrap
    time, FSDP does not, so sharding a model needs this first. Buffers alone (BatchNorm running statistics, which
    every rank updates from its own batches) make every rank validate the model that rank 0 exports.
    """
    if not is_distributed():
        return
    for t in [*(module.parameters() if parameters else ()), *module.buffers()]:
        dist.broadcast(t.data, src=src)
