"""What a run is built from: device, data sets per data view, model and method, optimizer, schedules.

Kept apart from ``trainer.py`` so that the loop reads as a loop, and so that every method's data is built by the
same code from the method's declared ``data_view`` (``tokenlab.data.transforms.TRANSFORM_KINDS``): there is no
per-method entry point. The engine still knows methods only by their protocol (``tokenlab.methods``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sized
from typing import Any, cast

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from tokenlab.data.transforms import TRANSFORM_KINDS
from tokenlab.engine.config import cfg_dict
from tokenlab.methods import Method, build_method, get_method_class
from tokenlab.utils import distributed as D
from tokenlab.utils.schedules import build_schedule, cosine_schedule

__all__ = [
    "DATA_VIEWS",
    "build_datasets",
    "build_method_from_config",
    "build_model",
    "build_optimizer",
    "build_schedules",
    "clip_gradients",
    "data_meta",
    "dataset_len",
    "param_groups",
    "shard_method",
    "unsharded_copy",
]

#: The training data views the engine can build (the data layer's transform vocabulary, less ``eval``).
DATA_VIEWS = tuple(view for view in TRANSFORM_KINDS if view != "eval")
_SEGMENTATION_DATASET_KEYS = ("ignore_index", "num_classes")


def build_model(name: str, num_classes: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """``tokenlab.models.create_model(name, num_classes=K, **kwargs)``; bad kwargs raise a ValueError naming them."""
    from tokenlab.models import create_model

    kwargs = dict(kwargs or {})
    try:
        return create_model(name, num_classes=num_classes, **kwargs)
    except TypeError as err:
        raise ValueError(f"model {name!r} does not accept model.kwargs {sorted(kwargs)}: {err}") from None


def build_method_from_config(cfg: DictConfig, meta: Mapping[str, Any]) -> Method:
    """The model of ``cfg.model`` inside the method of ``cfg.method``.

    The classes come from the data when ``model.num_classes`` is null; the method's ``data_kwargs(meta)`` are
    defaults that ``method.kwargs`` override. ``model.pretrained`` (a published FAN / STL / iBOT checkpoint or a
    tokenlab export) is loaded into the model before the method is built (``tokenlab.models.load_pretrained``: the
    classifier re-initialised, every other key matched); what was loaded is kept as ``method.pretrained_from``.
    """
    num_classes = cfg.model.num_classes
    if num_classes is None:
        num_classes = meta.get("num_classes") or len(meta.get("classes", ())) or None
    if num_classes is None:
        raise ValueError("model.num_classes is not set and the data set does not say how many classes it has")
    model = build_model(cfg.model.name, int(num_classes), cfg_dict(cfg.model.kwargs))
    pretrained = None
    if cfg.model.pretrained is not None:  # before the method (a teacher copies the model) and the optimizer
        from tokenlab.models import load_pretrained

        pretrained = load_pretrained(model, cfg.model.pretrained, cfg.model.pretrained_prefer)
    cls = get_method_class(cfg.method.name)
    kwargs = cls.data_kwargs(dict(meta)) | cfg_dict(cfg.method.kwargs)
    method = build_method(cfg.method.name, model=model, **kwargs)
    method.pretrained_from = pretrained  # the export's model.json records it (``pretrained``)
    return method


def shard_method(method: Method, ema_enabled: bool = False) -> None:
    """FSDP2: shard every transformer block of ``method.model``, then the method as the root (the rest).

    The method's ``forward`` (the training step) runs through the root's hooks; validation and export run the model
    outside it, so the trainer unshards the root for them (the blocks gather their own in their hooks). Runs before
    the optimizer is built: it swaps the parameters for DTensors.
    """
    from torch.distributed.fsdp import fully_shard

    if ema_enabled:
        raise ValueError("train.ema.enabled is not supported with train.distributed=fsdp (use ddp)")
    D.broadcast_module(method)  # one initialisation: each rank keeps its shard of rank 0's weights
    for block in getattr(method.model, "blocks", []):
        fully_shard(block)
    fully_shard(method)


def unsharded_copy(cfg: DictConfig, method: Method, target: nn.Module, is_main: bool) -> nn.Module | None:
    """FSDP2: an unsharded CPU copy of ``target`` (a submodule of ``method``) on rank 0, ``None`` elsewhere.

    The copy is rebuilt from ``cfg.model``. A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(method, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main:
        return None
    prefix = next(name for name, m in method.named_modules() if m is target)
    prefix = f"{prefix}." if prefix else ""
    num_classes = int(getattr(target, "num_classes", cfg.model.num_classes or 0))
    model = build_model(cfg.model.name, num_classes, cfg_dict(cfg.model.kwargs))
    model.load_state_dict({k[len(prefix) :]: v for k, v in full.items() if k.startswith(prefix)}, strict=True)
    return model


# ---- data -------------------------------------------------------------------------------------------------------
def build_datasets(
    cfg: DictConfig, data_view: str = "classification", transform_options: Mapping[str, Any] | None = None
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """Training and validation sets of a data view from ``cfg.data``, and the meta stored with the exported model.

    Args:
        cfg: The run config. For the image views ``data.name``/``data.root`` is a data-set spec (a folder, a list
            file, a synthetic set or ``cifar10``); for ``segmentation`` ``data.name`` is the layout (``synthetic``,
            ``cityscapes``, ``folder``) and ``data.root`` its location; for ``detection`` ``data.root`` is a COCO-format
            tree (``annotations/instances_<split>.json`` + ``<split>/``).
        data_view: The method's sample layout (``Method.data_view``).
        transform_options: The method's extra transform kwargs (``Method.transform_options``).

    Raises:
        ValueError: an unknown view, or settings the data layer rejects.
    """
    if data_view not in DATA_VIEWS:
        raise ValueError(f"unknown data_view {data_view!r}; valid: {', '.join(DATA_VIEWS)}")
    if data_view == "segmentation":
        train_set, val_set, meta = _segmentation_datasets(cfg)
    elif data_view == "detection":
        train_set, val_set, meta = _detection_datasets(cfg)
    else:
        train_set, val_set, meta = _image_datasets(cfg, data_view, transform_options)
        _check_label_store(cfg, train_set)
    train_set = _subset(train_set, cfg.data.train_subset, cfg.seed)
    if val_set is not None:
        val_set = _subset(val_set, cfg.data.val_subset, cfg.seed + 1)
    return train_set, val_set, meta


def _image_datasets(
    cfg: DictConfig, data_view: str, transform_options: Mapping[str, Any] | None
) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    from tokenlab.data import build_dataset, build_transforms

    d = cfg.data
    spec = d.root if d.root is not None else d.name
    extra_t = cfg_dict(d.transform)
    train_tf = build_transforms(data_view, d.img_size, **dict(transform_options or {}), **extra_t)
    dataset_kwargs = cfg_dict(d.dataset)
    train_set = build_dataset(spec, split=d.train_split, transform=train_tf, **dataset_kwargs)
    val_set = None
    norm = {k: extra_t[k] for k in ("mean", "std") if k in extra_t}
    meta = data_meta(train_set)
    meta.setdefault("mean", [float(v) for v in norm.get("mean", IMAGENET_DEFAULT_MEAN)])
    meta.setdefault("std", [float(v) for v in norm.get("std", IMAGENET_DEFAULT_STD)])
    # the one evaluation preprocessing: validation runs it, and the export stores its keys for every later evaluation
    val_tf = build_transforms("eval", d.img_size, mean=meta["mean"], std=meta["std"], **cfg_dict(d.eval))
    meta.update(val_tf.meta())
    if d.val_split is not None:
        val_set = build_dataset(spec, split=d.val_split, transform=val_tf, classes=list(train_set.classes),
                                **dataset_kwargs)  # fmt: skip
    return train_set, val_set, meta


def _check_label_store(cfg: DictConfig, train_set: Dataset) -> None:
    """A ``method.kwargs.label_store`` must hold the labels of exactly this training set (rows = sample indices)."""
    store = cfg_dict(cfg.method.kwargs).get("label_store")
    if store is None:
        return
    from tokenlab.data.label_store import LabelStore

    samples = getattr(train_set, "samples", None)
    if samples is None:
        raise ValueError(f"method.kwargs.label_store needs an image data set with a file list; got "
                         f"{type(train_set).__name__}")  # fmt: skip
    LabelStore.open(store).check_data([p for p, _ in samples], [y for _, y in samples])


def _segmentation_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """The ``SegmentationDataset``s of ``cfg.data``.

    ``data.dataset`` may hold ``ignore_index`` / ``num_classes``, ``data.transform`` the augmentation options of the
    ``segmentation`` view.
    """
    from tokenlab.data import build_transforms
    from tokenlab.data.segmentation import build_segmentation_dataset

    d = cfg.data
    if d.root is None:
        raise ValueError(f"data.root is not set: point it at the {d.name!r} segmentation data (for the synthetic set, "
                         f"create one with `tokenlab data synth --out DIR`)")  # fmt: skip
    extra = cfg_dict(d.dataset)
    unknown = sorted(set(extra) - set(_SEGMENTATION_DATASET_KEYS))
    if unknown:
        raise ValueError(f"unknown data.dataset option(s) {unknown} for segmentation; valid: ignore_index, num_classes")
    ignore = int(extra.get("ignore_index", 255))
    tf = cfg_dict(d.transform) | {"ignore_index": ignore}
    num_classes = extra.get("num_classes")
    train_tf = build_transforms("segmentation", d.img_size, train=True, **tf)
    train_set = build_segmentation_dataset(
        d.name, d.root, d.train_split, train_tf, ignore_index=ignore, num_classes=num_classes
    )
    val_set = None
    if d.val_split is not None:
        val_tf = build_transforms("segmentation", d.img_size, train=False, **tf)
        val_set = build_segmentation_dataset(
            d.name, d.root, d.val_split, val_tf, ignore_index=ignore, num_classes=num_classes
        )
    if cfg.model.num_classes is not None and cfg.model.num_classes != train_set.num_classes:
        raise ValueError(f"model.num_classes={cfg.model.num_classes} but the data set has {train_set.num_classes} "
                         f"classes")  # fmt: skip
    meta = {
        "classes": train_set.class_names, "num_classes": train_set.num_classes, "mean": train_set.mean,
        "std": train_set.std, "ignore_index": ignore, "task": "segmentation", "data": d.name,
    }  # fmt: skip
    return train_set, val_set, meta


def _detection_datasets(cfg: DictConfig) -> tuple[Dataset, Dataset | None, dict[str, Any]]:
    """The ``CocoDetection`` sets of ``cfg.data``: ``data.root`` holds ``annotations/instances_<split>.json``.

    ``data.dataset`` may hold ``masks`` (default true) and ``skip_empty`` (training images without annotations,
    default true); ``data.transform`` the ``detection`` view's options (``hflip``).
    """
    from tokenlab.data import build_transforms
    from tokenlab.data.detection import build_detection_dataset

    d = cfg.data
    if d.root is None:
        raise ValueError("data.root is not set: point it at a COCO-format tree (for the synthetic set, create one "
                         "with `tokenlab detect data --out DIR`)")  # fmt: skip
    extra = cfg_dict(d.dataset)
    unknown = sorted(set(extra) - {"masks", "skip_empty"})
    if unknown:
        raise ValueError(f"unknown data.dataset option(s) {unknown} for detection; valid: masks, skip_empty")
    masks = bool(extra.get("masks", True))
    tf = cfg_dict(d.transform)
    train_set = build_detection_dataset(d.root, d.train_split, build_transforms("detection", d.img_size, train=True,
                                        **tf), skip_empty=bool(extra.get("skip_empty", True)), masks=masks)  # fmt: skip
    val_set = None
    if d.val_split is not None:
        val_tf = build_transforms("detection", d.img_size, train=False, **tf)
        val_set = build_detection_dataset(d.root, d.val_split, val_tf, masks=masks)
        if val_set.classes != train_set.classes:
            raise ValueError(f"the categories of {d.val_split!r} differ from those of {d.train_split!r} in {d.root}")
    meta = {
        "classes": train_set.classes, "num_classes": train_set.num_classes, "mean": train_set.mean,
        "std": train_set.std, "task": "detection", "data": d.name, "skipped": train_set.skips.to_dict(),
    }  # fmt: skip
    return train_set, val_set, meta


def _subset(dataset: Dataset, size: int | None, seed: int) -> Dataset:
    """A fixed random subset of ``size`` samples (the whole set when ``size`` is None or not smaller)."""
    if size is None or size >= dataset_len(dataset):
        return dataset
    keep = torch.randperm(dataset_len(dataset), generator=torch.Generator().manual_seed(seed))[:size].sort().values
    return _Subset(dataset, keep.tolist())


class _Subset(Dataset):
    """Samples ``indices`` of ``dataset``.

    Unlike ``torch.utils.data.Subset`` it has no batched ``__getitems__``, which would bypass the per-sample seeding
    of ``SeededDataset`` (it forwards unknown attributes).
    """

    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.dataset[self.indices[i]]


def dataset_len(dataset: Dataset) -> int:
    """``len(dataset)``: torch's ``Dataset`` declares no ``__len__``, but every data set the engine builds has one."""
    return len(cast(Sized, dataset))


def data_meta(dataset: Dataset) -> dict[str, Any]:
    """``classes``, ``num_classes``, ``mean`` and ``std`` of a data set that has them (stored with the model)."""
    meta = {k: getattr(dataset, k) for k in ("classes", "mean", "std") if hasattr(dataset, k)}
    for k in ("mean", "std"):
        if k in meta:
            meta[k] = [float(v) for v in meta[k]]
    if "classes" in meta:
        meta["classes"] = list(meta["classes"])
        meta["num_classes"] = len(meta["classes"])
    return meta


# ---- optimizer and schedules ------------------------------------------------------------------------------------
def _no_decay_names(module: nn.Module) -> set[str]:
    """Full parameter names listed by ``no_weight_decay()`` of ``module`` or any submodule."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "no_weight_decay", None)
        if callable(fn):
            names |= {f"{prefix}.{n}" if prefix else n for n in fn()}
    return names


def _lr_scales(module: nn.Module) -> dict[str, float]:
    """``{parameter-name prefix: lr multiplier}`` declared by ``lr_scales()`` of ``module`` or any submodule."""
    scales: dict[str, float] = {}
    for prefix, sub in module.named_modules():
        fn = getattr(sub, "lr_scales", None)
        if callable(fn):
            scales |= {f"{prefix}.{k}" if prefix else k: float(v) for k, v in fn().items()}
    return scales


def param_groups(
    module: nn.Module, weight_decay: float, layer_decay: float | None, decay_embeddings: bool = False
) -> list[dict[str, Any]]:
    """Optimizer parameter groups: with and without weight decay, or timm's layer-decay groups.

    Without decay: 1-d tensors and biases, and (unless ``decay_embeddings``) the names of ``no_weight_decay()``
    (timm's set: ``pos_embed``, ``cls_token``, our ``mask_token``, ...). ``decay_embeddings=True`` is DINO/iBOT's
    ``get_params_groups`` rule: only biases and 1-d tensors are left undecayed, so the position embedding, the class
    token and the mask token are decayed too. With ``layer_decay`` set, timm's layer-decay groups (``lr_scale``);
    every group gets ``lr_scale`` and ``wd_scale``. A model's ``lr_scales()`` (e.g. the segmentation decoder at
    10x) splits the groups and multiplies their ``lr_scale``.
    """
    skip = set() if decay_embeddings else _no_decay_names(module)
    if layer_decay is not None:
        if not hasattr(module, "group_matcher"):
            raise ValueError(f"optim.layer_decay needs a model with group_matcher(); {type(module).__name__} has none")
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(
            module, weight_decay, no_weight_decay_list=tuple(skip), layer_decay=layer_decay
        )
    else:
        decay, no_decay = [], []
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            if p.ndim <= 1 or name.endswith(".bias") or name in skip:
                no_decay.append(p)
            else:
                decay.append(p)
        groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]
        groups = [g for g in groups if g["params"]]
    scales = _lr_scales(module)
    if scales:
        scale_of = {id(p): next((v for k, v in scales.items() if n.startswith(k + ".")), 1.0)
                    for n, p in module.named_parameters()}  # fmt: skip
        groups = [{**g, "params": [p for p in g["params"] if scale_of[id(p)] == s],
                   "lr_scale": g.get("lr_scale", 1.0) * s}
                  for g in groups for s in sorted({scale_of[id(p)] for p in g["params"]})]  # fmt: skip
    for g in groups:
        g["wd_scale"] = 1.0 if g["weight_decay"] > 0 else 0.0
        g.setdefault("lr_scale", 1.0)
    return groups


def build_optimizer(cfg: DictConfig, module: nn.Module, fused: bool = False) -> torch.optim.Optimizer:
    """Timm ``create_optimizer_v2`` over ``param_groups(module)`` with the ``optim`` settings.

    ``fused`` (``train.fast``'s choice): use torch's fused kernel where the optimizer class has one (Adam, AdamW,
    SGD); other optimizers are built as usual.
    """
    from timm.optim import create_optimizer_v2, get_optimizer_class

    o = cfg.optim
    groups = param_groups(module, o.weight_decay, o.layer_decay, bool(o.get("decay_embeddings", False)))
    betas = tuple(o.betas)
    extra: dict[str, Any] = {"fused": True} if fused and _has_fused_kernel(get_optimizer_class(o.name)) else {}
    return create_optimizer_v2(
        groups, opt=o.name, lr=o.lr, weight_decay=o.weight_decay, betas=betas, eps=o.eps, **extra
    )


def _has_fused_kernel(opt_class: Any) -> bool:
    """Whether ``opt_class`` is torch's Adam, AdamW or SGD, whose fused kernels torch ships for CPU and CUDA.

    timm registers some of them as ``functools.partial`` of the class (SGD with Nesterov).
    """
    cls = getattr(opt_class, "func", opt_class)
    return cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)


CLIP_MODES = ("global", "per_param")


@torch.no_grad()
def clip_gradients(params: Iterable[torch.Tensor], max_norm: float, mode: str = "global") -> torch.Tensor:
    """Clip gradients in place; returns the global gradient norm before clipping (float32 scalar).

    ``global``: ``torch.nn.utils.clip_grad_norm_`` (one norm over every gradient). ``per_param``: iBOT/DINO's
    ``clip_gradients``: each parameter's gradient ``g`` is scaled by ``min(1, max_norm / (||g||_2 + 1e-6))`` on its
    own. Under fp16 the trainer unscales the gradients first (as iBOT does).

    Raises:
        ValueError: an unknown ``mode``.
    """
    if mode not in CLIP_MODES:
        raise ValueError(f"unknown train.clip_mode {mode!r}; valid: {', '.join(CLIP_MODES)}")
    with_grad = [p for p in params if p.grad is not None]
    if mode == "global":
        return torch.nn.utils.clip_grad_norm_(with_grad, max_norm)
    grads = [p.grad for p in with_grad if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = torch._foreach_norm(grads)
    for g, n in zip(grads, norms, strict=True):
        g.mul_((max_norm / (n + 1e-6)).clamp(max=1.0))
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


def build_schedules(cfg: DictConfig, steps_per_epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-step learning rate and weight decay, one value per optimizer step of the run.

    Learning rate by ``schedule.kind``: warm-up + cosine or poly, then cool-down at ``min_lr``. Weight decay: cosine
    from ``weight_decay`` to ``weight_decay_end``.
    """
    o, s = cfg.optim, cfg.schedule
    main_steps = steps_per_epoch * s.epochs
    warmup = int(round(s.warmup_epochs * steps_per_epoch))
    cooldown = steps_per_epoch * s.cooldown_epochs
    lr = build_schedule(s.kind, o.lr, o.min_lr, main_steps, warmup, o.warmup_lr, cooldown, power=s.poly_power)
    wd_end = o.weight_decay if o.weight_decay_end is None else o.weight_decay_end
    wd = cosine_schedule(o.weight_decay, wd_end, main_steps, 0, 0.0, cooldown)
    return lr, wd
