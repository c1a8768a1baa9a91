"""ImageNet-C style corruptions: seeded per image, generated in parallel processes, cached on disk.

Wraps ``imagecorruptions`` (package ``imagecorruptions-imaug``; Hendrycks & Dietterich, ICLR 2019,
https://arxiv.org/abs/1903.12261): the 15 ImageNet-C types (noise, blur, weather, digital) plus the 4 extra
ones (speckle noise, gaussian blur, spatter, saturate), severities 1-5 (REFERENCE §3).

Reproducibility: the library draws from numpy's global generator (and, for ``glass_blur``/``impulse_noise``, from
a ``seed`` argument). :func:`corrupt_image` seeds both from ``image_seed(seed, corruption, severity, index)`` and
restores the previous global numpy state afterwards, so the same image always gets the same corruption.

Small images: the library refuses images under 32 px and its parameters are tuned for 224 px ImageNet images,
so on 32-64 px images every blur/noise is relatively much stronger than in ImageNet-C. ``work_size`` resizes the
image (bicubic) to that size, corrupts it and resizes it back, which keeps the relative strength close to
ImageNet-C; images smaller than 32 px are always upsized to 32 px. Every type works at 32 and 64 px.

Cache: :func:`generate_corruptions` writes an ImageNet-C tree ``<cache>/<name>-<key>/corruption/severity/class/img``
with a ``manifest.json``. The key hashes the source files (names, sizes, mtimes), the seed, ``work_size`` and the
format; each (corruption, severity) cell is marked complete once written and never regenerated.
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
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_all_start_methods, get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from tokenlab.data.images import READ_ERRORS, load_rgb_array, scan_class_folders
from tokenlab.eval.metrics import COMMON_CORRUPTIONS, EXTRA_CORRUPTIONS

logger = logging.getLogger(__name__)

__all__ = [
    "ALL_CORRUPTIONS",
    "CORRUPTION_GROUPS",
    "CorruptionCache",
    "corrupt_image",
    "generate_corruptions",
    "image_seed",
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
    """

    root: Path
    corruptions: list[str]
    severities: list[int]
    num_images: int
    unreadable: list[str] = field(default_factory=list)
    generated_cells: list[tuple[str, int]] = field(default_factory=list)
    seconds: float = 0.0


def _fingerprint(root: Path, items: Sequence[tuple[Path, str]]) -> str:
    h = hashlib.sha256()
    for p, c in items:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{c}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _cache_key(fingerprint: str, seed: int, work_size: int | None, fmt: str) -> str:
    payload = json.dumps({"v": _CACHE_VERSION, "src": fingerprint, "seed": seed, "work": work_size, "fmt": fmt})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _load_source(path: str) -> np.ndarray | None:
    try:
        return load_rgb_array(path)  # the data layer's decoder: the pixels training and evaluation see
    except READ_ERRORS:
        return None


def _work(
    tasks: list[tuple[str, str, int]], corruption: str, severity: int, seed: int, work_size: int | None, fmt: str
) -> tuple[int, list[str]]:
    """Worker: corrupt ``(source path, output path, index)`` tasks; returns (written, unreadable sources)."""
    written, bad = 0, []
    for src, dst, index in tasks:
        img = _load_source(src)
        if img is None:
            bad.append(src)
            continue
        out = corrupt_image(img, corruption, severity, image_seed(seed, corruption, severity, index), work_size)
        Path(dst).parent.mkdir(parents=True, exist_ok=True)
        tmp = dst + ".tmp"
        Image.fromarray(out).save(tmp, format="PNG" if fmt == "png" else "JPEG", quality=95)
        os.replace(tmp, dst)
        written += 1
    return written, bad


def _chunks(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


def generate_corruptions(
    source: str | Path,
    cache_dir: str | Path,
    corruptions: str | Sequence[str] | None = "common",
    severities: str | Sequence[int] | None = None,
    seed: int = 0,
    work_size: int | None = None,
    workers: int | None = None,
    fmt: str = "png",
    progress: bool = True,
    chunk_size: int = 64,
) -> CorruptionCache:
    """Corrupt every image of the tree ``source/<class>/<image>`` and cache the result; reuse what exists.

    Args:
        source: Clean image tree.
        cache_dir: Parent directory of the caches; the tree goes to ``cache_dir/<source name>-<key>``.
        corruptions: Names or groups (see :func:`resolve_corruptions`).
        severities: ``"1-5"``, ``[1, 3]``... (default all five).
        seed: Base seed of the per-image corruption seeds.
        work_size: Corrupt at this size (see :func:`corrupt_image`).
        workers: Processes (default: CPU count, at most 8); 0 or 1 runs in this process.
        fmt: ``"png"`` (lossless, default) or ``"jpg"``.
        progress: Show a tqdm bar over images.
        chunk_size: Images per worker task.

    Returns:
        The :class:`CorruptionCache`; ``generated_cells`` is empty when everything was cached.
    """
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unknown image format {fmt!r}; valid: png, jpg")
    names = resolve_corruptions(corruptions)
    sevs = resolve_severities(severities)
    source = Path(source)
    samples, classes = scan_class_folders(source, allow_missing_classes=True)
    items = [(path, classes[k]) for path, k in samples]
    key = _cache_key(_fingerprint(source, items), seed, work_size, fmt)
    root = Path(cache_dir) / f"{source.name}-{key}"
    root.mkdir(parents=True, exist_ok=True)
    manifest_file = root / "manifest.json"
    manifest: dict[str, Any] = json.loads(manifest_file.read_text()) if manifest_file.is_file() else {
        "source": str(source.resolve()), "seed": seed, "work_size": work_size, "format": fmt,
        "num_images": len(items), "complete": [], "unreadable": [],
    }  # fmt: skip
    done = {(c, int(s)) for c, s in manifest["complete"]}
    todo = [(c, s) for c in names for s in sevs if (c, s) not in done]
    result = CorruptionCache(root, names, sevs, len(items), list(manifest["unreadable"]))
    if not todo:
        logger.info("corruptions cached at %s (%d cells reused)", root, len(names) * len(sevs))
        return result
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    logger.info("generating %d corruption cells x %d images with %d workers into %s", len(todo), len(items),
                max(workers, 1), root)  # fmt: skip
    t0 = time.perf_counter()
    unreadable: set[str] = set(manifest["unreadable"])
    bar = tqdm(total=len(todo) * len(items), unit="img", desc="corrupting", disable=not progress)

    def tasks_for(c: str, s: int) -> list[list[tuple[str, str, int]]]:
        stem_ext = ".png" if fmt == "png" else ".jpg"
        rows = [(str(p), str(root / c / str(s) / cls / (p.stem + stem_ext)), i) for i, (p, cls) in enumerate(items)]
        return list(_chunks(rows, chunk_size))

    def finish(c: str, s: int) -> None:
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
                    _, bad = _work(chunk, c, s, seed, work_size, fmt)
                    unreadable.update(bad)
                    bar.update(len(chunk))
                finish(c, s)
        else:
            # fork: workers only run numpy/OpenCV code, and a spawned worker would re-import torch + timm (seconds)
            method = "fork" if "fork" in get_all_start_methods() else "spawn"
            with ProcessPoolExecutor(workers, mp_context=get_context(method)) as pool:
                pending = {}
                for c, s in todo:
                    chunks = tasks_for(c, s)
                    futs = [pool.submit(_work, chunk, c, s, seed, work_size, fmt) for chunk in chunks]
                    pending[(c, s)] = (futs, {id(f): len(ch) for f, ch in zip(futs, chunks, strict=True)})
                for (c, s), (futs, sizes) in pending.items():
                    for f in as_completed(futs):
                        _, bad = f.result()
                        unreadable.update(bad)
                        bar.update(sizes[id(f)])
                    finish(c, s)
    finally:
        bar.close()
    result.unreadable = sorted(unreadable)
    result.seconds = time.perf_counter() - t0
    if unreadable:
        logger.warning("%d unreadable source images were skipped in every cell (listed in %s): %s",
                       len(unreadable), manifest_file, ", ".join(sorted(unreadable)[:5]))  # fmt: skip
    return result


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
