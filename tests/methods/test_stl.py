"""STL stage 1 (labeler) and stage 2 (student) methods."""

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenlab
from tokenlab.methods import StepContext, TrainPlan, build_method
from tokenlab.models import save_exported

KW = dict(img_size=16, embed_dim=32, depth=1, num_heads=2)


def _ctx() -> StepContext:
    return StepContext(step=0, epoch=0, plan=TrainPlan(10, 10, 1), device=torch.device("cpu"))


def _token_model(k: int = 3, patch: int = 4) -> nn.Module:
    return timm.create_model("fan_nano_6_p16_224_token", num_classes=k, patch_size=patch, **KW)


def _batch(b: int = 4) -> dict:
    return {
        "image": torch.randn(b, 3, 16, 16),
        "teacher_image": torch.randn(b, 3, 16, 16),
        "label": torch.arange(b) % 3,
    }


def _labeler_step(**kwargs):
    """One labeler step with ``kwargs`` and the reference terms: (out, CE of cls, CE of the GAP term, logits, batch)."""
    model = _token_model().eval()
    method = build_method("stl_labeler", model=model, label_smoothing=0.0, **kwargs)
    batch = _batch()
    out = method.training_step(batch, _ctx())
    cls, patches = model.forward_features(batch["image"])
    ce_cls = F.cross_entropy(model.head(cls), batch["label"])
    ce_aux = F.cross_entropy(model.aux_head(patches.mean(1)), batch["label"])
    return out, ce_cls, ce_aux, model.aux_head(patches), batch


def test_labeler_loss_equals_formula():
    out, ce_cls, ce_aux, _, _ = _labeler_step(aux_loss_weight=0.5)
    assert out["loss"].item() == pytest.approx((ce_cls + 0.5 * ce_aux).item(), abs=1e-5)
    assert out["cls"].item() == pytest.approx(ce_cls.item(), abs=1e-5)


def test_student_loss_equals_formula_with_argmax_labels():
    student, teacher = _token_model().eval(), _token_model().eval()
    method = build_method(
        "stl_student",
        model=student,
        labeler=teacher,
        label_type="argmax",
        token_smoothing=0.1,
        token_loss_weight=0.7,
        label_smoothing=0.0,
    )
    batch = _batch()
    out = method.training_step(batch, _ctx())
    t = teacher.forward_tokens(batch["teacher_image"]).token_logits
    y = F.one_hot(t.argmax(-1), 3).float() * 0.9 + 0.1 / 3
    s = student.forward_tokens(batch["image"])
    tok = -(y * F.log_softmax(s.token_logits, -1)).sum(-1).mean()
    cls = F.cross_entropy(s.cls_logits, batch["label"])
    assert out["token"].item() == pytest.approx(tok.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((cls + 0.7 * tok).item(), abs=1e-5)


def test_teacher_is_frozen_and_never_changes():
    student, teacher = _token_model(), _token_model()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    method = build_method("stl_student", model=student, labeler=teacher, mixup_alpha=0.8)
    method.train()
    assert not teacher.training and all(not p.requires_grad for p in teacher.parameters())
    assert not any(n.startswith("_teacher") for n in method.state_dict())
    params = list(method.parameters())
    assert all(p is not q for p in params for q in teacher.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        method.training_step(_batch(), _ctx())["loss"].backward()
        opt.step()
        assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert any(p.grad is not None for p in student.parameters())


def test_heterogeneous_labeler_grid_is_interpolated():
    student, teacher = _token_model(patch=4), _token_model(patch=8)  # 4x4 vs 2x2 token grids
    method = build_method("stl_student", model=student, labeler=teacher)
    out = method.training_step(_batch(), _ctx())
    assert torch.isfinite(out["loss"]) and out["token"].item() > 0


def test_teacher_view_comes_from_the_paired_transform():
    student, teacher = _token_model(), _token_model()
    method = build_method("stl_student", model=student, labeler=teacher, teacher_aug="full")
    batch = _batch()
    assert method._teacher_input(batch) is batch["teacher_image"]
    assert type(method).transform_options({"teacher_aug": "none"}) == {"teacher": "none"}
    del batch["teacher_image"]
    with pytest.raises(KeyError, match="teacher_image"):
        method.training_step(batch, _ctx())


def test_labeler_loaded_from_run_dir(tmp_path):
    teacher = _token_model()
    save_exported(
        teacher,
        tmp_path / "model",
        {"model": "fan_nano_6_p16_224_token", "model_kwargs": dict(KW, num_classes=3, patch_size=4)},
    )
    method = build_method("stl_student", model=_token_model(), labeler=str(tmp_path))
    torch.testing.assert_close(method.teacher.head.weight, teacher.head.weight)
    assert not method.teacher.training


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no exported model"):
        build_method("stl_student", model=_token_model(), labeler=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="labeler predicts 5 classes but the student has 3"):
        build_method("stl_student", model=_token_model(3), labeler=_token_model(5))
    with pytest.raises(ValueError, match="needs method.kwargs.labeler"):
        build_method("stl_student", model=_token_model())
    plain = timm.create_model("fan_nano_6_p16_224", num_classes=3, patch_size=4, **KW)
    with pytest.raises(ValueError, match="labeler must be an STL token model"):
        build_method("stl_student", model=_token_model(), labeler=plain)
    with pytest.raises(ValueError, match="stl_labeler model must be an STL token model"):
        build_method("stl_labeler", model=plain)
    with pytest.raises(ValueError, match="teacher_aug 'clean'"):
        build_method("stl_student", model=_token_model(), labeler=_token_model(), teacher_aug="clean")


def _export(model: nn.Module, stem, step: int) -> None:
    meta = {"model": "fan_nano_6_p16_224_token", "model_kwargs": dict(KW, num_classes=3, patch_size=4), "step": step}
    save_exported(model, stem, meta)


def test_labeler_export_last_or_best_is_taken_and_recorded(tmp_path):
    last, best = _token_model(), _token_model()
    _export(last, tmp_path / "model", 100)
    _export(best, tmp_path / "model_best", 60)
    method = build_method("stl_student", model=_token_model(), labeler=str(tmp_path), labeler_export="best")
    torch.testing.assert_close(method.teacher.head.weight, best.head.weight)
    assert method.export_meta()["labeler"] == {
        "path": str(tmp_path / "model_best"),
        "export": "best",
        "model": "fan_nano_6_p16_224_token",
        "step": 60,
    }
    method = build_method("stl_student", model=_token_model(), labeler=str(tmp_path))  # default: last
    torch.testing.assert_close(method.teacher.head.weight, last.head.weight)
    assert method.export_meta()["labeler"]["export"] == "last"
    assert method.export_meta()["labeler"]["step"] == 100


def test_best_labeler_export_missing_is_a_clear_error(tmp_path):
    _export(_token_model(), tmp_path / "model", 100)
    with pytest.raises(FileNotFoundError, match="has no best export .*labeler_export=last"):
        build_method("stl_student", model=_token_model(), labeler=str(tmp_path), labeler_export="best")
    with pytest.raises(ValueError, match="unknown labeler_export 'ema'"):
        build_method("stl_student", model=_token_model(), labeler=str(tmp_path), labeler_export="ema")


def test_published_pth_tar_labeler_uses_its_ema_weights(tmp_path):
    plain, ema = _token_model(), _token_model()
    torch.save(
        {"epoch": 3, "state_dict": plain.state_dict(), "state_dict_ema": ema.state_dict(), "metric": 1.0},
        tmp_path / "model_best.pth.tar",
    )
    kwargs = dict(labeler=str(tmp_path / "model_best.pth.tar"), labeler_model="fan_nano_6_p16_224_token")
    with pytest.raises(ValueError, match="name its architecture with method.kwargs.labeler_model"):
        build_method("stl_student", model=_token_model(), labeler=kwargs["labeler"])
    model_kwargs = dict(KW, patch_size=4)
    method = build_method("stl_student", model=_token_model(), labeler_model_kwargs=model_kwargs, **kwargs)
    torch.testing.assert_close(method.teacher.head.weight, ema.head.weight)
    assert method.export_meta()["labeler"]["entry"] == "state_dict_ema"
    assert method.export_meta()["labeler"]["export"] == "published"
    method = build_method(
        "stl_student", model=_token_model(), labeler_model_kwargs=model_kwargs, labeler_prefer="model", **kwargs
    )
    torch.testing.assert_close(method.teacher.head.weight, plain.head.weight)
    assert method.export_meta()["labeler"]["entry"] == "state_dict"


def test_softmax_token_labels_are_the_raw_softmax():
    """Published ``--softmax-token-label``: ``softmax(t)``, no temperature, no smoothing."""
    student, teacher = _token_model().eval(), _token_model().eval()
    method = build_method("stl_student", model=student, labeler=teacher, label_type="softmax", label_smoothing=0.0)
    batch = _batch()
    out = method.training_step(batch, _ctx())
    y = F.softmax(teacher.forward_tokens(batch["teacher_image"]).token_logits, -1)
    s = student.forward_tokens(batch["image"]).token_logits
    assert out["token"].item() == pytest.approx(-(y * F.log_softmax(s, -1)).sum(-1).mean().item(), abs=1e-5)


def test_dense_weight_ramp_follows_sqrt_epoch_over_r():
    """Published ``--dynamic-dense-weight``: ``lambda * sqrt(epoch / 300)`` up to epoch 300, then lambda."""
    method = build_method("stl_student", model=_token_model(), labeler=_token_model(), token_loss_weight=2.0)
    assert [method.token_weight(e) for e in (0, 150, 400)] == [2.0, 2.0, 2.0]  # default: off
    method = build_method(
        "stl_student", model=_token_model(), labeler=_token_model(), token_loss_weight=2.0, dense_weight_ramp_epochs=300
    )
    assert method.token_weight(0) == 0.0
    assert method.token_weight(75) == pytest.approx(2.0 * 0.5)
    assert method.token_weight(300) == method.token_weight(350) == 2.0
    ctx = StepContext(step=0, epoch=75, plan=TrainPlan(10, 10, 1), device=torch.device("cpu"))
    out = method.training_step(_batch(), ctx)
    assert out["token_weight"].item() == pytest.approx(1.0)
    assert out["loss"].item() == pytest.approx(out["cls"].item() + out["token"].item(), abs=1e-5)
    with pytest.raises(ValueError, match="dense_weight_ramp_epochs must be >= 0"):
        build_method("stl_student", model=_token_model(), labeler=_token_model(), dense_weight_ramp_epochs=-1)


def test_single_token_label_is_one_label_per_image():
    """Published ``--single-token-label``: labels from the token-averaged labeler logits, learnt on average."""
    student, teacher = _token_model().eval(), _token_model().eval()
    method = build_method(
        "stl_student", model=student, labeler=teacher, label_type="argmax", single_token_label=True, label_smoothing=0
    )
    batch = _batch()
    out = method.training_step(batch, _ctx())
    t = teacher.forward_tokens(batch["teacher_image"]).token_logits.mean(1)  # (B, K)
    y = F.one_hot(t.argmax(-1), 3).float() * 0.9 + 0.1 / 3
    s = student.forward_tokens(batch["image"]).token_logits.mean(1)
    assert out["token"].item() == pytest.approx(-(y * F.log_softmax(s, -1)).sum(-1).mean().item(), abs=1e-5)


def test_online_self_labelling_puts_the_student_back_in_train_mode():
    student = _token_model()
    method = build_method("stl_student", model=student, labeler="self", label_type="argmax")
    method.train()
    seen = []
    student.blocks[0].register_forward_pre_hook(lambda mod, args: seen.append(mod.training))
    out = method.training_step(_batch(), _ctx())
    assert seen == [False, True]  # labels in eval mode, the student's own forward in train mode
    assert student.training and all(m.training for m in student.modules())
    assert method.teacher is student and method.export_meta()["labeler"]["export"] == "online"
    assert not any(k.startswith("_teacher") for k in method.state_dict())
    out["loss"].backward()
    assert any(p.grad is not None for p in student.parameters())


def test_aux_only_labeler_trains_only_the_token_average():
    """Published ``train_token_labeler.py --single-token-label``: only ``CE(mean tokens aux, y)``."""
    model = _token_model().eval()
    method = build_method("stl_labeler", model=model, aux_only=True, label_smoothing=0.0)
    batch = _batch()
    out = method.training_step(batch, _ctx())
    _, patches = model.forward_features(batch["image"])
    ce_aux = F.cross_entropy(model.aux_head(patches.mean(1)), batch["label"])
    assert out["loss"].item() == pytest.approx(ce_aux.item(), abs=1e-5)
    out["loss"].backward()
    assert model.head.weight.grad is not None and not model.head.weight.grad.any()  # in the graph, weight 0
    assert model.aux_head.weight.grad.any()
    val = method.validation_step(model, batch)
    assert val["correct"].item() == (model.aux_head(patches.mean(1)).argmax(-1) == batch["label"]).sum().item()
    assert method.export_meta() == {"stl_labeler": {"aux_only": True}}
    assert build_method("stl_labeler", model=model).export_meta() == {}


def test_in1k_student_recipes_take_the_labelers_best_export():
    """Published: the student's ``--offline-model`` is the labeler run's ``model_best.pth.tar`` (best EMA top-1)."""
    from pathlib import Path

    import yaml

    configs = Path(tokenlab.__file__).parent / "configs"
    students = sorted(configs.glob("in1k_stl_*_student.yaml"))
    assert len(students) == 4
    for path in students:
        kwargs = yaml.safe_load(path.read_text())["method"]["kwargs"]
        assert kwargs["labeler_export"] == "best", path.name
        assert kwargs["token_smoothing"] is None and kwargs["label_type"] == "gumbel", path.name
    evaluation = yaml.safe_load((configs / "in1k_base.yaml").read_text())["data"]["eval"]
    assert evaluation == {"crop_pct": 1.0, "interpolation": "bicubic"}


def test_labeler_max_over_tokens_term_adds_the_mil_loss():
    """Option (not published): ``+ mu * CE(max_i aux_head(p_i), y)`` next to the published GAP term."""
    out, ce_cls, ce_aux, token_logits, batch = _labeler_step(aux_max_weight=0.3)
    ce_max = F.cross_entropy(token_logits.max(dim=1).values, batch["label"])
    assert out["aux_max"].item() == pytest.approx(ce_max.item(), abs=1e-5)
    assert out["loss"].item() == pytest.approx((ce_cls + ce_aux + 0.3 * ce_max).item(), abs=1e-5)


def test_token_cutmix_pastes_a_token_aligned_box_and_targets_each_region():
    import numpy as np

    from tokenlab.methods.stl import region_cross_entropy, token_cutmix

    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 3, 16, 16)
    np.random.seed(3)
    mixed, inside = token_cutmix(images, (4, 4), alpha=1.0)
    assert inside.shape == (16,) and 0 < inside.sum() < 16
    # every 4x4 patch is wholly from one image: the flipped partner inside the box, the image itself outside
    patches = mixed[:, 0].reshape(4, 4, 4, 4, 4).permute(0, 1, 3, 2, 4).reshape(4, 16, 16)
    source = torch.where(inside, 3 - torch.arange(4.0)[:, None], torch.arange(4.0)[:, None])  # (B, N)
    assert torch.equal(patches, source[..., None].expand(4, 16, 16))
    assert torch.equal(images[:, 0, 0, 0], torch.arange(4.0))  # the caller's batch is untouched
    # region loss: area-weighted CE of the region means; without a box it is the published GAP term
    logits, targets = torch.randn(4, 16, 3), F.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    a = inside.float().mean()
    expected = (1 - a) * F.cross_entropy(logits[:, ~inside].mean(1), targets.argmax(1)) + a * F.cross_entropy(
        logits[:, inside].mean(1), targets.flip(0).argmax(1)
    )
    assert region_cross_entropy(logits, targets, inside).item() == pytest.approx(expected.item(), abs=1e-5)
    gap = F.cross_entropy(logits.mean(1), targets.argmax(1))
    assert region_cross_entropy(logits, targets).item() == pytest.approx(gap.item(), abs=1e-6)
    mil = (1 - a) * F.cross_entropy(logits[:, ~inside].max(1).values, targets.argmax(1)) + a * F.cross_entropy(
        logits[:, inside].max(1).values, targets.flip(0).argmax(1)
    )
    assert region_cross_entropy(logits, targets, inside, "max").item() == pytest.approx(mil.item(), abs=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        region_cross_entropy(logits, targets, pool="median")
    # top-k pooling: the mean of each class's 4 highest of 16 token logits; all tokens give the mean, one the max
    top4 = logits.sort(dim=1, descending=True).values[:, :4].mean(1)
    assert region_cross_entropy(logits, targets, None, "max", 0.25).item() == pytest.approx(
        F.cross_entropy(top4, targets.argmax(1)).item(), abs=1e-5
    )
    assert region_cross_entropy(logits, targets, None, "max", 1.0).item() == pytest.approx(gap.item(), abs=1e-5)


def test_labeler_token_cutmix_mixes_class_targets_by_area():
    import numpy as np

    model = _token_model().eval()
    method = build_method("stl_labeler", model=model, token_cutmix_alpha=1.0, token_cutmix_prob=1.0,
                          label_smoothing=0.0)  # fmt: skip
    batch = _batch()
    np.random.seed(0)
    out = method.training_step(batch, _ctx())
    np.random.seed(0)
    from tokenlab.methods.stl import region_cross_entropy, token_cutmix

    assert np.random.rand() < 1.0  # the step's draw of whether to mix
    mixed, inside = token_cutmix(batch["image"], (4, 4), 1.0)
    cls, patches = model.forward_features(mixed)
    y = F.one_hot(batch["label"], 3).float()
    a = inside.float().mean()
    ce_cls = -((1 - a) * y + a * y.flip(0)).mul(F.log_softmax(model.head(cls), -1)).sum(-1).mean()
    ce_aux = region_cross_entropy(model.aux_head(patches), y, inside)
    assert out["loss"].item() == pytest.approx((ce_cls + ce_aux).item(), abs=1e-5)
    out["loss"].backward()
    assert model.aux_head.weight.grad.any()
    with pytest.raises(ValueError, match="token_cutmix_alpha"):
        build_method("stl_labeler", model=model, token_cutmix_alpha=1.0, cutmix_alpha=1.0)
    with pytest.raises(ValueError, match="aux_max_weight"):
        build_method("stl_labeler", model=model, aux_max_weight=-1.0)
    with pytest.raises(ValueError, match="aux_max_topk"):
        build_method("stl_labeler", model=model, aux_max_topk=1.5)
