"""Batched classification evaluation: clean accuracy, NLL, calibration, and OOD sets on a class subset.

- Prediction rules for STL token models (REFERENCE §1): ``"official"`` is ``model(x)``, i.e.
  ``cls_logits + 0.5 * max_over_tokens(aux_logits)``; ``"cls"`` (ablation) is ``model.forward_tokens(x).cls_logits``.
- OOD sets whose classes are a subset or a renaming of the training classes: the logits are restricted to the
  covered classes before the argmax, ``y_hat = subset[argmax_j z_{subset[j]}]`` (as for ImageNet-A/R, whose 200-class
  index lists ship with timm in ``timm/data/_info/``). A mapping file renames folders to training classes.
- Metrics (see :mod:`tokenlab.eval.metrics`): top-1/top-5, NLL, ECE with a reliability diagram.

Inference runs under ``torch.inference_mode`` with optional autocast (bf16 / fp16); unreadable images are skipped
and counted, never silently dropped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader

from tokenlab.eval.folders import ImageTreeDataset, eval_transform, list_class_dirs
from tokenlab.eval.metrics import Reliability, expected_calibration_error, nll, topk_accuracy

logger = logging.getLogger(__name__)

__all__ = [
    "RULES",
    "ClassifyResult",
    "autocast_context",
    "build_loader",
    "evaluate_classifier",
    "imagenet_subset",
    "OODSpec",
    "imagenet_synsets",
    "load_class_mapping",
    "Predictions",
    "predict",
    "score_predictions",
    "resolve_ood_classes",
    "restrict_logits",
]

RULES = ("official", "cls")
_AMP = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ClassifyResult:
    """Result of one classification evaluation.

    Attributes:
        n: Images evaluated.
        skipped: Unreadable images skipped.
        top1, top5: Accuracies in [0, 1].
        nll: Mean negative log-likelihood.
        ece: Expected calibration error.
        reliability: The reliability diagram behind ``ece``.
        rule: Prediction rule (``"official"`` or ``"cls"``).
        num_classes: Classes competing in the argmax (the subset size for OOD sets).
        seconds: Wall time of inference; ``images_per_s = n / seconds``.
    """

    n: int
    skipped: int
    top1: float
    top5: float
    nll: float
    ece: float
    reliability: Reliability
    rule: str
    num_classes: int
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n, "skipped": self.skipped, "top1": self.top1, "top5": self.top5, "nll": self.nll,
            "ece": self.ece, "rule": self.rule, "num_classes": self.num_classes, "seconds": self.seconds,
            "images_per_s": self.images_per_s, "reliability": self.reliability.to_dict(),
        }  # fmt: skip


def autocast_context(device: torch.device, amp: str | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``amp`` in ``{"bf16", "fp16"}``, a no-op for None/"none"."""
    key = amp or "none"
    if key not in _AMP:
        raise ValueError(f"unknown autocast dtype {amp!r}; valid: {', '.join(_AMP)}")
    dtype = _AMP[key]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rule_logits(model: nn.Module, x: torch.Tensor, rule: str) -> torch.Tensor:
    if rule == "official":
        return model(x)
    elif rule == "cls":
        if not hasattr(model, "forward_tokens"):
            raise ValueError(f"rule 'cls' needs a model with forward_tokens; {type(model).__name__} has none")
        return model.forward_tokens(x).cls_logits
    else:
        raise ValueError(f"unknown prediction rule {rule!r}; valid: {', '.join(RULES)}")


@dataclass
class Predictions:
    """Logits collected by :func:`predict`.

    Attributes:
        logits: ``{rule: (n, K) float32 logits}``.
        targets: (n,) labels.
        groups: (n,) value of the batch key ``"group"`` (e.g. a corruption cell id), or None without it.
        skipped: Unreadable images skipped, in total.
        skipped_groups: The ``"group"`` value of every skipped image.
        seconds: Wall time.
    """

    logits: dict[str, torch.Tensor]
    targets: torch.Tensor
    groups: torch.Tensor | None
    skipped: int
    skipped_groups: list[int]
    seconds: float


def predict(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    amp: str | None = None,
    rules: Sequence[str] = ("official",),
) -> Predictions:
    """Run ``model`` over ``loader`` once (``inference_mode`` + optional autocast) and collect logits per rule.

    Batches carrying ``"valid"`` drop their invalid rows (counted in ``skipped``).
    """
    unknown = [r for r in rules if r not in RULES]
    if unknown:
        raise ValueError(f"unknown prediction rule(s) {unknown}; valid: {', '.join(RULES)}")
    device = torch.device(device)
    model.eval().to(device)
    outs: dict[str, list[torch.Tensor]] = {r: [] for r in rules}
    targets, groups, skipped_groups, skipped = [], [], [], 0
    both = set(rules) == {"official", "cls"} and hasattr(model, "forward_tokens")
    t0 = time.perf_counter()
    with torch.inference_mode(), autocast_context(device, amp):
        for batch in loader:
            x, y, g = batch["image"], batch["label"], batch.get("group")
            if "valid" in batch:
                keep = batch["valid"].bool()
                skipped += int((~keep).sum())
                if g is not None:
                    skipped_groups.extend(g[~keep].tolist())
                x, y, g = x[keep], y[keep], (g[keep] if g is not None else None)
            if x.shape[0] == 0:
                continue
            x = x.to(device, non_blocking=True)
            if both:
                tok = model.forward_tokens(x)  # one forward pass serves both rules
                outs["official"].append(tok.combined().float().cpu())
                outs["cls"].append(tok.cls_logits.float().cpu())
            else:
                for r in rules:
                    outs[r].append(_rule_logits(model, x, r).float().cpu())
            targets.append(y.cpu())
            if g is not None:
                groups.append(g.cpu())
    if not targets:
        raise ValueError(f"no readable image in the data set ({skipped} unreadable)")
    return Predictions(
        logits={r: torch.cat(v) for r, v in outs.items()},
        targets=torch.cat(targets),
        groups=torch.cat(groups) if groups else None,
        skipped=skipped,
        skipped_groups=skipped_groups,
        seconds=time.perf_counter() - t0,
    )


def restrict_logits(logits: torch.Tensor, subset: Sequence[int]) -> torch.Tensor:
    """Keep the columns ``subset`` of ``(n, K)`` logits: ``(n, K) -> (n, len(subset))``.

    A target ``t`` in the full label space becomes ``subset.index(t)``; the argmax ``j`` of the restricted logits
    means the full class ``subset[j]``.
    """
    if len(subset) == 0:
        raise ValueError("empty class subset")
    bad = [i for i in subset if i < 0 or i >= logits.shape[1]]
    if bad:
        raise ValueError(f"subset indices {bad[:10]} out of range for {logits.shape[1]} classes")
    return logits[:, torch.as_tensor(list(subset), dtype=torch.long)]


def _scores(logits: torch.Tensor, targets: torch.Tensor, rule: str, skipped: int, seconds: float,
            n_bins: int) -> ClassifyResult:  # fmt: skip
    acc = topk_accuracy(logits, targets, (1, 5))
    rel = expected_calibration_error(logits, targets, n_bins)
    return ClassifyResult(
        n=len(targets), skipped=skipped, top1=acc[1], top5=acc[5], nll=nll(logits, targets), ece=rel.ece,
        reliability=rel, rule=rule, num_classes=logits.shape[1], seconds=seconds,
    )  # fmt: skip


def evaluate_classifier(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    device: str | torch.device = "cpu",
    amp: str | None = None,
    rules: Sequence[str] = ("official",),
    subset: Sequence[int] | None = None,
    n_bins: int = 15,
) -> dict[str, ClassifyResult]:
    """Evaluate ``model`` on ``loader`` for each prediction rule.

    Args:
        model: A classifier; token models also support the ``"cls"`` rule.
        loader: Yields ``{"image", "label"[, "valid"]}`` batches; labels index the model's classes.
        device, amp: Where and with which autocast dtype to run.
        rules: Subset of :data:`RULES`.
        subset: Restrict the logits to these model classes before every metric (OOD sets).
        n_bins: Bins of the reliability diagram.

    Returns:
        ``{rule: ClassifyResult}``.
    """
    pred = predict(model, loader, device, amp, rules)
    return score_predictions(pred.logits, pred.targets, pred.skipped, pred.seconds, subset, n_bins)


def score_predictions(
    logits: Mapping[str, torch.Tensor],
    targets: torch.Tensor,
    skipped: int = 0,
    seconds: float = 0.0,
    subset: Sequence[int] | None = None,
    n_bins: int = 15,
) -> dict[str, ClassifyResult]:
    """Metrics of collected logits per rule, restricted to ``subset`` first when given."""
    if subset is not None:
        pos = {c: j for j, c in enumerate(subset)}
        missing = sorted({int(t) for t in targets.tolist()} - set(pos))
        if missing:
            raise ValueError(f"targets {missing[:10]} are not in the class subset")
        targets = torch.tensor([pos[int(t)] for t in targets.tolist()], dtype=torch.long)
        logits = {r: restrict_logits(v, subset) for r, v in logits.items()}
    return {r: _scores(v, targets, r, skipped, seconds, n_bins) for r, v in logits.items()}


# ---- data: loaders, class subsets and mapping files ------------------------------------------------------------
def build_loader(
    root: str | Path,
    class_to_idx: Mapping[str, int],
    meta: Mapping[str, Any],
    batch_size: int = 128,
    workers: int | None = None,
) -> DataLoader:
    """A loader over the tree ``root/<class>/<image>`` with the exported model's preprocessing (``meta``)."""
    size = int(meta.get("img_size", 224))
    tf = eval_transform(size, meta.get("mean", (0.485, 0.456, 0.406)), meta.get("std", (0.229, 0.224, 0.225)),
                        float(meta.get("crop_pct", 1.0)))  # fmt: skip
    ds = ImageTreeDataset(root, class_to_idx, tf, size)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())  # fmt: skip


def _info_file(name: str) -> Path:
    import timm.data

    path = Path(timm.data.__file__).parent / "_info" / name
    if not path.is_file():
        raise FileNotFoundError(f"timm ships no {name} (looked in {path.parent})")
    return path


def imagenet_subset(name: str) -> tuple[list[str], list[int]]:
    """``(synsets, indices)`` of the ImageNet-A or -R 200-class subset from timm's index lists.

    Args:
        name: ``"imagenet-a"`` or ``"imagenet-r"``.
    """
    key = {"imagenet-a": "a", "imagenet-r": "r", "imagenet_a": "a", "imagenet_r": "r"}.get(name.lower())
    if key is None:
        raise ValueError(f"unknown ImageNet subset {name!r}; valid: imagenet-a, imagenet-r")
    synsets = _info_file(f"imagenet_{key}_synsets.txt").read_text().split()
    indices = [int(v) for v in _info_file(f"imagenet_{key}_indices.txt").read_text().split()]
    return synsets, indices


def imagenet_synsets() -> list[str]:
    """The 1000 ImageNet-1k synsets in class-index order (timm's list)."""
    return _info_file("imagenet_synsets.txt").read_text().split()


def load_class_mapping(path: str | Path) -> dict[str, str]:
    """Read a folder -> training class mapping: JSON ``{"folder": "class"}`` or text lines ``folder class``.

    Text lines may separate the two names with a tab, a comma or spaces; ``#`` starts a comment.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"class mapping file not found: {path}")
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"{path}: expected a JSON object {{folder: training class}}")
        return {str(k): v for k, v in data.items()}
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p for p in line.replace(",", " ").replace("\t", " ").split(" ") if p]
        if len(parts) != 2:
            raise ValueError(f"{path}:{n}: expected 'folder class', got {line!r}")
        out[parts[0]] = parts[1]
    if not out:
        raise ValueError(f"class mapping file {path} is empty")
    return out


def resolve_ood_classes(
    root: str | Path, model_classes: Sequence[str], mapping: Mapping[str, str] | str | Path | None = None
) -> tuple[dict[str, int], list[int]]:
    """Map the class folders of an OOD set to model class indices.

    Args:
        root: The OOD tree ``root/<class>/<image>``.
        model_classes: The model's training classes, in index order.
        mapping: None (folders are training class names), a mapping ``{folder: training class}`` / mapping file,
            or ``"imagenet-a"`` / ``"imagenet-r"`` (folders are WordNet synsets; the model must have the 1000
            ImageNet classes, by synset or in timm's order).

    Returns:
        ``(folder -> model index, subset)`` with ``subset`` the sorted model indices covered by the set.

    Raises:
        KeyError: a folder or mapping target that is not a training class (valid names listed).
    """
    folders = list_class_dirs(root)
    if not folders:
        raise ValueError(f"{root} has no class sub-directories; expected the layout {root}/<class>/<image>")
    if isinstance(mapping, str) and mapping.lower().replace("_", "-") in ("imagenet-a", "imagenet-r"):
        synsets, indices = imagenet_subset(mapping)
        if len(model_classes) != 1000:
            raise ValueError(f"{mapping} needs a 1000-class ImageNet model, this one has {len(model_classes)} classes")
        order = list(model_classes) if set(synsets) <= set(model_classes) else imagenet_synsets()
        table = {s: s for s in synsets}
        model_classes = order
        mapping_dict: Mapping[str, str] = table
        allowed = set(indices)
    else:
        mapping_dict = load_class_mapping(mapping) if isinstance(mapping, (str, Path)) else dict(mapping or {})
        allowed = None
    index = {c: i for i, c in enumerate(model_classes)}
    unknown_targets = sorted({t for t in mapping_dict.values() if t not in index})
    if unknown_targets:
        raise KeyError(
            f"mapping names unknown classes {unknown_targets[:10]}; valid training classes: "
            f"{list(model_classes)[:30]}{' ...' if len(model_classes) > 30 else ''}"
        )
    class_to_idx, unknown = {}, []
    for f in folders:
        target = mapping_dict.get(f, f)
        if target not in index:
            unknown.append(f)
        else:
            class_to_idx[f] = index[target]
    if unknown:
        raise KeyError(
            f"OOD folders {unknown[:10]} of {root} are neither training classes nor in the mapping; training classes: "
            f"{list(model_classes)[:30]}{' ...' if len(model_classes) > 30 else ''}"
        )
    subset = sorted(set(class_to_idx.values()))
    if allowed is not None and not set(subset) <= allowed:
        outside = [f for f, i in class_to_idx.items() if i not in allowed]
        raise KeyError(f"folders {outside[:10]} are outside the {mapping} 200-class subset")
    return class_to_idx, subset


@dataclass
class OODSpec:
    """One OOD set: a name, its tree, and how its folders map to training classes."""

    name: str
    root: Path
    mapping: str | Path | dict[str, str] | None = None
