"""Training-step throughput, FLOPs and activation memory of FAN models against timm's DeiT, side by side.

Per model, in one subprocess, eager fp32 training steps (forward, backward, AdamW step) with the *published* FAN
formulation (``published_ops``: heads split before the softmaxes, transposed copies around the depthwise
convolutions, layer scales on the outputs, autograd keeping every intermediate) and torch's default AdamW alternate
with steps of tokenlab's fast path (its rewritten FAN ops plus what ``train.fast`` turns on for the device: the fused
AdamW kernel, bf16 where the hardware has it, channels-last on CUDA, and with ``--fast on`` ``torch.compile``, whose
compile time is reported separately as ``compile_s``). Rounds interleave,
medians are reported, and the README quotes ratios measured in the same process: background load hits both alike.

Per model: ``img_s_eager_fp32``, ``img_s_fast``, ``speedup_fast_vs_eager_fp32``, ``gflops_fwd`` (torch's FLOP counter,
forward, per image), ``peak_mib`` and ``memory_vs_deit`` (against DeiT of the same size). On CPU ``peak_mib`` is the
activation memory of one fast-path training step: the bytes of the distinct tensors autograd keeps for the backward
pass (deterministic, unlike the resident set of a shared machine); ``peak_mib_eager`` the same for the published
formulation. On CUDA it is ``torch.cuda.max_memory_allocated`` of the fast step.

    python benchmarks/models.py --size 128 --batch 8          # CPU, a few minutes on 2 cores
    python benchmarks/models.py --device cuda --batch 128 --fast on --size 224
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


@contextlib.contextmanager
def published_ops() -> Iterator[None]:
    """Run FAN blocks with the published formulation (the eager fp32 baseline), restoring tokenlab's on exit."""
    import torch
    import torch.nn.functional as F

    from tokenlab.models import layers as L

    def token_mixing(self, x, scale=None):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)
        kv = self.kv(x).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, kv[0], kv[1]).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def dwconv(self, x, H, W, scale=None):
        B, N, C = x.shape
        x = self.conv2(self.bn(self.act(self.conv1(x.transpose(1, 2).reshape(B, C, H, W)))))
        return x.reshape(B, C, N).transpose(1, 2)

    def dwconv_mlp(self, x, H, W):
        x = self.fc1(x)
        return self.drop(self.fc2(self.drop(x + self.gamma * self.dwconv(x, H, W))))

    def channel_processing(self, x, H, W, scale=None):
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2).softmax(-2).transpose(-1, -2)
        k = x.reshape(B, N, h, C // h).transpose(1, 2).softmax(-2).mean(-1, keepdim=True)
        attn = torch.sigmoid(q @ k) * self.temperature
        v = self.norm_v(self.mlp_v(x, H, W)).reshape(B, N, h, C // h).permute(0, 2, 3, 1)
        return (attn * v).permute(0, 3, 1, 2).reshape(B, N, C)

    def block(self, x, H, W):
        x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
        return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x), H, W))

    patches: dict[Any, Any] = {
        L.TokenMixing: token_mixing,
        L.DWConv: dwconv,
        L.DWConvMlp: dwconv_mlp,
        L.ChannelProcessing: channel_processing,
        L.FANBlock: block,
    }
    saved = {cls: cls.forward for cls in patches}
    try:
        for cls, fn in patches.items():
            cls.forward = fn
        yield
    finally:
        for cls, fn in saved.items():
            cls.forward = fn


def activation_mib(step_forward) -> float:
    """MiB of the distinct storages autograd saves for the backward pass during ``step_forward()``."""
    import torch

    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step_forward()
    del loss
    return sum(storages.values()) / 2**20


def measure_one(name: str, device: str, fast: str, batch: int, size: int, rounds: int) -> dict:
    """Interleaved eager-fp32 (published ops) and fast-path steps of one model in this process."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import tokenlab  # noqa: F401
    from tokenlab.utils.amp import autocast, resolve_fast

    cfg = resolve_fast(fast, device)
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=1000, img_size=size).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    fast_model, x_fast = model, x
    if cfg.channels_last:
        fast_model = model.to(memory_format=torch.channels_last)
        x_fast = x.contiguous(memory_format=torch.channels_last)
    runner = torch.compile(fast_model) if cfg.compile else fast_model

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    def loss_eager() -> torch.Tensor:
        with published_ops():
            return torch.nn.functional.cross_entropy(model(x), y)

    def loss_fast() -> torch.Tensor:
        with autocast(device, cfg.amp):
            return torch.nn.functional.cross_entropy(runner(x_fast), y)

    # the eager path steps with torch's default AdamW (a per-parameter loop on CPU, foreach on CUDA), the fast path
    # with the optimizer train.fast builds (fused where torch has the kernel)
    opt_eager = torch.optim.AdamW(model.parameters(), lr=1e-5)
    opt_fast = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=cfg.fused_optimizer or None)

    def step(loss_fn) -> float:
        opt = opt_fast if loss_fn is loss_fast else opt_eager
        sync()
        t = time.perf_counter()
        loss_fn().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - t

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x[:1])
    gflops = counter.get_total_flops() / 2 / 1e9  # multiply-adds, as papers quote "FLOPs"
    compile_s = step(loss_fast)  # the first fast step: compilation when compiling, else a warm-up
    step(loss_eager)
    times: dict[str, list[float]] = {"eager": [], "fast": []}
    for _ in range(rounds):
        times["eager"].append(step(loss_eager))
        times["fast"].append(step(loss_fast))
    eager, fst = statistics.median(times["eager"]), statistics.median(times["fast"])
    row = {
        "model": name,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gflops_fwd": round(gflops, 2),
        "img_s_eager_fp32": round(batch / eager, 3),
        "img_s_fast": round(batch / fst, 3),
        "speedup_fast_vs_eager_fp32": round(eager / fst, 3),
        "fast": {
            "amp": cfg.amp,
            "channels_last": cfg.channels_last,
            "compile": cfg.compile,
            "fused_optimizer": cfg.fused_optimizer,
        },
    }
    if cfg.compile:
        row["compile_s"] = round(compile_s, 1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        step(loss_fast)
        row["peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        row["peak_mib"] = round(activation_mib(loss_fast), 1)
        row["peak_mib_eager"] = round(activation_mib(loss_eager), 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--fast", default="auto", choices=["auto", "on"], help="train.fast of the fast path")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved eager/fast step pairs per model")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads")
    ap.add_argument("--models", nargs="*", default=MODELS)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/models_<device>.json)")
    ap.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if args._one:
        print(json.dumps(measure_one(args._one, args.device, args.fast, args.batch, args.size, args.rounds)))
        return

    rows = []
    for name in args.models:
        cmd = [sys.executable, __file__, "--_one", name] + [
            f"--{k}={getattr(args, k)}" for k in ("device", "fast", "batch", "size", "rounds", "threads")
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{name}: eager {r['img_s_eager_fp32']} img/s, fast {r['img_s_fast']} img/s", file=sys.stderr)
    by_name = {r["model"]: r for r in rows}
    for r in rows:
        ref = by_name.get(REFERENCE.get(r["model"], ""))
        if ref is not None:
            r["memory_vs_deit"] = round(r["peak_mib"] / ref["peak_mib"], 3)
            if "peak_mib_eager" in r:
                r["memory_vs_deit_eager"] = round(r["peak_mib_eager"] / ref["peak_mib_eager"], 3)
            r["speed_vs_deit_fast"] = round(r["img_s_fast"] / ref["img_s_fast"], 3)
            r["flop_parity_vs_deit"] = round(ref["gflops_fwd"] / r["gflops_fwd"], 3)

    result = {
        "benchmark": "training step (forward + backward + AdamW step), random data, 1000 classes; eager fp32 = "
        "published FAN formulation + torch's default AdamW, fast = tokenlab's ops + train.fast (fused AdamW)",
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "fast": args.fast,
        "batch": args.batch,
        "img_size": args.size,
        "rounds": args.rounds,
        "torch": torch.__version__,
        "peak_mib": "CUDA: max_memory_allocated; CPU: activation memory kept for the backward pass",
        "rows": rows,
    }
    default = f"models_{args.device}.json" if args.device == "cpu" else "models_cuda_bf16.json"
    out = Path(args.out or Path(__file__).parent / "results" / default)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':<26}{'GFLOPs':>8}{'eager':>8}{'fast':>8}{'speedup':>9}{'peak MiB':>10}{'mem/DeiT':>9}")
    for r in rows:
        mem = f"{r['memory_vs_deit']:.2f}x" if "memory_vs_deit" in r else ""
        print(f"{r['model']:<26}{r['gflops_fwd']:>8.2f}{r['img_s_eager_fp32']:>8.2f}{r['img_s_fast']:>8.2f}"
              f"{r['speedup_fast_vs_eager_fp32']:>8.2f}x{r['peak_mib']:>10.0f}{mem:>9}")  # fmt: skip
    print(f"written {out}")


if __name__ == "__main__":
    main()
