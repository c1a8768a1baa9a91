"""Forward+backward throughput and peak memory of FAN models against timm's DeiT, measured side by side.

Each (model, round) runs in a fresh subprocess so peak memory is that model's alone (CPU: peak RSS above the
process's baseline after imports; GPU: ``torch.cuda.max_memory_allocated``). Rounds are interleaved
(A B C D, A B C D, ...) and the median is reported, so background load hits every model alike; the README
quotes ratios to DeiT of the same round, not absolute numbers.

    python benchmarks/models.py                       # CPU, fp32, 224 px, batch 8
    python benchmarks/models.py --device cuda --amp bf16 --batch 64
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODELS = [
    "deit_tiny_patch16_224",
    "fan_tiny_12_p16_224",
    "fan_tiny_8_p4_hybrid",
    "deit_small_patch16_224",
    "fan_small_12_p16_224",
    "fan_small_12_p4_hybrid",
]
REFERENCE = {
    "fan_tiny_12_p16_224": "deit_tiny_patch16_224",
    "fan_tiny_8_p4_hybrid": "deit_tiny_patch16_224",
    "fan_small_12_p16_224": "deit_small_patch16_224",
    "fan_small_12_p4_hybrid": "deit_small_patch16_224",
}


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure_one(name: str, device: str, amp: str, batch: int, size: int, steps: int, warmup: int) -> dict:
    """Time ``steps`` forward+backward+SGD steps of one model in this process."""
    import timm
    import torch

    import tokenlab  # noqa: F401

    base_rss = _rss_mib()
    model = timm.create_model(name, num_classes=1000, img_size=size).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else _rss_mib() - base_rss
    return {
        "model": name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "images_per_s": batch * steps / elapsed,
        "peak_mem_mib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/models_<device>.json)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args._one:
        print(json.dumps(measure_one(args._one, args.device, args.amp, args.batch, args.size, args.steps, args.warmup)))
        return

    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for r in range(args.rounds):
        for name in args.models:
            cmd = [sys.executable, __file__, "--_one", name] + [
                f"--{k}={getattr(args, k)}" for k in ("device", "amp", "batch", "size", "steps", "warmup")
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[name].append(json.loads(out))
            print(f"round {r + 1}/{args.rounds} {name}: {runs[name][-1]['images_per_s']:.1f} img/s", file=sys.stderr)

    rows = []
    for name, rs in runs.items():
        rows.append(
            {
                "model": name,
                "params_m": round(rs[0]["params_m"], 2),
                "images_per_s": round(statistics.median(r["images_per_s"] for r in rs), 2),
                "peak_mem_mib": round(statistics.median(r["peak_mem_mib"] for r in rs), 1),
            }
        )
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        ref = REFERENCE.get(r["model"])
        if ref in by_name:
            r["speed_vs_" + ref] = round(r["images_per_s"] / by_name[ref]["images_per_s"], 3)
            r["mem_vs_" + ref] = round(r["peak_mem_mib"] / max(by_name[ref]["peak_mem_mib"], 1e-6), 3)

    import torch

    result = {
        "benchmark": "forward+backward+SGD step, random data, 1000 classes",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "amp": args.amp,
        "batch": args.batch,
        "img_size": args.size,
        "steps_per_round": args.steps,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "rows": rows,
    }
    out = Path(args.out or Path(__file__).parent / "results" / f"models_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{'model':<26}{'params':>8}{'img/s':>10}{'peak MiB':>10}  vs DeiT (speed / memory)")
    for r in rows:
        ratio = next((f"{r[k]:.2f}x / {r[k.replace('speed', 'mem')]:.2f}x" for k in r if k.startswith("speed_vs")), "")
        print(f"{r['model']:<26}{r['params_m']:>7.1f}M{r['images_per_s']:>10.1f}{r['peak_mem_mib']:>10.0f}  {ratio}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
