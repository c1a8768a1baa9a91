"""Linear probes of a frozen backbone (the second standard SSL evaluation), in two protocols.

``cached`` (default, fast): the features are extracted once (``tokenlab.eval.knn.extract_features``, kinds
``cls``, ``cls_avgpool``, ``last4_cls``, ...) from centre crops; the probe standardises each feature with the
training mean and std and trains one linear layer with softmax cross-entropy, SGD (momentum 0.9) and a cosine
learning-rate schedule:

    z = (f - mu) / sigma,   logits = W z + b,   L = -(1/B) sum_b log softmax(logits_b)_{y_b}

The learning rate is picked from a small grid on a held-out part of the training features (never on the test
split), then the probe is retrained on every training feature with that rate and evaluated once on the test split.

``augmented`` (the published iBOT protocol, ``eval_linear_multi.py``): the linear layer sees features of freshly
augmented training images every epoch (random resized crop, scale 0.08-1, + horizontal flip; no colour
augmentation), without standardisation (``logits = W f + b``, W ~ N(0, 0.01), b = 0), SGD momentum 0.9, no weight
decay, the learning rate ``lr x batch / 256`` with a per-epoch cosine to 0 over 100 epochs, one classifier per
learning rate of the grid ``{1..9} x 10^{-4..0}`` trained side by side on the same batches; every classifier is
evaluated on the test split after every epoch and the best accuracy over (lr, epoch) is reported, as published (so
the choice is made on the reported split; the ``cached`` protocol does not do that).

Evaluation preprocessing for both (and the k-NN): iBOT's, resize 256 bicubic + centre crop 224, i.e. ``crop_pct``
224/256 with bicubic interpolation through ``EvalTransform``, scaled to other input sizes
(``SSL_EVAL_CROP_PCT``, ``SSL_EVAL_INTERPOLATION``); results record the preprocessing and the protocol.

``evaluate_ssl_run`` is what ``tokenlab eval-ssl`` runs: the exported backbone of a run (``RUN/model``), optionally
next to the same architecture randomly initialised, through k-NN and the linear probe on cached features.
``finetune_run`` fine-tunes the backbone through the engine with layer-wise lr decay (a recipe such as
``ibot_cifar10_finetune``; timm ``create_optimizer_v2(layer_decay=...)``), loading the exported weights through
``model.pretrained=RUN/model`` (``tokenlab.models.load_pretrained``, the one fine-tune loader).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenlab.eval.knn import FeatureSet, KNNResult, extract_features, features_of, knn_classify
from tokenlab.models.contract import as_backbone
from tokenlab.utils.amp import autocast
from tokenlab.utils.runs import EVAL_SSL_FILE, export_stem

__all__ = [
    "LINEAR_PROTOCOLS",
    "PUBLISHED_LINEAR_LRS",
    "SSL_EVAL_CROP_PCT",
    "SSL_EVAL_INTERPOLATION",
    "FrozenEvalResult",
    "LinearResult",
    "SSLRunResult",
    "evaluate_frozen",
    "evaluate_ssl_run",
    "finetune_run",
    "linear_probe",
    "linear_probe_augmented",
    "train_linear",
]

logger = logging.getLogger(__name__)

#: Linear-probe protocols: fast probe on cached centre-crop features, or iBOT's probe on augmented images.
LINEAR_PROTOCOLS = ("cached", "augmented")
#: iBOT's learning-rate grid of eval_linear_multi.py: {1, ..., 9} x 10^k, k = -4 .. 0 (scaled by batch / 256).
PUBLISHED_LINEAR_LRS = tuple(n * 10.0**k for k in range(-4, 1) for n in range(1, 10))
#: iBOT's k-NN / linear evaluation preprocessing: Resize(256, bicubic) + CenterCrop(224).
SSL_EVAL_CROP_PCT = 224 / 256
SSL_EVAL_INTERPOLATION = "bicubic"


@dataclass
class LinearResult:
    """Linear-probe accuracy.

    Attributes:
        top1: Top-1 accuracy on the test features, in [0, 1].
        top5: Top-5 accuracy (1 with 5 classes or fewer).
        lr: Learning rate chosen (``augmented``: before the ``batch / 256`` scaling).
        val_top1: Accuracy of every tried learning rate on the split it was chosen on (``cached``: held-out training
            features; ``augmented``: the test split, best over epochs).
        epochs: Training epochs.
        protocol: ``cached`` or ``augmented`` (``LINEAR_PROTOCOLS``).
        selected_on: Where the learning rate (and, ``augmented``, the epoch) was chosen.
        best_epoch: ``augmented``: the epoch (1-based) of the reported accuracy.
    """

    top1: float
    top5: float
    lr: float
    val_top1: dict[float, float] = field(default_factory=dict)
    epochs: int = 0
    protocol: str = "cached"
    selected_on: str = "held-out training features"
    best_epoch: int | None = None


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    top1 = (ranked[:, 0] == labels).float().mean().item()
    top5 = (ranked == labels.unsqueeze(1)).any(dim=1).float().mean().item()
    return top1, top5


def train_linear(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lr: float,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> nn.Module:
    """Train ``Linear(D, C)`` on standardised ``features`` (N, D); returns a module that standardises then projects.

    Raises:
        ValueError: non-positive lr/epochs/batch size or mismatched lengths.
    """
    if lr <= 0 or epochs < 1 or batch_size < 1:
        raise ValueError(f"need lr > 0, epochs >= 1, batch_size >= 1; got {lr}, {epochs}, {batch_size}")
    if features.shape[0] != labels.shape[0]:
        raise ValueError(f"{features.shape[0]} features but {labels.shape[0]} labels")
    g = torch.Generator().manual_seed(seed)
    mean, std = features.mean(dim=0), features.std(dim=0).clamp(min=1e-6)
    z = (features - mean) / std
    linear = nn.Linear(features.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.01, generator=g)
        linear.bias.zero_()
    opt = torch.optim.SGD(linear.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = features.shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            for group in opt.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(linear(z[idx]), labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return _Standardised(mean, std, linear)


class _Standardised(nn.Module):
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear((x - self.mean) / self.std)


@torch.no_grad()
def _evaluate(probe: nn.Module, data: FeatureSet) -> tuple[float, float]:
    return _accuracy(probe(data.features.float()), data.labels)


def linear_probe(
    train: FeatureSet,
    test: FeatureSet,
    lrs: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    val_fraction: float = 0.1,
    num_classes: int | None = None,
    seed: int = 0,
) -> LinearResult:
    """Pick the lr on held-out training features, retrain on all of them, report test accuracy.

    Args:
        train: Cached training features.
        test: Cached test features (used once, at the end).
        lrs: Learning rates tried (one rate skips the selection).
        epochs: Epochs over the cached features.
        batch_size: Mini-batch size.
        weight_decay: L2 penalty of the SGD optimizer.
        val_fraction: Share of the training features held out for choosing the lr.
        num_classes: C (defaults to ``max label + 1``).
        seed: Seeds the split, the initialisation and the shuffling.

    Raises:
        ValueError: an empty lr grid, ``val_fraction`` outside (0, 1), or feature sizes that differ.
    """
    if not lrs:
        raise ValueError("lrs must hold at least one learning rate")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if train.features.shape[1] != test.features.shape[1]:
        raise ValueError(f"feature sizes differ: train {train.features.shape[1]}, test {test.features.shape[1]}")
    classes = int(num_classes or int(max(train.labels.max(), test.labels.max())) + 1)
    x, y = train.features.float(), train.labels
    val_top1: dict[float, float] = {}
    if len(lrs) > 1:
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
        n_val = max(1, int(round(val_fraction * len(y))))
        val_idx, fit_idx = order[:n_val], order[n_val:]
        held_out = FeatureSet(x[val_idx], y[val_idx], train.kind)
        for lr in lrs:
            probe = train_linear(x[fit_idx], y[fit_idx], classes, lr, epochs, batch_size, weight_decay, seed)
            val_top1[float(lr)] = _evaluate(probe, held_out)[0]
            logger.info("linear probe lr %g: held-out top-1 %.4f", lr, val_top1[float(lr)])
        best = max(val_top1, key=lambda k: val_top1[k])
    else:
        best = float(lrs[0])
    probe = train_linear(x, y, classes, best, epochs, batch_size, weight_decay, seed)
    top1, top5 = _evaluate(probe, test)
    return LinearResult(top1, top5, best, val_top1, epochs)


def linear_probe_augmented(
    model: nn.Module,
    train_set: Any,
    test: FeatureSet,
    kind: str = "cls",
    lrs: Sequence[float] = PUBLISHED_LINEAR_LRS,
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
    amp: str | torch.dtype | None = None,
    workers: int = 0,
    val_every: int = 1,
    seed: int = 0,
) -> LinearResult:
    """The published iBOT linear probe: one classifier per lr on augmented images, best (lr, epoch) on ``test``.

    Args:
        model: Frozen backbone (eval mode, no gradient).
        train_set: Map-style data set of ``{"image", "label"}`` samples with the training augmentation (random
            resized crop + flip); drawn through the engine's seeded training loader.
        test: Features of the reported split (centre crops; computed once, they do not change).
        kind: Feature kind (``last4_cls`` for ViT-S, ``cls_avgpool`` for ViT-B/L, as published).
        lrs: Learning-rate grid (each is scaled by ``batch_size / 256``).
        epochs: Epochs over ``train_set`` (100).
        batch_size: Mini-batch size (the last incomplete batch is dropped).
        weight_decay: SGD weight decay (0 in iBOT's lr-only sweep).
        num_classes: C (defaults to the training set's ``classes``, else ``max test label + 1``).
        device: Where the backbone and the classifiers run.
        amp: Autocast of the backbone.
        workers: Loader processes.
        val_every: Evaluate every this many epochs (and after the last).
        seed: Seeds the initialisation, the order and the augmentation.

    Raises:
        ValueError: an empty lr grid, non-positive lr/epochs/batch size, a data set smaller than one batch, or
            feature sizes that differ.
    """
    from tokenlab.data.sampler import ResumableSampler, build_train_loader

    if not lrs or min(lrs) <= 0 or epochs < 1 or batch_size < 1 or val_every < 1:
        raise ValueError(f"need lrs > 0, epochs >= 1, batch_size >= 1, val_every >= 1; got {lrs}, {epochs}, "
                         f"{batch_size}, {val_every}")  # fmt: skip
    n = len(train_set)
    batch = min(batch_size, n)
    device = torch.device(device)
    model.eval().to(device)
    sampler = ResumableSampler(n, shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    dim = test.features.shape[1]
    named = getattr(getattr(train_set, "dataset", train_set), "classes", None)  # a Subset's data set has them
    classes = int(num_classes or (len(named) if named else int(test.labels.max()) + 1))
    linears = [nn.Linear(dim, classes) for _ in lrs]
    with torch.no_grad():
        for linear in linears:
            linear.weight.normal_(0.0, 0.01, generator=g)
            linear.bias.zero_()
    heads = nn.ModuleList(linears).to(device)
    scale = batch / 256  # iBOT's linear scaling rule
    groups: list[dict[str, Any]] = [
        {"params": list(h.parameters()), "lr": lr * scale, "base_lr": lr * scale}
        for h, lr in zip(heads, lrs, strict=True)
    ]
    opt = torch.optim.SGD(groups, lr=float(lrs[0]) * scale, momentum=0.9, weight_decay=weight_decay)
    best: dict[float, tuple[float, float, int]] = {}  # lr -> (top1, top5, epoch)
    test_x, test_y = test.features.float().to(device), test.labels.to(device)
    for epoch in range(epochs):
        for group in opt.param_groups:  # torch's CosineAnnealingLR(T_max=epochs, eta_min=0), stepped per epoch
            group["lr"] = group["base_lr"] * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
        heads.train()
        for sample in build_train_loader(train_set, batch, sampler, epoch, num_workers=workers):
            with torch.no_grad(), autocast(device, amp):
                feats = features_of(model, sample["image"].to(device, non_blocking=True), kind)
            feats, target = feats.float(), sample["label"].to(device)
            if feats.shape[1] != dim:
                raise ValueError(f"feature sizes differ: train {feats.shape[1]}, test {dim}")
            loss = sum(F.cross_entropy(head(feats), target) for head in heads)  # independent heads: one backward
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[union-attr]
            opt.step()
        if (epoch + 1) % val_every and epoch + 1 != epochs:
            continue
        heads.eval()
        with torch.no_grad():
            for head, lr in zip(heads, lrs, strict=True):
                top1, top5 = _accuracy(head(test_x), test_y)
                if float(lr) not in best or top1 >= best[float(lr)][0]:
                    best[float(lr)] = (top1, top5, epoch + 1)
        logger.info("augmented linear probe epoch %d: best top-1 so far %.4f", epoch + 1, max(best.values())[0])
    lr = max(best, key=lambda k: (best[k][0], -best[k][2]))
    top1, top5, at = best[lr]
    return LinearResult(top1, top5, lr, {k: v[0] for k, v in best.items()}, epochs, "augmented",
                        "test split (best over learning rates and epochs, as published)", at)  # fmt: skip


@dataclass
class FrozenEvalResult:
    """k-NN and linear-probe results of one frozen backbone.

    Attributes:
        kind: Feature kind evaluated.
        feature_dim: Size of the features.
        knn: k-NN result (None when skipped).
        linear: Linear-probe result (None when skipped).
    """

    kind: str
    feature_dim: int
    knn: KNNResult | None = None
    linear: LinearResult | None = None

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        return asdict(self)


def evaluate_frozen(
    model: nn.Module,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    kind: str = "cls",
    knn: bool = True,
    k: int = 20,
    temperature: float = 0.07,
    linear: bool = True,
    linear_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    amp: str | torch.dtype | None = None,
    cache_dir: str | Path | None = None,
    linear_protocol: str = "cached",
    augmented_train: Any = None,
) -> FrozenEvalResult:
    """Extract (or read cached) features of both splits once, then run the k-NN and/or the linear probe.

    Args:
        model: Frozen backbone.
        train_loader: Batches of the split searched by the k-NN / fitted by the probe.
        test_loader: Batches of the split reported.
        kind: Feature kind (``tokenlab.eval.knn.FEATURE_KINDS``).
        knn: Run the weighted k-NN.
        k: Neighbours of the k-NN.
        temperature: Temperature of the k-NN vote weights.
        linear: Run the linear probe.
        linear_kwargs: Extra kwargs of ``linear_probe`` (``cached``) or ``linear_probe_augmented``.
        device: Where the backbone runs.
        amp: Autocast for feature extraction (``tokenlab.utils.amp``: a name or a dtype).
        cache_dir: Folder of ``train_<kind>.safetensors`` / ``test_<kind>.safetensors`` caches.
        linear_protocol: ``cached`` (fast, default) or ``augmented`` (iBOT's; see the module docstring).
        augmented_train: The ``augmented`` protocol's training set (augmenting transform).

    Raises:
        ValueError: an unknown protocol, or ``augmented`` without ``augmented_train``.
    """
    if linear_protocol not in LINEAR_PROTOCOLS:
        raise ValueError(f"unknown linear protocol {linear_protocol!r}; valid: {', '.join(LINEAR_PROTOCOLS)}")
    if linear and linear_protocol == "augmented" and augmented_train is None:
        raise ValueError("the augmented linear protocol needs the augmented training set (augmented_train)")
    cache = Path(cache_dir) if cache_dir is not None else None
    train = extract_features(
        model, train_loader, kind, device, amp, cache / f"train_{kind}.safetensors" if cache else None
    )
    test = extract_features(
        model, test_loader, kind, device, amp, cache / f"test_{kind}.safetensors" if cache else None
    )
    result = FrozenEvalResult(kind, int(train.features.shape[1]))
    if knn:
        result.knn = knn_classify(train, test, k=min(k, len(train)), temperature=temperature)
        logger.info("k-NN (k=%d, T=%g, %s): top-1 %.4f", result.knn.k, temperature, kind, result.knn.top1)
    if linear and linear_protocol == "augmented":
        extra = {"device": device, "amp": amp} | dict(linear_kwargs or {})
        result.linear = linear_probe_augmented(model, augmented_train, test, kind, **extra)
    elif linear:
        result.linear = linear_probe(train, test, **dict(linear_kwargs or {}))
    if result.linear is not None:
        logger.info("linear probe (%s, %s, lr %g): top-1 %.4f", linear_protocol, kind, result.linear.lr,
                    result.linear.top1)  # fmt: skip
    return result


def _subset_indices(n: int, size: int | None, seed: int) -> list[int] | None:
    if size is None or size >= n:
        return None
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].tolist())


@dataclass
class SSLRunResult:
    """What :func:`evaluate_ssl_run` measured; ``to_dict()`` is the ``eval_ssl.json`` schema.

    Attributes:
        run, data, model, train_split, test_split: What was evaluated.
        num_train, num_test: Images in the feature bank / probe fit and in the report split.
        results: ``{"pretrained" | "random": {feature kind: FrozenEvalResult}}``.
        skipped: Unreadable images left out of the two splits.
        preprocessing: The evaluation transform's keys (``EvalTransform.meta()``: size, crop_pct, interpolation).
        linear_protocol: ``cached`` or ``augmented``.
    """

    run: str
    data: str
    model: str
    train_split: str
    test_split: str
    num_train: int
    num_test: int
    results: dict[str, dict[str, FrozenEvalResult]] = field(default_factory=dict)
    skipped: int = 0
    preprocessing: dict[str, Any] = field(default_factory=dict)
    linear_protocol: str = "cached"

    def to_dict(self) -> dict[str, Any]:
        """This result as plain JSON-ready data."""
        return {
            "preprocessing": self.preprocessing, "linear_protocol": self.linear_protocol,
            "run": self.run, "data": self.data, "model": self.model, "train_split": self.train_split,
            "test_split": self.test_split, "num_train": self.num_train, "num_test": self.num_test,
            "results": {label: {kind: r.to_dict() for kind, r in by_kind.items()}
                        for label, by_kind in self.results.items()},
            "skipped": self.skipped,
        }  # fmt: skip


def evaluate_ssl_run(
    run: str | Path,
    data: str = "cifar10",
    train_split: str = "train",
    test_split: str = "test",
    kinds: Sequence[str] = ("cls",),
    knn: bool = True,
    linear: bool = True,
    k: int = 20,
    temperature: float = 0.07,
    linear_kwargs: dict[str, Any] | None = None,
    batch_size: int = 256,
    workers: int = 0,
    device: str = "cpu",
    amp: str | torch.dtype | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    random_init: bool = False,
    seed: int = 0,
    out: str | Path | None = None,
    crop_pct: float | None = SSL_EVAL_CROP_PCT,
    interpolation: str | None = SSL_EVAL_INTERPOLATION,
    linear_protocol: str = "cached",
) -> SSLRunResult:
    """k-NN / linear probe of ``RUN/model`` (and of a random initialisation of it); writes ``RUN/eval_ssl.json``.

    Images get iBOT's evaluation preprocessing by default (``crop_pct`` 224/256, bicubic: resize 256 + centre crop
    224 at 224 px, scaled at other sizes) through ``EvalTransform`` with the export's size, mean and std; ``None``
    for ``crop_pct`` / ``interpolation`` keeps the export's own (``eval_transform_from_meta``).

    Args:
        run: Run directory or exported model stem.
        data: Data-set spec for ``tokenlab.data.build_dataset`` (``cifar10``, a folder, a synthetic set, ...).
        train_split: Split of the feature bank / probe fit.
        test_split: Split reported.
        kinds: Feature kinds to evaluate.
        amp: Autocast for feature extraction (``none``/``bf16``/``fp16`` or a dtype).
        train_subset: Fixed random subset (seeded) of the train split, to bound the cost on a CPU.
        test_subset: Likewise for the test split.
        random_init: Also evaluate the same architecture with random weights (``torch.manual_seed(seed)``).
        out: JSON path (default ``RUN/eval_ssl.json``; the run's folder when ``run`` is a model stem).
        knn: Run the weighted k-NN.
        k: Neighbours of the k-NN.
        temperature: Temperature of the k-NN vote weights.
        linear: Run the linear probe.
        linear_kwargs: Extra kwargs of ``linear_probe``.
        batch_size: Feature-extraction batch size.
        workers: DataLoader workers.
        device: Where the backbone runs.
        seed: Seed of the subsets and of ``random_init``.
        crop_pct: Centre-crop fraction of the evaluation transform (None: the export's).
        interpolation: Resize interpolation of the evaluation transform (None: the export's).
        linear_protocol: ``cached`` (fast probe on cached features) or ``augmented`` (iBOT's protocol: training
            images with random resized crop + flip, lr grid, best on the test split).

    Raises:
        ValueError: an unknown protocol, or a bad ``crop_pct`` / ``interpolation``.
    """
    import json

    import timm
    from torch.utils.data import DataLoader, Subset

    from tokenlab.data import build_dataset, build_transforms, eval_transform_from_meta
    from tokenlab.models import load_exported

    if linear_protocol not in LINEAR_PROTOCOLS:
        raise ValueError(f"unknown linear protocol {linear_protocol!r}; valid: {', '.join(LINEAR_PROTOCOLS)}")
    run = Path(run)
    model, meta = load_exported(run)
    run_dir = run if run.is_dir() else run.parent
    fallback = (
        None if meta.get("img_size") else int(as_backbone(model).pretrained_cfg.get("input_size", (3, 224, 224))[-1])
    )
    stored = eval_transform_from_meta(meta, img_size=fallback)
    transform = build_transforms(
        "eval",
        stored.img_size,
        crop_pct=stored.crop_pct if crop_pct is None else crop_pct,
        mean=stored.mean,
        std=stored.std,
        interpolation=stored.interpolation if interpolation is None else interpolation,
    )
    splits, skipped = {}, 0
    augmented: Any = None
    for name, split, size, offset in (("train", train_split, train_subset, 0), ("test", test_split, test_subset, 1)):
        dataset = build_dataset(data, split=split, transform=transform)
        skipped += len(dataset.skipped)
        idx = _subset_indices(len(dataset), size, seed + offset)
        splits[name] = dataset if idx is None else Subset(dataset, idx)
        if name == "train" and linear and linear_protocol == "augmented":
            # iBOT's probe training view: RandomResizedCrop (0.08-1) + flip, nothing else
            train_tf = build_transforms("classification", stored.img_size, rand_augment=None, re_prob=0.0,
                                        mean=stored.mean, std=stored.std)  # fmt: skip
            augmented = build_dataset(data, split=split, transform=train_tf)
            augmented = augmented if idx is None else Subset(augmented, idx)
    loaders = {
        name: DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers) for name, ds in splits.items()
    }
    tag = f"{data.replace('/', '_')}_{len(splits['train'])}_{len(splits['test'])}_s{seed}"
    tag += f"_{transform.img_size}_c{transform.crop_pct:.4f}_{transform.interpolation}"  # cached features per transform
    models = {"pretrained": model}
    if random_init:
        torch.manual_seed(seed)
        models["random"] = timm.create_model(meta["model"], **meta.get("model_kwargs", {}))
    if linear_protocol == "augmented":
        linear_kwargs = {"batch_size": batch_size, "workers": workers} | dict(linear_kwargs or {})
    result = SSLRunResult(str(run), data, meta["model"], train_split, test_split, len(splits["train"]),
                          len(splits["test"]), skipped=skipped, preprocessing=transform.meta(),
                          linear_protocol=linear_protocol)  # fmt: skip
    for label, backbone in models.items():
        result.results[label] = {}
        for kind in kinds:
            result.results[label][kind] = evaluate_frozen(
                backbone,
                loaders["train"],
                loaders["test"],
                kind,
                knn,
                k,
                temperature,
                linear,
                linear_kwargs,
                device,
                amp,
                run_dir / "ssl_features" / f"{label}_{tag}",
                linear_protocol,
                augmented,
            )
    out = Path(out) if out is not None else run_dir / EVAL_SSL_FILE
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result.to_dict(), indent=2, default=str))
    logger.info("wrote %s", out)
    return result


def finetune_run(run: str | Path, recipe: str | Path, overrides: Sequence[str] = ()) -> Any:
    """Fine-tune the exported backbone of ``run`` through the engine (recipe + dotlist overrides).

    The model name and architecture kwargs come from the run's export; the weights are ``model.pretrained=RUN/model``
    (``tokenlab.models.load_pretrained``: position embeddings resampled when ``img_size`` changes). Returns the engine's
    ``RunResult`` (``val`` holds the fine-tuned accuracy).
    """
    from tokenlab.engine.config import load_config
    from tokenlab.engine.trainer import train
    from tokenlab.models import load_exported

    run = Path(run)
    _, meta = load_exported(run)
    stem = export_stem(run)
    arch = [f"model.name={meta['model']}"] + [
        f"model.kwargs.{key}={value}"
        for key, value in meta.get("model_kwargs", {}).items()
        if key not in ("num_classes", "pretrained", "pretrained_cfg_overlay")
    ]
    weights = [f"model.pretrained={stem}"]
    run_dir = [f"run_dir={(run if run.is_dir() else run.parent) / 'finetune'}"]
    cfg = load_config(recipe, arch + weights + run_dir + list(overrides))
    return train(cfg)
