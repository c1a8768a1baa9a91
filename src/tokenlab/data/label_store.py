"""A memory-mapped store of cached token labels: each image's top-k labeler logits on the labeler's token grid.

STL's student runs the frozen labeler on a second view of every image at every step. A label store runs it once
(``tokenlab labels build``) and keeps, per image and per stored view, the ``k`` largest token logits (fp16) with
their class ids (uint16) and the log-sum-exp of the other classes (fp16, one value per token): with a 14x14 grid and
top-5 that is ``196 * (5 * 4 + 2)`` = 4312 bytes per image and view. View 0 is the full image, resized to the
labeler's input size without cropping; optional further views are the mirrored full image (``--flip-view``) and
random crops (with flips) of it, each stored with its ``theta`` (``tokenlab.data.transforms.view_affine``).
``StoredCrops`` turns those random crops back into crop boxes, so that a student can train on exactly the crops
the labeler saw (FKD-style [0]): then its cached labels are the labeler's opinion of its own crop, as online.

Layout of a store directory::

    manifest.json   format, labeler identity (model, export path, sha256 of the weights), data identity (spec,
                    split, number of images, sha256 of the ordered relative file list), img_size, k, grid, views,
                    num_classes, normalisation, and ``complete``
    files.txt       the relative image paths in sample order (row i = sample index i)
    values.f16      (N, V, G, k) float16   top-k logits, largest first
    indices.u16     (N, V, G, k) uint16    their class ids
    rest.f16        (N, V, G)    float16   log-sum-exp of the K - k other logits (-inf when K == k)
    theta.f32       (N, V, 2, 3) float32   each view's affine onto the source image
    done.u8         (N,)         uint8     progress record: 1 once a row is written and flushed

Rows are written in chunks, the data before their ``done`` flags, so an interrupted build is resumed where it
stopped; ``complete`` is set only when every row is done, and a store that is not complete is never read for
training. A store that does not fit its manifest (truncated files), another labeler, another data set or other
settings is a ``ValueError`` naming what differs, and nothing in it is overwritten.

Dense reconstruction (``dense_logits``): the stored top-k logits go back to their classes and each of the ``K - k``
missing classes gets ``rest - log(K - k)``, i.e. the missing classes share their true total softmax mass equally.
This keeps the labeler's full-softmax probabilities of the top-k classes and its argmax exactly (up to fp16), keeps
every missing class below the k-th, and stays finite, so bilinear sampling of the map never meets ``-inf``.
``crop_token_map`` cuts a dense map with a view's ``theta`` onto another token grid (bilinear ``grid_sample`` at the
token centres, border padding outside the source image).

- [0]: A Fast Knowledge Distillation Framework for Visual Recognition (FKD), 2022, https://arxiv.org/abs/2112.01528
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "FORMAT",
    "LabelStore",
    "compress_logits",
    "crop_token_map",
    "data_identity",
    "dense_logits",
    "select_views",
    "sha256_file",
    "StoredCrops",
    "crop_from_theta",
    "store_bytes_per_image",
]

FORMAT = "tokenlab-label-store/1"
MANIFEST = "manifest.json"
FILES = "files.txt"
#: array name -> (file, numpy dtype, shape after N given (views, tokens, k))
_ARRAYS: dict[str, tuple[str, Any]] = {
    "values": ("values.f16", np.float16),
    "indices": ("indices.u16", np.uint16),
    "rest": ("rest.f16", np.float16),
    "theta": ("theta.f32", np.float32),
    "done": ("done.u8", np.uint8),
}
#: manifest keys that must agree for a build to resume an existing store (labeler and data by identity only)
_SETTINGS = (
    "labeler",
    "data",
    "img_size",
    "k",
    "grid",
    "views",
    "num_classes",
    "mean",
    "std",
    "seed",
    "flip_view",
    "view_scale",
)
_IDENTITY = {"labeler": ("model", "sha256"), "data": ("num_images", "sha256")}


def _identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    out = {key: manifest.get(key) for key in _SETTINGS}
    for key, fields in _IDENTITY.items():
        out[key] = {f: (manifest.get(key) or {}).get(f) for f in fields}
    return out


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def data_identity(paths: Sequence[str | Path], labels: Sequence[int]) -> tuple[list[str], str]:
    """The relative file list of a data set (sample order; relative to the files' common folder) and its sha256.

    The hash covers each ``relative path<TAB>label`` line, so a reordered, relabelled or changed set differs.
    """
    full = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath(full) if len(full) > 1 else os.path.dirname(full[0]) if full else ""
    rel = [os.path.relpath(p, root) for p in full]
    h = hashlib.sha256()
    for r, y in zip(rel, labels, strict=True):
        h.update(f"{r}\t{int(y)}\n".encode())
    return rel, h.hexdigest()


def _shape(name: str, n: int, views: int, tokens: int, k: int) -> tuple[int, ...]:
    return {
        "values": (n, views, tokens, k),
        "indices": (n, views, tokens, k),
        "rest": (n, views, tokens),
        "theta": (n, views, 2, 3),
        "done": (n,),
    }[name]


def store_bytes_per_image(tokens: int, k: int, views: int = 1) -> int:
    """Bytes per image of a store with ``tokens`` tokens per view, top-``k`` and ``views`` views (arrays only)."""
    return sum(
        int(np.prod(_shape(name, 1, views, tokens, k))) * np.dtype(dtype).itemsize
        for name, (_, dtype) in _ARRAYS.items()
    )


def _differences(a: Mapping[str, Any], b: Mapping[str, Any], keys: Sequence[str], prefix: str = "") -> list[str]:
    out = []
    for key in keys:
        va, vb = a.get(key), b.get(key)
        if isinstance(va, Mapping) and isinstance(vb, Mapping):
            out += _differences(va, vb, sorted(set(va) | set(vb)), f"{prefix}{key}.")
        elif va != vb and not (isinstance(va, list | tuple) and isinstance(vb, list | tuple) and list(va) == list(vb)):
            out.append(f"{prefix}{key}: store {va!r}, now {vb!r}")
    return out


class LabelStore:
    """A label store directory: its manifest and its memory-mapped arrays (see the module docstring).

    ``LabelStore.open(dir)`` reads a finished store for training; ``LabelStore.create(dir, manifest)`` starts a
    build or resumes the one already there.
    """

    def __init__(self, root: Path, manifest: dict[str, Any], mode: Literal["r", "r+"]) -> None:
        self.root, self.manifest = root, manifest
        n, v, k = int(manifest["data"]["num_images"]), int(manifest["views"]), int(manifest["k"])
        gh, gw = manifest["grid"]
        self.num_images, self.num_views, self.k, self.grid = n, v, k, (int(gh), int(gw))
        self.num_classes = int(manifest["num_classes"])
        tokens = self.grid[0] * self.grid[1]
        self.arrays: dict[str, np.memmap] = {}
        for name, (file, dtype) in _ARRAYS.items():
            shape = _shape(name, n, v, tokens, k)
            path = root / file
            expected = int(np.prod(shape)) * np.dtype(dtype).itemsize
            if mode == "r+" or path.exists():
                size = path.stat().st_size if path.exists() else 0
                if size != expected:
                    raise ValueError(
                        f"label store {root} is truncated or damaged: {file} has {size} bytes, its manifest needs "
                        f"{expected}; build a new store with `tokenlab labels build --out NEW_DIR`"
                    )
            self.arrays[name] = np.memmap(path, dtype=dtype, mode=mode, shape=shape)

    # ---- opening ----------------------------------------------------------------------------------------------
    @staticmethod
    def _read_manifest(root: Path) -> dict[str, Any]:
        path = root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{root} is not a label store (no {MANIFEST}); build one with `tokenlab labels "
                                    f"build`")  # fmt: skip
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"label store manifest {path} is not valid JSON ({err}); rebuild the store") from None
        if manifest.get("format") != FORMAT:
            raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; rebuild the store")
        return manifest

    @classmethod
    def open(cls, root: str | Path) -> LabelStore:
        """A finished store, read-only.

        Raises:
            FileNotFoundError: no store at ``root``.
            ValueError: the build did not finish (resume it), or the files do not fit the manifest.
        """
        root = Path(root)
        manifest = cls._read_manifest(root)
        if not manifest.get("complete"):
            raise ValueError(
                f"label store {root} is half-written (its build stopped); run the same `tokenlab labels build` "
                f"command again to resume it"
            )
        return cls(root, manifest, "r")

    @classmethod
    def create(cls, root: str | Path, manifest: Mapping[str, Any], files: Sequence[str]) -> LabelStore:
        """Start a store at ``root``, or resume the one there when it was built with the same settings.

        Raises:
            ValueError: ``root`` holds another store (each differing setting named) or other files; nothing is
                overwritten.
        """
        root = Path(root)
        manifest = {"format": FORMAT, **manifest, "complete": False}
        if (root / MANIFEST).is_file():
            old = cls._read_manifest(root)
            diff = _differences(_identity(old), _identity(manifest), _SETTINGS)
            if diff:
                raise ValueError(f"{root} holds a label store built with other settings ({'; '.join(diff)}); "
                                 f"choose another --out (nothing was overwritten)")  # fmt: skip
            return cls(root, old, "r+")
        if root.exists() and any(root.iterdir()):
            raise ValueError(f"--out {root} exists and is not a label store; choose an empty or new directory")
        root.mkdir(parents=True, exist_ok=True)
        (root / FILES).write_text("".join(f"{f}\n" for f in files))
        n, v, k = int(manifest["data"]["num_images"]), int(manifest["views"]), int(manifest["k"])
        tokens = int(manifest["grid"][0]) * int(manifest["grid"][1])
        for name, (file, dtype) in _ARRAYS.items():
            np.memmap(root / file, dtype=dtype, mode="w+", shape=_shape(name, n, v, tokens, k)).flush()
        _write_json(root / MANIFEST, manifest)
        return cls(root, manifest, "r+")

    # ---- checks -----------------------------------------------------------------------------------------------
    def files(self) -> list[str]:
        """The stored relative file list (row order)."""
        return (self.root / FILES).read_text().splitlines()

    def check_data(self, paths: Sequence[str | Path], labels: Sequence[int]) -> None:
        """Raise a ``ValueError`` unless the data set is the one the store was built from (names what differs)."""
        rel, digest = data_identity(paths, labels)
        if digest == self.manifest["data"]["sha256"]:
            return
        stored = self.files()
        have = set(stored)
        missing = [r for r in rel if r not in have]
        if missing:
            raise ValueError(
                f"{len(missing)} training image(s) are missing from label store {self.root} (e.g. "
                f"{', '.join(missing[:5])}); build a store for this data set with `tokenlab labels build`"
            )
        what = (
            f"{len(rel)} images, store {len(stored)}"
            if len(rel) != len(stored)
            else "the same files in another order or with other labels"
        )
        raise ValueError(f"label store {self.root} was built from another data set "
                         f"({self.manifest['data'].get('spec')}): {what}; rebuild it for this one")  # fmt: skip

    def missing_rows(self) -> np.ndarray:
        """Row ids not yet written."""
        return np.flatnonzero(np.asarray(self.arrays["done"]) == 0)

    # ---- writing ----------------------------------------------------------------------------------------------
    def write_rows(
        self,
        rows: np.ndarray,
        values: torch.Tensor,
        indices: torch.Tensor,
        rest: torch.Tensor,
        theta: torch.Tensor,
    ) -> None:
        """Write rows ``(B, V, G, k)`` / ``(B, V, G)`` / ``(B, V, 2, 3)``, flush, then mark them done."""
        a = self.arrays
        a["values"][rows] = values.cpu().numpy().astype(np.float16)
        a["indices"][rows] = indices.cpu().numpy().astype(np.uint16)
        a["rest"][rows] = rest.cpu().numpy().astype(np.float16)
        a["theta"][rows] = theta.cpu().numpy().astype(np.float32)
        for name in ("values", "indices", "rest", "theta"):
            a[name].flush()
        a["done"][rows] = 1
        a["done"].flush()

    def finish(self) -> bool:
        """Mark the store complete when every row is done; returns whether it is."""
        if len(self.missing_rows()):
            return False
        self.manifest["complete"] = True
        _write_json(self.root / MANIFEST, self.manifest)
        return True

    # ---- reading ----------------------------------------------------------------------------------------------
    def read(self, rows: Sequence[int] | np.ndarray) -> dict[str, torch.Tensor]:
        """The stored ``values`` (B, V, G, k) fp16, ``indices`` (int64), ``rest`` (B, V, G) and ``theta`` of rows."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_images):
            raise ValueError(f"sample index {int(rows.max())} is outside label store {self.root} "
                             f"({self.num_images} images); was it built from another data set?")  # fmt: skip
        a = self.arrays
        return {
            "values": torch.from_numpy(np.ascontiguousarray(a["values"][rows])),
            "indices": torch.from_numpy(a["indices"][rows].astype(np.int64)),
            "rest": torch.from_numpy(np.ascontiguousarray(a["rest"][rows])),
            "theta": torch.from_numpy(np.ascontiguousarray(a["theta"][rows])),
        }

    def bytes_per_image(self) -> int:
        """Bytes of the arrays per image (manifest and file list left out)."""
        return store_bytes_per_image(self.grid[0] * self.grid[1], self.k, self.num_views)


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


# ---- logits <-> store ---------------------------------------------------------------------------------------
def compress_logits(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k ``values``, ``indices`` and the log-sum-exp ``rest`` of the other classes of logits ``(..., K)``."""
    logits = logits.float()
    K = logits.shape[-1]
    if not 0 < k <= K:
        raise ValueError(f"top-k must be in [1, {K}] (the number of classes), got {k}")
    values, indices = logits.topk(k, dim=-1)
    others = logits.scatter(-1, indices, float("-inf"))
    rest = torch.logsumexp(others, dim=-1) if K > k else torch.full(logits.shape[:-1], float("-inf"))
    return values, indices, rest


def dense_logits(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dense logits ``(..., K)`` from top-k ``values``/``indices`` ``(..., k)`` and ``rest`` ``(...)``.

    The ``K - k`` missing classes each get ``rest - log(K - k)``: they share their true total mass equally.
    """
    k = values.shape[-1]
    if num_classes > k:
        floor = rest.float() - math.log(num_classes - k)
    else:
        floor = torch.zeros_like(rest, dtype=torch.float32)
    dense = floor.unsqueeze(-1).expand(*floor.shape, num_classes).clone()
    return dense.scatter(-1, indices.long(), values.float())


def crop_token_map(dense: torch.Tensor, theta: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Cut token maps ``(B, K, h, w)`` with affines ``theta`` ``(B, 2, 3)`` onto a ``grid`` ``(H, W)``: ``(B, HW, K)``.

    Bilinear sampling at the centres of the ``H x W`` tokens (``align_corners=False``); points outside the map take
    the nearest border token.
    """
    B, K = dense.shape[:2]
    H, W = int(grid[0]), int(grid[1])
    coords = F.affine_grid(theta.to(dense.dtype), [B, K, H, W], align_corners=False)
    out = F.grid_sample(dense, coords, mode="bilinear", padding_mode="border", align_corners=False)
    return out.flatten(2).transpose(1, 2)  # (B, K, H, W) -> (B, HW, K)


def _as3(theta: torch.Tensor) -> torch.Tensor:
    bottom = torch.zeros(*theta.shape[:-2], 1, 3, dtype=theta.dtype, device=theta.device)
    bottom[..., 0, 2] = 1.0
    return torch.cat([theta, bottom], dim=-2)


def select_views(
    stored: torch.Tensor, student: torch.Tensor, source: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each sample, the stored view that best covers the student view, and the student's affine on it.

    Args:
        stored: ``(B, V, 2, 3)`` affines of the stored views onto the source image (view 0: the full image).
        student: ``(B, 2, 3)`` affines of the student views onto the source image.
        source: ``(B,)`` the stored view each student view was cut from (``StoredCrops``; -1: none), taken whether
            or not it holds the whole student view: a geometric op (rotate, shear, translate) on the stored crop
            reaches past it, where the labeler, run online, would see the op's fill; the crop's border tokens are
            the nearer stand-in than the full image resampled.

    Returns:
        ``(view id (B,), theta (B, 2, 3))``: among the stored views that contain the four corners of the student
        view, those with the student's orientation (not mirrored relative to it) first, then the one with the smallest
        area (the finest labels); ``theta`` maps the student view into it. Orientation comes first because labelers
        are not flip-equivariant: a mirrored stored view costs more label agreement than a coarser one
        (docs/results/cached_labels.md).
    """
    s3 = _as3(student.double()).unsqueeze(1)  # (B, 1, 3, 3)
    v3 = _as3(stored.double())  # (B, V, 3, 3)
    rel = torch.linalg.solve(v3, s3.expand_as(v3))  # stored-view coords of the student view: v^-1 s
    corners = torch.tensor([[-1.0, -1.0, 1.0], [1.0, -1.0, 1.0], [-1.0, 1.0, 1.0], [1.0, 1.0, 1.0]],
                           dtype=rel.dtype, device=rel.device).T  # fmt: skip
    mapped = rel @ corners  # (B, V, 3, 4)
    inside = (mapped[..., :2, :].abs() <= 1.0 + 1e-4).flatten(-2).all(dim=-1)  # (B, V)
    # the full view, mirrored or not, holds every point (a student point outside it is clamped to the border)
    eye = torch.eye(2, dtype=v3.dtype, device=v3.device)
    whole = ((v3[..., :2, :2].abs() - eye).abs().amax(dim=(-2, -1)) < 1e-6) & (v3[..., :2, 2].abs().amax(-1) < 1e-6)
    inside |= whole
    inside[:, 0] = True
    area = torch.linalg.det(v3[..., :2, :2]).abs()
    mirrored = torch.linalg.det(rel[..., :2, :2]) < 0  # (B, V): the student view is a mirror image of the stored one
    score = (area + mirrored.to(area.dtype) * 1e3).masked_fill(~inside, float("inf"))  # areas are <= 1
    view = score.argmin(dim=1)
    if source is not None:
        source = source.to(view.device)
        view = torch.where(source >= 0, source, view)
    theta = rel[torch.arange(rel.shape[0]), view, :2].to(student.dtype)
    return view, theta


# ---- the views a store is built from --------------------------------------------------------------------------
class StoreViews:
    """The labeler's inputs of one sample: the full image, its mirror (``flip_view``), random crops; each with theta.

    ``views`` counts them all. View 0 resizes the whole image to ``img_size x img_size`` (no crop, so its token map
    covers the source image exactly; a non-square image is squashed). The mirrored full view gives flipped student
    crops labels of a flipped image. Augmented views draw a random-resized crop (``scale``, aspect 3/4-4/3) and a
    flip from a generator seeded by ``(seed, index)``, so a resumed build stores the same views.

    Returns (per sample): ``views`` ``(V, 3, S, S)`` normalised, ``theta`` ``(V, 2, 3)``, ``index``.
    """

    def __init__(
        self,
        img_size: int,
        views: int = 1,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        scale: tuple[float, float] = (0.35, 1.0),
        seed: int = 0,
        flip_view: bool = False,
    ) -> None:
        if views < 1 + flip_view:
            raise ValueError(f"a label store holds at least the full view (and its mirror); got {views} views")
        self.img_size, self.views, self.scale, self.seed, self.flip_view = img_size, views, scale, seed, flip_view
        self.mean = torch.tensor(list(mean)).view(3, 1, 1)
        self.std = torch.tensor(list(std)).view(3, 1, 1)

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        from torchvision.transforms.v2 import functional as TF

        from tokenlab.data.transforms import sample_crop_box, view_affine

        image = sample["image"]
        height, width = (int(v) for v in image.shape[-2:])
        size = [self.img_size, self.img_size]
        boxes: list[dict[str, Any]] = [{"box": (0, 0, height, width), "flip": False, "geometric": []}]
        if self.flip_view:
            boxes.append({"box": (0, 0, height, width), "flip": True, "geometric": []})
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + int(sample["index"]))
        for _ in range(len(boxes), self.views):
            box = sample_crop_box((height, width), self.scale, (3 / 4, 4 / 3), gen)
            boxes.append({"box": box, "flip": bool(torch.rand((), generator=gen) < 0.5), "geometric": []})
        images, thetas = [], []
        for params in boxes:
            top, left, h, w = params["box"]
            view = TF.resized_crop(image, top, left, h, w, size, antialias=True)
            if params["flip"]:
                view = TF.horizontal_flip(view)
            images.append((view.as_subclass(torch.Tensor).float() / 255 - self.mean) / self.std)
            thetas.append(view_affine(params, (height, width), self.img_size))
        return {"views": torch.stack(images), "theta": torch.stack(thetas), "index": sample["index"]}


# ---- the stored crops as student crops --------------------------------------------------------------------
def crop_from_theta(theta: torch.Tensor, src_size: tuple[int, int]) -> tuple[tuple[int, int, int, int], bool]:
    """The crop box ``(top, left, h, w)`` and flip of a crop view's ``theta`` (``view_affine`` without other ops).

    ``theta`` of a crop box (no rotation or shear) is ``[[+-w/W, 0, (2 left + w)/W - 1], [0, h/H, (2 top + h)/H -
    1]]``, so the integer box is recovered exactly from the float32 entries.

    Raises:
        ValueError: ``theta`` rotates or shears (it is not a crop box).
    """
    t = theta.double()
    if abs(float(t[0, 1])) > 1e-6 or abs(float(t[1, 0])) > 1e-6:
        raise ValueError(f"view affine {t.tolist()} rotates or shears: it is not a crop box")
    height, width = src_size
    w, h = abs(float(t[0, 0])) * width, float(t[1, 1]) * height
    left = (float(t[0, 2]) + 1) * width / 2 - w / 2
    top = (float(t[1, 2]) + 1) * height / 2 - h / 2
    return (round(top), round(left), round(h), round(w)), float(t[0, 0]) < 0


class StoredCrops:
    """The random-crop views of a label store as crop boxes: ``crops(index, src_size)`` -> ``[(box, flip), ...]``.

    A student view that takes one of them as its crop box and flip (``ViewTransform(crops=...)``) gets the
    labeler's logits of exactly that crop from the store (the transform's ``given_crop`` + ``first`` is the stored
    view, passed to ``select_views`` as ``source``), as the online path would compute them, instead of the
    full-image map resampled. That closes the accuracy gap of cached labels when each image has about one stored
    crop per epoch; reused crops cost crop diversity (docs/results/cached_labels.md). Opens the store lazily, so
    that each data-loader worker maps it itself.

    Raises:
        ValueError: the store holds no random-crop views (build it with ``--views N``).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        manifest = LabelStore._read_manifest(self.root)
        self.first = 1 + bool(manifest.get("flip_view"))  # the full view and its mirror are not random crops
        self.count = int(manifest["views"]) - self.first
        if self.count < 1:
            raise ValueError(
                f"label store {self.root} holds no random-crop views to train on; build one with "
                f"`tokenlab labels build --views N` (N >= 1; --view-scale to match the student's crop scale)"
            )
        self.scale = tuple(manifest.get("view_scale", ()))
        self._store: LabelStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}  # memory maps are reopened in each worker, not pickled

    def __call__(self, index: int, src_size: tuple[int, int]) -> list[tuple[tuple[int, int, int, int], bool]]:
        """Crop boxes and flips of sample ``index``'s stored random-crop views, on a ``src_size`` source image."""
        if self._store is None:
            self._store = LabelStore.open(self.root)
        theta = torch.from_numpy(np.array(self._store.arrays["theta"][int(index), self.first :]))  # no logits read
        return [crop_from_theta(t, src_size) for t in theta]
