"""``tokenlab eval-ssl``: k-NN, linear probe and (optionally) fine-tuning of a self-supervised backbone."""

from __future__ import annotations

import argparse

from tokenlab.cli.common import add_runtime_flags, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval-ssl``; its fine-tuning overrides use ``-o`` so the run path stays the one positional."""
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
    p.add_argument(
        "--linear-protocol",
        choices=("cached", "augmented"),
        default="cached",
        help="cached: fast probe on cached centre-crop features, lr chosen on held-out train (default); augmented: "
        "iBOT's protocol (random resized crop + flip every epoch, no standardisation, 45-lr grid, best on the test "
        "split)",
    )
    p.add_argument("--linear-epochs", type=int, default=100, help="linear-probe epochs")
    p.add_argument(
        "--linear-lrs",
        help="linear-probe lr grid (default: 0.01,0.03,0.1,0.3 cached; iBOT's {1..9}e-4..{1..9}e0 augmented)",
    )
    p.add_argument("--crop-pct", type=float, default=224 / 256, help="eval centre-crop fraction (iBOT: 224/256)")
    p.add_argument("--interpolation", default="bicubic", help="eval resize interpolation (iBOT: bicubic)")
    p.add_argument("--random-init", action="store_true", help="also evaluate the same architecture untrained")
    p.add_argument("--train-subset", type=int, help="fixed random subset of the train split")
    p.add_argument("--test-subset", type=int, help="fixed random subset of the test split")
    add_runtime_flags(p, {"batch_size": 256, "workers": 0, "device": "cpu", "amp": "none"})
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="JSON path (default RUN/eval_ssl.json)")
    p.add_argument(
        "--finetune",
        metavar="RECIPE",
        help="then fine-tune through the engine with this recipe (e.g. ibot_cifar10_finetune)",
    )
    p.add_argument(
        "-o",
        "--override",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override of the fine-tuning recipe (repeatable)",
    )
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Feature evaluation first (a table per weights x feature kind), then the optional fine-tuning run."""
    from tokenlab.eval.linear import evaluate_ssl_run, finetune_run

    if args.overrides and not args.finetune:
        raise ValueError(f"overrides {args.overrides} only apply with --finetune RECIPE")
    device = resolve_device(args.device, args.amp)
    _check_outputs(args)
    kinds = [k for k in args.kind.split(",") if k]
    linear_kwargs = {"epochs": args.linear_epochs, "seed": args.seed}
    if args.linear_lrs:
        linear_kwargs["lrs"] = [float(v) for v in args.linear_lrs.split(",") if v]
    report = evaluate_ssl_run(
        args.run,
        args.data,
        args.train_split,
        args.test_split,
        kinds,
        knn=not args.no_knn,
        linear=not args.no_linear,
        k=args.k,
        temperature=args.temperature,
        linear_kwargs=linear_kwargs,
        batch_size=args.batch_size,
        workers=args.workers,
        device=device,
        amp=args.amp,
        train_subset=args.train_subset,
        test_subset=args.test_subset,
        random_init=args.random_init,
        seed=args.seed,
        out=args.out,
        crop_pct=args.crop_pct,
        interpolation=args.interpolation,
        linear_protocol=args.linear_protocol,
    )
    print(f"{report.model} on {report.data} ({report.num_train} train / {report.num_test} test); linear probe: "
          f"{report.linear_protocol} protocol; preprocessing: crop_pct {report.preprocessing['crop_pct']:.4f}, "
          f"{report.preprocessing['interpolation']}")  # fmt: skip
    print(f"{'weights':<11} {'features':<12} {'k-NN top-1':>10} {'linear top-1':>12}")
    for label, by_kind in report.results.items():
        for kind, res in by_kind.items():
            knn = f"{100 * res.knn.top1:.2f}" if res.knn else "-"
            lin = f"{100 * res.linear.top1:.2f}" if res.linear else "-"
            print(f"{label:<11} {kind:<12} {knn:>10} {lin:>12}")
    if args.finetune:
        result = finetune_run(args.run, args.finetune, args.overrides)
        acc = result.val.get("acc1")
        print(f"fine-tuned ({args.finetune}) into {result.run_dir}: top-1 {100 * acc:.2f}" if acc is not None
              else f"fine-tuned ({args.finetune}) into {result.run_dir} (no validation split)")  # fmt: skip
    return 0


def _check_outputs(args: argparse.Namespace) -> None:
    """The feature cache (in the run directory) and the JSON output must be writable before the features are made."""
    from pathlib import Path

    from tokenlab.utils.runs import check_writable, export_stem, read_model_meta

    read_model_meta(args.run)  # a missing or corrupt model.json is named before anything else
    check_writable(export_stem(args.run).parent, "run directory (for the feature cache and eval_ssl.json)")
    if args.out is not None:
        if Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a directory; give the path of the JSON file to write")
        check_writable(Path(args.out).parent, "--out directory")
