"""Training configuration: ``configs/default.yaml`` -> recipe -> command-line dotlist, validated up front.

``default.yaml`` holds every key (struct mode, so a typo such as ``optim.lrr=5`` is rejected with a did-you-mean).
A recipe holds only what differs and may start from another recipe with ``_base_: other.yaml`` (shipped ``*_base``
recipes are partial building blocks of that kind). The free-form
dicts ``model.kwargs``, ``method.kwargs``, ``data.dataset`` and ``data.transform`` accept any key; their consumers
(timm, ``build_method``, the data layer) validate them. Every other leaf must keep the type of its default (an int
is accepted where a float is expected) and a sensible value. Every failure is one ``ValueError`` naming the key.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any, cast

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tokenlab.utils.amp import AMP_CHOICES

__all__ = ["FREE_SECTIONS", "cfg_dict", "find_recipe", "list_recipes", "load_config", "validate_config"]

FREE_SECTIONS = ("model.kwargs", "method.kwargs", "data.dataset", "data.transform")

# Types of keys whose default is null.
_NULLABLE: dict[str, type] = {
    "model.num_classes": int,
    "model.pretrained": str,
    "data.root": str,
    "data.val_batch_size": int,
    "data.val_split": str,
    "data.train_subset": int,
    "data.val_subset": int,
    "optim.weight_decay_end": float,
    "optim.layer_decay": float,
    "optim.clip_grad": float,
    "schedule.max_steps": int,
    "checkpoint.resume": str,
}

_CHOICES: dict[str, tuple[str, ...]] = {
    "train.amp": AMP_CHOICES,
    "model.pretrained_prefer": ("ema", "model"),
    "train.distributed": ("ddp", "fsdp"),
    "train.clip_mode": ("global", "per_param"),
    "schedule.kind": ("cosine", "poly"),
}

# key -> (lowest allowed, strictly greater?)
_LOWER: dict[str, tuple[float, bool]] = {
    "data.img_size": (0, True),
    "data.batch_size": (0, True),
    "data.val_batch_size": (0, True),
    "data.train_subset": (0, True),
    "data.val_subset": (0, True),
    "data.num_workers": (0, False),
    "model.num_classes": (0, False),
    "optim.lr": (0, True),
    "optim.min_lr": (0, False),
    "optim.warmup_lr": (0, False),
    "optim.weight_decay": (0, False),
    "optim.weight_decay_end": (0, False),
    "optim.eps": (0, True),
    "optim.layer_decay": (0, True),
    "optim.clip_grad": (0, True),
    "optim.accum_steps": (0, True),
    "schedule.poly_power": (0, True),
    "schedule.epochs": (0, True),
    "schedule.warmup_epochs": (0, False),
    "schedule.cooldown_epochs": (0, False),
    "schedule.max_steps": (0, True),
    "train.dist_timeout_s": (0, True),
    "train.max_nonfinite": (0, True),
    "train.ema.decay": (0, False),
    "train.ema.every_steps": (0, True),
    "train.min_free_disk_mb": (0, False),
    "log.every_steps": (0, True),
    "log.val_every_epochs": (0, False),
    "checkpoint.every_steps": (0, False),
    "checkpoint.keep": (0, True),
}


def cfg_dict(node: Any) -> dict[str, Any]:
    """A mapping section of a config (``DictConfig``) as a plain ``dict``, interpolations left as they are.

    The one place that narrows ``OmegaConf.to_container``'s wide return type for the free-form sections.

    Raises:
        TypeError: ``node`` is not a mapping section.
    """
    out = OmegaConf.to_container(node)
    if not isinstance(out, dict):
        raise TypeError(f"expected a mapping config section, got {type(out).__name__}")
    return cast(dict[str, Any], out)


def _packaged(name: str) -> Path:
    return Path(str(resources.files("tokenlab") / "configs" / name))


def list_recipes() -> list[str]:
    """Names of the recipes shipped in ``tokenlab/configs`` (without ``.yaml``)."""
    root = _packaged("")
    return sorted(p.stem for p in root.glob("*.yaml") if p.stem != "default")


def find_recipe(name: str | Path, relative_to: Path | None = None) -> Path:
    """A recipe path: an existing file, a file next to ``relative_to``, or a shipped recipe name."""
    path = Path(name)
    candidates = [path]
    if relative_to is not None and not path.is_absolute():
        candidates.append(relative_to / path)
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    candidates.append(_packaged(stem + ".yaml"))
    for c in candidates:
        if c.is_file():
            return c
    close = difflib.get_close_matches(stem, list_recipes(), n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise FileNotFoundError(f"recipe not found: {name}{hint}; shipped recipes: {', '.join(list_recipes())}")


def _defaults() -> DictConfig:
    cfg = OmegaConf.load(_packaged("default.yaml"))
    assert isinstance(cfg, DictConfig)
    OmegaConf.set_struct(cfg, True)
    for key in FREE_SECTIONS:
        OmegaConf.set_struct(OmegaConf.select(cfg, key), False)
    return cfg


def _load_recipe(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The recipe at ``path`` preceded by its ``_base_`` chain."""
    if path.resolve() in seen:
        raise ValueError(f"recipe {path} includes itself through _base_")
    try:
        raw = OmegaConf.load(path)
    except (yaml.YAMLError, UnicodeDecodeError, OmegaConfBaseException) as err:
        raise ValueError(f"recipe {path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(raw, DictConfig):
        raise ValueError(f"recipe {path} must be a YAML mapping, got {type(raw).__name__}")
    chain: list[DictConfig] = []
    base = raw.pop("_base_", None)
    if base is not None:
        chain = _load_recipe(find_recipe(str(base), path.parent), seen + (path.resolve(),))
    return chain + [raw]


def _yaml_problem(err: Exception, located: bool = True) -> str:
    """One line for a YAML / decoding error: what is wrong and (``located``) where, line and column 1-based."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None and located else ""
        return f"{err.problem or err.context or 'syntax error'!s}{where}"
    return str(err).splitlines()[0]


def _check_sections(cfg: DictConfig, other: DictConfig, source: str, prefix: str = "") -> None:
    """A section of the defaults (``model``, ``data.transform``...) must stay a mapping in ``other``.

    OmegaConf would raise a bare ``TypeError`` for a list there and silently replace the section by a scalar.
    """
    sections = {k: v for k, v in cfg.items_ex(resolve=False) if isinstance(v, DictConfig)}
    for key, value in other.items_ex(resolve=False):
        full = prefix + str(key)
        current = sections.get(key)
        if not isinstance(current, DictConfig):
            continue
        if not isinstance(value, DictConfig):
            shown = OmegaConf.to_container(value) if isinstance(value, ListConfig) else value
            keys = ", ".join(str(k) for k in list(current.keys())[:6])
            raise ValueError(f"config key {full!r} in {source} must be a section (a mapping"
                             f"{' of ' + keys + ', ...' if keys else ''}), got {shown!r}")  # fmt: skip
        _check_sections(current, value, source, full + ".")


def _merge(cfg: DictConfig, other: DictConfig, source: str) -> DictConfig:
    _check_sections(cfg, other, source)
    try:
        merged = OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        first = str(err).splitlines()[0]
        raise ValueError(f"bad config key {key!r} in {source}: {first}") from None
    assert isinstance(merged, DictConfig)
    return merged


def load_config(recipe: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Merge ``default.yaml``, the recipe (and its ``_base_`` chain) and ``key=value`` overrides, then validate.

    Raises:
        FileNotFoundError: the recipe does not exist.
        ValueError: unknown key, wrong type or impossible value (the message names the key).
    """
    cfg = _defaults()
    if recipe is not None:
        path = find_recipe(recipe)
        for part in _load_recipe(path):
            cfg = _merge(cfg, part, str(path))
    bad = [o for o in overrides if "=" not in o or o.startswith("=")]
    if bad:
        raise ValueError(f"command-line overrides must look like key=value, got {bad}")
    for override in overrides:  # parsed one by one, so a syntax error names its override
        try:
            OmegaConf.from_dotlist([override])
        except (yaml.YAMLError, OmegaConfBaseException) as err:
            raise ValueError(f"cannot parse override {override!r}: {_yaml_problem(err, located=False)}") from None
    try:
        dotlist = OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as err:
        raise ValueError(f"cannot parse overrides {list(overrides)}: {str(err).splitlines()[0]}") from None
    cfg = _merge(cfg, dotlist, "the command-line overrides")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ValueError(f"cannot resolve interpolation: {str(err).splitlines()[0]}") from None
    validate_config(cfg)
    _check_data_options(cfg)
    return cfg


def _check_data_options(cfg: DictConfig) -> None:
    """The free sections ``data.transform`` and ``data.dataset`` must fit what the method's data view builds.

    The training transform is built once here (it is cheap: no data is read) with the method's options, the way
    the engine builds it, so an unknown or ill-typed key fails now, as one ValueError naming the section, instead
    of as a ``TypeError`` from deep inside the data layer.
    """
    import inspect

    from tokenlab.data import build_dataset, build_transforms
    from tokenlab.methods import get_method_class

    method = get_method_class(cfg.method.name)
    view = method.data_view
    extra = cfg_dict(cfg.data.transform)
    try:
        options = method.transform_options(cfg_dict(cfg.method.kwargs))
        options.pop("crops_from", None)  # a label store: the method checks it with its own message
        if view == "segmentation":
            build_transforms(view, cfg.data.img_size, train=True, **extra)
        else:
            build_transforms(view, cfg.data.img_size, **options, **extra)
    except (TypeError, ValueError) as err:
        raise ValueError(f"config section 'data.transform' {extra} does not fit method {cfg.method.name!r} "
                         f"(data view {view!r}, data.img_size {cfg.data.img_size}): {err}") from None  # fmt: skip
    if view not in ("segmentation", "detection"):  # their builders check their data.dataset keys themselves
        valid = set(inspect.signature(build_dataset).parameters) - {"spec", "split", "transform"}
        unknown = sorted(set(cfg_dict(cfg.data.dataset)) - valid)
        if unknown:
            raise ValueError(f"unknown key(s) {unknown} in config section 'data.dataset'; valid: {sorted(valid)}")


def _leaves(node: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for key, value in node.items():
        full = f"{prefix}{key}"
        if full in FREE_SECTIONS:
            continue
        if isinstance(value, DictConfig):
            out += _leaves(value, full + ".")
        else:
            out.append((full, value))
    return out


def _type_ok(value: Any, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _type_name(value: Any) -> str:
    return "list" if isinstance(value, ListConfig) else type(value).__name__


def validate_config(cfg: DictConfig) -> None:
    """Check every non-free leaf against the type of its default and the allowed values; raise ValueError."""
    defaults = dict(_leaves(_defaults()))
    values = dict(_leaves(cfg))
    for key, value in values.items():
        default = defaults.get(key)
        expected = _NULLABLE.get(key) if default is None else type(default)
        if expected is None:
            continue
        if value is None:
            if default is None or key in _NULLABLE:
                continue
            raise ValueError(f"config key {key!r} must not be null (default {default!r})")
        if expected is ListConfig:
            if not isinstance(value, ListConfig):
                raise ValueError(f"config key {key!r} must be a list, got {value!r} ({_type_name(value)})")
            continue
        if not _type_ok(value, expected):
            raise ValueError(f"config key {key!r} must be {expected.__name__}, got {value!r} ({_type_name(value)})")
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(f"config key {key!r} is {value!r}; valid: {', '.join(_CHOICES[key])}")
        if key in _LOWER:
            low, strict = _LOWER[key]
            if value < low or (strict and value == low):
                raise ValueError(f"config key {key!r} must be {'>' if strict else '>='} {low}, got {value!r}")
    _check_relations(cfg)


def _check_relations(cfg: DictConfig) -> None:
    if not cfg.model.name:
        raise ValueError("config key 'model.name' must name a model (see `tokenlab models`)")
    if not cfg.method.name:
        raise ValueError("config key 'method.name' must name a method")
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ValueError(f"config key 'optim.min_lr' ({cfg.optim.min_lr}) must not exceed optim.lr ({cfg.optim.lr})")
    if cfg.schedule.warmup_epochs >= cfg.schedule.epochs + cfg.schedule.cooldown_epochs:
        raise ValueError(
            f"config key 'schedule.warmup_epochs' ({cfg.schedule.warmup_epochs}) must be shorter than the run "
            f"({cfg.schedule.epochs} epochs)"
        )
    if not 0.0 <= cfg.train.ema.decay < 1.0:
        raise ValueError(f"config key 'train.ema.decay' must be in [0, 1), got {cfg.train.ema.decay}")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(_type_ok(b, float) and 0 <= b < 1 for b in betas):
        raise ValueError(f"config key 'optim.betas' must be two numbers in [0, 1), got {betas}")
    if cfg.optim.layer_decay is not None and cfg.optim.layer_decay > 1:
        raise ValueError(f"config key 'optim.layer_decay' must be in (0, 1], got {cfg.optim.layer_decay}")
    resume = cfg.checkpoint.resume
    if resume is not None and resume != "auto" and not Path(resume).exists():
        raise FileNotFoundError(f"config key 'checkpoint.resume': no checkpoint at {resume} (use 'auto' or a path)")
