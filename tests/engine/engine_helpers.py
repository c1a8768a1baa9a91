"""Tiny data and configs for the engine tests (16x16 images, a 1-block FAN, a few steps)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from tokenlab.engine.config import load_config

TINY_MODEL = [
    "model.name=fan_nano_6_p16_224_token",
    "model.kwargs.img_size=16",
    "model.kwargs.patch_size=4",
    "model.kwargs.embed_dim=32",
    "model.kwargs.depth=1",
    "model.kwargs.num_heads=2",
    "model.num_classes=4",
]


class TinySet(Dataset):
    """Deterministic dict samples: the class is which quadrant is bright, plus per-index noise."""

    def __init__(self, n: int = 32, size: int = 16, classes: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % classes
        self.images = torch.randn(n, 3, size, size, generator=g) * 0.3
        h = size // 2
        for i, y in enumerate(self.labels.tolist()):
            r, c = divmod(y, 2)
            self.images[i, :, r * h : (r + 1) * h, c * h : (c + 1) * h] += 1.5
        self.classes = [f"c{k}" for k in range(classes)]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = self.images[i]
        return {
            "image": img + 0.05 * torch.randn(img.shape),
            "teacher_image": img,
            "label": int(self.labels[i]),
            "index": i,
        }


def tiny_config(run_dir: Path, *overrides: str) -> DictConfig:
    base = TINY_MODEL + [
        f"run_dir={run_dir}",
        "data.img_size=16",
        "data.batch_size=4",
        "optim.lr=0.002",
        "log.every_steps=1",
        "log.progress=false",
        "log.tensorboard=false",
        "train.min_free_disk_mb=0",
    ]
    return load_config(None, base + list(overrides))
