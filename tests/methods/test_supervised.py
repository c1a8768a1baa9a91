"""Supervised baseline method and the method registry."""

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenlab  # noqa: F401  (registers the models)
from tokenlab.methods import Method, StepContext, TrainPlan, build_method, list_methods, register_method
from tokenlab.methods.supervised import ClassTargets, Supervised


def _ctx() -> StepContext:
    return StepContext(step=0, epoch=0, plan=TrainPlan(10, 10, 1), device=torch.device("cpu"))


def _model(k: int = 3) -> nn.Module:
    return timm.create_model(
        "fan_nano_6_p16_224", num_classes=k, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2
    ).eval()


def test_builtin_methods_registered():
    assert {"supervised", "stl_labeler", "stl_student"} <= set(list_methods())


def test_loss_equals_label_smoothed_ce():
    model = _model()
    method = build_method("supervised", model=model, label_smoothing=0.1)
    batch = {"image": torch.randn(4, 3, 16, 16), "label": torch.tensor([0, 1, 2, 0])}
    out = method.training_step(batch, _ctx())
    ref = F.cross_entropy(model(batch["image"]), batch["label"], label_smoothing=0.1)
    assert out["loss"].item() == pytest.approx(ref.item(), abs=1e-5)
    assert set(out) == {"loss", "ce"}


def test_mixup_targets_are_soft_and_sum_to_one():
    np.random.seed(0)  # timm's Mixup draws from numpy's global RNG
    targets = ClassTargets(5, label_smoothing=0.1, mixup_alpha=0.8, cutmix_alpha=1.0)
    images = torch.randn(4, 3, 8, 8)
    mixed, y = targets(images, torch.tensor([0, 1, 2, 3]))
    assert y.shape == (4, 5)
    torch.testing.assert_close(y.sum(-1), torch.ones(4))
    assert not torch.equal(mixed, images)
    assert torch.equal(images, images.clone())  # caller's batch untouched
    with pytest.raises(ValueError, match="even batch size"):
        targets(torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 2]))


def test_plain_targets_are_smoothed_one_hot():
    _, y = ClassTargets(4, label_smoothing=0.2)(torch.zeros(2, 3, 4, 4), torch.tensor([1, 3]))
    torch.testing.assert_close(y, torch.tensor([[0.05, 0.85, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]]))


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown method 'supervise'.*did you mean 'supervised'"):
        build_method("supervise", model=_model())
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['label_smoothin'\] for method 'supervised'"):
        build_method("supervised", model=_model(), label_smoothin=0.1)
    with pytest.raises(ValueError, match="label_smoothing"):
        build_method("supervised", model=_model(), label_smoothing=1.5)
    with pytest.raises(ValueError, match="already registered"):

        @register_method("supervised")
        class Other(Method):
            pass


def test_default_validation_step_counts():
    method = Supervised(_model())
    batch = {"image": torch.randn(5, 3, 16, 16), "label": torch.tensor([0, 1, 2, 0, 1])}
    stats = method.validation_step(method.model, batch)
    assert stats["count"].item() == 5 and 0 <= stats["correct"].item() <= 5 and stats["loss"].item() > 0
