"""``tokenlab labels build``: run a token labeler once over a training set and write a label store.

The store (``tokenlab.data.label_store``) holds each image's top-k token logits on the labeler's grid; an
``stl_student`` run reads it with ``method.kwargs.label_store=DIR`` instead of running the labeler every step. The
build is resumable (run the same command again) and, under ``torchrun``, each rank writes its own rows.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenlab.cli.common import add_runtime_flags


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``labels`` with its ``build`` action."""
    p = sub.add_parser("labels", help="cache a token labeler's labels of a training set (STL without the labeler)")
    actions = p.add_subparsers(dest="labels_command", metavar="ACTION", required=True)
    b = actions.add_parser("build", help="write a label store (resumable; one rank per process under torchrun)")
    b.add_argument("--labeler", required=True, help="stage-1 run dir, export stem or published .pth/.pth.tar")
    b.add_argument("--labeler-export", default="last", help="for a run dir: last or best export")
    b.add_argument("--labeler-model", default=None, help="timm architecture of a published checkpoint")
    b.add_argument("--data", required=True, help="training data spec (synthetic set, image folder, list, cifar10)")
    b.add_argument("--split", default="train", help="split of --data (default: train)")
    b.add_argument("--out", required=True, help="store directory (new, or a half-written one to resume)")
    b.add_argument("--topk", type=int, default=5, help="logits kept per token (default: 5)")
    b.add_argument("--views", type=int, default=0, help="augmented views per image besides the full one")
    b.add_argument("--img-size", type=int, default=None, help="labeler input side (default: the labeler's)")
    b.add_argument("--seed", type=int, default=0, help="seed of the augmented views")
    b.add_argument(
        "--view-scale", type=float, nargs=2, default=(0.35, 1.0), metavar=("LO", "HI"),
        help="area range of the augmented views (default: 0.35 1); for method.kwargs.store_crops use the "
        "student's data.transform.scale",
    )  # fmt: skip
    b.add_argument(
        "--flip-view", action="store_true",
        help="also store the mirrored full image, for flipped student crops (labelers are not flip-equivariant)",
    )  # fmt: skip
    add_runtime_flags(b, {"device": "auto", "amp": "none", "batch_size": 64, "workers": 2})
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch to the action."""
    if args.labels_command == "build":
        store = build_store(
            args.labeler, args.data, args.out, split=args.split, topk=args.topk, views=args.views,
            img_size=args.img_size, labeler_export=args.labeler_export, labeler_model=args.labeler_model,
            seed=args.seed, view_scale=tuple(args.view_scale), flip_view=args.flip_view, device=args.device,
            amp=args.amp, batch_size=args.batch_size, workers=args.workers,
            progress=not args.no_progress,
        )  # fmt: skip
        if store is not None:
            grid = f"{store.grid[0]}x{store.grid[1]}"
            print(f"wrote {store.root}: {store.num_images} images x {store.num_views} view(s), grid {grid}, "
                  f"top-{store.k}, {store.bytes_per_image():.0f} bytes per image")  # fmt: skip
        return 0
    raise ValueError(f"unknown labels action {args.labels_command!r}; valid: build")


def build_store(
    labeler: str,
    data: str,
    out: str | Path,
    *,
    split: str = "train",
    topk: int = 5,
    views: int = 0,
    img_size: int | None = None,
    labeler_export: str = "last",
    labeler_model: str | None = None,
    seed: int = 0,
    view_scale: tuple[float, float] = (0.35, 1.0),
    flip_view: bool = False,
    device: str = "auto",
    amp: str = "none",
    batch_size: int = 64,
    workers: int = 0,
    progress: bool = True,
) -> Any:
    """Build (or resume) the label store of ``labeler`` over ``data`` at ``out``; the store on rank 0, else None.

    Raises:
        ValueError: ``out`` holds another store or other files (nothing overwritten); bad options.
        FileNotFoundError: no labeler or data at the given paths.
    """
    import torch
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from torch.utils.data import DataLoader, Subset
    from tqdm import tqdm

    from tokenlab.cli.common import resolve_device
    from tokenlab.data import build_dataset
    from tokenlab.data.label_store import LabelStore, StoreViews, compress_logits, data_identity, sha256_file
    from tokenlab.methods.stl import load_labeler
    from tokenlab.models.contract import as_backbone
    from tokenlab.utils import distributed as D
    from tokenlab.utils.amp import autocast

    if views < 0:
        raise ValueError(f"--views must be >= 0, got {views}")
    if not 0 < view_scale[0] <= view_scale[1] <= 1:
        raise ValueError(f"--view-scale must satisfy 0 < LO <= HI <= 1, got {list(view_scale)}")
    dev = torch.device(resolve_device(device, amp))
    D.init_distributed(dev)
    try:
        model, info, meta = load_labeler(labeler, labeler_export, labeler_model)
        backbone = as_backbone(model)
        if not getattr(model, "has_aux_head", False):
            raise ValueError(f"labeler {labeler} has no aux_head: a token labeler is a '*_token' FAN from stage 1")
        model.to(dev).eval()
        size = int(img_size or meta.get("img_size") or 224)
        mean = [float(v) for v in meta.get("mean") or IMAGENET_DEFAULT_MEAN]
        std = [float(v) for v in meta.get("std") or IMAGENET_DEFAULT_STD]
        num_classes = int(backbone.num_classes)
        if not 0 < topk <= num_classes:
            raise ValueError(f"--topk must be in [1, {num_classes}] (the labeler's classes), got {topk}")
        grid = [int(g) for g in backbone.grid_size(size)]
        transform = StoreViews(size, 1 + flip_view + views, mean, std, scale=view_scale, seed=seed, flip_view=flip_view)
        dataset = build_dataset(data, split=split, transform=transform)
        paths = [p for p, _ in dataset.samples]
        rel, digest = data_identity(paths, [y for _, y in dataset.samples])
        weights = None  # the file whose sha256 identifies the labeler
        if info.get("path"):
            weights = Path(info["path"]) if info["export"] == "published" else Path(info["path"] + ".safetensors")
        manifest = {
            "labeler": {"model": info.get("model"), "path": info.get("path"), "export": info.get("export"),
                        "sha256": sha256_file(weights) if weights else None},
            "data": {"spec": str(data), "split": split, "num_images": len(rel), "sha256": digest},
            "img_size": size, "k": topk, "grid": grid, "views": transform.views, "num_classes": num_classes,
            "mean": mean, "std": std, "seed": seed, "view_scale": list(transform.scale),
        }  # fmt: skip
        if flip_view:  # absent otherwise, so stores built before the option compare equal on resume
            manifest["flip_view"] = True
        problem = None
        if D.is_main_process():
            try:
                LabelStore.create(out, manifest, rel)
            except (ValueError, FileNotFoundError) as err:
                problem = str(err)
        problem = D.broadcast_object(problem)
        if problem:
            raise ValueError(problem)
        store = LabelStore.create(out, manifest, rel)  # rank 0 made it: every rank opens it (read-write)
        rows = store.missing_rows()[D.rank() :: D.world_size()]
        loader = DataLoader(Subset(dataset, rows.tolist()), batch_size=batch_size, num_workers=workers)
        bar = tqdm(total=len(rows), unit="img", desc="labelling", disable=not (progress and D.is_main_process()))
        with torch.inference_mode():
            for batch in loader:
                b, v = batch["views"].shape[:2]
                with autocast(dev, amp):
                    out_t = backbone.forward_tokens(batch["views"].flatten(0, 1).to(dev))
                assert out_t.token_logits is not None
                values, indices, rest = compress_logits(out_t.token_logits.float(), topk)
                g = values.shape[1]
                store.write_rows(batch["index"].numpy(), values.view(b, v, g, topk), indices.view(b, v, g, topk),
                                 rest.view(b, v, g), batch["theta"])  # fmt: skip
                bar.update(b)
        bar.close()
        D.barrier()
        if not D.is_main_process():
            return None
        if not store.finish():
            raise ValueError(f"label store {out} still misses {len(store.missing_rows())} rows; run the command again")
        return store
    finally:
        D.cleanup_distributed()
