"""The one training sampler, the per-sample seeding and the training ``DataLoader`` every method goes through.

Augmentation randomness is tied to the sample, not to the worker or to the process: ``ResumableSampler`` yields
``(index, sample_seed(seed, epoch, index))`` and ``SeededDataset`` runs the wrapped data set's ``__getitem__`` with
torch's default CPU generator seeded to that value (the previous state is restored afterwards, so the training
process's RNG is untouched when ``num_workers=0``). Every training data set (classification, STL paired, iBOT
multi-crop, segmentation) draws from that generator only, so a sample's augmentation depends on (seed, epoch,
index) alone: the same with any number of workers and after a mid-epoch resume, and different in the next epoch.

Sharding follows ``DistributedSampler``: one permutation per epoch drawn from ``seed + epoch``, padded by
wrap-around (or cut with ``drop_last``) to a multiple of the world size; rank ``r`` takes every ``world``-th index
from ``r``. ``start`` skips the samples of this rank already consumed before a resume.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

__all__ = ["ResumableSampler", "SeededDataset", "ShardSampler", "build_train_loader", "sample_seed"]

_MASK64 = (1 << 63) - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample in one epoch (splitmix64-style mixing of the three integers)."""
    value = (seed * 0x9E3779B97F4A7C15 + epoch * 0xBF58476D1CE4E5B9 + index * 0x94D049BB133111EB) & ((1 << 64) - 1)
    value ^= value >> 31
    value = (value * 0xD6E8FEB86659FD93) & ((1 << 64) - 1)
    value ^= value >> 32
    return value & _MASK64


class ResumableSampler(Sampler[tuple[int, int]]):
    """Distributed training sampler with a per-epoch permutation that can start mid-epoch.

    Yields ``(index, sample_seed(seed, epoch, index))`` for ``SeededDataset``; call ``set_epoch`` before each epoch.

    Args:
        length: Data set size.
        num_replicas: Number of processes.
        rank: This process's rank.
        shuffle: Permute each epoch (training) or keep the order.
        seed: Run seed (the permutation and the per-sample seeds derive from it).
        drop_last: Cut the tail so every rank gets the same number of samples instead of padding by repetition.

    Raises:
        ValueError: an empty data set, a rank outside ``[0, num_replicas)``, or too few samples for the ranks.
    """

    def __init__(
        self,
        length: int,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if length < 1:
            raise ValueError("the data set is empty")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside [0, {num_replicas})")
        self.length, self.num_replicas, self.rank, self.shuffle, self.seed = length, num_replicas, rank, shuffle, seed
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0
        self.per_rank = length // num_replicas if drop_last else math.ceil(length / num_replicas)
        if self.per_rank == 0:
            raise ValueError(f"{length} samples cannot feed {num_replicas} ranks with drop_last")

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch to yield next and skip this rank's first ``start`` samples of it."""
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        """This rank's sample indices for the current epoch, from ``start``."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=g).tolist()
        else:
            order = list(range(self.length))
        total = self.per_rank * self.num_replicas
        order = (order * math.ceil(total / self.length))[:total]
        return order[self.rank :: self.num_replicas][self.start :]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter((i, sample_seed(self.seed, self.epoch, i)) for i in self.indices())

    def __len__(self) -> int:
        return self.per_rank - self.start


class ShardSampler(Sampler[int]):
    """Validation: every sample exactly once over all ranks (no padding, no shuffle)."""

    def __init__(self, length: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, num_replicas))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SeededDataset(Dataset):
    """Wraps a data set so that ``ds[(index, seed)]`` runs ``dataset[index]`` with the default generator seeded.

    A plain ``ds[index]`` is passed through unseeded. Unknown attributes are forwarded to the wrapped data set.
    """

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


def build_train_loader(
    dataset: Dataset,
    batch_size: int,
    sampler: ResumableSampler,
    epoch: int,
    start: int = 0,
    num_workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[Any], Any] = default_collate,
) -> DataLoader:
    """The training ``DataLoader`` of one epoch: ``SeededDataset`` over ``sampler``, from sample ``start``.

    The loader draws its worker seeds from its own generator (seeded from the sampler's seed, the epoch and the
    rank), so iterating it never shifts the global RNG streams and a resumed run sees the same batches.

    Args:
        dataset: Map-style data set of sample dicts.
        batch_size: Per-process batch size (the last incomplete batch is dropped).
        sampler: The run's sampler; its epoch and start are set here.
        epoch: Epoch to load.
        start: Samples of this rank's share already consumed in this epoch.
        num_workers: Loader processes.
        pin_memory: Pin batches for a CUDA copy.
        collate_fn: How samples become a batch (``data.transforms.collate_for(view)``).

    Raises:
        ValueError: a non-positive batch size or a negative worker count.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    sampler.set_epoch(epoch, start)
    gen = torch.Generator().manual_seed(sampler.seed * 100_003 + epoch * 1009 + sampler.rank)
    return DataLoader(
        SeededDataset(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
        collate_fn=collate_fn, drop_last=True, generator=gen, pin_memory=pin_memory,
        persistent_workers=False, prefetch_factor=2 if num_workers else None,
    )  # fmt: skip
