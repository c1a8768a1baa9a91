"""Data-spec strings, parsed in one place: what ``--data`` / ``data.name`` may name and where its images are.

A spec is one of:

- ``cifar10``: the archive ``../shared/data/cifar10.tar.gz`` (or ``$TOKENLAB_CIFAR10``), extracted once to
  ``~/.cache/tokenlab`` (or ``$TOKENLAB_CACHE``); CIFAR has ``train`` and ``test`` (``val`` reads ``test``);
- a set of splits: a directory with ``dataset.json`` (the synthetic set, or a set written by ``tokenlab data``):
  ``DIR/<split>/<class>/<image>``, masks in ``DIR/<split>_masks``, classes from ``dataset.json``;
- a CSV/TSV list file (``path,label`` rows), or a directory holding ``<split>.csv`` / ``<split>.tsv``;
- an image-folder root: ``DIR/<split>/<class>/<image>``, or with no split the class-folder tree ``DIR`` itself.

``DIR:split`` names the split in the string (an explicit ``split`` argument wins). Training defaults to ``train``,
evaluation to ``val`` then ``test``: the caller passes its defaults to ``DataSpec.resolve``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenlab.data.images import is_image_file, list_class_dirs
from tokenlab.data.synthetic import FORMAT as SYNTHETIC_FORMAT

logger = logging.getLogger(__name__)

__all__ = [
    "CIFAR10_CLASSES",
    "LIST_SUFFIXES",
    "SPEC_KINDS",
    "SPLIT_NAMES",
    "EVAL_SPLITS",
    "DataSpec",
    "cache_dir",
    "cifar10_archive",
    "ensure_cifar10",
    "parse_data_spec",
]

SPEC_KINDS = ("cifar10", "splits", "list", "folder")
LIST_SUFFIXES = (".csv", ".tsv", ".txt")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
EVAL_SPLITS = ("val", "test")
#: Folder names taken for splits (not classes) when they hold folders only: ``ROOT`` is then a split-folder root.
SPLIT_NAMES = ("train", "val", "valid", "validation", "test")


def _holds_folders_only(path: Path) -> bool:
    """A directory with at least one sub-folder and no image file at its top (the shape of a split folder)."""
    entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    return any(e.is_dir() for e in entries) and not any(e.is_file() and is_image_file(e.name) for e in entries)


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    Attributes:
        kind: One of ``SPEC_KINDS``: ``cifar10``, ``splits`` (a directory with ``dataset.json``), ``list`` (a list
            file) or ``folder`` (an image-folder root, or a directory of ``<split>.csv`` lists).
        path: The data set directory (for ``cifar10`` the extracted archive) or the list file.
        split: The split, None when none was named (see ``resolve``).
        meta: The ``dataset.json`` of a ``splits`` set, else None.
    """

    kind: str
    path: Path
    split: str | None = None
    meta: dict[str, Any] | None = None

    @property
    def synthetic(self) -> bool:
        """A set written by the synthetic generator (``dataset.json`` with its format tag)."""
        return (self.meta or {}).get("format") == SYNTHETIC_FORMAT

    @property
    def classes(self) -> list[str] | None:
        """The class list the set declares (CIFAR-10, ``dataset.json``), else None (then the folders decide)."""
        if self.kind == "cifar10":
            return list(CIFAR10_CLASSES)
        return list(self.meta["classes"]) if self.meta and self.meta.get("classes") else None

    @property
    def splits(self) -> list[str]:
        """The split names present (``dataset.json``'s list, else the sub-folders that are not mask folders)."""
        if self.kind == "list":
            return []
        if self.meta and self.meta.get("splits"):
            return sorted(self.meta["splits"])
        return [d for d in list_class_dirs(self.path) if not d.endswith("_masks")]

    def resolve(self, defaults: Sequence[str] = ("train",)) -> DataSpec:
        """This spec with its split settled and checked.

        With no split named, ``cifar10`` and ``splits`` sets take the first of ``defaults`` they have (a folder
        keeps None: the folder itself is the tree). ``val`` falls back to ``test`` where there is no ``val``.

        Raises:
            ValueError: the split does not exist (naming the valid ones).
        """
        split = self.split
        if self.kind == "list":
            return self
        if self.kind == "splits":
            available = self.splits
            if split is None:
                split = next((s for s in defaults if s in available), None)
                if split is None:
                    raise ValueError(f"{self.path} has no {' or '.join(map(repr, defaults))} split; name one of "
                                     f"{available} as {self.path}:<split>")  # fmt: skip
            if split not in available:
                raise ValueError(f"split {split!r} not in synthetic set {self.path}; valid: {', '.join(available)}")
            return replace(self, split=split)
        if self.kind == "cifar10" and split is None:
            split = defaults[0] if defaults else "train"
        if split is None:
            self._refuse_split_root(defaults)
        if split is None or self.list_file(split) is not None:
            return replace(self, split=split)
        if not (self.path / split).is_dir():
            if split == "val" and (self.path / "test").is_dir():
                logger.info("no split 'val' in %s; using 'test'", self.path)
                return replace(self, split="test")
            raise ValueError(f"split {split!r} not found in {self.path}; available: {self.splits} "
                             f"(split=None reads {self.path} itself)")  # fmt: skip
        return replace(self, split=split)

    def _refuse_split_root(self, defaults: Sequence[str]) -> None:
        """A folder read as a class tree must not be a split-folder root (``ROOT/train/<class>/...``).

        Its split folders would otherwise become the classes; the message names the ``ROOT:<split>`` to use.
        """
        splits = [d for d in list_class_dirs(self.path) if d.lower() in SPLIT_NAMES]
        if not splits or not all(_holds_folders_only(self.path / d) for d in splits):
            return
        suggest = next((s for s in defaults if s in splits), splits[0])
        raise ValueError(f"{self.path} holds the splits {splits}, not class folders; name the split: "
                         f"{self.path}:{suggest}")  # fmt: skip

    def list_file(self, split: str | None = None) -> Path | None:
        """The list file of this spec: the file itself, or ``DIR/<split>.csv|.tsv`` when it exists."""
        if self.kind == "list":
            return self.path
        split = self.split if split is None else split
        if self.kind == "folder" and split is not None:
            for suffix in (".csv", ".tsv"):
                if (self.path / f"{split}{suffix}").is_file():
                    return self.path / f"{split}{suffix}"
        return None

    @property
    def root(self) -> Path:
        """The class-folder tree ``root/<class>/<image>`` of the (resolved) split.

        Raises:
            ValueError: a list file has no tree.
        """
        if self.list_file() is not None:
            raise ValueError(f"{self.path} is a list file ({self.list_file()}); this needs an image-folder tree")
        return self.path if self.split is None else self.path / self.split

    @property
    def dataset_dir(self) -> Path | None:
        """The directory holding the splits (masks, OOD splits live next to the split), None for a bare tree."""
        return None if self.split is None or self.kind == "list" else self.path

    @property
    def masks(self) -> Path | None:
        """``<dataset_dir>/<split>_masks`` when it exists."""
        if self.dataset_dir is None:
            return None
        m = self.dataset_dir / f"{self.split}_masks"
        return m if m.is_dir() else None


def parse_data_spec(spec: str | Path | DataSpec, split: str | None = None) -> DataSpec:
    """Parse a data spec (see the module docstring); ``cifar10`` is extracted on first use.

    Args:
        spec: The spec string (``DIR``, ``DIR:split``, ``cifar10``, ``LIST.csv``) or an already parsed spec.
        split: The split; wins over a ``:split`` suffix. None leaves it to ``DataSpec.resolve``.

    Raises:
        FileNotFoundError: nothing at the path.
        ValueError: a file that is not a list file.
    """
    if isinstance(spec, DataSpec):
        return spec if split is None else replace(spec, split=split)
    text = str(spec)
    if ":" in text and not Path(text).expanduser().exists():
        text, suffix = text.rsplit(":", 1)
        split = split if split is not None else suffix
    if text == "cifar10" and not Path(text).exists():
        return DataSpec("cifar10", ensure_cifar10(), split)
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"data set {text!r} not found (data directory not found: {path}); give a synthetic set or image-folder "
            f"directory, a .csv/.tsv list, or 'cifar10'"
        )
    if path.is_file():
        if path.suffix.lower() not in LIST_SUFFIXES:
            raise ValueError(f"{path} is not a list file; expected one of {list(LIST_SUFFIXES)}")
        return DataSpec("list", path, split)
    meta_file = path / "dataset.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if isinstance(meta, dict):
            return DataSpec("splits", path, split, meta)
    return DataSpec("folder", path, split)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR-10


def cache_dir() -> Path:
    """``$TOKENLAB_CACHE`` or ``~/.cache/tokenlab``."""
    return Path(os.environ.get("TOKENLAB_CACHE", Path.home() / ".cache" / "tokenlab"))


def cifar10_archive() -> Path:
    """Locate ``cifar10.tar.gz``: ``$TOKENLAB_CIFAR10``, else ``../shared/data`` from the cwd or the project root."""
    env = os.environ.get("TOKENLAB_CIFAR10")
    if env:
        if not Path(env).is_file():
            raise FileNotFoundError(f"TOKENLAB_CIFAR10={env} is not a file")
        return Path(env)
    project = Path(__file__).resolve().parents[3]
    candidates = [Path.cwd() / "../shared/data/cifar10.tar.gz", project / "../shared/data/cifar10.tar.gz"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise FileNotFoundError(
        f"cifar10.tar.gz not found in {[str(c) for c in candidates]}; set TOKENLAB_CIFAR10 to the archive"
    )


def ensure_cifar10(cache: Path | None = None) -> Path:
    """Extract the CIFAR-10 archive once to ``<cache>/cifar10`` and return that directory."""
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / "cifar10"
    if (target / ".complete").exists():
        return target
    archive = cifar10_archive()
    cache.mkdir(parents=True, exist_ok=True)
    staging = cache / f".cifar10-extract-{os.getpid()}"
    logger.info("extracting %s to %s (once)", archive, target)
    with tarfile.open(archive) as tar:
        tar.extractall(staging, filter="data")
    # the archive holds one top folder (cifar10/) with train/ and test/
    roots = [p for p in staging.iterdir() if p.is_dir()]
    source = roots[0] if len(roots) == 1 and (roots[0] / "train").is_dir() else staging
    (source / ".complete").write_text(str(archive))
    try:
        source.rename(target)
    except OSError:
        if not (target / ".complete").exists():
            raise
        logger.info("another process extracted %s first", target)
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
    return target
