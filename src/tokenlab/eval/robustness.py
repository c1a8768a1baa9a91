"""Robustness evaluation of one exported model: clean, corruptions (mCE / relative mCE / retention) and OOD sets.

What STL claims (REFERENCE §2-3) and how it is measured here:

- clean top-1/top-5, NLL, ECE on the data set's evaluation split;
- corruptions: every (corruption, severity) cell of an ImageNet-C style tree (generated and cached by
  :mod:`tokenlab.eval.corruptions`, or an existing ImageNet-C download); per-cell accuracy, then
  ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, ``mCE = mean_c CE_c``, relative mCE with ``E - E_clean``, and
  ``retention = robust accuracy / clean accuracy`` (:mod:`tokenlab.eval.metrics`). The reference is AlexNet's
  ImageNet-C table (1000-class models) or another run's ``eval.json`` (e.g. the supervised baseline). As published
  (STL / FAN ``validate_ood.py``), the robust accuracy averages every corruption folder present (19 with the
  extra set) and mCE the 15 benchmark corruptions; the 15-corruption accuracy is reported too, and each number
  names its corruptions (:mod:`tokenlab.eval.classify_corruptions`);
- OOD sets (subset/renamed classes; ImageNet-A/R; the synthetic ``rendition`` and ``shortcut`` splits) with the
  logits restricted to the covered classes;
- token models under both rules: official ``cls + 0.5 * max tokens`` and, as ablation, cls only.

:func:`evaluate_classifier_run` ties this together and writes ``eval.json``; ``report.py`` only formats that file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenlab.data.images import list_class_dirs
from tokenlab.data.specs import EVAL_SPLITS, DataSpec, parse_data_spec
from tokenlab.eval.class_maps import OODSpec, match_model_classes, resolve_ood_classes
from tokenlab.eval.classify import RULES, ClassifyResult, predict, score_predictions
from tokenlab.eval.classify_corruptions import CorruptionResult, default_cache_dir, evaluate_corruptions, load_reference
from tokenlab.eval.corruptions import (
    generate_corruptions,
    parse_work_size,
    resolve_corruptions,
    resolve_severities,
)
from tokenlab.eval.folders import eval_loader
from tokenlab.utils.runs import EVAL_FILE

logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "evaluate_classifier_run", "evaluate_runs", "reference_run"]

SYNTHETIC_OOD_SPLITS = ("rendition", "shortcut")


@dataclass
class EvalResult:
    """Everything :func:`evaluate_classifier_run` measured; ``to_dict()`` is the ``eval.json`` schema."""

    name: str
    model: str
    checkpoint: str
    data: str
    classes: list[str]
    rules: list[str]
    clean: dict[str, ClassifyResult]
    corruptions: CorruptionResult | None = None
    ood: dict[str, dict[str, Any]] = field(default_factory=dict)
    device: str = "cpu"
    amp: str | None = None
    seconds: float = 0.0
    reference: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        return {
            "name": self.name, "model": self.model, "checkpoint": self.checkpoint, "data": self.data,
            "classes": self.classes, "rules": self.rules, "device": self.device, "amp": self.amp,
            "seconds": self.seconds, "reference": self.reference,
            "clean": {r: v.to_dict() for r, v in self.clean.items()},
            "corruptions": self.corruptions.to_dict() if self.corruptions else None,
            "ood": self.ood,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` atomically (via a temporary file); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        os.replace(tmp, path)
        return path


def _ood_specs(data: DataSpec, ood: Sequence[str | OODSpec] | str | None) -> list[OODSpec]:
    """``"auto"`` adds the synthetic OOD splits; strings are ``NAME=DIR[@MAPPING]`` or ``DIR``."""
    out: list[OODSpec] = []
    items = [ood] if isinstance(ood, str) else list(ood or [])
    for item in items:
        if isinstance(item, OODSpec):
            out.append(item)
        elif item == "auto":
            if data.dataset_dir is not None:
                found = [s for s in SYNTHETIC_OOD_SPLITS if (data.dataset_dir / s).is_dir()]
                out += [OODSpec(s, data.dataset_dir / s) for s in found]
        else:
            name, _, rest = item.partition("=") if "=" in item else (Path(item).name, "", item)
            root, _, mapping = rest.partition("@")
            out.append(OODSpec(name, Path(root), mapping or None))
    return out


def evaluate_classifier_run(
    checkpoint: str | Path,
    data: str | Path | DataSpec,
    out: str | Path | None = None,
    rules: Sequence[str] | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    corruption_tree: str | Path | None = None,
    cache_dir: str | Path | None = None,
    work_size: int | str | None = "model",
    corruption_seed: int = 0,
    reference: str | Path | None = "auto",
    ood: Sequence[str | OODSpec] | str | None = "auto",
    device: str = "cpu",
    amp: str | None = None,
    batch_size: int = 128,
    workers: int | None = None,
    progress: bool = True,
) -> EvalResult:
    """Evaluate an exported model (run directory or ``model`` stem) and write ``eval.json``.

    Args:
        checkpoint: A run directory (``RUN/model.{safetensors,json}``) or the exported stem/file.
        data: Data spec (``tokenlab.data.specs.parse_data_spec``; the split defaults to ``val``, then ``test``).
        out: Where ``eval.json`` goes (default: ``RUN/eval.json`` for a run dir, else next to the model).
        rules: Prediction rules; default ``official`` and, for token models, ``cls`` as well.
        corruptions: Names/groups to generate and evaluate (None and no ``corruption_tree``: skip corruptions).
        severities: ``"1-5"`` by default.
        corruption_tree: Read this ImageNet-C style tree instead of generating one.
        cache_dir: Corruption cache (default :func:`default_cache_dir`).
        work_size: Where the corruptions are generated: ``"model"`` (default, None: after the model's evaluation
            resize, at the size it sees), ``"source"`` (the images' own size) or a side in pixels; see
            :mod:`tokenlab.eval.corruptions`.
        corruption_seed: Base seed of the corruptions.
        reference: mCE reference: ``auto``, ``alexnet``, ``none`` or a run dir / ``eval.json``.
        ood: ``"auto"`` (synthetic rendition/shortcut splits when present), and/or ``NAME=DIR[@MAPPING]`` strings
            where MAPPING is a mapping file or ``imagenet-a`` / ``imagenet-r``.
        device: Where the model runs.
        amp: Autocast dtype (``tokenlab.utils.amp``).
        batch_size: Evaluation batch size.
        workers: DataLoader workers.
        progress: tqdm bar while generating corruptions.
    """
    from tokenlab.models import load_exported

    t0 = time.perf_counter()
    if corruptions is not None:  # fail on a typo before any inference
        corruptions = resolve_corruptions(corruptions)
    if severities is not None:
        severities = resolve_severities(severities)
    work_size = parse_work_size(work_size)
    ckpt = Path(checkpoint)
    model, meta = load_exported(ckpt, device=device)
    spec = parse_data_spec(data).resolve(EVAL_SPLITS)
    folders = list_class_dirs(spec.root)
    if not folders:
        raise ValueError(f"{spec.root} has no class sub-directories; expected {spec.root}/<class>/<image>")
    classes = match_model_classes(meta, folders, spec.root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    token_model = bool(getattr(model, "has_aux_head", False))
    rules = list(rules) if rules else (["official", "cls"] if token_model else ["official"])
    if "cls" in rules and not hasattr(model, "forward_tokens"):
        raise ValueError(f"rule 'cls' needs a token model; {meta.get('model')} has no forward_tokens")
    bad = [r for r in rules if r not in RULES]
    if bad:
        raise ValueError(f"unknown rule(s) {bad}; valid: {', '.join(RULES)}")

    ood_sets = [(o, *resolve_ood_classes(o.root, classes, o.mapping)) for o in _ood_specs(spec, ood)]
    ref, reference_used = None, None
    if corruptions is not None or corruption_tree is not None:
        ref = load_reference(reference, len(classes))
        if ref is not None:
            spec_path = None if str(reference) in ("auto", "alexnet") else str(reference)
            reference_used = {"name": ref.name, "path": spec_path, "this_run": False}
    loader = eval_loader(spec.root, class_to_idx, meta, batch_size, workers)
    n_images = len(loader.dataset)  # type: ignore[arg-type]  # an ImageTreeDataset: sized
    logger.info("clean evaluation of %s on %s: %d images at %s px, batch %d, %s", meta.get("model"), spec.root,
                n_images, meta.get("img_size"), batch_size, _loader_workers(loader))  # fmt: skip
    pred = predict(model, loader, device, amp, rules)
    clean = score_predictions(pred.logits, pred.targets, pred.skipped, pred.seconds)
    name = ckpt.name if ckpt.is_dir() else ckpt.parent.name
    result = EvalResult(name, str(meta.get("model")), str(ckpt), str(spec.root), classes, rules, clean,
                        device=device, amp=amp, reference=reference_used)  # fmt: skip

    if corruptions is not None or corruption_tree is not None:
        cache = None
        if corruption_tree is None:
            cache = generate_corruptions(spec.root, cache_dir or default_cache_dir(), corruptions, severities,
                                         seed=corruption_seed, work_size=work_size, workers=workers,
                                         progress=progress, model_meta=meta)  # fmt: skip
            tree, corruptions, severities = cache.root, cache.corruptions, cache.severities
        else:
            tree = Path(corruption_tree)
        result.corruptions = evaluate_corruptions(
            model, tree, class_to_idx, meta, {r: c.top1 for r, c in clean.items()}, corruptions, severities, ref,
            rules, device, amp, batch_size, workers,
        )  # fmt: skip
        if cache is not None:
            result.corruptions.work_size = cache.work_size
            result.corruptions.unchanged = [f"{c}/{s}" for c, s in cache.unchanged]

    for o, c2i, subset in ood_sets:
        logger.info("OOD set %s: %s (%d of %d classes)", o.name, o.root, len(subset), len(classes))
        res = score_predictions(
            *_pred_tuple(predict(model, eval_loader(o.root, c2i, meta, batch_size, workers), device, amp, rules)),
            subset=subset if len(subset) < len(classes) else None,
        )
        result.ood[o.name] = {"root": str(o.root), "subset": subset, **{r: v.to_dict() for r, v in res.items()}}

    result.seconds = time.perf_counter() - t0
    target = Path(out) if out else _eval_path(ckpt)
    result.save(target)
    logger.info("wrote %s", target)
    return result


def reference_run(runs: Sequence[str | Path]) -> int:
    """Index of the mCE reference among ``runs``: the run directory named ``baseline``, else the first."""
    names = [Path(r).name if Path(r).is_dir() else Path(r).parent.name for r in runs]
    return names.index("baseline") if "baseline" in names else 0


def evaluate_runs(
    checkpoints: Sequence[str | Path],
    data: str | Path | DataSpec,
    reference: str | Path | None = "auto",
    **kwargs: Any,
) -> list[EvalResult]:
    """Evaluate several runs on one data set and one corruption cache; each writes its ``RUN/eval.json``.

    The corruptions are generated once and reused: the cache key is the source tree, the seed and the geometry
    the images are corrupted at (for ``work_size="model"`` the model's evaluation resize, not the model), so runs
    with the same preprocessing share one cache; runs that need different caches are named in the log.

    Args:
        checkpoints: Run directories or exported stems (``out`` cannot be given: each result goes next to its run).
        data: Data spec, as for :func:`evaluate_classifier_run`.
        reference: ``auto``: the run named ``baseline`` (its directory name), else the first, is evaluated first
            and is the mCE reference of every other run; ``none`` / ``alexnet``; or a run dir / ``eval.json``
            (evaluated first when it is one of ``checkpoints``).
        **kwargs: The other arguments of :func:`evaluate_classifier_run`.

    Returns:
        The results in the order of ``checkpoints``.
    """
    if not checkpoints:
        raise ValueError("no run to evaluate")
    if kwargs.get("out") is not None:
        raise ValueError("--out names one eval.json; with several runs each one is written into its run directory")
    paths = [Path(c) for c in checkpoints]
    ref_idx: int | None = None
    if str(reference) == "auto":
        ref_idx = reference_run(paths)
    elif str(reference) not in ("none", "alexnet"):
        given = Path(str(reference)).resolve()
        ref_idx = next((i for i, p in enumerate(paths) if given in (p.resolve(), p.resolve() / EVAL_FILE)), None)
    order = ([ref_idx] if ref_idx is not None else []) + [i for i in range(len(paths)) if i != ref_idx]
    results: dict[int, EvalResult] = {}
    for i in order:
        if i == ref_idx:
            logger.info("mCE reference: %s (evaluated first)", paths[i])
            res = evaluate_classifier_run(paths[i], data, reference="none", **kwargs)
            if res.corruptions is not None:  # without corruptions there is no mCE, hence no reference
                res.reference = {"name": res.name, "path": None, "this_run": True}
                res.save(_eval_path(paths[i]))
        else:
            ref = str(paths[ref_idx]) if ref_idx is not None else reference
            res = evaluate_classifier_run(paths[i], data, reference=ref, **kwargs)
        results[i] = res
    _log_caches([results[i] for i in order])
    return [results[i] for i in range(len(paths))]


def _loader_workers(loader: Any) -> str:
    """How a loader reads its images, as measured: the worker count it was built with."""
    n = int(loader.num_workers)
    return f"{n} loader worker process{'es' if n > 1 else ''}" if n > 0 else "read in this process (no loader workers)"


def _eval_path(ckpt: Path) -> Path:
    return ckpt / EVAL_FILE if ckpt.is_dir() else ckpt.parent / EVAL_FILE


def _log_caches(results: Sequence[EvalResult]) -> None:
    """Say which runs shared a corruption cache, and name the runs that needed a different one."""
    caches: dict[str, list[str]] = {}
    for r in results:
        if r.corruptions is not None:
            caches.setdefault(r.corruptions.source, []).append(r.name)
    if len(caches) == 1:
        ((root, names),) = caches.items()
        logger.info("%d runs evaluated on one corruption cache %s", len(names), root)
    elif len(caches) > 1:
        logger.warning(
            "the runs needed %d different corruption caches (their evaluation resize differs, so the corrupted images "
            "differ and the corruption scores are not measured on the same images): %s", len(caches),
            "; ".join(f"{', '.join(n)}: {root}" for root, n in caches.items()),
        )  # fmt: skip


def _pred_tuple(p: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, float]:
    return p.logits, p.targets, p.skipped, p.seconds
