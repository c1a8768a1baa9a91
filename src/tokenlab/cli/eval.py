"""``tokenlab eval``: clean, corruption and OOD evaluation of exported models, each written to its ``eval.json``.

``tokenlab eval RUN1 RUN2 ...`` evaluates several runs on one generated corruption cache, the mCE reference first
(:func:`tokenlab.eval.robustness.evaluate_runs`); ``--checkpoint RUN`` (or one RUN) evaluates one run as before.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from tokenlab.cli.common import add_runtime_flags, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``eval`` with every runtime flag (default batch 128, workers chosen by the evaluator)."""
    p = sub.add_parser(
        "eval", help="clean / corruption / OOD evaluation of trained models, written to RUN/eval.json",
        description="Evaluate one run, or several runs on the same cached corruptions (the mCE reference first).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=REFERENCE_HELP,
    )  # fmt: skip
    p.add_argument(
        "runs",
        nargs="*",
        metavar="RUN",
        help="run directories or exported models; several: one corruption cache, one mCE reference",
    )
    p.add_argument("--checkpoint", help="one run directory or exported model (<stem>[.safetensors|.json])")
    p.add_argument(
        "--data", required=True, help="image tree DIR/<class>/<img>, or a data set DIR[:split] (default val)"
    )
    p.add_argument("--out", help="eval.json path (default: RUN/eval.json)")
    p.add_argument("--rules", help="prediction rules: official,cls (default: both for token models)")
    p.add_argument("--corruptions", help="generate + evaluate: all, common, extra, fast, noise, blur, ... or names")
    p.add_argument("--severities", default=None, help="e.g. 1-5 (default) or 1,3,5")
    p.add_argument("--corruption-tree", help="read an ImageNet-C style tree corruption/severity/class/img instead")
    p.add_argument("--cache-dir", help="corruption cache (default $TOKENLAB_CACHE or ~/.cache/tokenlab)")
    p.add_argument(
        "--work-size", default="model",
        help="where corruptions are generated: 'model' (default: after the model's eval resize, at its input size), "
        "'source' (each image's own size; weak after downsizing to a small model) or a side N in pixels "
        "(corrupt at NxN, resize back); each choice has its own cache",
    )  # fmt: skip
    p.add_argument("--reference", default="auto", metavar="auto|RUN|none|alexnet",
                   help="mCE reference (see below); default auto")  # fmt: skip
    p.add_argument("--ood", action="append", default=None,
                   help="OOD set NAME=DIR[@MAPPING] (MAPPING: file, imagenet-a, imagenet-r); repeatable; "
                        "'auto' (default) adds the synthetic rendition/shortcut splits; 'none' disables")  # fmt: skip
    add_runtime_flags(p, {"device": "cpu", "amp": "none", "batch_size": 128, "workers": None})
    p.set_defaults(handler=run)


REFERENCE_HELP = """\
mCE reference (--reference):
  mCE measures robustness relative to a reference model: for each corruption, the model's top-1 error summed over
  the severities divided by the reference's, averaged over corruptions. 100 % = as robust as the reference, below
  100 % = more robust. Relative mCE does the same with the drop from clean error. The ImageNet-C papers use
  AlexNet as reference, which only means something for 1000 ImageNet classes; on your own data the reference is
  one of your runs (e.g. the supervised baseline), evaluated on the same corrupted images.
    auto     several runs: the run whose directory is named 'baseline', else the first run, is evaluated first and
             is the reference of the others; one run: AlexNet's table for 1000-class models, else none
    RUN      a run directory (or its eval.json) evaluated with the same --corruptions; evaluated first when listed
    none     no mCE (robust accuracy and retention only)
    alexnet  the ImageNet-C AlexNet errors (1000-class ImageNet models only)
  Each eval.json records its reference under "reference"; the report says "mCE relative to RUN".
"""


def run(args: argparse.Namespace) -> int:
    """Evaluate, then print per run one row per prediction rule, the corruption scores and the OOD accuracies."""
    from tokenlab.eval.robustness import evaluate_classifier_run, evaluate_runs

    runs = list(args.runs) + ([args.checkpoint] if args.checkpoint else [])
    if not runs:
        raise ValueError("no run given: name run directories (tokenlab eval RUN1 RUN2 ... --data DIR) or --checkpoint")
    if len(runs) > 1 and args.out is not None:
        raise ValueError("--out names one eval.json; with several runs each one is written into its run directory")
    device = resolve_device(args.device, args.amp)
    for ckpt in runs:
        _check_inputs_and_outputs(args, ckpt)
    ood = args.ood or ["auto"]
    kwargs = dict(
        rules=args.rules.split(",") if args.rules else None,
        corruptions=args.corruptions,
        severities=args.severities,
        corruption_tree=args.corruption_tree,
        cache_dir=args.cache_dir,
        work_size=args.work_size,
        ood=[] if ood == ["none"] else ood,
        device=device,
        amp=args.amp,
        batch_size=args.batch_size,
        workers=args.workers,
    )
    if len(runs) == 1:
        results = [evaluate_classifier_run(runs[0], args.data, out=args.out, reference=args.reference, **kwargs)]
    else:
        results = evaluate_runs(runs, args.data, reference=args.reference, **kwargs)
    for i, res in enumerate(results):
        if i:
            print()
        _print_result(res)
    caches = {r.corruptions.source for r in results if r.corruptions is not None and r.corruptions.work_size}
    if len(results) > 1 and len(caches) > 1:
        print(f"warning: the runs needed {len(caches)} corruption caches (different evaluation resize): their "
              "corruption scores are not measured on the same images")  # fmt: skip
    return 0


def _print_result(res: Any) -> None:
    """The console summary of one ``EvalResult``."""
    print(f"{res.name}: {res.model} on {res.data}")
    print(f"{'rule':<9} {'top-1':>6} {'top-5':>6} {'NLL':>6} {'ECE':>6} {'bal.':>6} {'major':>6} {'img/s':>8}")
    for rule, c in res.clean.items():
        bal, major = (c.balance.balanced_accuracy, c.balance.majority_rate) if c.balance else (float("nan"),) * 2
        flag = "  COLLAPSED (one class takes most predictions)" if c.balance and c.balance.collapsed else ""
        print(f"{rule:<9} {100 * c.top1:6.2f} {100 * c.top5:6.2f} {c.nll:6.3f} {100 * c.ece:6.2f} "
              f"{100 * bal:6.2f} {100 * major:6.2f} {c.images_per_s:8.1f}{flag}")  # fmt: skip
    skipped = max((c.skipped for c in res.clean.values()), default=0)
    if skipped:
        print(f"unreadable images skipped: {skipped} (named in the log)")
    if res.corruptions:
        work = res.corruptions.work_size
        if work is not None:
            print(f"corruptions generated at {_WORK_SIZE_NAMES.get(str(work), f'{work}x{work} px')}")
        if res.corruptions.unchanged:
            cells = ", ".join(res.corruptions.unchanged)
            print(f"warning: {cells} left the images unchanged (accuracy = clean; see the log)")
        for rule, s in res.corruptions.scores.items():
            if s.mce is not None:
                mce = f"mCE {100 * s.mce:.2f} relative to {s.reference}"
            elif (res.reference or {}).get("this_run"):
                mce = "mCE: this run is the reference of the others"
            else:
                mce = "mCE - (no reference: see --reference in tokenlab eval --help)"
            print(f"corruptions [{rule}]: robust acc {100 * s.robust_accuracy:.2f}  retention "
                  f"{100 * s.retention:.2f}  {mce}")  # fmt: skip
            for corruption, acc in s.per_corruption.items():
                print(f"  {corruption:<18} {100 * acc:6.2f}")
        if res.corruptions.skipped:
            print(f"unreadable images skipped: {res.corruptions.skipped}")
    for name, d in res.ood.items():
        print(f"OOD {name}: " + "  ".join(
            f"{r} {100 * d[r]['top1']:.2f} (balanced {100 * d[r].get('balanced_accuracy', float('nan')):.2f}"
            + (", COLLAPSED" if d[r].get("collapsed") else "") + ")" for r in res.rules))  # fmt: skip


_WORK_SIZE_NAMES = {"model": "the model's input size", "source": "the source image size"}


def _check_inputs_and_outputs(args: argparse.Namespace, checkpoint: str) -> None:
    """Refuse a backbone export and unwritable outputs before any image is read (nothing is lost after the work)."""
    from tokenlab.eval.classify_corruptions import default_cache_dir
    from tokenlab.utils.runs import EVAL_FILE, check_writable, export_stem, require_classifier

    require_classifier(checkpoint, "eval")
    out = Path(args.out) if args.out is not None else export_stem(checkpoint).parent / EVAL_FILE
    if out.is_dir():
        raise ValueError(f"{out} is a directory; give --out the path of the JSON file to write (e.g. eval.json)")
    check_writable(out.parent, "--out directory" if args.out is not None else "run directory (for eval.json)")
    if args.corruptions is not None and args.corruption_tree is None:
        cache = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()
        check_writable(cache, "--cache-dir" if args.cache_dir is not None else "corruption cache")
