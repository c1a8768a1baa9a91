"""The built-in synthetic data set: shapes on cluttered textures, with per-pixel masks and OOD splits.

It lets a new user run the whole system offline and gives the tests and CI a small, fast data set whose ground truth
is known per pixel. The class of an image is the **shape** of its one object (``SHAPES``); colour, fill texture,
size, position and rotation are random, and the background is one of ``len(TEXTURES)`` procedural textures with
distractor fragments (clipped random polygons) on top. Every image has a mask (0 = background, class id + 1 =
object pixels), which is what token-level evaluation compares token labels against.

Splits:

- ``train``: the shortcut cue ``t`` (``shortcut_cue``: the background texture, or the object's fill colour) is tied
  to the class ``k`` for an exact fraction ``p`` of the images (``t = k``); the rest get a cue drawn uniformly from
  the other cues. A model can therefore take the shortcut on ``train`` and still look good on it.
- ``val``: same rendering, cue uniform over all cues (``P(t = k) = 1/T``, chance); with ``val_tied`` the cue is
  tied as in ``train`` (an in-distribution test that shares the training correlation, as in Waterbirds).
- ``rendition`` (ImageNet-R analogue): the same shapes drawn as outlines, sketches (wobbly dashed strokes) or flat
  silhouettes on plain paper-like or unusual saturated-gradient backgrounds, without clutter.
- ``shortcut`` (cue-conflict): train rendering, but the cue is never the class's cue, so a model that learned the
  shortcut is misled on every image. Its accuracy against the in-distribution ``val`` (``val_tied``) measures how
  much a model relies on the cue.

Cues (``shortcut_cue``): ``"texture"`` ties the background texture (the object's colours are random); ``"colour"``
ties the object's fill colour to one hue per class (``HUES``, in the object's light or dark band) and draws the
background texture uniformly in every split, so the background carries no class evidence. At 32 px the models
learn the shape and ignore a tied background texture (docs/results/demo.md); the fill colour sits on the object
and is picked up.

Rendering is vectorised over chunks of ``CHUNK`` images with torch; every chunk draws from its own
``torch.Generator`` seeded from ``(seed, split, chunk)``, and the per-split label/texture assignment from
``(seed, split)``, so files are byte-identical for a seed whatever the number of workers. PNG encoding runs in a
thread pool (zlib releases the GIL).

On disk (a standard image-folder tree)::

    DIR/dataset.json                      classes, seed, parameters, per-split labels / textures / colours / styles
    DIR/<split>/<class>/<index>.png       RGB images
    DIR/<split>_masks/<class>/<index>.png 8-bit masks, same names
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

logger = logging.getLogger(__name__)

FORMAT = "tokenlab-synthetic"
VERSION = 1
CHUNK = 32
SPLITS = ("train", "val", "rendition", "shortcut")
SHAPES = ("circle", "square", "triangle", "star", "cross", "heart", "hexagon", "ring", "crescent", "arrow")
TEXTURES = (
    "h_stripes",
    "v_stripes",
    "diag_stripes",
    "checker",
    "dots",
    "grid",
    "waves",
    "rings",
    "blobs",
    "antidiag_stripes",
)
RENDITION_STYLES = ("outline", "sketch", "silhouette")
SHORTCUT_CUES = ("texture", "colour")


@dataclass
class SynthConfig:
    """Parameters of a synthetic data set; stored verbatim in ``dataset.json``.

    Args:
        seed: master seed; the same seed gives byte-identical files.
        img_size: image side in pixels.
        counts: images per split; a split with count 0 is not written.
        shortcut_p: fraction of ``train`` images whose cue is their class's cue.
        shortcut_cue: ``"texture"`` (the background texture is the cue) or ``"colour"`` (the object's fill hue is
            the cue; background textures uniform in every split).
        val_tied: ``val`` ties its cue with ``shortcut_p`` as ``train`` does (in-distribution); default: chance.
        object_scale: range of the object's radius as a fraction of the image half-side.
        max_fragments: distractor fragments per image (each present with probability 0.75).
        distractor_shapes: small whole shapes of other classes per natural image (each present with probability
            0.75), drawn in the object's colour band under the object; they are background in the mask.
        distractor_scale: radius range of the distractor shapes as a fraction of the image half-side.
    """

    seed: int = 0
    img_size: int = 64
    counts: dict[str, int] = field(
        default_factory=lambda: {"train": 5000, "val": 1000, "rendition": 1000, "shortcut": 1000}
    )
    shortcut_p: float = 0.8
    shortcut_cue: str = "texture"
    val_tied: bool = False
    object_scale: tuple[float, float] = (0.35, 0.6)
    max_fragments: int = 4
    distractor_shapes: int = 0
    distractor_scale: tuple[float, float] = (0.25, 0.4)

    def validate(self) -> None:
        """Reject settings the generator cannot honour (tiny images, unknown splits).

        Raises:
            ValueError: ``img_size`` below 8 or an unknown split in ``counts``.
        """
        if self.img_size < 8:
            raise ValueError(f"img_size must be at least 8 pixels, got {self.img_size}")
        unknown = sorted(set(self.counts) - set(SPLITS))
        if unknown:
            raise ValueError(f"unknown split(s) {unknown}; valid splits: {list(SPLITS)}")
        bad = {k: v for k, v in self.counts.items() if v < 0}
        if bad:
            raise ValueError(f"split counts must be >= 0, got {bad}")
        if not 0.0 <= self.shortcut_p <= 1.0:
            raise ValueError(f"shortcut_p must be in [0, 1], got {self.shortcut_p}")
        if self.shortcut_cue not in SHORTCUT_CUES:
            raise ValueError(f"unknown shortcut_cue {self.shortcut_cue!r}; valid: {list(SHORTCUT_CUES)}")
        low, high = self.object_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"object_scale must satisfy 0 < lo <= hi <= 1, got {self.object_scale}")
        if self.max_fragments < 0:
            raise ValueError(f"max_fragments must be >= 0, got {self.max_fragments}")
        if self.distractor_shapes < 0:
            raise ValueError(f"distractor_shapes must be >= 0, got {self.distractor_shapes}")
        low, high = self.distractor_scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"distractor_scale must satisfy 0 < lo <= hi <= 1, got {self.distractor_scale}")


def _seed_for(*parts: object) -> int:
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(_seed_for(*parts))


# ---------------------------------------------------------------------------------------------------------------
# Shapes: inside tests on object-frame coordinates (u, v), object radius about 1.


def _polygon(u: torch.Tensor, v: torch.Tensor, sides: int, radius: float) -> torch.Tensor:
    # A regular polygon in polar form: r * cos(phi - pi/n) <= R cos(pi/n), phi the angle within one sector.
    sector = 2 * math.pi / sides
    phi = torch.remainder(torch.atan2(v, u), sector) - sector / 2
    return torch.hypot(u, v) * torch.cos(phi) <= radius * math.cos(math.pi / sides)


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    sector = 2 * math.pi / 5
    phi = (torch.remainder(torch.atan2(v, u), sector) - sector / 2).abs() / (sector / 2)  # 0 at a spike, 1 between
    return torch.hypot(u, v) <= 1.0 - 0.55 * phi


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x, y = 1.25 * u, 0.25 - 1.25 * v
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


def _arrow(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    shaft = (v.abs() <= 0.22) & (u >= -0.9) & (u <= 0.15)
    head = (u >= 0.15) & (u <= 0.95) & (v.abs() <= (0.95 - u) * 0.9)
    return shaft | head


_SHAPE_FNS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "circle": lambda u, v: torch.hypot(u, v) <= 0.9,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.72,
    "triangle": lambda u, v: _polygon(u, v, 3, 1.0),
    "star": _star,
    "cross": lambda u, v: ((u.abs() <= 0.28) & (v.abs() <= 0.9)) | ((v.abs() <= 0.28) & (u.abs() <= 0.9)),
    "heart": _heart,
    "hexagon": lambda u, v: _polygon(u, v, 6, 0.92),
    "ring": lambda u, v: (torch.hypot(u, v) <= 0.92) & (torch.hypot(u, v) >= 0.5),
    "crescent": lambda u, v: (torch.hypot(u, v) <= 0.92) & (torch.hypot(u - 0.45, v) > 0.72),
    "arrow": _arrow,
}
assert tuple(_SHAPE_FNS) == SHAPES


# ---------------------------------------------------------------------------------------------------------------
# Rendering helpers. Shapes: (B, H, W) coordinates, (B,) parameters broadcast as (B, 1, 1).


def _col(t: torch.Tensor) -> torch.Tensor:
    return t.view(-1, 1, 1)


def _rand(n: int, gen: torch.Generator, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=gen)


def _band_colours(light: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(B,) bool -> (B, 3) colours in the light band [0.55, 1] or the dark band [0, 0.45]."""
    base = torch.rand(light.numel(), 3, generator=gen)
    return torch.where(light[:, None], 0.55 + 0.45 * base, 0.45 * base)


def _hues(count: int) -> torch.Tensor:
    """(count, 3) fully saturated colours of evenly spaced hues (HSV with s = v = 1)."""
    return torch.tensor([colorsys.hsv_to_rgb(i / count, 1.0, 1.0) for i in range(count)], dtype=torch.float32)


def _cue_colours(cue: torch.Tensor, light: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """(B,) cue ids into ``HUES``, (B,) bool band, (B, 3) colours of that band -> the cue's hue in the band, jittered.

    A convex mix of two colours of a band stays in the band, so the object keeps its contrast with the background.
    """
    hue = HUES.to(cue.device)[cue]
    return 0.8 * torch.where(light[:, None], 0.55 + 0.45 * hue, 0.45 * hue) + 0.2 * jitter


def _lerp_colour(c1: torch.Tensor, c2: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # (B, 3) colours, (B, H, W) weights -> (B, 3, H, W); channel-first keeps the per-pixel work contiguous
    return torch.addcmul(c1[:, :, None, None], (c2 - c1)[:, :, None, None], t[:, None])


HUES = _hues(len(SHAPES))  # the object colour of each class under shortcut_cue="colour"


def _paint(image: torch.Tensor, where: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    # (B, 3, H, W) image, (B, H, W) bool, (B, 3) or (B, 3, H, W) colour -> painted image
    if colour.dim() == 2:
        colour = colour[:, :, None, None]
    return torch.where(where[:, None], colour, image)


def _texture(kind: torch.Tensor, x: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Background texture values in [0, 1]; ``kind`` (B,) indexes ``TEXTURES``; x, y are (1, H, W) in [-1, 1]."""
    n = kind.numel()
    freq = _col(_rand(n, gen, 2.5, 5.0)) * math.pi
    ph1, ph2 = _col(_rand(n, gen, 0, 2 * math.pi)), _col(_rand(n, gen, 0, 2 * math.pi))
    out = torch.empty(n, x.shape[-2], x.shape[-1])
    for k in kind.unique().tolist():
        sel = (kind == k).nonzero().squeeze(1)
        f, p1, p2 = freq[sel], ph1[sel], ph2[sel]
        name = TEXTURES[k]
        if name == "h_stripes":
            val = (torch.sin(f * y + p1) > 0).float()
        elif name == "v_stripes":
            val = (torch.sin(f * x + p1) > 0).float()
        elif name == "diag_stripes":
            val = (torch.sin(f * (x + y) * 0.7071 + p1) > 0).float()
        elif name == "antidiag_stripes":
            val = 0.5 + 0.5 * torch.sin(f * (x - y) * 0.7071 + p1)
        elif name == "checker":
            val = (torch.sin(f * x + p1) * torch.sin(f * y + p2) > 0).float()
        elif name == "dots":
            val = (torch.cos(1.5 * f * x + p1) * torch.cos(1.5 * f * y + p2) > 0.45).float()
        elif name == "grid":
            val = (torch.maximum(torch.cos(f * x + p1).abs(), torch.cos(f * y + p2).abs()) > 0.92).float()
        elif name == "waves":
            val = 0.5 + 0.5 * torch.sin(1.5 * f * y + 1.8 * torch.sin(f * x + p1) + p2)
        elif name == "rings":
            cx, cy = _col(torch.cos(p1)), _col(torch.sin(p2))
            val = (torch.sin(1.5 * f * torch.hypot(x - cx, y - cy) + p2) > 0).float()
        elif name == "blobs":
            coarse = torch.rand(sel.numel(), 1, 5, 5, generator=gen)
            val = F.interpolate(coarse, size=x.shape[-2:], mode="bicubic", align_corners=False)[:, 0].clamp(0, 1)
        else:
            raise KeyError(f"unknown texture {name!r}; valid: {list(TEXTURES)}")
        out[sel] = val.expand(sel.numel(), -1, -1)
    return out


def _object_frame(
    x: torch.Tensor, y: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, scale: torch.Tensor, angle: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dx, dy = x - _col(cx), y - _col(cy)
    cos, sin = _col(torch.cos(angle)), _col(torch.sin(angle))
    return (dx * cos + dy * sin) / _col(scale), (dy * cos - dx * sin) / _col(scale)


def _shapes(labels: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    inside = torch.empty(u.shape, dtype=torch.bool)
    for k in labels.unique().tolist():
        sel = (labels == k).nonzero().squeeze(1)
        inside[sel] = _SHAPE_FNS[SHAPES[k]](u[sel], v[sel])
    return inside


def _fill(u: torch.Tensor, v: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Object fill pattern in [0, 1] in the object frame: flat, stripes, checker, dots or a gradient."""
    n = u.shape[0]
    kind = torch.randint(0, 5, (n,), generator=gen)
    freq = _col(_rand(n, gen, 4.0, 8.0))
    out = torch.zeros_like(u)
    for k in kind.unique().tolist():
        if k == 0:
            continue  # flat
        sel = (kind == k).nonzero().squeeze(1)
        su, sv, f = u[sel], v[sel], freq[sel]
        if k == 1:
            val = torch.sin(f * su) > 0
        elif k == 2:
            val = torch.sin(f * su) * torch.sin(f * sv) > 0
        elif k == 3:
            val = torch.cos(f * su) * torch.cos(f * sv) > 0.5
        else:
            val = (0.5 + 0.5 * su).clamp(0, 1)
        out[sel] = val.float()
    return out


def _fragments(x: torch.Tensor, y: torch.Tensor, n: int, count: int, gen: torch.Generator) -> list[tuple]:
    """Distractor fragments: random polygons (3-8 sides) clipped by a half-plane through their centre."""
    out = []
    for _ in range(count):
        present = torch.rand(n, generator=gen) < 0.75
        cx, cy = _rand(n, gen, -1, 1), _rand(n, gen, -1, 1)
        scale, angle = _rand(n, gen, 0.12, 0.3), _rand(n, gen, 0, 2 * math.pi)
        sides = torch.randint(3, 9, (n,), generator=gen).float()
        u, v = _object_frame(x, y, cx, cy, scale, angle)
        sector = 2 * math.pi / _col(sides)
        phi = torch.remainder(torch.atan2(v, u), sector) - sector / 2
        polygon = torch.hypot(u, v) * torch.cos(phi) <= torch.cos(math.pi / _col(sides))
        clip = u * _col(torch.cos(angle * 1.7)) + v * _col(torch.sin(angle * 1.7)) > _col(_rand(n, gen, -0.5, 0.3))
        light = torch.rand(n, generator=gen) < 0.5
        out.append((polygon & clip & _col(present), _band_colours(light, gen)))
    return out


def _distractors(
    x: torch.Tensor,
    y: torch.Tensor,
    labels: torch.Tensor,
    count: int,
    scale_range: tuple[float, float],
    light: torch.Tensor,
    gen: torch.Generator,
) -> list[tuple]:
    """Small whole shapes of classes other than ``labels``, anywhere in the frame, in the ``light`` colour band."""
    out = []
    n = labels.numel()
    for _ in range(count):
        present = torch.rand(n, generator=gen) < 0.75
        other = (labels + torch.randint(1, len(SHAPES), (n,), generator=gen)) % len(SHAPES)
        scale = _rand(n, gen, *scale_range)
        cx, cy = _rand(n, gen, -1, 1) * (1 - scale), _rand(n, gen, -1, 1) * (1 - scale)
        u, v = _object_frame(x, y, cx, cy, scale, _rand(n, gen, 0, 2 * math.pi))
        out.append((_shapes(other, u, v) & _col(present), _band_colours(light, gen)))
    return out


def _erode(mask: torch.Tensor, width: int) -> torch.Tensor:
    # (B, H, W) bool -> eroded by a (2w+1)^2 square: a pixel survives if no background pixel is within w.
    background = (~mask).float()[:, None]
    return F.max_pool2d(background, 2 * width + 1, stride=1, padding=width)[:, 0] == 0


def render_chunk(
    labels: torch.Tensor,
    textures: torch.Tensor,
    gen: torch.Generator,
    img_size: int,
    style: str = "natural",
    object_scale: tuple[float, float] = (0.35, 0.6),
    max_fragments: int = 4,
    distractor_shapes: int = 0,
    distractor_scale: tuple[float, float] = (0.25, 0.4),
    colours: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor | None]:
    """Render a chunk of images.

    Args:
        labels: (B,) class ids into ``SHAPES``.
        textures: (B,) background texture ids into ``TEXTURES`` (ignored for ``style="rendition"``).
        gen: the chunk's generator; all randomness comes from it.
        img_size: output side in pixels.
        style: ``"natural"`` (train / val / shortcut) or ``"rendition"``.
        object_scale: range of the object radius as a fraction of the half-side.
        max_fragments: distractor fragment slots for natural images.
        distractor_shapes: slots for small whole shapes of other classes in natural images (background in the mask).
        distractor_scale: their radius range as a fraction of the half-side.
        colours: (B,) cue ids into ``HUES``: natural objects are filled with that hue (``shortcut_cue="colour"``);
            None: random fill colours. Nothing else of the image changes (no extra random draws).

    Returns:
        ``(images, masks, styles)``: uint8 ``(B, S, S, 3)`` and ``(B, S, S)`` arrays (mask = label + 1 on the object),
        and for renditions the (B,) index into ``RENDITION_STYLES``.
    """
    n = labels.numel()
    coords = (torch.arange(img_size, dtype=torch.float32) + 0.5) / img_size * 2 - 1
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    x, y = x[None], y[None]  # (1, H, W)
    # keep the object mostly inside the frame: the centre moves at most (1 - radius) * 0.8 from the middle
    scale = _rand(n, gen, *object_scale)
    reach = (1 - scale) * 0.8
    cx, cy = (torch.rand(n, generator=gen) * 2 - 1) * reach, (torch.rand(n, generator=gen) * 2 - 1) * reach
    angle = _rand(n, gen, 0, 2 * math.pi)
    u, v = _object_frame(x, y, cx, cy, scale, angle)
    styles = None
    if style == "natural":
        light_bg = torch.rand(n, generator=gen) < 0.5
        c1, c2 = _band_colours(light_bg, gen), _band_colours(light_bg, gen)
        image = _lerp_colour(c1, c2, _texture(textures, x, y, gen))
        for frag, colour in _fragments(x, y, n, max_fragments, gen):
            image = _paint(image, frag, colour)
        inside = _shapes(labels, u, v)
        o1, o2 = _band_colours(~light_bg, gen), _band_colours(~light_bg, gen)
        if colours is not None:  # the cue's hue, jittered by the random colours
            o1, o2 = _cue_colours(colours, ~light_bg, o1), _cue_colours(colours, ~light_bg, o2)
        o2 = o1 + 0.5 * (o2 - o1)  # a gentler second fill colour, same band
        fill = _lerp_colour(o1, o2, _fill(u, v, gen))
        # drawn last from the generator, so a set without distractors is the same as before they existed
        for other, colour in _distractors(x, y, labels, distractor_shapes, distractor_scale, ~light_bg, gen):
            image = _paint(image, other, colour)
        image = _paint(image, inside, fill)
    elif style == "rendition":
        styles = torch.randint(0, len(RENDITION_STYLES), (n,), generator=gen)
        plain = torch.rand(n, generator=gen) < 0.5
        paper = 0.85 + 0.15 * torch.rand(n, 3, generator=gen)
        ga, gb = torch.rand(n, 3, generator=gen), torch.rand(n, 3, generator=gen)
        direction = _rand(n, gen, 0, 2 * math.pi)
        ramp = (0.5 + 0.5 * (x * _col(torch.cos(direction)) + y * _col(torch.sin(direction)))).clamp(0, 1)
        image = torch.where(plain[:, None, None, None], paper[:, :, None, None], _lerp_colour(ga, gb, ramp))
        # sketches wobble: perturb the object frame before the inside test
        wobble = _col((styles == 1).float() * _rand(n, gen, 0.02, 0.06))
        freq, phase = _col(_rand(n, gen, 5, 9)), _col(_rand(n, gen, 0, 2 * math.pi))
        inside = _shapes(labels, u + wobble * torch.sin(freq * v + phase), v + wobble * torch.cos(freq * u + phase))
        thin = inside & ~_erode(inside, 1)
        thick = inside & ~_erode(inside, 2)
        outline = torch.where(_col(torch.rand(n, generator=gen) < 0.5), thin, thick)
        dashes = torch.sin(_col(_rand(n, gen, 10, 18)) * torch.atan2(v, u) + phase) > -0.3
        ink_dark = plain | (torch.rand(n, generator=gen) < 0.5)
        ink = torch.where(
            ink_dark[:, None], 0.25 * torch.rand(n, 3, generator=gen), 1 - 0.1 * torch.rand(n, 3, generator=gen)
        )
        strokes = torch.where(_col(styles == 0), outline, torch.where(_col(styles == 1), outline & dashes, inside))
        image = _paint(image, strokes, ink)
    else:
        raise ValueError(f"unknown style {style!r}; valid: ['natural', 'rendition']")
    images = (image.clamp(0, 1) * 255 + 0.5).to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
    masks = torch.where(inside, _col(labels + 1), 0).to(torch.uint8).numpy()
    return images, masks, styles


def assign_split(config: SynthConfig, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and shortcut cues (texture or hue ids, ``shortcut_cue``) of one split, drawn from ``(seed, split)``.

    Labels are balanced (``i mod K``, shuffled). Cues: ``train`` (and ``val`` with ``val_tied``) ties exactly
    ``round(p * n)`` images to their class's cue and draws the rest uniformly from the other cues; ``val`` and
    ``rendition`` draw uniformly from all cues; ``shortcut`` draws uniformly from the cues of other classes (cue
    conflict). ``background_textures`` gives the background textures.
    """
    n = config.counts.get(split, 0)
    gen = _generator(config.seed, split, "assign")
    num_classes, num_textures = len(SHAPES), len(TEXTURES)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=gen)]
    other = (labels + torch.randint(1, num_textures, (n,), generator=gen)) % num_textures  # never == label
    if split == "train" or (split == "val" and config.val_tied):
        tied = torch.zeros(n, dtype=torch.bool)
        tied[torch.randperm(n, generator=gen)[: round(config.shortcut_p * n)]] = True
        textures = torch.where(tied, labels, other)
    elif split in ("val", "rendition"):
        textures = torch.randint(0, num_textures, (n,), generator=gen)
    elif split == "shortcut":
        textures = other
    else:
        raise ValueError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return labels, textures


def background_textures(config: SynthConfig, split: str, cues: torch.Tensor) -> torch.Tensor:
    """Background texture ids of a split.

    The cues themselves for ``shortcut_cue="texture"``; else uniform over all textures, drawn from
    ``(seed, split, "background")``.
    """
    if config.shortcut_cue == "texture":
        return cues
    return torch.randint(0, len(TEXTURES), cues.shape, generator=_generator(config.seed, split, "background"))


def _encode_png(target: Path | BinaryIO, array: np.ndarray) -> None:
    """The one PNG encoding of the set (a file path, or a buffer for benchmarks/data.py)."""
    Image.fromarray(array).save(target, format="PNG", compress_level=1)


def image_name(index: int) -> str:
    """The file name of image ``index`` of a split (zero-padded, so names sort in index order)."""
    return f"{index:06d}.png"


def _write_chunk(
    out: Path,
    config: SynthConfig,
    split: str,
    chunk: int,
    labels: torch.Tensor,
    textures: torch.Tensor,
    colours: torch.Tensor | None,
) -> list[int]:
    begin = chunk * CHUNK
    images, masks, styles = render_chunk(
        labels,
        textures,
        _generator(config.seed, split, chunk),
        config.img_size,
        style="rendition" if split == "rendition" else "natural",
        object_scale=config.object_scale,
        max_fragments=config.max_fragments,
        distractor_shapes=config.distractor_shapes,
        distractor_scale=config.distractor_scale,
        colours=colours,
    )
    for offset, label in enumerate(labels.tolist()):
        name = f"{SHAPES[label]}/{image_name(begin + offset)}"
        _encode_png(out / split / name, images[offset])
        _encode_png(out / f"{split}_masks" / name, masks[offset])
    return [] if styles is None else styles.tolist()


def generate(out: str | Path, config: SynthConfig | None = None, workers: int = 2) -> dict:
    """Write the synthetic data set to ``out`` and return the ``dataset.json`` content.

    Chunks are rendered and encoded by ``workers`` threads, each with one torch intra-op thread (torch and zlib
    release the GIL; one intra-op thread per chunk avoids oversubscribing small machines). The process-wide torch
    thread count is restored afterwards.

    Args:
        out: target directory; created if missing. Existing files of the same names are overwritten.
        config: parameters (defaults: ``SynthConfig()``).
        workers: rendering threads.

    Raises:
        ValueError: on invalid parameters (see ``SynthConfig.validate``).
    """
    config = config or SynthConfig()
    config.validate()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    meta: dict = {
        "format": FORMAT,
        "version": VERSION,
        "classes": list(SHAPES),
        "textures": list(TEXTURES),
        "rendition_styles": list(RENDITION_STYLES),
        "seed": config.seed,
        "img_size": config.img_size,
        "params": asdict(config),
        "layout": {"image": "{split}/{class}/{index:06d}.png", "mask": "{split}_masks/{class}/{index:06d}.png"},
        "mask_values": "0 = background, class id + 1 = object",
        "splits": {},
    }
    jobs: dict[str, list] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            for split in SPLITS:
                n = config.counts.get(split, 0)
                if n == 0:
                    continue
                labels, cues = assign_split(config, split)
                textures = background_textures(config, split, cues)
                colours = cues if config.shortcut_cue == "colour" else None
                for sub in (split, f"{split}_masks"):
                    for name in SHAPES:
                        (out / sub / name).mkdir(parents=True, exist_ok=True)
                meta["splits"][split] = {"count": n, "labels": labels.tolist(), "textures": textures.tolist()}
                if colours is not None:
                    meta["splits"][split]["colours"] = colours.tolist()
                jobs[split] = [
                    pool.submit(_write_chunk, out, config, split, chunk, labels[b : b + CHUNK],
                                textures[b : b + CHUNK], None if colours is None else colours[b : b + CHUNK])
                    for chunk, b in enumerate(range(0, n, CHUNK))
                ]  # fmt: skip
            for split, futures in jobs.items():
                styles = [style for future in futures for style in future.result()]
                if split == "rendition":
                    meta["splits"][split]["styles"] = styles
    finally:
        torch.set_num_threads(threads)
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    total = sum(entry["count"] for entry in meta["splits"].values())
    elapsed = time.perf_counter() - start
    logger.info("wrote %d images to %s in %.2fs (%.0f images/s)", total, out, elapsed, total / max(elapsed, 1e-9))
    return meta


def shortcut_correlation(meta: dict, split: str) -> float:
    """Fraction of ``split`` images whose shortcut cue is their class's cue (``P(t = k)``).

    The cue is the object colour when the set has one (``colours``, ``shortcut_cue="colour"``), else the background
    texture.
    """
    entry = meta["splits"].get(split)
    if entry is None:
        raise KeyError(f"split {split!r} not in the data set; present: {sorted(meta['splits'])}")
    labels, cues = np.asarray(entry["labels"]), np.asarray(entry.get("colours", entry["textures"]))
    return float((labels == cues).mean()) if labels.size else float("nan")
