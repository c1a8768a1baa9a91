"""Sampler, seeding and ``DataLoader`` set-up shared by every method.

Augmentation randomness is tied to the sample, not to the worker: ``EpochSampler`` yields ``(index, sample_seed)``
with ``sample_seed = f(seed, epoch, index)``, and ``SeededDataset`` runs the wrapped data set's ``__getitem__``
with torch's default CPU generator seeded to ``sample_seed`` (the previous state is restored afterwards, so the
training process's RNG is untouched when ``num_workers=0``). The same ``(seed, epoch)`` therefore gives the same
batches with any number of workers, with persistent workers, and after a resume at an epoch boundary.

Sharding follows ``DistributedSampler``: one permutation per epoch drawn from ``(seed, epoch)``, padded (or cut
with ``drop_last``) to a multiple of the world size, rank ``r`` takes every ``world``-th index from ``r``. Rank and
world size come from ``torch.distributed`` when it is initialised.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

logger = logging.getLogger(__name__)

_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (splitmix64-style mixing of the three integers)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    value ^= value >> 32
    return value & _MASK64


def _dist_info(rank: int | None, world_size: int | None) -> tuple[int, int]:
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside [0, {world_size})")
    return rank, world_size


class EpochSampler(Sampler[tuple[int, int]]):
    """Shuffling, sharding sampler yielding ``(index, sample_seed)``; call ``set_epoch`` before each epoch.

    Args:
        length: data set size.
        seed: run seed.
        shuffle: permute each epoch (training) or keep order (evaluation).
        rank: this process's rank (default: from ``torch.distributed`` or 0).
        world_size: number of processes (default: from ``torch.distributed`` or 1).
        drop_last: cut the tail so every rank gets the same number of samples, instead of padding by repetition.
    """

    def __init__(
        self,
        length: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if length < 1:
            raise ValueError(f"cannot sample from an empty data set (length {length})")
        self.length = length
        self.seed = seed
        self.shuffle = shuffle
        self.rank, self.world_size = _dist_info(rank, world_size)
        self.drop_last = drop_last
        self.epoch = 0
        if drop_last:
            self.per_rank = length // self.world_size
        else:
            self.per_rank = -(-length // self.world_size)
        if self.per_rank == 0:
            raise ValueError(f"{length} samples cannot feed {self.world_size} ranks with drop_last")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, -1))
            order = torch.randperm(self.length, generator=gen).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.world_size
        if total > len(order):
            order += (order * (total // len(order) + 1))[: total - len(order)]
        return order[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices():
            yield index, sample_seed(self.seed, self.epoch, index)

    def __len__(self) -> int:
        return self.per_rank


class SeededDataset(Dataset):
    """Wraps a data set so that ``ds[(index, seed)]`` runs ``dataset[index]`` with the default generator seeded."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, key: int | tuple[int, int]) -> Any:
        if isinstance(key, int):
            return self.dataset[key]
        index, seed = key
        state = torch.get_rng_state()
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            torch.set_rng_state(state)


def seed_worker(worker_id: int) -> None:
    """Seed Python's and NumPy's global generators in a worker from its torch seed (for third-party code)."""
    base = torch.initial_seed() & 0xFFFFFFFF
    random.seed(base)
    np.random.seed(base)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    train: bool,
    num_workers: int = 0,
    seed: int = 0,
    rank: int | None = None,
    world_size: int | None = None,
    pin_memory: bool | None = None,
    persistent_workers: bool | None = None,
    drop_last: bool | None = None,
    prefetch_factor: int | None = None,
    collate_fn: Callable[[list[Any]], Any] | None = None,
) -> DataLoader:
    """A ``DataLoader`` with ``EpochSampler`` + ``SeededDataset``; call ``set_epoch(loader, epoch)`` every epoch.

    Args:
        dataset: any map-style data set returning sample dicts.
        batch_size: per-process batch size.
        train: shuffle and drop the last incomplete batch (evaluation keeps order and every sample).
        num_workers: loader processes.
        seed: run seed (the sampler and per-sample augmentation seeds derive from it).
        rank: process rank (default: from ``torch.distributed``).
        world_size: process count (default: from ``torch.distributed``).
        pin_memory: default: when CUDA is available.
        persistent_workers: default: when ``num_workers > 0``.
        drop_last: default: ``train``.
        prefetch_factor: batches prefetched per worker (default: torch's).
        collate_fn: default: ``default_collate``.

    Raises:
        ValueError: on a non-positive batch size or negative worker count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    drop_last = train if drop_last is None else drop_last
    sampler = EpochSampler(len(dataset), seed, shuffle=train, rank=rank, world_size=world_size,  # type: ignore
                           drop_last=drop_last and train)
    rank_, _ = sampler.rank, sampler.world_size
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["persistent_workers"] = True if persistent_workers is None else persistent_workers
        kwargs["worker_init_fn"] = seed_worker
        if prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
    return DataLoader(
        SeededDataset(dataset),
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        drop_last=drop_last,
        collate_fn=collate_fn or default_collate,
        generator=torch.Generator().manual_seed(sample_seed(seed, rank_, -2)),
        **kwargs,
    )


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Select the epoch whose permutation and augmentation seeds the loader yields next."""
    sampler = loader.sampler
    if not isinstance(sampler, EpochSampler):
        raise TypeError(f"loader was not built by build_loader (sampler {type(sampler).__name__})")
    sampler.set_epoch(epoch)
