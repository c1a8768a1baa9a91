"""``tokenlab report``: a Markdown + single-file HTML report comparing runs side by side."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``report``."""
    p = sub.add_parser("report", help="Markdown + single-file HTML report comparing runs side by side")
    p.add_argument("runs", nargs="+", help="run directories (with eval.json / tokens.json / metrics.jsonl)")
    p.add_argument("--out", required=True, help="output directory (report.md, report.html, images/)")
    p.add_argument("--names", help="comma-separated display names, one per run")
    p.add_argument("--title", help="report title")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Write the report, then say where it is."""
    from tokenlab.eval.report import write_report

    files = write_report(args.runs, args.out, args.names.split(",") if args.names else None, args.title)
    print(f"wrote {files.markdown} and {files.html} ({len(files.images)} images)")
    return 0
