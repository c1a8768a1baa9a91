"""Side-by-side report of several runs: a Markdown file and the same content as one self-contained HTML page.

Only formats: it reads what evaluation wrote in each run directory (``eval.json`` from ``tokenlab eval``,
``tokens.json`` and the token/attention PNGs from ``tokenlab tokens``, ``metrics.jsonl`` from training) and draws
the comparison plots with :mod:`tokenlab.eval.visualize`. Tables: clean accuracy (official rule and cls-only
ablation), NLL, ECE, robust accuracy, mCE / relative mCE, retention, OOD accuracy, class balance per set (balanced
accuracy and majority-class rate, with a sentence for every set a run has collapsed on), per-class accuracy,
token-label quality; an OOD bar chart with 95 % intervals; and a verdict with its noise statement for any runs
(:mod:`tokenlab.eval.verdict`: binomial intervals run by run, or the paired difference across seeds for runs named
``<model>_s<seed>`` with one seed list), each model against the run (or model) named ``baseline``, else the first.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenlab.eval import visualize as vis
from tokenlab.eval.verdict import (
    compare_accuracies,
    comparison_sentence,
    paired_sentence,
    seed_groups,
    seed_statistics,
    single_run_noise_note,
    wilson_interval,
)
from tokenlab.utils.runs import EVAL_FILE, METRICS_FILE, TOKENS_FILE, check_writable

logger = logging.getLogger(__name__)

__all__ = ["RunData", "ReportFiles", "load_run", "write_report"]

# pictures that `tokenlab tokens` leaves in a run directory, copied into the report when present
RUN_PICTURES = {"token_labels.png": "token labels", "class_attention.png": "class attention"}


@dataclass
class RunData:
    """What a run directory holds for the report."""

    name: str
    path: Path
    eval: dict[str, Any] | None = None
    tokens: dict[str, Any] | None = None
    has_metrics: bool = False
    pictures: dict[str, Path] = field(default_factory=dict)


@dataclass
class ReportFiles:
    """Paths written by :func:`write_report`."""

    markdown: Path
    html: Path
    images: list[Path]


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None


def load_run(path: str | Path, name: str | None = None) -> RunData:
    """Collect ``eval.json``, ``tokens.json``, ``metrics.jsonl`` and the token pictures of one run directory."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    run = RunData(name or path.name, path, _read_json(path / EVAL_FILE), _read_json(path / TOKENS_FILE),
                  (path / METRICS_FILE).is_file())  # fmt: skip
    run.pictures = {f: path / f for f in RUN_PICTURES if (path / f).is_file()}
    if run.eval is None and run.tokens is None and not run.has_metrics:
        raise FileNotFoundError(
            f"{path} has nothing to report: no eval.json (run `tokenlab eval`), tokens.json (`tokenlab tokens`) "
            "or metrics.jsonl"
        )
    return run


def _pct(v: Any, digits: int = 1) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.{digits}f}"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.{digits}f}"


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _reference_note(runs: list) -> str:
    """Which reference each run's mCE is measured against (runs without one have no mCE)."""
    refs = {r.name: _get(r.eval, "corruptions", "official", "reference") for r in runs
            if _get(r.eval, "corruptions", "official")}  # fmt: skip
    with_ref = [f"{name} relative to {ref}" for name, ref in refs.items() if ref]
    with_ref += [f"{r.name} is the reference" for r in runs if _get(r.eval, "reference", "this_run")]
    if not with_ref:
        return ("No mCE reference was given: mCE needs one (`tokenlab eval RUN1 RUN2 ...` uses the run named "
                "baseline, else the first).")  # fmt: skip
    return (f"mCE: {'; '.join(with_ref)} (each corruption's error summed over severities, divided by the "
            "reference's, averaged; 100 % = as robust as the reference; relative mCE does the same with the "
            "drop from clean error; `alexnet` is the ImageNet-C AlexNet table).")  # fmt: skip


def _balance_sets(r: RunData) -> dict[str, dict[str, Any]]:
    """``{set: official-rule result}`` for the clean set and every OOD set of a run, when it has the balance keys."""
    sets = {"clean": _get(r.eval, "clean", "official")}
    sets.update({o: _get(d, "official") for o, d in ((r.eval or {}).get("ood") or {}).items()})
    return {k: v for k, v in sets.items() if isinstance(v, dict) and "balanced_accuracy" in v}


def _class_name(r: RunData, idx: Any) -> str:
    classes = (r.eval or {}).get("classes") or []
    return str(classes[idx]) if isinstance(idx, int) and 0 <= idx < len(classes) else str(idx)


def _balance_section(runs: list[RunData]) -> list[str]:
    """Per set and run: balanced accuracy / majority-class rate, and a sentence per collapsed (run, set)."""
    per_run = {r.name: _balance_sets(r) for r in runs}
    sets = ["clean"] + sorted({s for v in per_run.values() for s in v} - {"clean"})
    with_balance = [r for r in runs if per_run[r.name]]
    if not with_balance:
        return []
    rows = []
    for s in sets:
        row = [s]
        for r in with_balance:
            d = per_run[r.name].get(s)
            row.append("–" if d is None else f"{_pct(d['balanced_accuracy'])} / {_pct(d['majority_rate'])} "
                       f"({_class_name(r, d['majority_class'])})")  # fmt: skip
        rows.append(row)
    md = ["## Class balance", ""]
    md += _table(["set"] + [r.name for r in with_balance], rows)
    md += ["", "Balanced accuracy (mean per-class accuracy) / share of the predictions that go to the most-predicted "
           "class (that class), in %, official rule. A model that predicts mostly one class can look fine on top-1 "
           "when the set is unbalanced; these columns show it.", ""]  # fmt: skip
    flags = []
    for r in with_balance:
        for s, d in per_run[r.name].items():
            if d.get("collapsed"):
                flags.append(f"COLLAPSED: {r.name} predicts class {_class_name(r, d['majority_class'])} for "
                             f"{_pct(d['majority_rate'], 0)} % of the {s} set, which holds "
                             f"{_pct(d.get('majority_true_rate'), 0)} % of it (prediction entropy "
                             f"{_num(d.get('prediction_entropy'), 2)}); its accuracy on that set reflects the class "
                             "mix, not recognition.")  # fmt: skip
    for f in flags or ["No run has collapsed onto one class on any set."]:
        md += [f, ""]  # one paragraph each
    return md


def _set_ids(r: RunData, set_name: str, k: int) -> list[int]:
    """Model class index of each of the ``k`` competing classes of a set (an OOD subset, or every class)."""
    ids = _get(r.eval, "ood", set_name, "subset") if set_name != "clean" else None
    if not (isinstance(ids, list) and len(ids) == k < len((r.eval or {}).get("classes") or [])):
        ids = list(range(k))  # the set was scored on every model class, in model order
    return ids


def _per_class_section(runs: list[RunData], set_names: list[str], max_classes: int = 50) -> list[str]:
    """One table per set: accuracy of each true class (rows) for each run (columns), official rule."""
    md: list[str] = []
    for set_name in set_names:
        cols: dict[str, dict[str, float | None]] = {}
        for r in runs:
            acc = _get(_balance_sets(r).get(set_name), "per_class_accuracy")
            if isinstance(acc, list):
                ids = _set_ids(r, set_name, len(acc))
                cols[r.name] = {_class_name(r, i): a for i, a in zip(ids, acc, strict=True)}
        classes = list(dict.fromkeys(c for v in cols.values() for c in v))
        if not cols:
            continue
        if not md:
            md += ["## Per-class accuracy", ""]
        if len(classes) > max_classes:
            md += [f"{set_name} set: {len(classes)} classes, table left out (more than {max_classes}).", ""]
            continue
        md += [f"{set_name} set:", ""]
        md += _table(["class"] + list(cols), [[c] + [_pct(v.get(c)) for v in cols.values()] for c in classes])
        md.append("")
    if md:
        md += ["Top-1 of the images of each true class, in % (official rule; – : the class is absent from the set). "
               "A class near 0 next to one near 100 is the mark of a model that predicts one class.", ""]  # fmt: skip
    return md


# verdict metrics: (key, what); the OOD sets follow as ("ood:<set>", "top-1 on the <set> set")
_VERDICT_METRICS = (("clean", "clean top-1"), ("corrupted", "top-1 under the corruptions"))


def _verdict_metrics(r: RunData) -> dict[str, tuple[str, float, int]]:
    """``{key: (what, accuracy, images)}`` of one run: clean, corrupted (counted as the clean set) and OOD top-1."""
    e = r.eval or {}
    out: dict[str, tuple[str, float, int]] = {}
    n_clean = int(_get(e, "clean", "official", "n") or 0)
    values = {"clean": _get(e, "clean", "official", "top1"),
              "corrupted": _get(e, "corruptions", "official", "robust_accuracy")}  # fmt: skip
    for key, what in _VERDICT_METRICS:
        if values[key] is not None:
            out[key] = (what, float(values[key]), n_clean)
    for o, d in (e.get("ood") or {}).items():
        top1 = _get(d, "official", "top1")
        if top1 is not None:
            out[f"ood:{o}"] = (f"top-1 on the {o} set", float(top1), int(_get(d, "official", "n") or 0))
    return out


def _reference_first(names: list[str]) -> list[str]:
    return ["baseline"] + [n for n in names if n != "baseline"] if "baseline" in names else names


def _verdict_section(runs: list[RunData]) -> list[str]:
    """Every model against the reference (``baseline``, else the first): paired across seeds or run by run."""
    evald = [r for r in runs if _verdict_metrics(r)]
    if len(evald) < 2:
        return []
    metrics = {r.name: _verdict_metrics(r) for r in evald}
    groups = seed_groups([r.name for r in evald])
    md = ["## Verdict", ""]
    if groups is not None:
        models = _reference_first(list(groups))
        seeds = sorted(next(iter(groups.values())))
        per_seed = {s: {m: {k: v[1] for k, v in metrics[groups[m][s]].items()} for m in models} for s in seeds}
        keys = list(dict.fromkeys(k for m in metrics.values() for k in m))
        whats = {k: v[0] for m in metrics.values() for k, v in m.items()}
        ref = models[0]
        rows = []
        for m in models:
            st = seed_statistics(per_seed, keys, ref, m)
            rows.append([m] + [_mean_sd_cell(st["models"].get(m, {}).get(k)) for k in keys])
            if m != ref:
                md += [paired_sentence(whats[k], ref, m, st["difference"][k]) for k in keys if k in st["difference"]]
        md += ["", f"Runs paired by seed ({', '.join(map(str, seeds))}): per seed the difference of the two models, "
               "then its mean ± t · sd / √n over the seeds, a 95 % interval; an interval that holds 0 is within "
               "noise. Seed-to-seed variation is inside these intervals.", ""]  # fmt: skip
        md += _table(["model (mean ± sd over seeds)"] + [whats[k] for k in keys], rows)
        md.append("")
        return md
    names = _reference_first([r.name for r in evald])
    ref = names[0]
    for name in names[1:]:
        for key, (what, b, n_b) in metrics[name].items():
            if key in metrics[ref]:
                _, a, n_a = metrics[ref][key]
                md.append(comparison_sentence(what, ref, name, compare_accuracies(a, n_a, b, n_b)))
    n_ref = metrics[ref].get("clean", ("", 0.0, 0))[2]
    md += ["", "One evaluation per run, compared with " + ref + ". " + single_run_noise_note(n_ref)
           + " For a paired comparison across seeds, name the runs `<model>_s<seed>` (e.g. `baseline_s0`, "
           "`baseline_s1`, `student_s0`, `student_s1`) with the same seeds for every model.", ""]  # fmt: skip
    return md


def _mean_sd_cell(v: dict[str, Any] | None) -> str:
    if v is None:
        return "–"
    return _pct(v["mean"]) + ("" if math.isnan(v["sd"]) else f" ± {100 * v['sd']:.1f}")


def _ood_intervals(runs: list[RunData]) -> dict[str, dict[str, tuple[float, float, float]]]:
    """``{run: {set: (top-1, Wilson low, high)}}`` for the clean set and every OOD set (official rule)."""
    out = {}
    for r in runs:
        sets = {"clean": _get(r.eval, "clean", "official")}
        sets.update({o: _get(d, "official") for o, d in ((r.eval or {}).get("ood") or {}).items()})
        row = {}
        for s, d in sets.items():
            if isinstance(d, dict) and d.get("top1") is not None:
                row[s] = (float(d["top1"]), *wilson_interval(float(d["top1"]), int(d.get("n") or 0)))
        out[r.name] = row
    return out


def _confusion_panels(runs: list[RunData], set_name: str) -> dict[str, tuple[Any, list[str]]]:
    """``{run: (confusion, class names)}`` of one set (official rule), for the runs whose eval.json stores it."""
    out = {}
    for r in runs:
        d = _balance_sets(r).get(set_name)
        if d is None or "confusion" not in d:
            continue
        out[r.name] = (d["confusion"], [_class_name(r, i) for i in _set_ids(r, set_name, len(d["confusion"]))])
    return out


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def _unique_names(runs: Sequence[str | Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        if len(names) != len(runs):
            raise ValueError(f"{len(names)} names for {len(runs)} runs")
        return list(names)
    out: list[str] = []
    for r in runs:
        base = Path(r).name or str(r)
        n, i = base, 2
        while n in out:
            n, i = f"{base}-{i}", i + 1
        out.append(n)
    return out


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def write_report(
    run_dirs: Sequence[str | Path],
    out_dir: str | Path,
    names: Sequence[str] | None = None,
    title: str | None = None,
    verdict: str | None = None,
) -> ReportFiles:
    """Write ``out_dir/report.md`` (+ ``images/*.png``) and ``out_dir/report.html`` (images embedded as base64).

    Args:
        run_dirs: Run directories to compare, in column order.
        out_dir: Output directory.
        names: Display names (default: directory names, made unique).
        title: Report title.
        verdict: The verdict paragraph (e.g. a study's own); default: the comparison of the runs written by
            :mod:`tokenlab.eval.verdict` (paired across seeds for ``<model>_s<seed>`` runs), none for one run.
    """
    if not run_dirs:
        raise ValueError("no run directory given")
    runs = [load_run(p, n) for p, n in zip(run_dirs, _unique_names(run_dirs, names), strict=True)]
    out = Path(out_dir)
    check_writable(out, "report directory")  # before any figure is drawn
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    md: list[str] = [f"# {title or 'tokenlab report: ' + ', '.join(r.name for r in runs)}", ""]
    images: list[Path] = []

    def figure(path: Path, caption: str) -> None:
        images.append(path)
        md.extend([f"![{caption}](images/{path.name})", "", f"*{caption}*", ""])

    # ---- summary ------------------------------------------------------------------------------------------------
    evald = [r for r in runs if r.eval]
    md += ["## Summary", ""]
    rows = []
    for r in runs:
        e = r.eval or {}
        off = _get(e, "clean", "official")
        cls = _get(e, "clean", "cls")
        corr = _get(e, "corruptions", "official")
        tok = r.tokens or {}
        rows.append([
            r.name, str(e.get("model", "–")), _pct(_get(off, "top1")), _pct(_get(cls, "top1")),
            _pct(_get(off, "top5")), _num(_get(off, "nll")), _pct(_get(off, "ece")),
            _pct(_get(corr, "robust_accuracy")), _pct(_get(corr, "mce")), _pct(_get(corr, "relative_mce")),
            _pct(_get(corr, "retention")), _pct(tok.get("fg_accuracy")), _pct(tok.get("iou")),
        ])  # fmt: skip
    md += _table(["run", "model", "top-1", "top-1 (cls only)", "top-5", "NLL", "ECE", "robust acc.", "mCE",
                  "rel. mCE", "retention", "token fg acc.", "token IoU"], rows)  # fmt: skip
    md += ["", "Accuracies, ECE, mCE and retention in %. *top-1* uses the official rule (token models: "
           "`cls + 0.5 · max tokens`); *cls only* is the ablation. " + _reference_note(evald), ""]  # fmt: skip
    skipped = {r.name: _get(r.eval, "corruptions", "skipped") for r in evald if _get(r.eval, "corruptions", "skipped")}
    skipped.update({r.name: {"clean": _get(r.eval, "clean", "official", "skipped")} for r in evald
                    if _get(r.eval, "clean", "official", "skipped")})  # fmt: skip
    if skipped:
        md += [f"Unreadable images skipped: {json.dumps(skipped)}", ""]

    # ---- corruptions --------------------------------------------------------------------------------------------
    corr_runs = {r.name: _get(r.eval, "corruptions", "official") for r in evald
                 if _get(r.eval, "corruptions", "official")}  # fmt: skip
    if corr_runs:
        md += ["## Corruptions", ""]
        names_c = sorted({c for v in corr_runs.values() for c in v["per_corruption"]})
        rows = [[c.replace("_", " ")] + [_pct(v["per_corruption"].get(c)) for v in corr_runs.values()]
                + [_pct(v["ce"].get(c)) for v in corr_runs.values()] for c in names_c]  # fmt: skip
        md += _table(["corruption"] + [f"acc. {n}" for n in corr_runs] + [f"CE {n}" for n in corr_runs], rows)
        md.append("")
        clean = {r.name: _get(r.eval, "clean", "official", "top1") for r in evald if r.name in corr_runs}
        figure(vis.plot_corruption_bars({n: v["per_corruption"] for n, v in corr_runs.items()},
                                        img_dir / "corruption_bars.png", clean), "accuracy per corruption")  # fmt: skip
        per_sev = {n: v["per_severity"] for n, v in corr_runs.items()}
        figure(vis.plot_severity_curves(per_sev, img_dir / "severity_curves.png", clean), "accuracy against severity")

    # ---- OOD ----------------------------------------------------------------------------------------------------
    ood_names = sorted({o for r in evald for o in ((r.eval or {}).get("ood") or {})})
    if ood_names:
        md += ["## Distribution shift (OOD sets)", ""]
        rows = []
        for o in ood_names:
            row = [o]
            for r in evald:
                d = _get(r.eval, "ood", o)
                row.append(_pct(_get(d, "official", "top1")) + (f" / {_pct(_get(d, 'cls', 'top1'))}"
                                                                if _get(d, "cls") else ""))  # fmt: skip
            rows.append(row)
        md += _table(["set"] + [r.name for r in evald], rows)
        md += ["", "Top-1 in % with logits restricted to the classes the set covers (official / cls only).", ""]
        figure(vis.plot_ood_bars(_ood_intervals(evald), img_dir / "ood_bars.png"),
               "top-1 per set and model, official rule, with 95 % Wilson intervals of the finite set")  # fmt: skip

    md += _balance_section(evald)
    md += _per_class_section(evald, ["clean"] + ood_names)
    for set_name in ["clean"] + ood_names:
        panels = _confusion_panels(evald, set_name)
        if panels:
            path = img_dir / f"confusion_{_slug(set_name)}.png"
            figure(vis.plot_confusion(panels, path, f"{set_name} set"),
                   f"confusion matrices, {set_name} set (rows: true class, shares of each row)")  # fmt: skip

    # ---- calibration --------------------------------------------------------------------------------------------
    rel = {r.name: _get(r.eval, "clean", "official", "reliability") for r in evald
           if _get(r.eval, "clean", "official", "reliability")}  # fmt: skip
    if rel:
        md += ["## Calibration", ""]
        figure(vis.plot_reliability(rel, img_dir / "reliability.png"), "reliability diagrams (clean set)")

    # ---- token labels -------------------------------------------------------------------------------------------
    tok_runs = [r for r in runs if r.tokens]
    if tok_runs:
        md += ["## Token labels", ""]
        rows = []
        for r in tok_runs:
            t = r.tokens or {}
            rows.append([r.name, str(t.get("source", "–")), _pct(t.get("agree_with_image_label")),
                         _pct(t.get("confidence")), _pct(t.get("fg_accuracy")), _pct(t.get("fg_confidence")),
                         _pct(t.get("bg_agree_with_image_label")), _pct(t.get("bg_confidence")), _pct(t.get("iou")),
                         _pct(t.get("stability"))])  # fmt: skip
        md += _table(["run", "source", "all = image label", "conf.", "fg acc.", "fg conf.", "bg = image label",
                      "bg conf.", "IoU(agree, mask)", "view stability"], rows)  # fmt: skip
        md += [
            "",
            "In %. *all = image label* / *conf.*: every token (with or without object masks); *fg acc.*: object "
            "tokens labelled with the image class; *bg = image label*: background tokens given the image class; "
            "*IoU*: tokens agreeing with the image label vs the object mask (fg / bg / IoU need masks: – without); "
            "*view stability*: same token label in the teacher and the student view.",
            "",
        ]
        for r in tok_runs:
            for f, cap in RUN_PICTURES.items():
                if f in r.pictures:
                    dst = img_dir / f"{_slug(r.name)}_{f}"
                    shutil.copyfile(r.pictures[f], dst)
                    figure(dst, f"{r.name}: {cap}")

    # ---- training -----------------------------------------------------------------------------------------------
    trained = {r.name: r.path for r in runs if r.has_metrics}
    if trained:
        md += ["## Training curves", ""]
        figure(vis.plot_training_curves(trained, img_dir / "training_curves.png"), "training loss and validation")

    # ---- verdict ------------------------------------------------------------------------------------------------
    if verdict is not None:
        md += ["## Verdict", "", *verdict.split("\n"), ""]
    else:
        md += _verdict_section(evald)

    md_path = out / "report.md"
    md_path.write_text("\n".join(md) + "\n")
    html_path = out / "report.html"
    html_path.write_text(_to_html(md, img_dir))
    logger.info("wrote %s and %s (%d images)", md_path, html_path, len(images))
    return ReportFiles(md_path, html_path, images)


_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #ccc;padding:4px 8px;"
    "text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}"
    "img{max-width:100%;border:1px solid #eee}code{background:#f4f4f4;padding:0 3px}em{color:#555}"
)


def _inline(text: str) -> str:
    t = html.escape(text)
    t = re.sub(r"`([^`]+)`", r"<code>\1</code>", t)
    return re.sub(r"\*([^*]+)\*", r"<em>\1</em>", t)


def _to_html(md: list[str], img_dir: Path) -> str:
    """Render the small Markdown subset this module writes (headings, tables, images, paragraphs)."""
    body: list[str] = []
    i = 0
    while i < len(md):
        line = md[i]
        if line.startswith("# "):
            body.append(f"<h1>{_inline(line[2:])}</h1>")
        elif line.startswith("## "):
            body.append(f"<h2>{_inline(line[3:])}</h2>")
        elif line.startswith("!["):
            m = re.match(r"!\[(.*)\]\(images/(.+)\)", line)
            assert m is not None
            data = base64.b64encode((img_dir / m.group(2)).read_bytes()).decode()
            body.append(f'<p><img alt="{html.escape(m.group(1))}" src="data:image/png;base64,{data}"></p>')
        elif line.startswith("| "):
            rows = []
            while i < len(md) and md[i].startswith("|"):
                rows.append(md[i])
                i += 1
            cells = [[c.strip() for c in r.strip("|").split("|")] for r in rows if not r.startswith("|---")]
            head = "".join(f"<th>{_inline(c)}</th>" for c in cells[0])
            rest = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rest}</tbody></table>")
            continue
        elif line.strip():
            body.append(f"<p>{_inline(line)}</p>")
        i += 1
    title = _inline(md[0][2:]) if md and md[0].startswith("# ") else "tokenlab report"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{_CSS}</style></head>"
            f"<body>{''.join(body)}</body></html>\n")  # fmt: skip
