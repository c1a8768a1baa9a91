"""ImageNet-C style corruptions: seeded per image, generated in parallel processes, cached on disk.

Wraps ``imagecorruptions`` (package ``imagecorruptions-imaug``; Hendrycks & Dietterich, ICLR 2019,
https://arxiv.org/abs/1903.12261): the 15 ImageNet-C types (noise, blur, weather, digital) plus the 4 extra
ones (speckle noise, gaussian blur, spatter, saturate), severities 1-5 (REFERENCE §3).

Reproducibility: the library draws from numpy's global generator (and, for ``glass_blur``/``impulse_noise``, from
a ``seed`` argument). :func:`corrupt_image` seeds both from ``image_seed(seed, corruption, severity, index)`` and
restores the previous global numpy state afterwards, so the same image always gets the same corruption.

Where the corruption happens (``work_size`` of :func:`generate_corruptions`, ``--work-size`` of ``tokenlab eval``):

- ``"model"`` (the default of classifier evaluation): each source image first goes through the resize step of the
  model's evaluation transform (``tokenlab.data.transforms.eval_transform_from_meta``: short side to
  ``floor(img_size / crop_pct)`` with the model's interpolation) and is corrupted and stored at that size; the
  evaluation transform then only centre-crops it. The corruption acts on the pixels the model sees, as ImageNet-C
  corrupts the 224 px images the models read. The centre crop is left to the evaluation transform (cropping here
  too would crop twice when ``crop_pct < 1``).
- ``"source"``: the source image at its own size (the only choice before; segmentation keeps it, since its corrupted
  images are paired with full-size masks). Large sources shrunk to a small model afterwards lose most of the
  corruption: pixel noise and JPEG blocks average out in the downsizing.
- an integer ``N``: resized (bicubic) to ``N x N``, corrupted, resized back to the source size.

The library refuses images under 32 px and its parameters are tuned for 224 px ImageNet images, so on 32-64 px
images every blur/noise is relatively much stronger than in ImageNet-C; images smaller than 32 px are always
upsized to 32 px for the corruption and back. Every type works at 32 and 64 px.

Unchanged images: for each generated cell the mean absolute pixel change (0-255 grey levels) between clean and
corrupted image is measured as the model sees them (both through the model's resize when its metadata is given)
and kept in the manifest; a cell under :data:`UNCHANGED_THRESHOLD` is logged as a warning naming the corruption and
severity (:attr:`CorruptionCache.unchanged`).

Cache: :func:`generate_corruptions` writes an ImageNet-C tree ``<cache>/<name>-<key>/corruption/severity/class/img``
with a ``manifest.json``. The key hashes the source files (names, sizes, mtimes), the seed, the work size (for
``"model"``: the resize side and interpolation, so models sharing a geometry share a cache) and the format; each
(corruption, severity) cell is marked complete once written and never regenerated.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from tokenlab.data.images import READ_ERRORS, load_rgb_array, scan_class_folders
from tokenlab.data.transforms import eval_transform_from_meta
from tokenlab.eval.metrics import COMMON_CORRUPTIONS, EXTRA_CORRUPTIONS

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTION_GROUPS",
    "UNCHANGED_THRESHOLD",
    "WORK_SIZES",
    "CorruptionCache",
    "corrupt_image",
    "generate_corruptions",
    "image_seed",
    "model_resize",
    "parse_work_size",
    "read_corruption_tree",
    "resolve_corruptions",
    "resolve_severities",
]

ALL_CORRUPTIONS: tuple[str, ...] = COMMON_CORRUPTIONS + EXTRA_CORRUPTIONS
# "fast": 11 of the 15 ImageNet-C types, every family represented. Left out, as measured by benchmarks/eval.py on
# 64 px images: zoom_blur and frost (4-15x slower than the noise types), elastic_transform, and glass_blur (numba
# compiles it for several seconds in every new process).
FAST_CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "snow", "fog",
    "brightness", "contrast", "pixelate", "jpeg_compression",
)  # fmt: skip
CORRUPTION_GROUPS: dict[str, tuple[str, ...]] = {
    "all": ALL_CORRUPTIONS,
    "common": COMMON_CORRUPTIONS,
    "extra": EXTRA_CORRUPTIONS,
    "fast": FAST_CORRUPTIONS,
    "noise": ("gaussian_noise", "shot_noise", "impulse_noise"),
    "blur": ("defocus_blur", "glass_blur", "motion_blur", "zoom_blur"),
    "weather": ("snow", "frost", "fog", "brightness"),
    "digital": ("contrast", "elastic_transform", "pixelate", "jpeg_compression"),
}
MIN_SIZE = 32  # the library rejects smaller images
#: Named work sizes (besides an integer side): the model's evaluation resize, or the source image's own size.
WORK_SIZES = ("model", "source")
#: Mean absolute pixel change (0-255 grey levels, clean vs corrupted as the model sees them) under which a cell is
#: reported as leaving the images unchanged. Severity 1 of every type changes 64 px images by several levels.
UNCHANGED_THRESHOLD = 1.0
_CACHE_VERSION = 2  # 2: sources decoded by tokenlab.data.images (16-bit scaled, alpha on white)


def resolve_corruptions(spec: str | Sequence[str] | None) -> list[str]:
    """Turn ``"fast"``, ``"common,extra"``, ``"fog,snow"`` or a list into corruption names (order kept, no repeats).

    Raises:
        ValueError: an unknown name, listing the valid names and groups.
    """
    if spec is None:
        spec = "common"
    parts = [p.strip() for p in (spec.split(",") if isinstance(spec, str) else spec) if p.strip()]
    out: list[str] = []
    for p in parts:
        names = CORRUPTION_GROUPS.get(p, (p,))
        for n in names:
            if n not in ALL_CORRUPTIONS:
                raise ValueError(
                    f"unknown corruption {n!r}; valid: {', '.join(ALL_CORRUPTIONS)} or a group "
                    f"({', '.join(CORRUPTION_GROUPS)})"
                )
            if n not in out:
                out.append(n)
    if not out:
        raise ValueError("no corruption selected")
    return out


def resolve_severities(spec: str | Sequence[int] | None) -> list[int]:
    """``"1-5"``, ``"1,3,5"`` or a list -> sorted severities in 1..5."""
    if spec is None:
        return [1, 2, 3, 4, 5]
    if isinstance(spec, str):
        vals: list[int] = []
        for part in spec.split(","):
            part = part.strip()
            try:
                if "-" in part:
                    a, b = part.split("-")
                    vals.extend(range(int(a), int(b) + 1))
                elif part:
                    vals.append(int(part))
            except ValueError:
                raise ValueError(f"bad severity list {spec!r}; use e.g. '1-5' or '1,3,5'") from None
    else:
        vals = [int(v) for v in spec]
    bad = [v for v in vals if v < 1 or v > 5]
    if bad or not vals:
        raise ValueError(f"severities must be in 1..5, got {spec!r}")
    return sorted(set(vals))


def image_seed(seed: int, corruption: str, severity: int, index: int) -> int:
    """A stable 32-bit seed per (run seed, corruption, severity, image index); independent of Python's hash salt."""
    return zlib.crc32(f"{seed}/{corruption}/{severity}/{index}".encode()) & 0xFFFFFFFF


def parse_work_size(value: int | str | None, default: str = "model") -> int | str:
    """``"model"``, ``"source"``, a side in pixels (an int or its digits), or None for ``default``.

    Raises:
        ValueError: anything else, naming the value and the valid choices.
    """
    if value is None:
        value = default
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError(f"work size must be a positive number of pixels, got {value}")
        return value
    text = str(value).strip().lower()
    if text in WORK_SIZES:
        return text
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(
        f"bad work size {value!r}; use 'model' (the model's input size), 'source' (the image's own size) "
        "or a side in pixels such as 64"
    )


def model_resize(meta: Mapping[str, Any]) -> v2.Resize:
    """The resize step of the model's evaluation transform (``eval_transform_from_meta(meta)``).

    The geometry ``work_size="model"`` corrupts at; the transform's centre crop stays with the evaluation.
    """
    step = eval_transform_from_meta(meta).pipeline.transforms[0]
    if not isinstance(step, v2.Resize):  # pragma: no cover - guards a change of EvalTransform's pipeline
        raise TypeError(f"expected the evaluation transform to start with a Resize, got {type(step).__name__}")
    return step


def _resize_key(resize: v2.Resize) -> list[Any]:
    return [list(resize.size) if resize.size is not None else None, str(resize.interpolation.value)]


def _apply_resize(resize: v2.Resize, image: np.ndarray) -> np.ndarray:
    """``resize`` on a uint8 (H, W, 3) array, through the uint8 tensor path the evaluation loader takes."""
    out = resize(tv_tensors.Image(torch.tensor(image).permute(2, 0, 1)))
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


def _corruption_fn(name: str):  # noqa: ANN202  (a function of the imagecorruptions library)
    from imagecorruptions import corruption_dict

    return corruption_dict[name]


def corrupt_image(
    image: np.ndarray, corruption: str, severity: int, seed: int, work_size: int | None = None
) -> np.ndarray:
    """Apply one corruption reproducibly.

    Args:
        image: (H, W, 3) uint8 RGB.
        corruption: One of :data:`ALL_CORRUPTIONS`.
        severity: 1..5.
        seed: Seeds every random draw of the corruption (see :func:`image_seed`).
        work_size: Corrupt at this square size (bicubic resize there and back); None corrupts at the native size,
            except that sides under 32 px are upsized to 32.

    Returns:
        (H, W, 3) uint8, the same shape as ``image``.
    """
    if corruption not in ALL_CORRUPTIONS:
        raise ValueError(f"unknown corruption {corruption!r}; valid: {', '.join(ALL_CORRUPTIONS)}")
    if severity not in (1, 2, 3, 4, 5):
        raise ValueError(f"severity must be in 1..5, got {severity}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    pil = Image.fromarray(image)
    if work_size is not None:
        size = (max(work_size, MIN_SIZE), max(work_size, MIN_SIZE))
    elif min(h, w) < MIN_SIZE:
        size = (max(w, MIN_SIZE), max(h, MIN_SIZE))
    else:
        size = (w, h)
    if size != (w, h):
        pil = pil.resize(size, Image.Resampling.BICUBIC)
    fn = _corruption_fn(corruption)
    kwargs = {"seed": seed} if "seed" in inspect.signature(fn).parameters else {}
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the library emits deprecation warnings from scikit-image / numpy
            out = np.clip(fn(pil, severity, **kwargs), 0, 255).astype(np.uint8)
    finally:
        np.random.set_state(state)
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    if out.shape[:2] != (h, w):
        out = np.asarray(Image.fromarray(out).resize((w, h), Image.Resampling.BICUBIC))
    return out


@dataclass
class CorruptionCache:
    """A generated (or found) corruption tree.

    Attributes:
        root: Directory holding ``corruption/severity/class/img``.
        corruptions, severities: What the caller asked for (all complete on return).
        num_images: Images per cell.
        unreadable: Source images that could not be read (skipped in every cell).
        generated_cells: Cells generated by this call; ``[]`` when everything came from the cache.
        seconds: Generation time of this call.
        work_size: ``"model"``, ``"source"`` or the side in pixels the images were corrupted at.
        change: ``{"corruption/severity": mean absolute pixel change}`` of the requested cells, as the model sees
            them (cells generated before this measurement existed, or for another model geometry, are absent).
        unchanged: Requested cells whose change is under :data:`UNCHANGED_THRESHOLD` (each logged as a warning).
    """

    root: Path
    corruptions: list[str]
    severities: list[int]
    num_images: int
    unreadable: list[str] = field(default_factory=list)
    generated_cells: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0
    work_size: int | str = "source"
    change: dict[str, float] = field(default_factory=dict)
    unchanged: list[tuple[str, int]] = field(default_factory=list)


def _fingerprint(root: Path, items: Sequence[tuple[Path, str]]) -> str:
    h = hashlib.sha256()
    for p, c in items:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_key(fingerprint: str, seed: int, work_size: Any, fmt: str) -> str:
    payload = json.dumps({"v": _CACHE_VERSION, "src": fingerprint, "seed": seed, "work": work_size, "fmt": fmt})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_source(path: str) -> np.ndarray | None:
    try:
        return load_rgb_array(path)  # the data layer's decoder: the pixels training and evaluation see
    except READ_ERRORS:
        return None


def _work(
    tasks: list[tuple[str, str, int]],
    corruption: str,
    severity: int,
    seed: int,
    work_size: int | None,
    fmt: str,
    pre: v2.Resize | None = None,
    view: v2.Resize | None = None,
) -> tuple[int, list[str], float]:
    """Worker: corrupt ``(source path, output path, index)`` tasks.

    ``pre`` resizes each source before the corruption (``work_size="model"``); ``view`` is the model's resize the
    pixel change is measured through when the stored images are not already at that geometry.

    Returns:
        (written, unreadable sources, sum over written images of the mean absolute pixel change).
    """
    written, bad, change = 0, [], 0.0
    for src, dst, index in tasks:
        img = _load_source(src)
        if img is None:
            bad.append(src)
            continue
        if pre is not None:
            img = _apply_resize(pre, img)
        out = corrupt_image(img, corruption, severity, image_seed(seed, corruption, severity, index), work_size)
        seen_clean, seen_out = (img, out) if view is None else (_apply_resize(view, img), _apply_resize(view, out))
        change += float(np.abs(seen_clean.astype(np.int16) - seen_out.astype(np.int16)).mean())
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = dst + ".tmp"
        Image.fromarray(out).save(tmp, format="PNG" if fmt == "png" else "JPEG", quality=95)
        os.replace(tmp, dst)
        written += 1
    return written, bad, change


def _chunks(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def generate_corruptions(
    source: str | Path,
    cache_dir: str | Path,
    corruptions: str | Sequence[str] | None = "common",
    severities: str | Sequence[int] | None = None,
    seed: int = 0,
    work_size: int | str | None = None,
    workers: int | None = None,
    fmt: str = "png",
    progress: bool = True,
    chunk_size: int = 64,
    model_meta: Mapping[str, Any] | None = None,
) -> CorruptionCache:
    """Corrupt every image of the tree ``source/<class>/<image>`` and cache the result; reuse what exists.

    Args:
        source: Clean image tree.
        cache_dir: Parent directory of the caches; the tree goes to ``cache_dir/<source name>-<key>``.
        corruptions: Names or groups (see :func:`resolve_corruptions`).
        severities: ``"1-5"``, ``[1, 3]``... (default all five).
        seed: Base seed of the per-image corruption seeds.
        work_size: ``"model"`` (needs ``model_meta``), ``"source"`` (default, None) or a side in pixels; see the
            module docstring.
        workers: Processes (default: CPU count, at most 8); 0 or 1 runs in this process.
        fmt: ``"png"`` (lossless, default) or ``"jpg"``.
        progress: Show a tqdm bar over images.
        chunk_size: Images per worker task.
        model_meta: The exported model's metadata (``EVAL_META_KEYS``): its evaluation resize is the geometry of
            ``work_size="model"`` and the view through which the pixel change of each cell is measured.

    Returns:
        The :class:`CorruptionCache`; ``generated_cells`` is empty when everything was cached.

    Raises:
        ValueError: unknown format, corruption, severity or work size; ``"model"`` without ``model_meta``.
    """
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unknown image format {fmt!r}; valid: png, jpg")
    names = resolve_corruptions(corruptions)
    sevs = resolve_severities(severities)
    work = parse_work_size(work_size, default="source")
    if work == "model" and model_meta is None:
        raise ValueError("work size 'model' needs the model's metadata (model_meta); use 'source' or a side in pixels")
    view = model_resize(model_meta) if model_meta is not None else None
    pre = view if work == "model" else None
    measure_view = None if work == "model" else view  # model-size images are already what the model sees
    side = work if isinstance(work, int) else None
    # "source" and N keep the keys of earlier versions (None / N); "model" names the geometry, not the model
    key_work: Any = {"model_resize": _resize_key(view)} if pre is not None and view is not None else side
    view_key = json.dumps(_resize_key(view)) if view is not None else "stored"
    source = Path(source)
    samples, classes = scan_class_folders(source, allow_missing_classes=True)
    items = [(path, classes[k]) for path, k in samples]
    key = _cache_key(_fingerprint(source, items), seed, key_work, fmt)
    root = Path(cache_dir) / f"{source.name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    manifest_file = root / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {
        "source": str(source.resolve()), "seed": seed, "work_size": key_work if pre is not None else work,
        "format": fmt, "num_images": len(items), "complete": [], "unreadable": [],
    }  # fmt: skip
    changes: dict[str, float] = manifest.setdefault("change", {}).setdefault(view_key, {})
    done = {(c, int(s)) for c, s in manifest["complete"]}
    todo = [(c, s) for c in names for s in sevs if (c, s) not in done]
    result = CorruptionCache(root, names, sevs, len(items), list(manifest["unreadable"]), work_size=work)
    if not todo:
        logger.info("corruptions cached at %s (%d cells reused)", root, len(names) * len(sevs))
        _check_changed(result, changes)
        return result
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    sz = list(view.size or []) if pre is not None and view is not None else []
    where = (f"at the model's resize ({'x'.join(map(str, sz)) if len(sz) == 2 else f'shorter side {sz[0]}'} px)"
             if sz else f"at {side}x{side} px" if side else "at each image's own size")  # fmt: skip
    how = f"{workers} worker processes" if workers > 1 else "in this process (1 worker)"
    logger.info("generating %d corruption cells x %d images %s, %s, into %s", len(todo), len(items), where, how, root)
    t0 = time.perf_counter()
    unreadable: set[str] = set(manifest["unreadable"])
    bar = tqdm(total=len(todo) * len(items), unit="img", desc="corrupting", disable=not progress)

    def tasks_for(c: str, s: int) -> list[list[tuple[str, str, int]]]:
        stem_ext = ".png" if fmt == "png" else ".jpg"
        rows = [(str(p), str(root / c / str(s) / cls / (p.stem + stem_ext)), i) for i, (p, cls) in enumerate(items)]
        return list(_chunks(rows, chunk_size))

    cell_change: dict[tuple[str, int], float] = {}

    def finish(c: str, s: int) -> None:
        readable = len(items) - len(unreadable)
        if readable:
            changes[f"{c}/{s}"] = cell_change.get((c, s), 0.0) / readable
        manifest["complete"].append([c, s])
        manifest["unreadable"] = sorted(unreadable)
        tmp = manifest_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_file)
        result.generated_cells.append((c, s))

    try:
        if workers <= 1:
            for c, s in todo:
                for chunk in tasks_for(c, s):
                    _, bad, change = _work(chunk, c, s, seed, side, fmt, pre, measure_view)
                    unreadable.update(bad)
                    cell_change[(c, s)] = cell_change.get((c, s), 0.0) + change
                    bar.update(len(chunk))
                finish(c, s)
        else:
            # fork: workers only run numpy/OpenCV code, and a spawned worker would re-import torch + timm (seconds)
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
                pending = {}
                for c, s in todo:
                    chunks = tasks_for(c, s)
                    futs = [pool.submit(_work, chunk, c, s, seed, side, fmt, pre, measure_view) for chunk in chunks]
                    pending[(c, s)] = (futs, {id(f): len(ch) for f, ch in zip(futs, chunks, strict=True)})
                for (c, s), (futs, sizes) in pending.items():
                    for f in as_completed(futs):
                        _, bad, change = f.result()
                        unreadable.update(bad)
                        cell_change[(c, s)] = cell_change.get((c, s), 0.0) + change
                        bar.update(sizes[id(f)])
                    finish(c, s)
    finally:
        bar.close()
    result.unreadable = sorted(unreadable)
    result.seconds = time.perf_counter() - t0
    if unreadable:
        logger.warning("%d unreadable source images were skipped in every cell (listed in %s): %s",
                       len(unreadable), manifest_file, ", ".join(sorted(unreadable)[:5]))  # fmt: skip
    _check_changed(result, changes)
    return result


def _check_changed(result: CorruptionCache, changes: Mapping[str, float]) -> None:
    """Fill ``result.change`` / ``result.unchanged`` and warn once per cell that leaves the images unchanged."""
    for c in result.corruptions:
        for s in result.severities:
            value = changes.get(f"{c}/{s}")
            if value is None:
                continue
            result.change[f"{c}/{s}"] = value
            if value < UNCHANGED_THRESHOLD:
                result.unchanged.append((c, s))
    if not result.unchanged:
        return
    hint = {
        "model": "the corruption is too weak at this size",
        "source": "the images are corrupted at their source size and the model's resize averages the corruption "
        "out; corrupt at the model's input size (--work-size model)",
    }.get(str(result.work_size), "corrupt at the model's input size (--work-size model)")
    cells = ", ".join(f"{c} severity {s} ({result.change[f'{c}/{s}']:.2f})" for c, s in result.unchanged)
    logger.warning(
        "corruptions that leave the images unchanged as the model sees them (mean absolute pixel change under "
        "%.1f of 255): %s; their accuracy will equal the clean one. %s",
        UNCHANGED_THRESHOLD, cells, hint[0].upper() + hint[1:],
    )  # fmt: skip


def read_corruption_tree(
    root: str | Path, corruptions: str | Sequence[str] | None = None, severities: str | Sequence[int] | None = None
) -> dict[str, dict[int, Path]]:
    """Find the cells of an ImageNet-C style tree ``root/corruption/severity/class/img``.

    Args:
        root: Tree root (a generated cache or a downloaded ImageNet-C).
        corruptions: Restrict to these names/groups; None takes every corruption folder present (any name, so
            custom corruption sets also work).
        severities: Restrict to these severities (default all present).

    Returns:
        ``{corruption: {severity: cell directory}}``.

    Raises:
        FileNotFoundError: missing root or a requested cell.
        ValueError: no cell found.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"corruption tree not found: {root} (expected root/corruption/severity/class/img)")
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    wanted = resolve_corruptions(corruptions) if corruptions is not None else present
    sev_filter = resolve_severities(severities) if severities is not None else None
    out: dict[str, dict[int, Path]] = {}
    for c in wanted:
        if not (root / c).is_dir():
            raise FileNotFoundError(f"corruption {c!r} not in {root}; present: {', '.join(present) or 'none'}")
        cells = {int(p.name): p for p in (root / c).iterdir() if p.is_dir() and p.name.isdigit()}
        if sev_filter is not None:
            missing = [s for s in sev_filter if s not in cells]
            if missing:
                raise FileNotFoundError(f"severities {missing} of {c!r} missing under {root / c}")
            cells = {s: cells[s] for s in sev_filter}
        if cells:
            out[c] = dict(sorted(cells.items()))
    if not out:
        raise ValueError(f"no corruption/severity folders found under {root}")
    return out
