"""The one training loader (``data.sampler``): per-sample seeding (worker-count independent), epochs, sharding."""

from pathlib import Path

import pytest
import torch

from tokenlab.data import build_dataset, build_train_loader, build_transforms
from tokenlab.data.sampler import ResumableSampler


def _first_batch(ds, workers: int, epoch: int) -> dict:
    loader = build_train_loader(ds, 8, ResumableSampler(len(ds), seed=1), epoch, num_workers=workers)
    return next(iter(loader))


def test_same_batches_with_and_without_workers(synth_dir: Path) -> None:
    ds = build_dataset(synth_dir, "train", build_transforms("stl_paired", 32), verify="none")
    a, b = _first_batch(ds, 0, 0), _first_batch(ds, 2, 0)
    assert torch.equal(a["index"], b["index"]) and torch.equal(a["image"], b["image"])
    assert a["teacher_image"].shape == (8, 3, 32, 32) and a["mask"].dtype == torch.int64
    c = _first_batch(ds, 0, 1)
    assert not torch.equal(a["index"], c["index"])


def test_loading_leaves_the_global_rng_alone(synth_dir: Path) -> None:
    ds = build_dataset(synth_dir, "val", build_transforms("classification", 32), verify="none")
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    next(iter(build_train_loader(ds, 4, ResumableSampler(len(ds)), 0)))
    assert torch.equal(torch.rand(3), expected)


def test_sharding_covers_every_sample_once() -> None:
    shards = [ResumableSampler(10, num_replicas=3, rank=r, seed=3).indices() for r in range(3)]
    assert all(len(s) == 4 for s in shards)
    flat = sorted(i for s in shards for i in s)
    assert set(flat) == set(range(10)) and len(flat) == 12  # padded by repetition
    dropped = [ResumableSampler(10, num_replicas=3, rank=r, seed=3, drop_last=True).indices() for r in range(3)]
    assert sum(len(s) for s in dropped) == 9 and len({i for s in dropped for i in s}) == 9
    assert ResumableSampler(5, shuffle=False).indices() == [0, 1, 2, 3, 4]


def test_resume_mid_epoch_continues_the_same_batches(synth_dir: Path) -> None:
    ds = build_dataset(synth_dir, "train", build_transforms("classification", 32), verify="none")
    sampler = ResumableSampler(len(ds), seed=2)
    full = list(build_train_loader(ds, 4, sampler, 1))
    resumed = list(build_train_loader(ds, 4, sampler, 1, start=8))
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(full[2:], resumed, strict=True))


def test_bad_loader_arguments(synth_dir: Path) -> None:
    ds = build_dataset(synth_dir, "val", None, verify="none")
    with pytest.raises(ValueError, match="batch_size"):
        build_train_loader(ds, 0, ResumableSampler(len(ds)), 0)
    with pytest.raises(ValueError, match="rank 3 outside"):
        ResumableSampler(10, num_replicas=2, rank=3)


def test_sampler_shards_and_resumes():
    a = ResumableSampler(10, num_replicas=2, rank=0, seed=1)
    b = ResumableSampler(10, num_replicas=2, rank=1, seed=1)
    a.set_epoch(3)
    b.set_epoch(3)
    ia, ib = list(a), list(b)
    assert sorted(i for i, _ in ia + ib) == list(range(10))
    assert len({s for _, s in ia + ib}) == 10  # one augmentation seed per sample
    a.set_epoch(3, start=2)
    assert list(a) == ia[2:] and len(a) == 3
    a.set_epoch(4)
    assert [i for i, _ in a] != [i for i, _ in ia]
