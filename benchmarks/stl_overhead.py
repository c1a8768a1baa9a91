"""Cost of an STL student step (online or cached labels) over a supervised step, and throughput of FAN vs DeiT.

1. Overhead (issue 5 target: CPU <= 1.4x time and <= 1.15x memory; GPU bf16 <= 1.3x time). Same token model, same
   batch, same data: the supervised step is ``CE(model(x))``; the STL student step adds the frozen labeler (same
   architecture) on the teacher view under ``torch.inference_mode`` + autocast and the token loss. Time: the two
   steps run interleaved in one process (A, B, A, B, ...) and the ratio of their medians is reported, so load from
   other processes hits both alike. Memory: on CUDA ``torch.cuda.max_memory_allocated`` per step kind; on CPU each
   kind runs in a fresh subprocess that resets the kernel's peak-RSS counter after its imports and reports the
   peak RSS minus the RSS at that point (models, labeler, optimizer state, activations).
   Cached STL (issue 18 target: <= 1.05x the supervised step; store <= 8 KB per image at 14x14, top-5): the student
   reads its labels from a label store (``tokenlab.data.label_store``; random top-5 logits at the labeler's grid,
   one full view per image, written to a temporary directory) and cuts them to random crop/flip views
   (``view_theta``), so the step pays the store read, the dense reconstruction and the RoI sampling, no labeler.
   ``cached_over_supervised`` is its time ratio, ``store_bytes_per_image`` the store size at a 14x14 grid, top-5.
   Cached STL on the store's own crops (``store_crops``): the store also holds ``CROP_VIEWS`` random crops per image
   and each student view is one of them (``given_crop``), so the step cuts the stored crop itself;
   ``cached_crops_over_supervised`` is its time ratio, ``store_crops_bytes_per_image`` the size per number of crops.
2. Throughput: images/s of full training steps (forward, backward, AdamW) of fan_tiny/fan_small against timm's
   deit_tiny/deit_small at the same image size and batch, interleaved in one process.

Usage::

    python benchmarks/stl_overhead.py               # CPU defaults, writes results/stl_overhead_cpu.json
    python benchmarks/stl_overhead.py --device cuda --amp bf16 --img-size 224 --batch-size 128
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timm
import torch

import tokenlab  # noqa: F401  (registers the FAN models)
from tokenlab.methods import StepContext, TrainPlan, build_method
from tokenlab.models.contract import as_backbone
from tokenlab.utils.amp import AMP_CHOICES, amp_dtype, autocast

logger = logging.getLogger("stl_overhead")
RESULTS = Path(__file__).parent / "results"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) so imports do not count (Linux ``clear_refs`` mode 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


KINDS = ("supervised", "stl_student", "stl_cached", "stl_cached_crops")
STORE_IMAGES = 256  # images in the benchmark's label store; each step reads a random batch of them
CROP_VIEWS = 2  # random crops per image in the store_crops store


def make_store(args: argparse.Namespace, grid: tuple[int, int], root: Path, crops: int = 0) -> Path:
    """A finished label store of ``STORE_IMAGES`` images with random top-k logits on ``grid``: the full view, then
    ``crops`` random crop/flip views."""
    import numpy as np

    from tokenlab.data.label_store import LabelStore, compress_logits

    n, k, tokens, v = STORE_IMAGES, args.topk, grid[0] * grid[1], 1 + crops
    manifest = {
        "labeler": {"model": args.labeler or args.model, "path": None, "export": "benchmark", "sha256": None},
        "data": {"spec": "random", "split": "train", "num_images": n, "sha256": "0" * 64},
        "img_size": args.img_size, "k": k, "grid": list(grid), "views": v, "num_classes": args.num_classes,
        "mean": [0.0] * 3, "std": [1.0] * 3, "seed": 0,
    }  # fmt: skip
    store = LabelStore.create(root, manifest, [f"{i}.png" for i in range(n)])
    g = torch.Generator().manual_seed(2)
    for start in range(0, n, 32):
        rows = np.arange(start, min(start + 32, n))
        b = len(rows)
        logits = torch.randn(b * v, tokens, args.num_classes, generator=g)
        values, indices, rest = (t.view(b, v, *t.shape[1:]) for t in compress_logits(logits, k))
        full = torch.tensor([[1.0, 0, 0], [0, 1, 0]]).expand(b, 1, 2, 3)
        theta = torch.cat([full, random_view_thetas(b * crops, g).view(b, crops, 2, 3)], dim=1)
        store.write_rows(rows, values, indices, rest, theta)
    store.finish()
    return root


def random_view_thetas(b: int, g: torch.Generator) -> torch.Tensor:
    """Affines of ``b`` random crops (side 0.6-1 of the image) with random flips, as ``view_affine`` gives them."""
    side = 0.6 + 0.4 * torch.rand(b, generator=g)
    centre = (1 - side)[:, None] * (2 * torch.rand(b, 2, generator=g) - 1)
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, :, 2] = centre
    return theta


def make_step(kind: str, args: argparse.Namespace, device: torch.device) -> Callable[[], float]:
    """A closure running one training step of ``kind`` (one of ``KINDS``) on a fixed batch."""
    kw = dict(num_classes=args.num_classes, img_size=args.img_size)
    torch.manual_seed(0)
    model = timm.create_model(args.model, **kw)
    g = torch.Generator().manual_seed(1)
    b = args.batch_size
    extra: dict[str, torch.Tensor] = {}
    if kind == "supervised":
        method = build_method("supervised", model=model, num_classes=args.num_classes)
    elif kind in ("stl_cached", "stl_cached_crops"):
        import tempfile

        from tokenlab.data.label_store import LabelStore

        gh, gw = as_backbone(model).grid_size(args.img_size)
        crops = CROP_VIEWS if kind == "stl_cached_crops" else 0
        root = make_store(args, (gh, gw), Path(tempfile.mkdtemp(prefix="stl_overhead_store_")) / "store", crops)
        method = build_method("stl_student", model=model, label_store=str(root), store_crops=bool(crops))
        index = torch.randperm(STORE_IMAGES, generator=g)[:b]
        extra = {"index": index, "view_theta": random_view_thetas(b, g).to(device)}
        if crops:  # each student view is one of its image's stored crops, as ViewTransform(crops=...) gives them
            given = torch.randint(0, crops, (b,), generator=g)
            stored = LabelStore.open(root).read(index.numpy())["theta"]
            extra.update(given_crop=given.to(device), view_theta=stored[torch.arange(b), 1 + given].to(device))
    else:
        labeler = timm.create_model(args.labeler or args.model, **kw)
        method = build_method("stl_student", model=model, labeler=labeler, teacher_dtype=args.teacher_dtype)
    method.to(device).train()
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    batch = {
        "image": torch.randn(b, 3, args.img_size, args.img_size, generator=g).to(device),
        "teacher_image": torch.randn(b, 3, args.img_size, args.img_size, generator=g).to(device),
        "label": torch.randint(0, args.num_classes, (b,), generator=g).to(device),
        **extra,
    }
    if kind != "stl_student":
        del batch["teacher_image"]  # the supervised and cached steps get no second view
    ctx = StepContext(0, 0, TrainPlan(1, 1, 1), device, amp_dtype=amp_dtype(args.amp))

    def step() -> float:
        _sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(device, args.amp):
            loss = method(batch, ctx)["loss"]
        loss.backward()
        opt.step()
        _sync(device)
        return time.perf_counter() - t0

    return step


def interleaved(steps: dict[str, Callable[[], float]], warmup: int, repeats: int) -> dict[str, list[float]]:
    """Run every step ``warmup`` times, then ``repeats`` rounds of one call each, in turn."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            times[k].append(fn())
    return times


def memory_one(kind: str, args: argparse.Namespace) -> float:
    """Peak memory (MiB) of ``kind``'s steps: CUDA max allocated, or CPU peak RSS growth in this process."""
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base: float = torch.cuda.memory_allocated(device)
        step = make_step(kind, args, device)
        for _ in range(3):
            step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    _reset_peak_rss()
    base = _rss_mb()
    step = make_step(kind, args, device)
    for _ in range(3):
        step()
    return _peak_rss_mb() - base


def memory(kind: str, args: argparse.Namespace) -> float:
    if args.device.startswith("cuda"):
        return memory_one(kind, args)
    cmd = [sys.executable, __file__, "--memory-of", kind] + [a for a in sys.argv[1:] if a != "--memory-of"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def throughput(args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    """Images/s of training steps of fan_tiny/small vs deit_tiny/small (same image size and batch)."""
    names = args.throughput_models.split(",")
    steps: dict[str, Callable[[], float]] = {}
    for name in names:
        torch.manual_seed(0)
        model = timm.create_model(name, num_classes=args.num_classes, img_size=args.img_size).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
        y = torch.randint(0, args.num_classes, (args.batch_size,), device=device)

        def step(
            model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt, x: torch.Tensor = x, y: torch.Tensor = y
        ) -> float:
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            with autocast(device, args.amp):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            _sync(device)
            return time.perf_counter() - t0

        steps[name] = step
    times = interleaved(steps, args.warmup, args.throughput_repeats)
    return {k: args.batch_size / statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=AMP_CHOICES)
    p.add_argument("--model", default="fan_tiny_12_p16_224_token")
    p.add_argument("--labeler", default=None, help="labeler architecture (default: same as --model)")
    p.add_argument("--teacher-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--img-size", type=int, default=112)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--topk", type=int, default=5, help="logits per token in the cached-label store")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument(
        "--throughput-models",
        default="fan_tiny_12_p16_224,deit_tiny_patch16_224,fan_small_12_p16_224,deit_small_patch16_224",
    )
    p.add_argument("--throughput-repeats", type=int, default=4)
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default=None, help="JSON output (default: results/stl_overhead_<device>.json)")
    p.add_argument("--note", default=None, help="free text stored with the results (e.g. 'shared machine')")
    p.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        print(memory_one(args.memory_of, args))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    from tokenlab.data.label_store import store_bytes_per_image

    steps = {k: make_step(k, args, device) for k in KINDS}
    times = interleaved(steps, args.warmup, args.repeats)
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: memory(k, args) for k in KINDS}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "memory_of"},
        "step_time_s": med,
        "step_times_s": times,
        "time_ratio": med["stl_student"] / med["supervised"],
        "cached_over_supervised": med["stl_cached"] / med["supervised"],
        "cached_over_online": med["stl_cached"] / med["stl_student"],
        "cached_crops_over_supervised": med["stl_cached_crops"] / med["supervised"],
        "store_bytes_per_image": store_bytes_per_image(14 * 14, args.topk),
        "store_crops_bytes_per_image": {n: store_bytes_per_image(14 * 14, args.topk, 1 + n) for n in (1, 2, 4)},
        "store_layout": f"14x14 grid, top-{args.topk}: fp16 logits + uint16 ids + fp16 rest per token, theta, flag",
        "peak_memory_mib": mem,
        "memory_ratio": mem["stl_student"] / mem["supervised"],
        "cached_memory_ratio": mem["stl_cached"] / mem["supervised"],
        "memory_method": "cuda max_memory_allocated"
        if device.type == "cuda"
        else "peak RSS (VmHWM, reset after imports) minus RSS after imports, one subprocess per step kind",
    }
    if not args.skip_throughput:
        result["images_per_s"] = throughput(args, device)
    keys = ("time_ratio", "cached_over_supervised", "cached_crops_over_supervised", "store_bytes_per_image",
            "memory_ratio", "cached_memory_ratio", "step_time_s", "peak_memory_mib")  # fmt: skip
    logger.info(json.dumps({k: result[k] for k in keys}))
    if "images_per_s" in result:
        logger.info("images/s: %s", {k: round(v, 1) for k, v in result["images_per_s"].items()})
    out = (
        Path(args.out)
        if args.out
        else RESULTS / f"stl_overhead_{device.type}{'_' + args.amp if args.amp != 'none' else ''}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
