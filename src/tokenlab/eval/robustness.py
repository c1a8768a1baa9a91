"""Robustness evaluation of one exported model: clean, corruptions (mCE / relative mCE / retention) and OOD sets.

What STL claims (REFERENCE §2-3) and how it is measured here:

- clean top-1/top-5, NLL, ECE on the data set's evaluation split;
- corruptions: every (corruption, severity) cell of an ImageNet-C style tree (generated and cached by
  :mod:`tokenlab.eval.corruptions`, or an existing ImageNet-C download); per-cell accuracy, then
  ``CE_c = sum_s E_{s,c} / sum_s E^ref_{s,c}``, ``mCE = mean_c CE_c``, relative mCE with ``E - E_clean``, and
  ``retention = robust accuracy / clean accuracy`` (:mod:`tokenlab.eval.metrics`). The reference is AlexNet's
  ImageNet-C table (1000-class models) or another run's ``eval.json`` (e.g. the supervised baseline);
- OOD sets (subset/renamed classes; ImageNet-A/R; the synthetic ``rendition`` and ``shortcut`` splits) with the
  logits restricted to the covered classes;
- token models under both rules: official ``cls + 0.5 * max tokens`` and, as ablation, cls only.

:func:`evaluate_run` ties this together and writes ``eval.json``; ``report.py`` only formats that file.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from tokenlab.eval.classify import (
    RULES,
    ClassifyResult,
    OODSpec,
    build_loader,
    predict,
    resolve_ood_classes,
    score_predictions,
)
from tokenlab.eval.corruptions import (
    generate_corruptions,
    read_corruption_tree,
    resolve_corruptions,
    resolve_severities,
)
from tokenlab.eval.folders import ImageTreeDataset, eval_transform, list_class_dirs
from tokenlab.eval.metrics import ALEXNET_CLEAN_ERROR, ALEXNET_ERRORS, CorruptionScores, corruption_scores

logger = logging.getLogger(__name__)

__all__ = [
    "CorruptionResult",
    "DataSpec",
    "EvalResult",
    "default_cache_dir",
    "evaluate_corruptions",
    "evaluate_run",
    "load_reference",
    "resolve_data",
]

SYNTHETIC_OOD_SPLITS = ("rendition", "shortcut")


def default_cache_dir() -> Path:
    """``$TOKENLAB_CACHE/corruptions`` or ``~/.cache/tokenlab/corruptions``."""
    base = os.environ.get("TOKENLAB_CACHE") or Path.home() / ".cache" / "tokenlab"
    return Path(base) / "corruptions"


@dataclass
class DataSpec:
    """Where the evaluation images are.

    Attributes:
        root: The clean tree ``root/<class>/<image>``.
        dataset_dir: The data set directory holding ``dataset.json`` (synthetic / generated sets), else None.
        split: The split name when ``dataset_dir`` is set.
    """

    root: Path
    dataset_dir: Path | None = None
    split: str | None = None

    @property
    def masks(self) -> Path | None:
        """``<dataset_dir>/<split>_masks`` when it exists."""
        if self.dataset_dir is None:
            return None
        m = self.dataset_dir / f"{self.split}_masks"
        return m if m.is_dir() else None


def resolve_data(spec: str | Path, split: str | None = None) -> DataSpec:
    """Resolve ``DIR`` / ``DIR:split`` into a clean tree.

    A directory with ``dataset.json`` (the synthetic set, or any set written by ``tokenlab data``) is a set of splits
    ``DIR/<split>/<class>/<image>``; the split defaults to ``val`` (then ``test``). Any other directory is the tree
    itself. The literal ``cifar10`` is the built-in CIFAR-10 archive (extracted once; default split ``test``).
    """
    text = str(spec)
    if split is None and ":" in text and not Path(text).exists():
        text, split = text.rsplit(":", 1)
    if text == "cifar10" and not Path(text).exists():
        from tokenlab.data.datasets import ensure_cifar10

        # the built-in archive: CIFAR's `test` split is the evaluation split (`val` is an alias, as in build_dataset)
        split = "test" if split in (None, "val") else split
        return DataSpec(ensure_cifar10() / split, None, split)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"data directory not found: {path}")
    if not path.is_dir():
        raise NotADirectoryError(f"data spec is not a directory: {path}")
    if (path / "dataset.json").is_file():
        splits = [p.name for p in sorted(path.iterdir()) if p.is_dir() and not p.name.endswith("_masks")]
        if split is None:
            split = next((s for s in ("val", "test") if s in splits), None)
            if split is None:
                raise ValueError(f"{path} has no 'val' or 'test' split; name one of {splits} as {path}:<split>")
        if split not in splits:
            raise ValueError(f"split {split!r} not in {path}; valid: {', '.join(splits)}")
        return DataSpec(path / split, path, split)
    if split is not None:
        if not (path / split).is_dir():
            raise ValueError(f"split {split!r} not in {path}; valid: {', '.join(list_class_dirs(path))}")
        return DataSpec(path / split, path, split)
    return DataSpec(path)


def _match_classes(meta: Mapping[str, Any], folders: list[str], root: Path) -> list[str]:
    """The model's class names; raise when they do not match the data set's folders."""
    classes = meta.get("classes")
    k = int(meta.get("num_classes", len(classes) if classes else 0))
    if classes is None:
        if k != len(folders):
            raise ValueError(
                f"checkpoint has {k} classes but data set {root} has {len(folders)} class folders ({folders[:10]})"
            )
        logger.warning("checkpoint lists no class names; assuming the sorted folder names of %s", root)
        return folders
    if set(classes) != set(folders):
        missing = sorted(set(classes) - set(folders))[:10]
        extra = sorted(set(folders) - set(classes))[:10]
        raise ValueError(
            f"checkpoint classes do not match data set {root}: {len(classes)} checkpoint classes vs {len(folders)} "
            f"folders; only in checkpoint: {missing}; only in data: {extra} (for a subset/renamed set use --ood)"
        )
    return list(classes)


@dataclass
class CorruptionResult:
    """Corruption evaluation per rule.

    Attributes:
        scores: ``{rule: CorruptionScores}``.
        skipped: ``{"corruption/severity": unreadable images}`` (only cells with skips).
        num_images: Images evaluated over all cells.
        source: The tree that was read.
        seconds: Inference wall time.
    """

    scores: dict[str, CorruptionScores]
    skipped: dict[str, int]
    num_images: int
    source: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "skipped": self.skipped, "num_images": self.num_images,
                               "seconds": self.seconds}  # fmt: skip
        for rule, s in self.scores.items():
            out[rule] = _scores_dict(s)
        return out


def _scores_dict(s: CorruptionScores) -> dict[str, Any]:
    return {
        "accuracy": {c: {str(k): v for k, v in sev.items()} for c, sev in s.accuracy.items()},
        "per_corruption": s.per_corruption, "per_severity": {str(k): v for k, v in s.per_severity.items()},
        "robust_accuracy": s.robust_accuracy, "retention": s.retention, "mce": s.mce, "ce": s.ce,
        "relative_mce": s.relative_mce, "relative_ce": s.relative_ce, "reference": s.reference,
    }  # fmt: skip


class _Grouped(Dataset):
    """Adds ``"group": gid`` to every sample of a dataset."""

    def __init__(self, ds: Dataset, gid: int) -> None:
        self.ds, self.gid = ds, gid

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.ds[i], "group": self.gid}


@dataclass
class Reference:
    """A reference for mCE: a per-corruption table (or AlexNet's means) and its clean error."""

    name: str
    table: Mapping[str, Any]
    clean_error: float | None


def load_reference(spec: str | Path | None, num_classes: int, rule: str = "official") -> Reference | None:
    """``"alexnet"``, ``"none"``, ``"auto"`` (AlexNet for 1000-class models, else none) or a run dir / eval.json."""
    if spec is None or str(spec) == "auto":
        spec = "alexnet" if num_classes == 1000 else "none"
    if str(spec) == "none":
        return None
    if str(spec) == "alexnet":
        return Reference("alexnet", ALEXNET_ERRORS, ALEXNET_CLEAN_ERROR)
    path = Path(spec)
    path = path / "eval.json" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"reference {spec!r} is neither 'alexnet', 'none', 'auto' nor a run with eval.json")
    data = json.loads(path.read_text())
    corr = data.get("corruptions") or {}
    table = corr.get(rule) or corr.get("official")
    if not table:
        raise ValueError(f"reference {path} has no corruption results; run `tokenlab eval` on it with --corruptions")
    errors = {c: {int(s): 1 - a for s, a in sev.items()} for c, sev in table["accuracy"].items()}
    clean = (data.get("clean") or {}).get(rule) or (data.get("clean") or {}).get("official")
    name = data.get("name") or path.parent.name
    return Reference(name, errors, 1 - clean["top1"] if clean else None)


def evaluate_corruptions(
    model: nn.Module,
    tree: str | Path,
    class_to_idx: Mapping[str, int],
    meta: Mapping[str, Any],
    clean_accuracy: Mapping[str, float],
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    reference: Reference | None = None,
    rules: Sequence[str] = ("official",),
    device: str | torch.device = "cpu",
    amp: str | None = None,
    batch_size: int = 128,
    workers: int | None = None,
) -> CorruptionResult:
    """Accuracy on every cell of ``tree/corruption/severity/class/img`` and the derived robustness scores.

    Args:
        model: The classifier.
        tree: ImageNet-C style root.
        class_to_idx: Folder -> model class index.
        meta: Exported-model metadata (``img_size``, ``mean``, ``std``, ``crop_pct``).
        clean_accuracy: ``{rule: clean top-1}`` for retention and relative mCE.
        corruptions, severities: Restrict the cells (default: all present).
        reference: mCE reference (None: no mCE).
        rules, device, amp, batch_size, workers: As in :func:`tokenlab.eval.classify.evaluate_classifier`.
    """
    cells = read_corruption_tree(tree, corruptions, severities)
    size = int(meta.get("img_size", 224))
    tf = eval_transform(size, meta.get("mean", (0.485, 0.456, 0.406)), meta.get("std", (0.229, 0.224, 0.225)),
                        float(meta.get("crop_pct", 1.0)))  # fmt: skip
    keys = [(c, s) for c, sev in cells.items() for s in sev]
    parts = [_Grouped(ImageTreeDataset(cells[c][s], class_to_idx, tf, size), g) for g, (c, s) in enumerate(keys)]
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    loader = DataLoader(ConcatDataset(parts), batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=torch.cuda.is_available())  # fmt: skip
    pred = predict(model, loader, device, amp, rules)
    assert pred.groups is not None
    skipped: dict[str, int] = {}
    for g in pred.skipped_groups:
        k = f"{keys[g][0]}/{keys[g][1]}"
        skipped[k] = skipped.get(k, 0) + 1
    if skipped:
        logger.warning("unreadable images skipped in corruption cells: %s", skipped)
    scores = {}
    for rule in rules:
        correct = (pred.logits[rule].argmax(1) == pred.targets).float()
        acc: dict[str, dict[int, float]] = {}
        for g, (c, s) in enumerate(keys):
            sel = pred.groups == g
            if sel.any():
                acc.setdefault(c, {})[s] = correct[sel].mean().item()
            else:
                logger.warning("corruption cell %s/%s has no readable image; left out", c, s)
        scores[rule] = corruption_scores(
            acc,
            clean_accuracy[rule],
            reference.table if reference else None,
            reference.clean_error if reference else None,
            reference.name if reference else None,
        )
    return CorruptionResult(scores, skipped, len(pred.targets), str(tree), pred.seconds)


@dataclass
class EvalResult:
    """Everything :func:`evaluate_run` measured; ``to_dict()`` is the ``eval.json`` schema."""

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "model": self.model, "checkpoint": self.checkpoint, "data": self.data,
            "classes": self.classes, "rules": self.rules, "device": self.device, "amp": self.amp,
            "seconds": self.seconds,
            "clean": {r: v.to_dict() for r, v in self.clean.items()},
            "corruptions": self.corruptions.to_dict() if self.corruptions else None,
            "ood": self.ood,
        }  # fmt: skip

    def save(self, path: str | Path) -> Path:
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


def evaluate_run(
    checkpoint: str | Path,
    data: str | Path | DataSpec,
    out: str | Path | None = None,
    rules: Sequence[str] | None = None,
    corruptions: str | Sequence[str] | None = None,
    severities: str | Sequence[int] | None = None,
    corruption_tree: str | Path | None = None,
    cache_dir: str | Path | None = None,
    work_size: int | None = None,
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
        data: Data spec (see :func:`resolve_data`).
        out: Where ``eval.json`` goes (default: ``RUN/eval.json`` for a run dir, else next to the model).
        rules: Prediction rules; default ``official`` and, for token models, ``cls`` as well.
        corruptions: Names/groups to generate and evaluate (None and no ``corruption_tree``: skip corruptions).
        severities: ``"1-5"`` by default.
        corruption_tree: Read this ImageNet-C style tree instead of generating one.
        cache_dir: Corruption cache (default :func:`default_cache_dir`).
        work_size: Corrupt at this size (see :func:`tokenlab.eval.corruptions.corrupt_image`).
        corruption_seed: Base seed of the corruptions.
        reference: mCE reference: ``auto``, ``alexnet``, ``none`` or a run dir / ``eval.json``.
        ood: ``"auto"`` (synthetic rendition/shortcut splits when present), and/or ``NAME=DIR[@MAPPING]`` strings
            where MAPPING is a mapping file or ``imagenet-a`` / ``imagenet-r``.
        device, amp, batch_size, workers: Inference settings.
        progress: tqdm bar while generating corruptions.
    """
    from tokenlab.models import load_exported

    t0 = time.perf_counter()
    if corruptions is not None:  # fail on a typo before any inference
        corruptions = resolve_corruptions(corruptions)
    if severities is not None:
        severities = resolve_severities(severities)
    ckpt = Path(checkpoint)
    model, meta = load_exported(ckpt, device=device)
    spec = data if isinstance(data, DataSpec) else resolve_data(data)
    folders = list_class_dirs(spec.root)
    if not folders:
        raise ValueError(f"{spec.root} has no class sub-directories; expected {spec.root}/<class>/<image>")
    classes = _match_classes(meta, folders, spec.root)
    class_to_idx = {c: i for i, c in enumerate(classes)}
    token_model = bool(getattr(model, "has_aux_head", False))
    rules = list(rules) if rules else (["official", "cls"] if token_model else ["official"])
    if "cls" in rules and not hasattr(model, "forward_tokens"):
        raise ValueError(f"rule 'cls' needs a token model; {meta.get('model')} has no forward_tokens")
    bad = [r for r in rules if r not in RULES]
    if bad:
        raise ValueError(f"unknown rule(s) {bad}; valid: {', '.join(RULES)}")

    ood_sets = [(o, *resolve_ood_classes(o.root, classes, o.mapping)) for o in _ood_specs(spec, ood)]
    ref = None
    if corruptions is not None or corruption_tree is not None:
        ref = load_reference(reference, len(classes))
    logger.info("clean evaluation of %s on %s", meta.get("model"), spec.root)
    loader = build_loader(spec.root, class_to_idx, meta, batch_size, workers)
    pred = predict(model, loader, device, amp, rules)
    clean = score_predictions(pred.logits, pred.targets, pred.skipped, pred.seconds)
    name = ckpt.name if ckpt.is_dir() else ckpt.parent.name
    result = EvalResult(name, str(meta.get("model")), str(ckpt), str(spec.root), classes, rules, clean,
                        device=device, amp=amp)  # fmt: skip

    if corruptions is not None or corruption_tree is not None:
        if corruption_tree is None:
            cache = generate_corruptions(spec.root, cache_dir or default_cache_dir(), corruptions, severities,
                                         seed=corruption_seed, work_size=work_size, progress=progress)  # fmt: skip
            tree, corruptions, severities = cache.root, cache.corruptions, cache.severities
        else:
            tree = Path(corruption_tree)
        result.corruptions = evaluate_corruptions(
            model, tree, class_to_idx, meta, {r: c.top1 for r, c in clean.items()}, corruptions, severities, ref,
            rules, device, amp, batch_size, workers,
        )  # fmt: skip

    for o, c2i, subset in ood_sets:
        logger.info("OOD set %s: %s (%d of %d classes)", o.name, o.root, len(subset), len(classes))
        res = score_predictions(
            *_pred_tuple(predict(model, build_loader(o.root, c2i, meta, batch_size, workers), device, amp, rules)),
            subset=subset if len(subset) < len(classes) else None,
        )
        result.ood[o.name] = {"root": str(o.root), "subset": subset, **{r: v.to_dict() for r, v in res.items()}}

    result.seconds = time.perf_counter() - t0
    target = Path(out) if out else (ckpt / "eval.json" if ckpt.is_dir() else ckpt.parent / "eval.json")
    result.save(target)
    logger.info("wrote %s", target)
    return result


def _pred_tuple(p: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor, int, float]:
    return p.logits, p.targets, p.skipped, p.seconds
