"""``tokenlab demo``: the STL study end to end on the built-in synthetic set, with a table and a verdict."""

from __future__ import annotations

import argparse

from tokenlab.cli.common import add_runtime_flags, resolve_device


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo``; only ``--device`` of the runtime flags, since the budget fixes batch size and loading."""
    p = sub.add_parser(
        "demo",
        help="the whole system end to end on the built-in synthetic set (about 6 minutes on 2 CPU cores)",
        description="Generate the synthetic set, train the STL labeler, a supervised baseline FAN and the STL "
        "student with the same budget, evaluate them (clean, corruptions, rendition, shortcut, token labels) and "
        "write a report. Interrupt with Ctrl-C at any time; the same command resumes where it stopped.",
    )
    p.add_argument("--out", default="tokenlab-demo", help="output directory (default: ./tokenlab-demo)")
    p.add_argument("--minutes", type=float, default=6.0, help="time budget; optimizer steps scale with it")
    p.add_argument("--seed", type=int, default=0, help="same seed, same numbers")
    p.add_argument("--seeds", type=int, default=1, help="run N seeds (SEED, SEED+1, ...): mean ± sd per model and a "
                   "95 %% interval of the student - baseline difference")  # fmt: skip
    p.add_argument("--ibot", action="store_true", help="also run a short iBOT pre-training scored by k-NN")
    add_runtime_flags(p, {"device": "cpu"})
    p.add_argument("--no-progress", action="store_true", help="no progress bars (for logs)")
    p.add_argument("--preset", default="default", choices=["default", "tiny"], help=argparse.SUPPRESS)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the demo, printing a line per stage, then the table, the verdict and where the report is."""
    import time

    from tokenlab.studies.demo import Demo, DemoConfig
    from tokenlab.studies.stl_study import format_seed_table, format_table

    make = DemoConfig.tiny if args.preset == "tiny" else DemoConfig
    cfg = make(seed=args.seed, seeds=args.seeds, minutes=args.minutes, ibot=args.ibot,
               device=resolve_device(args.device))  # fmt: skip
    cfg.validate()
    started = time.perf_counter()

    def on_stage(name: str, i: int, n: int, elapsed: float) -> None:
        eta = f", about {max(0.0, args.minutes * args.seeds * 60 - elapsed) / 60:.0f} min left" if i > 1 else ""
        print(f"[{i}/{n}] {name}  ({elapsed / 60:.1f} min elapsed{eta})", flush=True)

    demo = Demo(args.out, cfg, progress=not args.no_progress, on_stage=on_stage)
    summary = demo.run()
    print()
    print(format_table(summary["metrics"]))
    if summary["seeds"] is not None:
        print(f"\nmean ± sd over seeds {', '.join(map(str, summary['seeds']['seeds']))}:")
        print(format_seed_table(summary["seeds"]["models"]))
    print()
    print(summary["verdict"])
    print(f"\nreport: {demo.report_dir / 'report.md'} and report.html ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0
