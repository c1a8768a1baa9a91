"""Which model classes an evaluation set covers: ImageNet-A/R subsets, mapping files, OOD set specs.

An OOD set's class folders may be a subset or a renaming of the training classes. ``resolve_ood_classes`` maps
each folder to a model class index and returns the covered subset, which the scorer restricts the logits to
(``tokenlab.eval.classify.restrict_logits``). ImageNet-A/R's 200-class index lists ship with timm in
``timm/data/_info/``; a mapping file (JSON or ``folder class`` lines) renames folders to training classes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenlab.data.images import list_class_dirs

logger = logging.getLogger(__name__)

__all__ = [
    "OODSpec",
    "imagenet_subset",
    "imagenet_synsets",
    "load_class_mapping",
    "match_model_classes",
    "resolve_ood_classes",
]


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


def match_model_classes(meta: Mapping[str, Any], folders: list[str], root: Path) -> list[str]:
    """The model's class names (``meta["classes"]``) checked against a data set's class folders.

    Without names in the export, the sorted folder names are assumed (when their number matches).

    Raises:
        ValueError: the names (or their number) differ, listing what is only on one side.
    """
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
