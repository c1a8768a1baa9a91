"""Training methods: the objects that turn a batch into named losses, and their registry.

A method is an ``nn.Module`` that owns the trainable backbone (``self.model``) plus whatever else it needs (heads,
a frozen labeler, an EMA teacher). The engine only talks to this protocol (``docs/design.md``):

- ``training_step(batch, ctx) -> dict[str, Tensor]``: named loss terms plus the total ``"loss"`` that is
  back-propagated. ``forward`` calls it, so the engine can wrap the whole method in DDP/FSDP.
- ``on_train_start(plan)``: called once with the step plan (total steps, steps per epoch) so a method can build
  its per-step schedules up front (e.g. iBOT's teacher temperature and momentum, see ``tokenlab.utils.schedules``).
- ``before_optimizer_step(ctx)``: after backward, before clipping and the optimizer step (e.g. freeze a last layer
  by zeroing its gradients during the first epoch).
- ``after_step(ctx)``: after the optimizer step (e.g. EMA teacher update).
- ``trainable_module()``: the module whose parameters the optimizer updates (default ``self.model``).
- ``export_module()``: the module evaluated and exported as ``RUN/model`` (default ``self.model``); when the engine
  keeps a model EMA of ``self.model`` it exports that EMA instead.
- ``data_view``: class attribute naming the sample layout it needs, in the data layer's vocabulary
  (``tokenlab.data.transforms.TRANSFORM_KINDS``: ``"classification"``, ``"stl_paired"``, ``"multicrop"``,
  ``"segmentation"``); the engine builds the data sets of that view, with ``transform_options(kwargs)``.
- ``data_kwargs(meta)``: constructor kwargs the method takes from the training data (e.g. the segmentation ignore
  index); the recipe's ``method.kwargs`` override them.
- ``export_meta()``: extra entries the engine stores in the exported ``model.json``.
- ``validation_step(model, batch)``: per-batch validation statistics (default: top-1 and CE of ``model(image)``).
- ``extra_state_dict()`` / ``load_extra_state_dict(state)``: tensors outside ``state_dict()`` that must survive a
  resume (default: nothing; buffers and parameters of the method are already in ``state_dict()``).

Methods register with ``@register_method("name")`` and are built with ``build_method(name, model=..., **kwargs)``.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Method",
    "StepContext",
    "TrainPlan",
    "build_method",
    "get_method_class",
    "list_methods",
    "register_method",
]

# Modules that register built-in methods when imported; loaded lazily so importing the registry stays cheap and
# free of import cycles. A module that is not there yet (another engineer's work in progress) is skipped.
_BUILTIN_MODULES = (
    "tokenlab.methods.supervised",
    "tokenlab.methods.stl",
    "tokenlab.methods.ibot",
    "tokenlab.methods.segmentation",
    "tokenlab.methods.detection",
)

_REGISTRY: dict[str, type[Method]] = {}
M = TypeVar("M", bound=type["Method"])


@dataclass(frozen=True)
class TrainPlan:
    """How long training runs, known before the first step.

    Attributes:
        total_steps: Optimizer steps in the whole run.
        steps_per_epoch: Optimizer steps per epoch.
        epochs: Number of epochs.
        world_size: Number of processes.
        global_batch_size: Images per optimizer step over all processes (per-process batch x accumulation x world).
    """

    total_steps: int
    steps_per_epoch: int
    epochs: int
    world_size: int = 1
    global_batch_size: int = 1


@dataclass
class StepContext:
    """What a method may know about the current step; built by the trainer for every micro-batch.

    With gradient accumulation an optimizer step runs ``accum_steps`` micro-batches; state that must move once
    per optimizer step (e.g. iBOT's centres) accumulates until ``last_micro_batch``.

    Attributes:
        step: Optimizer step index (0-based) this micro-batch contributes to.
        epoch: Epoch index (0-based).
        plan: The run's ``TrainPlan``.
        device: Device of the model.
        amp_dtype: Autocast dtype in use (``None`` when autocast is off).
        lr: Learning rate of the first parameter group at this step.
        values: Extra per-step values from the trainer's schedules, by name.
        micro_batch: Index of this micro-batch within the optimizer step (0-based).
        accum_steps: Micro-batches per optimizer step.
    """

    step: int
    epoch: int
    plan: TrainPlan
    device: torch.device
    amp_dtype: torch.dtype | None = None
    lr: float = 0.0
    values: dict[str, float] = field(default_factory=dict)
    micro_batch: int = 0
    accum_steps: int = 1

    @property
    def last_micro_batch(self) -> bool:
        """Whether this is the optimizer step's last micro-batch (the one after which the optimizer steps)."""
        return self.micro_batch == self.accum_steps - 1

    @property
    def progress(self) -> float:
        """Fraction of training done, in [0, 1]."""
        return self.step / max(1, self.plan.total_steps)


class Method(nn.Module):
    """Base class of every training method; see the module docstring for the protocol.

    Args:
        model: The trainable backbone (a timm model following the tokenlab backbone contract).
    """

    name: str = "method"
    #: The sample layout the method needs: a view of ``tokenlab.data.transforms.TRANSFORM_KINDS``.
    data_view: str = "classification"
    #: Set by the engine when ``model.pretrained`` initialised the model: the record ``model.json`` keeps.
    pretrained_from: dict[str, Any] | None = None

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """One training step (``training_step``), so DDP / FSDP hooks run around it."""
        return self.training_step(batch, ctx)

    def training_step(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, torch.Tensor]:
        """Losses of one micro-batch; ``loss`` is back-propagated, the others are logged."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_step")

    def on_train_start(self, plan: TrainPlan) -> None:
        """Precompute per-step schedules; the default does nothing."""

    def before_optimizer_step(self, ctx: StepContext) -> None:
        """Adjust gradients before clipping and the optimizer step; the default does nothing."""

    def after_step(self, ctx: StepContext) -> None:
        """Update state after the optimizer step (EMA teachers); the default does nothing."""

    @classmethod
    def transform_options(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Extra ``build_transforms`` kwargs implied by the method's config kwargs (e.g. the STL teacher view)."""
        return {}

    @classmethod
    def data_kwargs(cls, meta: dict[str, Any]) -> dict[str, Any]:
        """Constructor kwargs implied by the training data's meta (``method.kwargs`` override them); none here."""
        return {}

    def export_meta(self) -> dict[str, Any]:
        """Extra entries for the exported ``model.json`` (e.g. where the weights were initialised from)."""
        return {}

    def trainable_module(self) -> nn.Module:
        """The module whose trainable parameters the optimizer updates."""
        return self.model

    def export_module(self) -> nn.Module:
        """The module evaluated during training and exported as ``RUN/model`` at the end."""
        return self.model

    def extra_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors outside ``state_dict()`` needed for an exact resume; the default has none."""
        return {}

    def load_extra_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what ``extra_state_dict`` returned."""

    @torch.no_grad()
    def validation_step(self, model: nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Sums over the batch of ``correct`` (top-1) and ``loss`` (CE), plus ``count``; the engine reduces them."""
        logits = model(batch["image"])
        labels = batch["label"]
        return {
            "correct": (logits.argmax(dim=-1) == labels).sum().float(),
            "loss": F.cross_entropy(logits.float(), labels, reduction="sum"),
            "count": torch.tensor(float(labels.numel()), device=logits.device),
        }


def init_from_meta(path: str | None, source_meta: dict[str, Any] | None) -> dict[str, Any]:
    """The ``init_from`` entry a dense task (segmentation, detection) adds to its export meta.

    It names the classification run the backbone started from, so a result can be traced to its initialisation.
    """
    if path is None:
        return {}
    info = source_meta or {}
    return {"init_from": {"path": path, "model": info.get("model"), "method": info.get("method")}}


def register_method(name: str) -> Callable[[M], M]:
    """Class decorator that registers a ``Method`` subclass under ``name``; a duplicate name raises."""

    def wrap(cls: M) -> M:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method {name!r} is already registered by {_REGISTRY[name].__qualname__}")
        if not (isinstance(cls, type) and issubclass(cls, Method)):
            raise TypeError(f"register_method({name!r}) needs a Method subclass, got {cls!r}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def _load_builtins() -> None:
    for module in _BUILTIN_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name != module:
                raise


def list_methods() -> list[str]:
    """Names of every registered method, sorted."""
    _load_builtins()
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[Method]:
    """The class registered as ``name``; unknown names raise a ValueError with the valid options."""
    _load_builtins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" (did you mean {', '.join(map(repr, close))}?)" if close else ""
        raise ValueError(f"unknown method {name!r}{hint}; valid methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def build_method(name: str, model: nn.Module, **kwargs: Any) -> Method:
    """Build the method registered as ``name`` around ``model``; unknown names or options raise a ValueError."""
    cls = get_method_class(name)
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        valid = sorted(k for k in params if k not in ("self", "model"))
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(f"unknown option(s) {unknown} for method {name!r}; valid options: {valid}")
    return cls(model=model, **kwargs)
