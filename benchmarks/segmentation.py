"""Training and inference throughput (images/s) of FAN + SegFormer segmentation models at 512x512.

Training = forward + per-pixel CE + backward + AdamW step; inference = whole-image forward under ``no_grad``.
Models are measured in interleaved rounds (A B C, A B C, ...) in one process and the median per model is reported,
so background load on a shared machine hits every model alike; compare models by their ratios within one run.

    python benchmarks/segmentation.py                                  # CPU, fp32, batch 2, 512 px
    python benchmarks/segmentation.py --device cuda --amp bf16 --batch 8 --rounds 5

Writes ``benchmarks/results/segmentation_<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import tokenlab.models.segmentation  # noqa: F401  (registers segformer_fan)
from tokenlab.models import create_model
from tokenlab.utils.amp import autocast

BACKBONES = ["fan_tiny_12_p16_224", "fan_tiny_8_p4_hybrid", "fan_small_12_p16_224"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer, train: bool,
             steps: int, amp: str) -> float:  # fmt: skip
    """Images per second over ``steps`` timed iterations (after one warm-up iteration)."""
    device = x.device
    model.train(train)
    for i in range(steps + 1):
        if i == 1:
            _sync(device)
            t0 = time.perf_counter()
        with autocast(device, amp):
            if train:
                loss = F.cross_entropy(model(x).float(), y, ignore_index=255)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                with torch.no_grad():
                    model(x)
    _sync(device)
    return steps * x.shape[0] / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16"])  # fp16 training would need a grad scaler
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--steps", type=int, default=2, help="timed iterations per model and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=19)
    p.add_argument("--backbones", nargs="+", default=BACKBONES)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device(args.device)
    amp = args.amp
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    y = torch.randint(0, args.classes, (args.batch, args.size, args.size), generator=g).to(device)
    models = {}
    for name in args.backbones:
        model = create_model("segformer_fan", backbone=name, num_classes=args.classes, img_size=args.size).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        models[name] = (model, opt, sum(q.numel() for q in model.parameters()))
    rates: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in models}
    for r in range(args.rounds):
        for name, (model, opt, _) in models.items():
            for mode in ("train", "infer"):
                rates[name][mode].append(_measure(model, x, y, opt, mode == "train", args.steps, amp))
            print(f"round {r}: {name:<24} train {rates[name]['train'][-1]:7.2f} img/s  "
                  f"infer {rates[name]['infer'][-1]:7.2f} img/s", flush=True)  # fmt: skip
    ref = args.backbones[0]
    rows = {}
    for name, (_, _, params) in models.items():
        tr, inf = statistics.median(rates[name]["train"]), statistics.median(rates[name]["infer"])
        rows[name] = {
            "params_m": round(params / 1e6, 2), "train_img_s": round(tr, 3), "infer_img_s": round(inf, 3),
            "train_vs_" + ref: round(tr / statistics.median(rates[ref]["train"]), 3),
            "infer_vs_" + ref: round(inf / statistics.median(rates[ref]["infer"]), 3),
            "rounds": {k: [round(v, 3) for v in vs] for k, vs in rates[name].items()},
        }  # fmt: skip
    result = {
        "what": "segformer_fan images/s, median over interleaved rounds",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "amp": args.amp, "batch": args.batch, "size": args.size,
        "steps": args.steps, "rounds": args.rounds, "classes": args.classes, "torch": torch.__version__,
        "models": rows,
    }  # fmt: skip
    out = Path(args.out or Path(__file__).parent / "results" / f"segmentation_{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name, row in rows.items():
        print(f"{name:<24} {row['params_m']:6.2f}M  train {row['train_img_s']:7.2f} img/s  "
              f"infer {row['infer_img_s']:7.2f} img/s")  # fmt: skip
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
