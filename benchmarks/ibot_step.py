"""Time and peak memory of one iBOT training step (2 global + 10 local crops), and the share spent in the teacher.

One step = the method's ``training_step`` (teacher forward on the global crops, student forward on all crops, both
losses) + backward + per-parameter clipping + AdamW step + EMA teacher update. The teacher's share is measured in
the same process, interleaved with the full steps on the same batch: ``(teacher forward + EMA update) / step``.
Also interleaved: the step as it was before issue #19, with the student's projection head on every patch token
(``head_on_masked_only=False``: student and teacher heads on every patch token; the same losses) and torch's
default AdamW instead of the fused one ``train.fast`` builds: ``speedup_vs_before`` is the before/after ratio.

Each model runs in its own subprocess so its peak memory is its own: on CUDA ``torch.cuda.max_memory_allocated``;
on CPU the process's peak resident set size (``ru_maxrss``) and its growth over the size before the first step.
Timings on a shared CPU are noisy; compare the ratios (teacher share), which are measured side by side.

    python benchmarks/ibot_step.py                                 # CPU, tiny + small, batch 2
    python benchmarks/ibot_step.py --device cuda --amp bf16 --batch-size 64 --out benchmarks/results/ibot_step_gpu.json
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
from typing import Any

import torch

# name -> (timm model, global crop size, local crop size, model kwargs)
MODELS: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "vit_tiny_p4_32": ("ibot_vit_tiny_patch4_32", 32, 16, {}),
    "vit_small_p16_224": ("ibot_vit_small_patch16_224", 224, 96, {}),
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_mb() -> float:
    # ru_maxrss is in KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return float("nan")


def run_one(name: str, batch_size: int, num_local: int, device: str, amp: str, steps: int, warmup: int) -> dict:
    import timm

    import tokenlab.models  # noqa: F401  (registers the models)
    from tokenlab.methods import StepContext, TrainPlan, build_method
    from tokenlab.utils.amp import amp_dtype, autocast, resolve_fast

    model_name, size, local, kwargs = MODELS[name]
    dev = torch.device(device)
    torch.manual_seed(0)
    backbone = timm.create_model(model_name, num_classes=0, **kwargs)
    method = build_method("ibot", model=backbone).to(dev).train()  # the paper head: 2048 / 256 / 8192
    grid = backbone.grid_size(size)
    crops = [torch.randn(batch_size, 3, size, size, device=dev) for _ in range(2)]
    crops += [torch.randn(batch_size, 3, local, local, device=dev) for _ in range(num_local)]
    masks = [torch.rand(batch_size, *grid, device=dev) < 0.3 for _ in range(2)]
    batch = {"crops": crops, "masks": masks}
    params = list(method.trainable_module().parameters())
    # today's step uses the optimizer train.fast builds (fused AdamW where torch has the kernel); the step before
    # #19 used torch's default AdamW (a per-parameter loop on CPU)
    opt_now = torch.optim.AdamW(params, lr=1e-4, fused=resolve_fast("auto", dev).fused_optimizer or None)
    opt_before = torch.optim.AdamW(params, lr=1e-4)
    plan = TrainPlan(total_steps=1000, steps_per_epoch=100, epochs=10, global_batch_size=batch_size)
    ctx = StepContext(step=200, epoch=2, plan=plan, device=dev, amp_dtype=amp_dtype(amp, dev))

    def full_step(before: bool = False) -> float:
        method.head_on_masked_only = not before  # before #19: the student head on every patch token
        opt = opt_before if before else opt_now
        _sync(dev)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            loss = method.training_step(batch, ctx)["loss"]
        loss.backward()
        method.before_optimizer_step(ctx)
        opt.step()
        method.after_step(ctx)
        _sync(dev)
        return time.perf_counter() - t

    globals_ = torch.cat(crops[:2])

    @torch.no_grad()
    def teacher_part() -> float:
        _sync(dev)
        t = time.perf_counter()
        with autocast(dev, amp):
            method.teacher["head"](*method.teacher["backbone"].forward_features(globals_))
        method.update_teacher(0.999)
        _sync(dev)
        return time.perf_counter() - t

    rss_before = _current_rss_mb()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    for _ in range(warmup):
        full_step()
        teacher_part()
    step_times, teacher_times, before_times = [], [], []
    for _ in range(steps):  # interleaved: today's step, the step before the masked-only head, the teacher part
        step_times.append(full_step())
        before_times.append(full_step(before=True))
        teacher_times.append(teacher_part())
    step_s, teacher_s = statistics.median(step_times), statistics.median(teacher_times)
    before_s = statistics.median(before_times)
    out = {
        "model": model_name,
        "params_m": round(sum(p.numel() for p in backbone.parameters()) / 1e6, 2),
        "head_params_m": round(sum(p.numel() for p in method.head.parameters()) / 1e6, 2),
        "global_size": size,
        "local_size": local,
        "num_local": num_local,
        "batch_size": batch_size,
        "step_s": round(step_s, 4),
        "step_s_all": [round(t, 4) for t in step_times],
        "images_per_s": round(batch_size / step_s, 2),
        "step_s_before": round(before_s, 4),
        "speedup_vs_before": round(before_s / step_s, 3),
        "teacher_s": round(teacher_s, 4),
        "teacher_share": round(teacher_s / step_s, 3),
    }
    if dev.type == "cuda":
        out["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
    else:
        out["peak_rss_mb"] = round(_rss_mb(), 1)
        out["rss_growth_mb"] = round(_rss_mb() - rss_before, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {sorted(MODELS)}")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (each gives 2 + num_local crops)")
    parser.add_argument("--num-local", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", default="none", choices=["none", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.single:
        res = run_one(args.single, args.batch_size, args.num_local, args.device, args.amp, args.steps, args.warmup)
        print("RESULT " + json.dumps(res))
        return 0
    names = [m for m in args.models.split(",") if m]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models {unknown}; valid: {sorted(MODELS)}")
    results = []
    for name in names:
        cmd = [
            sys.executable,
            __file__,
            "--single",
            name,
            "--batch-size",
            str(args.batch_size),
            "--num-local",
            str(args.num_local),
            "--device",
            args.device,
            "--amp",
            args.amp,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
        ] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        res = json.loads(lines[-1][len("RESULT ") :])
        results.append(res)
        mem = f"{res['peak_mem_mb']:.0f} MB GPU" if "peak_mem_mb" in res else f"{res['peak_rss_mb']:.0f} MB RSS"
        print(
            f"{name:<20} step {res['step_s']:.3f} s ({res['speedup_vs_before']:.2f}x faster than before #19, "
            f"{res['images_per_s']:.1f} img/s)  teacher "
            f"{100 * res['teacher_share']:.0f}%  peak {mem}"
        )
    device = args.device if args.device == "cpu" else torch.cuda.get_device_name(torch.device(args.device))
    report = {
        "device": device,
        "amp": args.amp,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "crops": f"2 global + {args.num_local} local",
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
