"""Data-layer throughput: synthetic generation, paired STL loader vs timm single-view loader, iBOT multi-crop.

The tokenlab pipelines run through the one training loader the Trainer uses (``data.sampler.build_train_loader``:
``ResumableSampler`` + per-sample seeding), with the data views of ``data.transforms.build_transforms``.

Every loader pipeline reads the same synthetic ``train`` split (images only, no masks, like timm's ImageFolder)
with the same image size, batch size and workers; the pipelines are measured in alternating rounds within one run
(shared machines are noisy) and the median round is reported. The headline number is the cost ratio
``paired STL / timm single view`` (target <= 1.3).

    python benchmarks/data.py                       # CPU, writes benchmarks/results/data.json
    python benchmarks/data.py --device cuda --workers 8 --batch-size 256 --images 20000
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch
import torchvision
from timm.data import create_transform
from torch.utils.data import DataLoader

from tokenlab.data import ResumableSampler, SynthConfig, build_dataset, build_train_loader, build_transforms, generate

logger = logging.getLogger("benchmarks.data")


def _move(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [_move(v, device) for v in batch]
    return batch


def _rate(make_loader: Callable[[], DataLoader], batches: int, device: torch.device) -> float:
    loader = make_loader()
    iterator = iter(loader)
    _move(next(iterator), device)  # worker start-up and first batch are not timed
    count, start = 0, time.perf_counter()
    for _ in range(batches):
        batch = _move(next(iterator), device)
        count += (batch["label"] if isinstance(batch, dict) else batch[1]).shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del iterator
    return count / elapsed


def _synthetic_breakdown(img_size: int, chunks: int = 20) -> dict[str, float]:
    """Images/s of one thread for each part of generation: rendering, PNG encoding in memory, writing the files.

    ``generate`` writes two small PNGs per image (image + mask); on a slow file system the writes, not the
    rendering, can set the pace, and this says which.
    """
    import io

    import numpy as np

    from tokenlab.data.synthetic import CHUNK, _encode_png, _generator, render_chunk

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        labels, textures = torch.arange(CHUNK) % 10, torch.arange(CHUNK) % 4
        render_chunk(labels, textures, _generator(0, "warm-up", 0), img_size)
        start = time.perf_counter()
        rendered = [render_chunk(labels, textures, _generator(0, "bench", c), img_size)[:2] for c in range(chunks)]
        render = chunks * CHUNK / (time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    pairs = [(imgs[i], masks[i]) for imgs, masks in rendered for i in range(len(imgs))]
    blobs = []
    start = time.perf_counter()
    for img, mask in pairs:
        for array in (img, mask):
            buf = io.BytesIO()
            _encode_png(buf, np.asarray(array))
            blobs.append(buf.getvalue())
    encode = len(pairs) / (time.perf_counter() - start)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for i, blob in enumerate(blobs):
            (Path(tmp) / f"{i}.png").write_bytes(blob)
        write = len(pairs) / (time.perf_counter() - start)
    return {"render": render, "png_encode_in_memory": encode, "write_two_files": write}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--images", type=int, default=3000, help="synthetic train images to generate and read")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batches", type=int, default=15, help="timed batches per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    # mmax9: timm's PosterizeIncreasing reaches 0 bits at magnitude 10, which Pillow >= 12 rejects (ValueError)
    parser.add_argument("--rand-augment", default="rand-m9-mstd0.5-inc1-mmax9", help="same string for all pipelines")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: batches are copied there (pinned memory)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data.json"))
    args = parser.parse_args()
    if args.images // args.batch_size < args.batches + 1:  # one untimed batch, then the timed ones
        parser.error(
            f"--images {args.images} gives fewer than --batches {args.batches} + 1 batches of "
            f"{args.batch_size}; raise --images or lower --batches"
        )
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    results: dict[str, Any] = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "timm": timm.__version__,
            "device": str(device),
        },
        "args": vars(args),
    }
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "synth"
        gen_rates = []
        for round_ in range(args.rounds):
            start = time.perf_counter()
            generate(root, SynthConfig(seed=round_, img_size=args.img_size, counts={"train": args.images}))
            gen_rates.append(args.images / (time.perf_counter() - start))
        results["synthetic_images_per_s"] = {"median": statistics.median(gen_rates), "rounds": gen_rates}
        results["synthetic_breakdown_one_thread"] = _synthetic_breakdown(args.img_size)

        size, ra = args.img_size, args.rand_augment

        def view_set(view: str, **options: Any) -> Any:
            """The training images through one data view's transform (headers trusted, masks not read)."""
            transform = build_transforms(view, size, **options)
            return build_dataset(root, "train", transform, verify="none", load_masks=False)

        paired = view_set("stl_paired", re_prob=0.25, rand_augment=ra)
        single = view_set("classification", re_prob=0.25, rand_augment=ra)
        ibot = view_set("multicrop", patch_size=8, num_local=10)
        timm_tf = create_transform(size, is_training=True, auto_augment=ra, re_prob=0.25)
        timm_ds = torchvision.datasets.ImageFolder(str(root / "train"), transform=timm_tf)
        pin = device.type == "cuda"
        common = {"num_workers": args.workers, "pin_memory": pin}

        def training_loader(ds: Any) -> DataLoader:  # the loader the Trainer uses (data.sampler), epoch 0
            return build_train_loader(ds, args.batch_size, ResumableSampler(len(ds), seed=0), 0, **common)

        pipelines: dict[str, Callable[[], DataLoader]] = {
            "timm_single_view": lambda: DataLoader(timm_ds, args.batch_size, shuffle=True, drop_last=True, **common),
            "tokenlab_single_view": lambda: training_loader(single),
            "stl_paired": lambda: training_loader(paired),
            "ibot_multicrop_2g10l": lambda: training_loader(ibot),
        }
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for round_ in range(args.rounds):
            order = list(pipelines) if round_ % 2 == 0 else list(reversed(pipelines))
            for name in order:
                rates[name].append(_rate(pipelines[name], args.batches, device))
                logger.info("round %d %-22s %8.0f images/s", round_, name, rates[name][-1])
        results["loader_images_per_s"] = {n: {"median": statistics.median(r), "rounds": r} for n, r in rates.items()}
    med = {n: v["median"] for n, v in results["loader_images_per_s"].items()}
    results["stl_paired_cost_vs_timm_single_view"] = med["timm_single_view"] / med["stl_paired"]
    results["stl_paired_cost_vs_tokenlab_single_view"] = med["tokenlab_single_view"] / med["stl_paired"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(
        f"\n{'pipeline':<26}{'images/s':>10}   ({args.img_size}px, batch {args.batch_size}, "
        f"{args.workers} workers, {args.device})"
    )
    print(f"{'synthetic generation':<26}{results['synthetic_images_per_s']['median']:>10.0f}")
    for part, value in results["synthetic_breakdown_one_thread"].items():
        print(f"{'  one thread: ' + part:<40}{value:>8.0f}")
    for name, value in med.items():
        print(f"{name:<26}{value:>10.0f}")
    print(
        f"paired STL cost / timm single view: {results['stl_paired_cost_vs_timm_single_view']:.2f}x "
        f"(target <= 1.3); / tokenlab single view: {results['stl_paired_cost_vs_tokenlab_single_view']:.2f}x"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
