"""The ``tokenlab`` command line: one entry point, one sub-command per job.

Each sub-command lives in a ``_add_<name>`` function that declares its arguments and a handler. Handlers import
their heavy modules lazily so ``tokenlab --help`` stays fast. User mistakes (``ValueError``, ``KeyError``,
``FileNotFoundError``) become one clear ``error:`` line and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from tokenlab.errors import TrainingAborted

Handler = Callable[[argparse.Namespace], int | None]


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list every registered model with its parameter count")
    p.add_argument("--filter", default="*", help="wildcard on the model name, e.g. 'fan_*hybrid*'")
    p.add_argument("--num-classes", type=int, default=1000, help="classes used when counting parameters")

    def run(args: argparse.Namespace) -> int:
        import fnmatch

        import timm
        import torch

        from tokenlab.models import list_tokenlab_models

        names = [n for n in list_tokenlab_models() if fnmatch.fnmatch(n, args.filter)]
        if not names:
            raise ValueError(f"no model matches {args.filter!r}")
        width = max(len(n) for n in names)
        print(f"{'model':<{width}}  {'params':>10}")
        for name in names:
            with torch.device("meta"):
                model = timm.create_model(name, num_classes=args.num_classes)
            count = sum(p.numel() for p in model.parameters())
            print(f"{name:<{width}}  {count / 1e6:>9.2f}M")
        return 0

    p.set_defaults(handler=run)


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (supervised, STL labeler/student, iBOT, ...) from a YAML recipe",
        description="Merge configs/default.yaml, the recipe and key=value overrides, validate, then train. "
        "Launch with torchrun for several processes.",
    )
    p.add_argument("--config", default=None, help="recipe file or shipped recipe name (e.g. cifar10_stl_student)")
    p.add_argument("--run-dir", default=None, help="output directory (same as run_dir=...)")
    p.add_argument("--resume", default=None, help="'auto' (newest complete checkpoint of the run) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. optim.lr=1e-3")

    def run(args: argparse.Namespace) -> int:
        extra = [f"checkpoint.resume={args.resume}"] if args.resume is not None else []
        return _run_training(args, extra)

    p.set_defaults(handler=run)


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="generate the built-in synthetic data set, or picture what a data set feeds")
    actions = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = actions.add_parser("synth", help="write the synthetic shapes data set (image folders + masks)")
    synth.add_argument("--out", required=True, help="output directory")
    synth.add_argument("--seed", type=int, default=0, help="same seed, byte-identical files")
    synth.add_argument("--img-size", type=int, default=64, help="image side in pixels")
    for split, count in (("train", 5000), ("val", 1000), ("rendition", 1000), ("shortcut", 1000)):
        synth.add_argument(f"--{split}", type=int, default=count, help=f"{split} images (0 skips the split)")
    synth.add_argument("--shortcut-p", type=float, default=0.8, help="train images whose texture matches the class")
    synth.add_argument("--workers", type=int, default=2, help="rendering threads")

    show = actions.add_parser("show", help="write PNG grids: samples with mask overlays, STL pairs, iBOT crops")
    show.add_argument("spec", help="synthetic set / image folder / CSV list / 'cifar10'")
    show.add_argument("--out", required=True, help="PNG path for the samples grid; pairs go to <stem>_pairs.png")
    show.add_argument("--split", default="train", help="split to show")
    show.add_argument("--count", type=int, default=16, help="samples in the grid")
    show.add_argument("--img-size", type=int, default=64, help="view side in pixels")
    show.add_argument("--teacher", default="spatial", help="teacher mode of the pairs grid: none, spatial or full")
    show.add_argument("--ibot", action="store_true", help="also write <stem>_ibot.png with multi-crops and masks")
    show.add_argument("--patch-size", type=int, default=8, help="token size of the iBOT masks")
    show.add_argument("--seed", type=int, default=0, help="which samples and augmentations")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        if args.data_command == "synth":
            from tokenlab.data.synthetic import SynthConfig, generate, shortcut_correlation

            counts = {s: getattr(args, s) for s in ("train", "val", "rendition", "shortcut")}
            config = SynthConfig(seed=args.seed, img_size=args.img_size, counts=counts, shortcut_p=args.shortcut_p)
            meta = generate(args.out, config, workers=args.workers)
            for split, entry in meta["splits"].items():
                print(f"{split:<10} {entry['count']:>6} images  texture = class: "
                      f"{shortcut_correlation(meta, split):.3f}")
            print(f"wrote {args.out} (classes: {', '.join(meta['classes'])})")
            return 0
        if args.data_command == "show":
            from tokenlab.data.show import crops_grid, pairs_grid, samples_grid

            out = Path(args.out)
            if out.suffix.lower() != ".png":
                raise ValueError(f"--out must be a .png path, got {args.out!r}")
            written = [samples_grid(args.spec, args.split, out, args.count, args.seed, args.img_size)]
            pairs = out.with_name(f"{out.stem}_pairs.png")
            written.append(pairs_grid(args.spec, args.split, pairs, min(args.count, 8), args.seed, args.img_size,
                                      args.teacher))
            if args.ibot:
                written.append(crops_grid(args.spec, args.split, out.with_name(f"{out.stem}_ibot.png"), 4, args.seed,
                                          args.img_size, args.patch_size))
            for path in written:
                print(f"wrote {path}")
            return 0
        raise ValueError(f"unknown data action {args.data_command!r}; valid: synth, show")

    p.set_defaults(handler=run)


def _add_segment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="semantic segmentation with FAN backbones: fine-tune (train) and evaluate clean + corrupted mIoU (eval)",
        description="`segment train` runs a segmentation recipe (e.g. seg_synthetic) through the engine; "
        "`segment eval RUN` scores an exported segmentation run (mIoU, per-class IoU, pixel accuracy, corruptions).",
    )
    seg = p.add_subparsers(dest="segment_command", metavar="ACTION", required=True)
    t = seg.add_parser("train", help="fine-tune a segmentation model from a recipe")
    t.add_argument("--config", default="seg_synthetic", help="recipe file or shipped name, e.g. seg_cityscapes")
    t.add_argument("--run-dir", default=None, help="output directory (same as run_dir=...)")
    t.add_argument("--init-from", default=None, help="classification run whose backbone initialises the model")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides, e.g. data.root=DIR")
    e = seg.add_parser("eval", help="evaluate an exported segmentation run")
    e.add_argument("run", help="run directory (or export stem) of a segmentation model")
    e.add_argument("--data", default="synthetic", help="layout: synthetic | cityscapes | folder")
    e.add_argument("--root", required=True, help="data root")
    e.add_argument("--split", default="val")
    e.add_argument("--out", default=None, help="output folder (default RUN/segmentation)")
    e.add_argument("--corruptions", default=None, help="names or groups (common, fast, ...); omit for clean only")
    e.add_argument("--severities", default="1-5")
    e.add_argument("--cache-dir", default=None, help="corruption cache (default ROOT/../corruption-cache)")
    e.add_argument("--mode", default="whole", help="whole | slide")
    e.add_argument("--crop", type=int, default=512, help="sliding-window size")
    e.add_argument("--stride", type=int, default=341, help="sliding-window stride")
    e.add_argument("--device", default="cpu")
    e.add_argument("--amp", default="none", help="none | bf16")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--overlays", type=int, default=8, help="examples in overlays.png (0: none)")

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        if args.segment_command == "train":
            extra = [f"method.kwargs.init_from={args.init_from}"] if args.init_from is not None else []
            return _run_training(args, extra)  # the segmentation method's train_entry runs behind engine.train
        from tokenlab.eval.segmentation import evaluate_run

        out = Path(args.out) if args.out else Path(args.run) / "segmentation"
        res = evaluate_run(
            args.run, args.data, args.root, args.split, out, args.corruptions, args.severities, args.cache_dir,
            args.mode, args.crop, args.stride, args.device, args.batch_size, args.overlays, args.amp,
        )
        clean = res["clean"]
        print(f"clean: mIoU {clean['miou']:.4f}  pixel acc {clean['pixel_accuracy']:.4f}  ({res['images']} images)")
        for name, iou in clean["iou"].items():
            print(f"  {name:<20} IoU {iou:.4f}")
        if "robust_miou" in res:
            print(f"corrupted: mIoU {res['robust_miou']:.4f}  retention {res['retention']:.4f}")
            for c, v in res["per_corruption"].items():
                print(f"  {c:<20} mIoU {v:.4f}")
        print(f"wrote {out / 'segmentation.json'}")
        return 0

    p.set_defaults(handler=run)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="clean / corruption / OOD evaluation of a trained model, written to eval.json")
    p.add_argument("--checkpoint", required=True, help="run directory or exported model (<stem>[.safetensors|.json])")
    p.add_argument("--data", required=True, help="image tree DIR/<class>/<img>, or a data set DIR[:split] (default val)")
    p.add_argument("--out", help="eval.json path (default: RUN/eval.json)")
    p.add_argument("--rules", help="prediction rules: official,cls (default: both for token models)")
    p.add_argument("--corruptions", help="generate + evaluate: all, common, extra, fast, noise, blur, ... or names")
    p.add_argument("--severities", default=None, help="e.g. 1-5 (default) or 1,3,5")
    p.add_argument("--corruption-tree", help="read an ImageNet-C style tree corruption/severity/class/img instead")
    p.add_argument("--cache-dir", help="corruption cache (default $TOKENLAB_CACHE or ~/.cache/tokenlab)")
    p.add_argument("--work-size", type=int, help="corrupt at this image size, then resize back (small images)")
    p.add_argument("--reference", default="auto", help="mCE reference: auto, alexnet, none, or a run dir / eval.json")
    p.add_argument("--ood", action="append", default=None,
                   help="OOD set NAME=DIR[@MAPPING] (MAPPING: file, imagenet-a, imagenet-r); repeatable; "
                        "'auto' (default) adds the synthetic rendition/shortcut splits; 'none' disables")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast dtype")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=None, help="data-loading (and corruption) processes")

    def run(args: argparse.Namespace) -> int:
        from tokenlab.eval.robustness import evaluate_run

        ood = args.ood or ["auto"]
        res = evaluate_run(
            args.checkpoint, args.data, out=args.out, rules=args.rules.split(",") if args.rules else None,
            corruptions=args.corruptions, severities=args.severities, corruption_tree=args.corruption_tree,
            cache_dir=args.cache_dir, work_size=args.work_size, reference=args.reference,
            ood=[] if ood == ["none"] else ood, device=args.device, amp=args.amp, batch_size=args.batch_size,
            workers=args.workers,
        )
        print(f"{res.name}: {res.model} on {res.data}")
        print(f"{'rule':<9} {'top-1':>6} {'top-5':>6} {'NLL':>6} {'ECE':>6} {'img/s':>8}")
        for rule, c in res.clean.items():
            print(f"{rule:<9} {100 * c.top1:6.2f} {100 * c.top5:6.2f} {c.nll:6.3f} {100 * c.ece:6.2f} "
                  f"{c.images_per_s:8.1f}")
        if res.corruptions:
            for rule, s in res.corruptions.scores.items():
                mce = f"{100 * s.mce:.2f}" if s.mce is not None else "- (no reference)"
                print(f"corruptions [{rule}]: robust acc {100 * s.robust_accuracy:.2f}  retention "
                      f"{100 * s.retention:.2f}  mCE {mce} vs {s.reference or '-'}")
                for c, a in s.per_corruption.items():
                    print(f"  {c:<18} {100 * a:6.2f}")
            if res.corruptions.skipped:
                print(f"unreadable images skipped: {res.corruptions.skipped}")
        for name, d in res.ood.items():
            print(f"OOD {name}: " + "  ".join(f"{r} {100 * d[r]['top1']:.2f}" for r in res.rules))
        return 0

    p.set_defaults(handler=run)


def _add_tokens(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokens", help="token-label analysis of labelers/students on a data set with masks")
    p.add_argument("checkpoints", nargs="+", help="run directories or exported models to compare")
    p.add_argument("--data", required=True, help="data set with masks, DIR[:split] (e.g. the synthetic set)")
    p.add_argument("--source", default="auto", choices=["auto", "aux", "head"],
                   help="token logits: aux head, or the class head on every patch token (auto: aux when present)")
    p.add_argument("--threshold", type=float, default=0.5, help="object fraction above which a token is object")
    p.add_argument("--examples", type=int, default=6, help="images drawn in token_labels.png / class_attention.png")
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from pathlib import Path

        from tokenlab.eval.tokens import analyze_run
        from tokenlab.eval.visualize import save_token_pictures

        rows = []
        for ckpt in args.checkpoints:
            res = analyze_run(ckpt, args.data, source=args.source, threshold=args.threshold, device=args.device,
                              amp=args.amp, batch_size=args.batch_size, workers=args.workers,
                              num_examples=args.examples)  # fmt: skip
            out = Path(ckpt) if Path(ckpt).is_dir() else Path(ckpt).parent
            pics = save_token_pictures(res, out)
            rows.append((res, pics))
        print(f"{'run':<20} {'source':<6} {'fg acc':>7} {'bg=img':>7} {'bg conf':>7} {'IoU':>7} {'stable':>7}")
        for res, _ in rows:
            m = res.metrics
            print(f"{res.name:<20} {res.source:<6} {100 * m['fg_accuracy']:7.2f} "
                  f"{100 * m['bg_agree_with_image_label']:7.2f} {100 * m['bg_confidence']:7.2f} "
                  f"{100 * m['iou']:7.2f} {100 * m['stability']:7.2f}")
        for res, pics in rows:
            print(f"{res.name}: tokens.json" + "".join(f", {p}" for p in pics))
        return 0

    p.set_defaults(handler=run)


def _add_report(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="Markdown + single-file HTML report comparing runs side by side")
    p.add_argument("runs", nargs="+", help="run directories (with eval.json / tokens.json / metrics.jsonl)")
    p.add_argument("--out", required=True, help="output directory (report.md, report.html, images/)")
    p.add_argument("--names", help="comma-separated display names, one per run")
    p.add_argument("--title", help="report title")

    def run(args: argparse.Namespace) -> int:
        from tokenlab.eval.report import write_report

        files = write_report(args.runs, args.out, args.names.split(",") if args.names else None, args.title)
        print(f"wrote {files.markdown} and {files.html} ({len(files.images)} images)")
        return 0

    p.set_defaults(handler=run)


def _add_eval_ssl(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval-ssl", help="k-NN / linear probe / fine-tuning of a self-supervised (iBOT) backbone")
    p.add_argument("run", help="run directory or exported model (<stem>[.safetensors|.json])")
    p.add_argument("--data", default="cifar10", help="data set: cifar10, an image-folder root, a synthetic set ...")
    p.add_argument("--train-split", default="train", help="split for the k-NN bank and the probe fit")
    p.add_argument("--test-split", default="test", help="split reported")
    p.add_argument("--kind", default="cls", help="features: cls, avgpool, cls_avgpool, last4_cls (comma-separated)")
    p.add_argument("--no-knn", action="store_true", help="skip the k-NN")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--k", type=int, default=20, help="k-NN neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="k-NN vote temperature")
    p.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs over the cached features")
    p.add_argument("--linear-lrs", default="0.01,0.03,0.1,0.3", help="linear-probe lr grid (chosen on held-out train)")
    p.add_argument("--random-init", action="store_true", help="also evaluate the same architecture untrained")
    p.add_argument("--train-subset", type=int, help="fixed random subset of the train split")
    p.add_argument("--test-subset", type=int, help="fixed random subset of the test split")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0, help="data-loading processes")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="autocast dtype for feature extraction")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default RUN/eval_ssl.json)")
    p.add_argument("--finetune", metavar="RECIPE",
                   help="then fine-tune through the engine with this recipe (e.g. ibot_cifar10_finetune)")
    p.add_argument("-o", "--override", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override of the fine-tuning recipe (repeatable)")

    def run(args: argparse.Namespace) -> int:
        import torch

        from tokenlab.eval.linear import evaluate_ssl_run, finetune_run

        if args.overrides and not args.finetune:
            raise ValueError(f"overrides {args.overrides} only apply with --finetune RECIPE")
        kinds = [k for k in args.kind.split(",") if k]
        lrs = [float(v) for v in args.linear_lrs.split(",") if v]
        report = evaluate_ssl_run(
            args.run, args.data, args.train_split, args.test_split, kinds, knn=not args.no_knn,
            linear=not args.no_linear, k=args.k, temperature=args.temperature,
            linear_kwargs={"epochs": args.linear_epochs, "lrs": lrs, "seed": args.seed}, batch_size=args.batch_size,
            workers=args.workers, device=args.device, amp_dtype=torch.bfloat16 if args.amp == "bf16" else None,
            train_subset=args.train_subset, test_subset=args.test_subset, random_init=args.random_init,
            seed=args.seed, out=args.out,
        )
        print(f"{report['model']} on {report['data']} ({report['num_train']} train / {report['num_test']} test)")
        print(f"{'weights':<11} {'features':<12} {'k-NN top-1':>10} {'linear top-1':>12}")
        for label, by_kind in report["results"].items():
            for kind, res in by_kind.items():
                knn = f"{100 * res['knn']['top1']:.2f}" if res["knn"] else "-"
                lin = f"{100 * res['linear']['top1']:.2f}" if res["linear"] else "-"
                print(f"{label:<11} {kind:<12} {knn:>10} {lin:>12}")
        if args.finetune:
            result = finetune_run(args.run, args.finetune, args.overrides)
            acc = result.val.get("acc1")
            print(f"fine-tuned ({args.finetune}) into {result.run_dir}: top-1 {100 * acc:.2f}" if acc is not None
                  else f"fine-tuned ({args.finetune}) into {result.run_dir} (no validation split)")
        return 0

    p.set_defaults(handler=run)


def _run_training(args: argparse.Namespace, extra_overrides: list[str]) -> int:
    """Shared by ``train`` and ``segment train``: recipe + overrides -> engine.train, then a one-line summary."""
    from omegaconf import OmegaConf

    from tokenlab.engine import load_config, train

    overrides = list(args.overrides) + ([f"run_dir={args.run_dir}"] if args.run_dir is not None else [])
    cfg = load_config(args.config, overrides + extra_overrides)
    if args.print_config:
        print(OmegaConf.to_yaml(cfg), end="")
        return 0
    result = train(cfg)
    if int(os.environ.get("RANK", 0)) != 0:  # under torchrun only rank 0 reports
        return 0
    val = ", ".join(f"{k} {v:.4f}" for k, v in result.val.items())
    print(f"trained {result.step} steps into {result.run_dir}" + (f"; validation: {val}" if val else ""))
    if result.nonfinite_steps:
        print(f"skipped {result.nonfinite_steps} steps with a non-finite loss")
    return 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="the whole system end to end on the built-in synthetic set (about 6 minutes on 2 CPU cores)",
        description="Generate the synthetic set, train the STL labeler, a supervised baseline FAN and the STL "
        "student with the same budget, evaluate them (clean, corruptions, rendition, shortcut, token labels) and "
        "write a report. Interrupt with Ctrl-C at any time; the same command resumes where it stopped.",
    )
    p.add_argument("--out", default="tokenlab-demo", help="output directory (default: ./tokenlab-demo)")
    p.add_argument("--minutes", type=float, default=6.0, help="time budget; training epochs scale with it")
    p.add_argument("--seed", type=int, default=0, help="same seed, same numbers")
    p.add_argument("--ibot", action="store_true", help="also run a short iBOT pre-training scored by k-NN")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        import time

        from tokenlab.demo import Demo, DemoConfig, format_table

        make = DemoConfig.tiny if args.preset == "tiny" else DemoConfig
        cfg = make(seed=args.seed, minutes=args.minutes, ibot=args.ibot, device=args.device)
        cfg.train_epochs()  # validates --minutes
        started = time.perf_counter()

        def on_stage(name: str, i: int, n: int, elapsed: float) -> None:
            eta = f", about {max(0.0, args.minutes * 60 - elapsed) / 60:.0f} min left" if i > 1 else ""
            print(f"[{i}/{n}] {name}  ({elapsed / 60:.1f} min elapsed{eta})", flush=True)

        demo = Demo(args.out, cfg, progress=not args.no_progress, on_stage=on_stage)
        summary = demo.run()
        print()
        print(format_table(summary["metrics"]))
        print()
        print(summary["verdict"])
        print(f"\nreport: {demo.report_dir / 'report.md'} and report.html ({(time.perf_counter() - started) / 60:.1f} min)")
        return 0

    p.set_defaults(handler=run)


# Each entry adds one sub-command. Keep the list in the order `tokenlab --help` should show.
_SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_models,
    _add_train,
    _add_data,
    _add_segment,
    _add_eval,
    _add_tokens,
    _add_report,
    _add_eval_ssl,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenlab",
        description="Train and evaluate vision transformers with token-level self-distillation (STL, iBOT).",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 0
    try:
        rc = handler(args)
    except KeyboardInterrupt:
        print("\ninterrupted: progress so far is kept; run the same command again to resume", file=sys.stderr)
        return 130
    except (ValueError, KeyError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
        if args.debug:
            raise
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except TrainingAborted as err:  # non-finite losses, a dead peer rank: the message says what to do next
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
