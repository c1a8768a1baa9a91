"""Pictures (matplotlib, Agg backend, PNG) of evaluations and training runs.

Token-label maps, class-attention maps, per-block token-mixing attention maps (``FAN.forward_attention_maps``),
corruption bars and severity curves comparing runs, reliability diagrams, confusion matrices, and training curves
from ``metrics.jsonl``.

Every function takes plain data (tensors, dicts read from ``eval.json`` / ``tokens.json`` / ``metrics.jsonl``),
writes one PNG and returns its path; nothing here computes a metric.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402  (after selecting the Agg backend)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from tokenlab.utils.metrics_log import read_metrics  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "plot_block_attention",
    "plot_class_attention",
    "plot_confusion",
    "plot_corruption_bars",
    "plot_ood_bars",
    "plot_reliability",
    "plot_severity_curves",
    "plot_token_labels",
    "plot_training_curves",
    "save_token_pictures",
]

_DPI = 110
_VAL_KEYS = ("top1", "acc1", "val_top1", "accuracy")  # validation accuracy names, first found wins


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _save_grid(fig: plt.Figure, axes: np.ndarray, path: str | Path, title: str | None) -> Path:
    """Finish a grid of image panels (no axes, optional title) and save it."""
    for ax in axes.flat:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def _class_colors(k: int) -> np.ndarray:
    cmap = plt.get_cmap("tab10" if k <= 10 else "tab20")
    return np.array([cmap(i % cmap.N)[:3] for i in range(k)])


def _upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """``(H, W)`` token values -> ``(S, S)`` pixels (nearest), for overlays."""
    return F.interpolate(grid[None, None].float(), size=size, mode="nearest")[0, 0].numpy()


def plot_token_labels(
    images: torch.Tensor,
    pred: torch.Tensor,
    conf: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    path: str | Path,
    masks: torch.Tensor | None = None,
    title: str | None = None,
) -> Path:
    """One row per image: the image, its token-label map and its agreement map.

    The image carries the object contour; the token-label map shows colour = class, opacity = confidence; the
    agreement map is green where token label = image label, red for another class. Opacity of the label map
    grows from 0.3 at chance confidence (1/K) to 0.9 at confidence 1.

    Args:
        images: (n, 3, S, S) in [0, 1].
        pred: (n, H, W) token labels.
        conf: (n, H, W) token-label confidences.
        labels: (n,) image labels.
        classes: Class names.
        path: Output PNG.
        masks: (n, S, S) object masks (0 = background) drawn as contours.
        title: Figure title.
    """
    n = images.shape[0]
    size = (images.shape[-2], images.shape[-1])
    colors = _class_colors(len(classes))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        lab = int(labels[i])
        p = _upsample(pred[i], size).astype(int)
        c = _upsample(conf[i], size)
        ax = axes[i, 0]
        ax.imshow(img)
        if masks is not None:
            ax.contour(masks[i].numpy() > 0, levels=[0.5], colors="yellow", linewidths=1)
        ax.set_title(f"label: {classes[lab]}", fontsize=9)
        k = len(classes)  # opacity 0.3 at chance confidence (1/K) up to 0.9 at confidence 1
        alpha = 0.3 + 0.6 * np.clip((c - 1 / k) / (1 - 1 / k), 0, 1)
        overlay = np.concatenate([colors[p], alpha[..., None]], axis=-1)
        axes[i, 1].imshow(img.mean(-1), cmap="gray", vmin=0, vmax=1)
        axes[i, 1].imshow(overlay)
        axes[i, 1].set_title("token labels (opacity = conf.)", fontsize=9)
        agree = (p == lab).astype(float)
        axes[i, 2].imshow(img)
        axes[i, 2].imshow(agree, cmap=ListedColormap(["#d62728", "#2ca02c"]), alpha=0.55, vmin=0, vmax=1)
        if masks is not None:
            axes[i, 2].contour(masks[i].numpy() > 0, levels=[0.5], colors="yellow", linewidths=1)
        share = float((pred[i] == lab).float().mean())
        axes[i, 2].set_title(f"agrees with label: {share:.0%}", fontsize=9)
        for ax in axes[i]:
            ax.set_axis_off()
    used = sorted({int(v) for v in pred.unique().tolist()} | {int(v) for v in labels.tolist()})
    fig.legend(handles=[Patch(color=colors[k], label=classes[k]) for k in used], loc="lower center",
               ncol=min(len(used), 5), fontsize=8, bbox_to_anchor=(0.5, -0.02))  # fmt: skip
    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return _save(fig, path)


def plot_class_attention(
    images: torch.Tensor, attention: torch.Tensor, path: str | Path, max_heads: int = 4, title: str | None = None
) -> Path:
    """Per image: the image, the head-mean class attention, and up to ``max_heads`` single heads.

    Args:
        images: (n, 3, S, S) in [0, 1].
        attention: (n, heads, H, W) class-token attention over the patch tokens.
        path: Output PNG.
        max_heads: Single heads drawn per image.
        title: Figure title.
    """
    n, heads = attention.shape[:2]
    size = tuple(images.shape[-2:])
    show = min(heads, max_heads)
    fig, axes = plt.subplots(n, 2 + show, figsize=(2.2 * (2 + show), 2.2 * n), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        maps = [attention[i].mean(0)] + [attention[i, h] for h in range(show)]
        axes[i, 0].imshow(img)
        axes[i, 0].set_title("image", fontsize=9)
        for j, m in enumerate(maps):
            _heat_overlay(axes[i, 1 + j], img, m, size, "mean of heads" if j == 0 else f"head {j - 1}")
    return _save_grid(fig, axes, path, title)


def _heat_overlay(ax: Any, img: Any, heat: torch.Tensor, size: Sequence[int], title: str) -> None:
    """Draw ``img`` with the (H, W) map ``heat`` up-sampled (bilinear) onto it, as attention pictures are read."""
    up = F.interpolate(heat[None, None].float(), size=tuple(size), mode="bilinear", align_corners=False)[0, 0].numpy()
    ax.imshow(img)
    ax.imshow(up, cmap="inferno", alpha=0.6)
    ax.set_title(title, fontsize=9)


def plot_block_attention(
    images: torch.Tensor,
    maps: Sequence[torch.Tensor],
    path: str | Path,
    query: tuple[float, float] = (0.5, 0.5),
    blocks: Sequence[int] | None = None,
    title: str | None = None,
) -> Path:
    """Per image: the image with a query point, then one panel per block with that query token's attention.

    ``maps`` is what ``FAN.forward_attention_maps`` returns: one ``(n, heads, H, W, H, W)`` tensor per block (grids
    may differ between blocks, e.g. after the xlarge downsample). Each panel is the head-mean attention of the token
    under ``query`` over all tokens of that block, up-sampled onto the image.

    Args:
        images: (n, 3, S, S) in [0, 1].
        maps: Per-block token-mixing attention, ``maps[k][i, h, qi, qj]`` an ``(H, W)`` map.
        path: Output PNG.
        query: Query position as fractions (row, column) of the image height and width; default the centre.
        blocks: Block numbers for the panel titles (default 0, 1, ...).
        title: Figure title.
    """
    if not maps:
        raise ValueError("nothing to plot: no attention maps")
    if not (0 <= query[0] <= 1 and 0 <= query[1] <= 1):
        raise ValueError(f"query {query} must be fractions of the image size in [0, 1]")
    names = list(blocks) if blocks is not None else list(range(len(maps)))
    if len(names) != len(maps):
        raise ValueError(f"{len(names)} block names for {len(maps)} attention maps")
    for m in maps:
        if m.ndim != 6 or m.shape[0] != images.shape[0] or m.shape[2:4] != m.shape[4:6]:
            raise ValueError(f"expected (n, heads, H, W, H, W) attention maps for {images.shape[0]} images, "
                             f"got {tuple(m.shape)}")  # fmt: skip
    n = images.shape[0]
    size = (int(images.shape[-2]), int(images.shape[-1]))
    fig, axes = plt.subplots(n, 1 + len(maps), figsize=(2.2 * (1 + len(maps)), 2.2 * n), squeeze=False)
    for i in range(n):
        img = images[i].permute(1, 2, 0).numpy()
        axes[i, 0].imshow(img)
        axes[i, 0].plot(query[1] * (size[1] - 1), query[0] * (size[0] - 1), "c+", ms=12, mew=2)
        axes[i, 0].set_title("image + query", fontsize=9)
        for j, m in enumerate(maps):
            H, W = m.shape[2:4]
            qi, qj = min(int(query[0] * H), H - 1), min(int(query[1] * W), W - 1)
            att = m[i, :, qi, qj].float().mean(0)  # (heads, H, W) -> (H, W)
            _heat_overlay(axes[i, 1 + j], img, att, size, f"block {names[j]}")
    return _save_grid(fig, axes, path, title)


def plot_corruption_bars(
    per_corruption: Mapping[str, Mapping[str, float]],
    path: str | Path,
    clean: Mapping[str, float] | None = None,
    title: str = "accuracy per corruption (mean over severities)",
) -> Path:
    """Grouped bars: one group per corruption, one bar per run.

    Args:
        per_corruption: ``{run: {corruption: accuracy}}``.
        clean: ``{run: clean accuracy}``, drawn as a dashed line per run.
        path: Output PNG.
        title: Figure title.
    """
    runs = list(per_corruption)
    names = sorted({c for v in per_corruption.values() for c in v})
    if not runs or not names:
        raise ValueError("nothing to plot: no corruption results")
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * max(1, len(runs) / 2) + 2), 4))
    for j, r, color in _grouped_bar_runs(runs):
        vals = [100 * per_corruption[r].get(c, np.nan) for c in names]
        ax.bar(_group_offsets(len(names), j, len(runs)), vals, 0.8 / len(runs), label=r, color=color)
        if clean and r in clean:
            ax.axhline(100 * clean[r], color=color, ls="--", lw=1)
    ax.set_xticks(np.arange(len(names)), [c.replace("_", " ") for c in names], rotation=45, ha="right", fontsize=8)
    return _finish_accuracy_bars(fig, ax, path, title + ("; dashed: clean" if clean else ""))


def _grouped_bar_runs(runs: list[str]) -> list[tuple[int, str, Any]]:
    """``(index, run, colour)`` of each run in a grouped bar chart (tab10, cycled)."""
    colors = plt.get_cmap("tab10")
    return [(j, r, colors(j % 10)) for j, r in enumerate(runs)]


def _group_offsets(groups: int, j: int, runs: int) -> np.ndarray:
    """The x positions of run ``j``'s bars: ``runs`` bars side by side, centred on each of ``groups`` ticks."""
    return np.arange(groups) + (j - (runs - 1) / 2) * (0.8 / runs)


def _finish_accuracy_bars(fig: Any, ax: Any, path: str | Path, title: str) -> Path:
    """The common axes of the accuracy bar charts (0-100 %, legend, grid), then save."""
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def plot_ood_bars(
    accuracy: Mapping[str, Mapping[str, tuple[float, float, float]]],
    path: str | Path,
    title: str = "top-1 per evaluation set (bars: 95 % Wilson interval)",
) -> Path:
    """Grouped bars: one group per set (clean, then the OOD sets), one bar per model, with interval whiskers.

    Args:
        accuracy: ``{model: {set: (accuracy, interval low, interval high)}}`` as fractions; a NaN bound draws no
            whisker.
        path: Output PNG.
        title: Figure title.
    """
    runs = list(accuracy)
    sets = list(dict.fromkeys(s for v in accuracy.values() for s in v))
    if not runs or not sets:
        raise ValueError("nothing to plot: no OOD results")
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(sets) * max(1, len(runs) / 2) + 2), 3.8))
    for j, r, color in _grouped_bar_runs(runs):
        vals = np.array([accuracy[r].get(s, (np.nan, np.nan, np.nan)) for s in sets], dtype=float) * 100
        err = np.nan_to_num(np.abs(np.stack([vals[:, 0] - vals[:, 1], vals[:, 2] - vals[:, 0]])))
        ax.bar(_group_offsets(len(sets), j, len(runs)), vals[:, 0], 0.8 / len(runs), yerr=err, capsize=3, label=r,
               color=color, error_kw={"lw": 1})  # fmt: skip
    tilt = len(sets) > 4
    ax.set_xticks(np.arange(len(sets)), sets, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    return _finish_accuracy_bars(fig, ax, path, title)


def plot_severity_curves(
    per_severity: Mapping[str, Mapping[int | str, float]],
    path: str | Path,
    clean: Mapping[str, float] | None = None,
    title: str = "accuracy vs corruption severity (mean over corruptions)",
) -> Path:
    """Accuracy against severity, one line per run, with the clean accuracy at severity 0.

    Args:
        per_severity: ``{run: {severity: accuracy}}``.
        clean: ``{run: clean accuracy}``.
        path: Output PNG.
        title: Figure title.
    """
    if not per_severity:
        raise ValueError("nothing to plot: no severity results")
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for r, sev in per_severity.items():
        pts = sorted((int(s), a) for s, a in sev.items())
        if clean and r in clean:
            pts = [(0, clean[r])] + pts
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=r)
    ax.set_xlabel("severity (0 = clean)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(range(0, 6))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def plot_reliability(reliability: Mapping[str, Mapping[str, Any]], path: str | Path) -> Path:
    """Reliability diagrams side by side: accuracy per confidence bin against the diagonal, bin counts below.

    Args:
        reliability: ``{run: Reliability.to_dict()}`` (``edges``, ``counts``, ``accuracy``, ``confidence``, ``ece``).
        path: Output PNG.
    """
    if not reliability:
        raise ValueError("nothing to plot: no reliability data")
    n = len(reliability)
    fig, axes = plt.subplots(2, n, figsize=(3.3 * n, 4.6), squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    for j, (r, rel) in enumerate(reliability.items()):
        edges = np.asarray(rel["edges"])
        centers = (edges[:-1] + edges[1:]) / 2
        w = np.diff(edges)
        acc = np.array([np.nan if v is None else v for v in rel["accuracy"]], dtype=float)
        conf = np.array([np.nan if v is None else v for v in rel["confidence"]], dtype=float)
        ax = axes[0, j]
        ax.bar(centers, np.nan_to_num(acc), w, edgecolor="k", lw=0.5, label="accuracy")
        gap = np.where(np.isnan(acc), 0, np.abs(conf - acc))
        low = np.nan_to_num(np.fmin(acc, conf))
        ax.bar(centers, gap, w, bottom=low, color="#d62728", alpha=0.35, label="gap to confidence")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{r}\nECE = {100 * rel['ece']:.2f}%", fontsize=9)
        if j == 0:
            ax.set_ylabel("accuracy")
            ax.legend(fontsize=7, loc="upper left")
        axes[1, j].bar(centers, rel["counts"], w, color="grey")
        axes[1, j].set_xlim(0, 1)
        axes[1, j].set_xlabel("confidence")
        if j == 0:
            axes[1, j].set_ylabel("count")
    fig.tight_layout()
    return _save(fig, path)


def plot_confusion(
    panels: Mapping[str, tuple[Sequence[Sequence[int]], Sequence[str]]], path: str | Path, title: str | None = None
) -> Path:
    """Confusion matrices side by side, each row normalised to the share of that true class (rows: true class).

    Args:
        panels: ``{run: (K x K counts, K class names)}``.
        path: Output PNG.
        title: Figure title.
    """
    if not panels:
        raise ValueError("nothing to plot: no confusion matrix")
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.6), squeeze=False)
    for ax, (r, (counts, names)) in zip(axes[0], panels.items(), strict=True):
        m = np.asarray(counts, dtype=float)
        share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        k = len(names)
        if k <= 20:
            ax.set_xticks(range(k), [str(c) for c in names], rotation=90, fontsize=7)
            ax.set_yticks(range(k), [str(c) for c in names], fontsize=7)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(r, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_training_curves(runs: Mapping[str, str | Path], path: str | Path, smooth: int = 20) -> Path:
    """Training curves of several runs: step loss (moving average over ``smooth`` records) and validation top-1.

    Args:
        runs: ``{name: run dir}`` (each with ``metrics.jsonl``).
        path: Output PNG.
        smooth: Moving-average window of the step loss.
    """
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.8))
    any_val = False
    for name, run in runs.items():
        recs = read_metrics(run)
        steps = [(r["step"], r["loss"]) for r in recs if r.get("kind") == "step" and _finite(r.get("loss"))]
        if steps:
            s, loss = np.array(steps, dtype=float).T
            k = max(1, min(smooth, len(loss) // 5 or 1))
            ma = np.convolve(loss, np.ones(k) / k, mode="valid")
            ax_loss.plot(s[k - 1 :], ma, label=name)
        val = []
        for r in recs:
            key = next((k for k in _VAL_KEYS if _finite(r.get(k))), None) if r.get("kind") == "val" else None
            if key is not None:
                val.append((r.get("epoch", r["step"]), r[key]))
        if val:
            any_val = True
            e, acc = np.array(val, dtype=float).T
            acc = acc * 100 if acc.max() <= 1 else acc
            ax_val.plot(e, acc, marker="o", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (moving average)")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend(fontsize=8)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation top-1 (%)")
    ax_val.grid(alpha=0.3)
    if any_val:
        ax_val.legend(fontsize=8)
    else:
        ax_val.text(0.5, 0.5, "no validation records", ha="center", va="center", transform=ax_val.transAxes)
    fig.tight_layout()
    return _save(fig, path)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def save_token_pictures(result: Any, out_dir: str | Path) -> list[Path]:
    """Write ``token_labels.png`` and (for FAN) ``class_attention.png`` from a ``TokenResult``'s examples."""
    ex = result.examples
    if ex is None:
        return []
    out = [plot_token_labels(ex.images, ex.pred, ex.conf, ex.labels, result.classes, Path(out_dir) / "token_labels.png",
                             masks=ex.masks, title=f"{result.name}: token labels ({result.source})")]  # fmt: skip
    if ex.attention is not None:
        out.append(plot_class_attention(ex.images, ex.attention, Path(out_dir) / "class_attention.png",
                                        title=f"{result.name}: class attention"))  # fmt: skip
    return out
