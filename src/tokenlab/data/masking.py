"""Block-wise token masks for masked image modelling (iBOT, BEiT style).

iBOT [0] masks the patch tokens of each global crop with BEiT's [1] block-wise scheme: an image is masked with
probability ``mask_prob``; a masked image gets a ratio ``r ~ U(a, b)`` (iBOT: pred_ratio 0.3 +- 0.2), and rectangular
blocks of at least ``min_block`` patches with aspect ratio in ``aspect`` (log-uniform, 0.3-3.3) are added until
``round(r * H * W)`` patches are masked. A block is accepted only when it adds new patches without overshooting the
target, so the realised ratio never exceeds ``b`` and falls short of the target by less than ``min_block`` patches.

- [0]: iBOT: Image BERT Pre-Training with Online Tokenizer, 2021, https://arxiv.org/abs/2111.07832
- [1]: BEiT: BERT Pre-Training of Image Transformers, 2021, https://arxiv.org/abs/2106.08254
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

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
        min_block: smallest block area in tokens; ``None`` scales iBOT's 16 patches on 14 x 14 to this grid's area.
        aspect: ``(lo, hi)`` range of block height / width, sampled log-uniformly.
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
        target = round(_uniform(*self.ratio, generator) * height * width)
        log_lo, log_hi = math.log(self.aspect[0]), math.log(self.aspect[1])
        count, failures = 0, 0
        while target - count >= self.min_block and failures < self.max_attempts:
            remaining = target - count
            area = _uniform(self.min_block, remaining, generator)
            aspect = math.exp(_uniform(log_lo, log_hi, generator))
            block_h = round(math.sqrt(area * aspect))
            block_w = round(math.sqrt(area / aspect))
            fits = 1 <= block_h <= height and 1 <= block_w <= width
            if not fits or block_h * block_w < self.min_block or not log_lo <= math.log(block_h / block_w) <= log_hi:
                failures += 1
                continue
            top = int(torch.randint(0, height - block_h + 1, (), generator=generator))
            left = int(torch.randint(0, width - block_w + 1, (), generator=generator))
            window = mask[top : top + block_h, left : left + block_w]
            added = block_h * block_w - int(window.sum())
            if added == 0 or added > remaining:
                failures += 1
                continue
            window.fill_(True)
            count += added
            blocks.append(Block(top, left, block_h, block_w))
            failures = 0
        return mask, blocks
