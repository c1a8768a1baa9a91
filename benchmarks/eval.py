"""Evaluation throughput: corruption generation images/s (per type, and in parallel processes) and model
evaluation images/s (official rule alone vs official + cls-only ablation in one pass).

Images come from the built-in synthetic set (``val`` split). Shared machines are noisy, so the model evaluation
variants run in alternating rounds within one run and the median round is reported; corruption types are timed one
after the other on the same images (first call of each type excluded: numba compiles ``glass_blur``).

    python benchmarks/eval.py                          # CPU, 64 px, writes benchmarks/results/eval.json
    python benchmarks/eval.py --device cuda --amp bf16 --images 4096 --batch-size 512 --workers 8 \
        --model fan_tiny_12_p16_224_token --img-size 224 --patch-size 16 --out benchmarks/results/eval_gpu.json
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
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image

import tokenlab  # noqa: F401  (registers the models)
from tokenlab.data import SynthConfig, generate
from tokenlab.data.images import list_class_dirs
from tokenlab.eval.classify import predict
from tokenlab.eval.corruptions import ALL_CORRUPTIONS, corrupt_image, generate_corruptions
from tokenlab.eval.folders import eval_loader

logger = logging.getLogger("benchmarks.eval")


def corruption_rates(root: Path, names: list[str], per_type: int, severity: int) -> dict[str, float]:
    """Single-process images/s of each corruption type on the first ``per_type`` images."""
    paths = sorted(root.rglob("*.png"))[:per_type]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    out = {}
    for name in names:
        corrupt_image(images[0], name, severity, seed=0)  # warm-up (numba compile, frost files)
        t0 = time.perf_counter()
        for i, img in enumerate(images):
            corrupt_image(img, name, severity, seed=i)
        out[name] = len(images) / (time.perf_counter() - t0)
        logger.info("%-18s %8.1f img/s", name, out[name])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=256, help="synthetic val images")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--model", default="fan_nano_6_p16_224_token")
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2, help="loader workers and corruption processes")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: CPUs - loader workers)")
    parser.add_argument("--per-type", type=int, default=32, help="images timed per corruption type")
    parser.add_argument("--parallel", default="fast", help="corruptions generated in parallel (names or a group)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "eval.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) - args.workers))

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "device": args.device, "amp": args.amp,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None},
        "settings": vars(args),
    }  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        generate(tmp_path / "synth", SynthConfig(img_size=args.img_size, counts={"val": args.images}), workers=2)
        root = tmp_path / "synth" / "val"
        classes = list_class_dirs(root)

        # ---- corruption generation --------------------------------------------------------------------------
        per_type = corruption_rates(root, list(ALL_CORRUPTIONS), args.per_type, severity=3)
        results["corruption_images_per_s_single_process"] = per_type
        results["corruption_slowest"] = sorted(per_type, key=per_type.get)[:4]
        t0 = time.perf_counter()
        serial = generate_corruptions(root, tmp_path / "c1", args.parallel, "3", workers=0, progress=False)
        t_serial = time.perf_counter() - t0
        t0 = time.perf_counter()
        par = generate_corruptions(root, tmp_path / "c2", args.parallel, "3", workers=args.workers, progress=False)
        t_par = time.perf_counter() - t0
        n = serial.num_images * len(serial.corruptions)
        t0 = time.perf_counter()
        generate_corruptions(root, tmp_path / "c2", args.parallel, "3", workers=args.workers, progress=False)
        t_cached = time.perf_counter() - t0
        results["corruption_generation"] = {
            "corruptions": par.corruptions, "images": n, "serial_images_per_s": n / t_serial,
            "parallel_images_per_s": n / t_par, "parallel_workers": args.workers,
            "parallel_speedup": t_serial / t_par, "cached_rerun_s": t_cached,
        }  # fmt: skip
        logger.info("corruption generation: serial %.1f img/s, %d workers %.1f img/s, cached re-run %.2f s",
                    n / t_serial, args.workers, n / t_par, t_cached)  # fmt: skip

        # ---- model evaluation ---------------------------------------------------------------------------------
        model = timm.create_model(args.model, num_classes=len(classes), img_size=args.img_size,
                                  patch_size=args.patch_size).eval()  # fmt: skip
        meta = {"img_size": args.img_size, "mean": [0.5] * 3, "std": [0.5] * 3}
        loader = eval_loader(root, {c: i for i, c in enumerate(classes)}, meta, args.batch_size, args.workers)
        variants = {"official": ("official",), "official+cls": ("official", "cls")}
        predict(model, loader, args.device, args.amp, ("official",))  # warm-up
        rates: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.rounds):
            for k, rules in variants.items():
                pred = predict(model, loader, args.device, args.amp, rules)
                rates[k].append(len(pred.targets) / pred.seconds)
        results["eval_images_per_s"] = {k: {"median": statistics.median(v), "rounds": v} for k, v in rates.items()}
        results["eval_model"] = {"name": args.model, "params_M": sum(p.numel() for p in model.parameters()) / 1e6}
        logger.info("evaluation: %s", {k: round(statistics.median(v), 1) for k, v in rates.items()})
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    logger.info("wrote %s", out)


if __name__ == "__main__":
    main()
