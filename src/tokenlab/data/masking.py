"""Token masks for masked image modelling (iBOT, BEiT style): block-wise (default) or random.

iBOT [0] masks the patch tokens of each global crop with BEiT's [1] block-wise scheme: an image is masked with
probability ``mask_prob``; a masked image gets a ratio ``r ~ U(a, b)`` (iBOT: pred_ratio 0.3 +- 0.2), and rectangular
blocks are added while fewer than ``r * H * W`` patches are masked. Each block's area is drawn from
``U(min_block, remaining)`` and its aspect ratio log-uniformly from ``aspect`` (0.3-3.3); a block is accepted when it
adds new patches without overshooting the target, and a mask is complete when ``max_attempts`` draws in a row fail.
As in the published iBOT loader, filling does not stop once fewer than ``min_block`` patches remain: the area is then
drawn between the remainder and ``min_block``, so small closing blocks bring the realised ratio to within a few
patches of the target (mean 29.3 % on 14 x 14 for U(0.1, 0.5), the published rule's own mean). The realised ratio
never exceeds the target, hence never exceeds ``b``. One deliberate difference: a block may span the whole grid
height or width (the published loader requires it to be strictly smaller), so tiny grids such as CIFAR's 2 x 2 can be
masked at all; on 14 x 14 this moves the mean ratio by less than 0.1 %.

``RandomMaskGenerator`` is the published ``pred_shape='rand'`` option: the same per-image ratio draw, then exactly
``int(r * H * W)`` tokens chosen uniformly at random. ``build_mask_generator(shape, ...)`` picks one by name
(``MASK_SHAPES``; the multi-crop view's ``mask_shape`` option).

- [0]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
- [1]: BEiT: BERT Pre-Training of Image Transformers, 2021, https://arxiv.org/abs/2106.08254
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

__all__ = ["MASK_SHAPES", "Block", "BlockMaskGenerator", "RandomMaskGenerator", "build_mask_generator"]

logger = logging.getLogger(__name__)

#: Mask shapes of ``build_mask_generator`` (iBOT's ``--pred_shape``).
MASK_SHAPES = ("block", "rand")

# iBOT's 16-patch minimum block was chosen for a 14 x 14 grid (224 px, patch 16).
_REFERENCE_GRID_AREA = 14 * 14
_REFERENCE_MIN_BLOCK = 16


@dataclass(frozen=True)
class Block:
    """One masked rectangle in token units: rows ``top:top+height``, columns ``left:left+width``."""

    top: int
    left: int
    height: int
    width: int


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


class BlockMaskGenerator:
    """Draws BEiT-style block masks over a token grid.

    Args:
        grid: token grid ``(H, W)``, or one int for a square grid.
        ratio: ``(a, b)``; a masked image masks ``r ~ U(a, b)`` of its tokens.
        mask_prob: probability that an image is masked at all (iBOT masks every global crop: 1.0; some configs 0.5).
        min_block: lower end of the block-area draw in tokens (blocks closing a mask may be smaller); ``None``
            scales iBOT's 16 patches on 14 x 14 to this grid's area.
        aspect: ``(lo, hi)`` range of the drawn block height / width, sampled log-uniformly (rounding to whole
            tokens can move a small block's aspect slightly outside it).
        max_attempts: rejected draws in a row after which a mask is considered full.

    Raises:
        ValueError: on an empty grid, ratios outside ``[0, 1]`` or ``a > b``, a bad probability, a block size that
            does not fit the grid or an empty aspect range.
    """

    def __init__(
        self,
        grid: int | tuple[int, int],
        ratio: tuple[float, float] = (0.1, 0.5),
        mask_prob: float = 1.0,
        min_block: int | None = None,
        aspect: tuple[float, float] = (0.3, 1 / 0.3),
        max_attempts: int = 10,
    ) -> None:
        height, width = (grid, grid) if isinstance(grid, int) else grid
        if height < 1 or width < 1:
            raise ValueError(f"grid must be positive, got {grid!r}")
        low, high = ratio
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"ratio must satisfy 0 <= a <= b <= 1, got {ratio!r}")
        if not 0.0 <= mask_prob <= 1.0:
            raise ValueError(f"mask_prob must be in [0, 1], got {mask_prob!r}")
        if min_block is None:
            min_block = max(1, round(_REFERENCE_MIN_BLOCK * height * width / _REFERENCE_GRID_AREA))
        if not 1 <= min_block <= height * width:
            raise ValueError(f"min_block must be in [1, {height * width}] for a {height}x{width} grid, got {min_block}")
        if not 0 < aspect[0] <= aspect[1]:
            raise ValueError(f"aspect must satisfy 0 < lo <= hi, got {aspect!r}")
        self.grid = (height, width)
        self.ratio = (float(low), float(high))
        self.mask_prob = float(mask_prob)
        self.min_block = int(min_block)
        self.aspect = (float(aspect[0]), float(aspect[1]))
        self.max_attempts = max_attempts

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(grid={self.grid}, ratio={self.ratio}, mask_prob={self.mask_prob}, "
            f"min_block={self.min_block}, aspect={self.aspect})"
        )

    def __call__(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """Return a ``(H, W)`` bool mask, True = masked token."""
        return self.sample(generator)[0]

    def sample(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[Block]]:
        """Return the ``(H, W)`` bool mask and the blocks that built it (for inspection and tests)."""
        height, width = self.grid
        mask = torch.zeros(height, width, dtype=torch.bool)
        blocks: list[Block] = []
        if float(torch.rand((), generator=generator)) >= self.mask_prob:
            return mask, blocks
        target = _uniform(*self.ratio, generator) * height * width
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        count = 0.0
        while count < target:
            block = self._place_block(mask, target - count, log_lo, log_hi, generator)
            if block is None:
                break
            count = float(mask.sum())
            blocks.append(block)
        return mask, blocks

    def _place_block(
        self, mask: torch.Tensor, remaining: float, log_lo: float, log_hi: float, generator: torch.Generator | None
    ) -> Block | None:
        """Draw up to ``max_attempts`` blocks; mask the first that adds 1..``remaining`` patches and return it.

        Returns None when every draw fails, which ends the mask (the published loader's stopping rule).
        """
        height, width = self.grid
        for _ in range(self.max_attempts):
            # U(min_block, remaining) also when remaining < min_block: the range is then reversed, not empty.
            area = _uniform(self.min_block, remaining, generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            block_h = round(math.sqrt(area * aspect))
            block_w = round(math.sqrt(area / aspect))
            if not (1 <= block_h <= height and 1 <= block_w <= width):
                continue
            top = int(torch.randint(0, height - block_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - block_w + 1, (), generator=generator))
            window = mask[top : top + block_h, left : left + block_w]
            added = block_h * block_w - int(window.sum())
            if 0 < added <= remaining:
                window.fill_(True)
                return Block(top, left, block_h, block_w)
        return None


class RandomMaskGenerator(BlockMaskGenerator):
    """Random (non-block) masks, iBOT's ``pred_shape='rand'``: ``int(r * H * W)`` tokens drawn uniformly.

    Same arguments as ``BlockMaskGenerator``; ``min_block``, ``aspect`` and ``max_attempts`` are not used. The
    ``blocks`` returned by ``sample`` are 1 x 1 blocks, one per masked token.
    """

    def sample(self, generator: torch.Generator | None = None) -> tuple[torch.Tensor, list[Block]]:
        """Return the ``(H, W)`` bool mask and one 1 x 1 ``Block`` per masked token."""
        height, width = self.grid
        mask = torch.zeros(height * width, dtype=torch.bool)
        if float(torch.rand((), generator=generator)) >= self.mask_prob:
            return mask.reshape(height, width), []
        count = int(_uniform(*self.ratio, generator) * height * width)
        chosen = torch.randperm(height * width, generator=generator)[:count]
        mask[chosen] = True
        blocks = [Block(int(i) // width, int(i) % width, 1, 1) for i in chosen.sort().values]
        return mask.reshape(height, width), blocks


def build_mask_generator(
    shape: str,
    grid: int | tuple[int, int],
    ratio: tuple[float, float] = (0.1, 0.5),
    mask_prob: float = 1.0,
    min_block: int | None = None,
) -> BlockMaskGenerator:
    """The mask generator of ``shape`` (``block``: BEiT blocks, iBOT's default; ``rand``: random tokens).

    Raises:
        ValueError: an unknown shape, or arguments the generator rejects.
    """
    if shape not in MASK_SHAPES:
        raise ValueError(f"unknown mask shape {shape!r}; valid: {', '.join(MASK_SHAPES)}")
    cls = BlockMaskGenerator if shape == "block" else RandomMaskGenerator
    return cls(grid, ratio, mask_prob, min_block)
