"""iBOT method: losses wired to the right tokens, teacher by EMA only, schedules, safeguards, export/import,
engine integration (exact resume) and a 2-process gloo run."""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

import tokenlab.models  # noqa: F401  (registers the models)
from tokenlab.data.masking import BlockMaskGenerator
from tokenlab.engine.config import list_recipes, load_config
from tokenlab.engine.trainer import Trainer
from tokenlab.methods import StepContext, TrainPlan, build_method
from tokenlab.methods.ibot import IBOT, collapse_metrics
from tokenlab.models import load_exported, save_exported
from tokenlab.models.vit import import_ibot_checkpoint

MODEL_KW = dict(img_size=16, embed_dim=32, depth=2, num_heads=2)
HEAD_KW = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16)


def tiny_vit(**kwargs: Any) -> torch.nn.Module:
    return timm.create_model("ibot_vit_tiny_patch4_32", num_classes=4, **(MODEL_KW | kwargs))


def tiny_ibot(**kwargs: Any) -> IBOT:
    method = build_method("ibot", model=tiny_vit(), **(HEAD_KW | kwargs))
    assert isinstance(method, IBOT)
    return method


class TinyCrops(Dataset):
    """Multi-crop samples like the data layer's (2 global 16 px + 2 local 8 px crops, 4x4 block masks), drawn
    from a per-index generator so the data never depend on the global RNG."""

    def __init__(self, n: int = 16, locals_: int = 2) -> None:
        self.n, self.locals_ = n, locals_
        self.masker = BlockMaskGenerator(4, ratio=(0.2, 0.5), mask_prob=0.75, min_block=2)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        g = torch.Generator().manual_seed(1000 + i)
        base = torch.randn(3, 16, 16, generator=g) * 0.5 + (i % 4) - 1.5
        crops = [base + 0.1 * torch.randn(3, 16, 16, generator=g) for _ in range(2)]
        crops += [base[:, :8, :8] + 0.1 * torch.randn(3, 8, 8, generator=g) for _ in range(self.locals_)]
        return {"crops": crops, "masks": [self.masker(g) for _ in range(2)], "label": i % 4}


def _batch(b: int = 3, locals_: int = 2) -> dict[str, Any]:
    from torch.utils.data import default_collate

    data = TinyCrops(b, locals_)
    return default_collate([data[i] for i in range(b)])


def _ctx(step: int = 0, epoch: int = 0, total: int = 20, per_epoch: int = 5) -> StepContext:
    plan = TrainPlan(total_steps=total, steps_per_epoch=per_epoch, epochs=total // per_epoch)
    return StepContext(step=step, epoch=epoch, plan=plan, device=torch.device("cpu"))


# ---- construction ------------------------------------------------------------------------------------------------
def test_build_removes_classifier_and_freezes_teacher() -> None:
    method = tiny_ibot()
    assert method.model.num_classes == 0
    assert all(not p.requires_grad for p in method.teacher.parameters())
    method.train()
    assert method.model.training and not method.teacher.training
    names = {n for n, _ in method.trainable_module().named_parameters()}
    assert not any(n.startswith("teacher") for n in names) and "backbone.mask_token" in names


def test_build_errors() -> None:
    with pytest.raises(ValueError, match="mask token"):
        build_method("ibot", model=tiny_vit(use_mask_token=False), **HEAD_KW)
    with pytest.raises(ValueError, match="valid: teacher, student"):
        tiny_ibot(export="ema")
    with pytest.raises(ValueError, match="teacher momentum"):
        tiny_ibot(teacher_momentum=0.999, teacher_momentum_end=0.99)
    with pytest.raises(ValueError, match="unknown option"):
        build_method("ibot", model=tiny_vit(), out_dimm=3)


# ---- the step --------------------------------------------------------------------------------------------------------
def test_loss_is_the_weighted_sum_of_both_terms() -> None:
    batch = _batch()
    torch.manual_seed(0)
    a = tiny_ibot(cls_weight=0.3, patch_weight=2.0)
    out = a.training_step(batch, _ctx())
    expected = 0.3 * out["loss_cls"] + 2.0 * out["loss_patch"]
    assert torch.allclose(out["loss"].detach(), expected)
    for key in ("teacher_entropy", "teacher_marginal_entropy", "teacher_feature_std", "mask_ratio", "teacher_temp"):
        assert key in out and torch.isfinite(out[key])


def test_loss_terms_equal_the_formulas() -> None:
    """Recompute both terms from the student/teacher outputs with the losses' definitions."""
    import torch.nn.functional as F

    method = tiny_ibot()
    batch = _batch(b=2)
    out = method.training_step(batch, _ctx())
    globals_, mask = torch.cat(batch["crops"][:2]), torch.cat(batch["masks"]).flatten(1)
    with torch.no_grad():
        t_cls, t_patch = method.teacher["head"](*method.teacher["backbone"].forward_features(globals_))
        s_cls, s_patch = method.head(*method.model.forward_features(globals_, mask))
        l_cls, _ = method.head(method.model.forward_features(torch.cat(batch["crops"][2:]))[0])
    tt, ts = 0.04, 0.1  # step 0: the warm-up start; centers start at 0
    p_t = F.softmax(t_cls / tt, -1).reshape(2, 2, -1)
    log_s = F.log_softmax(torch.cat([s_cls, l_cls]) / ts, -1).reshape(4, 2, -1)
    pairs = [-(p_t[q] * log_s[v]).sum(-1).mean() for q in range(2) for v in range(4) if v != q]
    assert out["loss_cls"].item() == pytest.approx(torch.stack(pairs).mean().item(), rel=1e-4)
    ce = -(F.softmax(t_patch / tt, -1) * F.log_softmax(s_patch / ts, -1)).sum(-1)  # (2B, N)
    per_image = (ce * mask).sum(1) / mask.sum(1).clamp(min=1)
    assert out["loss_patch"].item() == pytest.approx(per_image.mean().item(), rel=1e-4)


def test_masked_tokens_are_the_generators_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    method = tiny_ibot()
    with torch.no_grad():
        method.model.mask_token.fill_(7.0)
    batch = _batch(b=4)
    seen: list[torch.Tensor] = []
    original = method.model._pos_embed

    def capture(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.detach().clone())
        return original(x)

    monkeypatch.setattr(method.model, "_pos_embed", capture)
    method.training_step(batch, _ctx())
    globals_ = torch.cat(batch["crops"][:2])
    chosen = torch.cat(batch["masks"])  # (2B, 4, 4) from the BlockMaskGenerator
    assert chosen.any() and not chosen.all()
    tokens = seen[0]  # first student call: the global crops, (2B, H, W, C) before the position embedding
    with torch.no_grad():
        plain = method.model.patch_embed(globals_)
    assert torch.all(tokens[chosen] == 7.0)
    assert torch.equal(tokens[~chosen], plain[~chosen])
    assert len(seen) == 2 and seen[1].shape[1:3] == (2, 2)  # the local crops: never masked
    assert not torch.any(seen[1] == 7.0)


def test_teacher_gets_no_gradient_and_moves_only_by_ema() -> None:
    method = tiny_ibot(teacher_momentum=0.9, teacher_momentum_end=0.9, freeze_last_layer_epochs=0)
    teacher_before = {k: v.clone() for k, v in method.teacher.state_dict().items()}
    opt = torch.optim.SGD(method.trainable_module().parameters(), lr=0.5)
    out = method.training_step(_batch(), _ctx())
    out["loss"].backward()
    assert all(p.grad is None for p in method.teacher.parameters())
    method.before_optimizer_step(_ctx())
    opt.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in method.teacher.state_dict().items())
    method.after_step(_ctx())
    student = dict(method.model.named_parameters(prefix="backbone")) | dict(method.head.named_parameters(prefix="head"))
    for name, t in method.teacher.named_parameters():
        expected = 0.9 * teacher_before[name] + 0.1 * student[name].detach()
        assert torch.allclose(t, expected, atol=1e-6), name


def test_schedules_follow_their_definitions() -> None:
    method = tiny_ibot(
        warmup_teacher_temp=0.04,
        teacher_temp=0.07,
        warmup_teacher_temp_epochs=2,
        teacher_momentum=0.996,
        teacher_momentum_end=1.0,
    )
    plan = TrainPlan(total_steps=40, steps_per_epoch=10, epochs=4)
    method.on_train_start(plan)
    # linear warm-up over 2 epochs = 20 steps: 0.04 + 0.03 * s / 20, then 0.07
    for s in (0, 5, 10, 19):
        assert method.current_teacher_temp(s) == pytest.approx(0.04 + 0.03 * s / 20)
    assert method.current_teacher_temp(20) == pytest.approx(0.07) == method.current_teacher_temp(39)
    # cosine: 1 - (1 - 0.996) * (1 + cos(pi s / 40)) / 2
    for s in (0, 10, 20, 39):
        assert method.current_momentum(s) == pytest.approx(1 - 0.004 * (1 + math.cos(math.pi * s / 40)) / 2)
    assert np.all(np.diff(method.momentum_schedule) >= 0)


def test_last_layer_frozen_during_first_epoch_only() -> None:
    method = tiny_ibot(freeze_last_layer_epochs=1)
    last = method.head.last_layer_parameters()
    for step, frozen in ((0, True), (4, True), (5, False)):
        method.zero_grad(set_to_none=True)
        ctx = _ctx(step=step, epoch=step // 5)
        method.training_step(_batch(), ctx)["loss"].backward()
        assert all(p.grad is not None for p in last if p.requires_grad)
        method.before_optimizer_step(ctx)
        assert all((p.grad is None) == frozen for p in last if p.requires_grad), step


def test_patch_temperature_has_its_own_schedule_and_reaches_the_patch_loss() -> None:
    """Published iBOT: teacher_patch_temp / warmup_teacher_patch_temp, warmed over the same epochs as the [CLS] one."""
    method = tiny_ibot(warmup_teacher_temp=0.04, teacher_temp=0.06, warmup_teacher_patch_temp=0.02,
                       teacher_patch_temp=0.09, warmup_teacher_temp_epochs=2)  # fmt: skip
    method.on_train_start(TrainPlan(total_steps=40, steps_per_epoch=10, epochs=4))
    for s in (0, 10, 19):
        assert method.current_teacher_patch_temp(s) == pytest.approx(0.02 + 0.07 * s / 20)
        assert method.current_teacher_temp(s) == pytest.approx(0.04 + 0.02 * s / 20)
    assert method.current_teacher_patch_temp(25) == pytest.approx(0.09)
    # the patch loss uses tau_p: recompute it at step 0 (tau_p = 0.02)
    import torch.nn.functional as F

    batch = _batch(b=2)
    out = method.training_step(batch, _ctx())
    assert out["teacher_patch_temp"].item() == pytest.approx(0.02)
    globals_, mask = torch.cat(batch["crops"][:2]), torch.cat(batch["masks"]).flatten(1)
    with torch.no_grad():
        _, t_patch = method.teacher["head"](*method.teacher["backbone"].forward_features(globals_))
        _, s_patch = method.head(*method.model.forward_features(globals_, mask))
    ce = -(F.softmax(t_patch / 0.02, -1) * F.log_softmax(s_patch / 0.1, -1)).sum(-1)
    expected = ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()
    assert out["loss_patch"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_pred_start_epoch_delays_masking_and_the_patch_temperature_warm_up() -> None:
    method = tiny_ibot(pred_start_epoch=1, warmup_teacher_temp_epochs=1, warmup_teacher_patch_temp=0.04,
                       teacher_patch_temp=0.07)  # fmt: skip
    plan = _ctx().plan  # 5 steps per epoch, 20 steps
    method.on_train_start(plan)
    assert [method.current_teacher_patch_temp(s) for s in range(5)] == pytest.approx([0.04] * 5)
    assert method.current_teacher_patch_temp(5) == pytest.approx(0.04)
    assert method.current_teacher_patch_temp(7) == pytest.approx(0.04 + 0.03 * 2 / 5)
    assert method.current_teacher_patch_temp(10) == pytest.approx(0.07)
    assert method.current_teacher_temp(5) == pytest.approx(0.07)  # the [CLS] warm-up is not delayed
    batch = _batch()
    early = method.training_step(batch, _ctx(step=4, epoch=0))
    assert early["mask_ratio"].item() == 0.0 and early["loss_patch"].item() == 0.0
    late = method.training_step(batch, _ctx(step=5, epoch=1))
    assert late["mask_ratio"].item() > 0.0 and late["loss_patch"].item() > 0.0


def test_separate_patch_prototypes_share_the_mlp_and_the_teacher_stays_shared() -> None:
    """Published shared_head=False: one MLP, a second prototype layer for patches; shared_head_teacher=True (default)
    keeps one prototype layer in the teacher, the EMA of the student's [CLS] one."""
    method = tiny_ibot(shared_head=False)
    assert not method.head.shared and method.teacher["head"].shared
    assert method.head.patch_last_layer is not None and not hasattr(method.head, "patch_head")
    s_names = {n for n, _ in method.head.named_parameters()}
    t_names = {n for n, _ in method.teacher["head"].named_parameters()}
    assert t_names < s_names and {n.split(".")[0] for n in s_names - t_names} == {"patch_last_layer"}
    out = method.training_step(_batch(), _ctx())
    out["loss"].backward()
    assert all(p.grad is not None for p in method.head.patch_last_layer.parameters() if p.requires_grad)
    before = {n: p.clone() for n, p in method.teacher["head"].named_parameters()}
    student = dict(method.head.named_parameters())
    method.update_teacher(0.5)
    for n, p in method.teacher["head"].named_parameters():
        torch.testing.assert_close(p, 0.5 * before[n] + 0.5 * student[n].detach())
    separate_teacher = tiny_ibot(shared_head=False, shared_head_teacher=False)
    assert not separate_teacher.teacher["head"].shared
    with pytest.raises(ValueError, match="shared_head_teacher"):
        tiny_ibot(shared_head=False, patch_out_dim=32)
    assert (
        tiny_ibot(shared_head=False, shared_head_teacher=False, patch_out_dim=32).patch_loss.center.center.shape[-1]
        == 32
    )


def test_collapse_metrics_pinned() -> None:
    k = 8
    uniform = torch.full((4, k), 1.0 / k)
    onehot = torch.zeros(4, k)
    onehot[:, 3] = 1.0
    spread = torch.eye(k)[:4]
    feats_same, feats_spread = torch.ones(4, 5), torch.eye(5)[:4]
    m = collapse_metrics(uniform, feats_same)
    assert m["teacher_entropy"].item() == pytest.approx(math.log(k), abs=1e-5)  # uniform collapse: log K
    assert m["teacher_marginal_entropy"].item() == pytest.approx(math.log(k), abs=1e-5)
    assert m["teacher_feature_std"].item() == pytest.approx(0.0, abs=1e-6)  # every image maps to one point
    m = collapse_metrics(onehot, feats_spread)
    assert m["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-5)  # one prototype: both entropies 0
    assert m["teacher_marginal_entropy"].item() == pytest.approx(0.0, abs=1e-5)
    m = collapse_metrics(spread, feats_spread)
    assert m["teacher_entropy"].item() == pytest.approx(0.0, abs=1e-5)  # healthy: sharp but diverse
    assert m["teacher_marginal_entropy"].item() == pytest.approx(math.log(4), abs=1e-5)
    # one-hot rows in 5 dims, 4 images: columns 0-3 have std sqrt(1/4 * 3/4 * 4/3) = 0.5, column 4 has 0
    assert m["teacher_feature_std"].item() == pytest.approx(4 * 0.5 / 5, abs=1e-5)


def test_batch_errors() -> None:
    method = tiny_ibot()
    batch = _batch()
    with pytest.raises(ValueError, match="at least 2 crops"):
        method.training_step({"crops": batch["crops"][:1]}, _ctx())
    with pytest.raises(ValueError, match="3 masks for 2 global"):
        method.training_step({"crops": batch["crops"], "masks": batch["masks"] + batch["masks"][:1]}, _ctx())
    no_masks = method.training_step({"crops": batch["crops"]}, _ctx())
    assert no_masks["loss_patch"].item() == 0.0 and no_masks["mask_ratio"].item() == 0.0


# ---- export and import -----------------------------------------------------------------------------------------------
def test_exported_backbone_loads_through_timm_overlay_at_another_resolution(tmp_path: Path) -> None:
    method = tiny_ibot()
    with torch.no_grad():
        method.teacher["backbone"].pos_embed.normal_()
    # what the engine's export writes for an iBOT run: the export module with the method's export_meta
    info = {"model": "ibot_vit_tiny_patch4_32", "model_kwargs": MODEL_KW | {"num_classes": 0}, "num_classes": 0}
    stem = save_exported(method.export_module(), tmp_path / "backbone", info | method.export_meta())
    meta = json.loads(stem.with_suffix(".json").read_text())
    assert meta["backbone"] == "teacher" and meta["num_classes"] == 0
    assert not any(k.startswith("head.") for k in load_file(stem.with_suffix(".safetensors")))
    same = timm.create_model(
        "ibot_vit_tiny_patch4_32",
        pretrained=True,
        num_classes=5,
        pretrained_cfg_overlay=dict(file=str(stem.with_suffix(".safetensors"))),
        **MODEL_KW,
    )
    assert torch.equal(same.blocks[0].attn.qkv.weight, method.teacher["backbone"].blocks[0].attn.qkv.weight)
    assert same.head.out_features == 5
    bigger = timm.create_model(
        "ibot_vit_tiny_patch4_32",
        pretrained=True,
        num_classes=5,
        pretrained_cfg_overlay=dict(file=str(stem.with_suffix(".safetensors"))),
        **(MODEL_KW | dict(img_size=32)),
    )
    assert bigger.pos_embed.shape == (1, 1 + 64, 32)  # 4x4 grid resampled to 8x8 (+ the class token)
    assert torch.equal(bigger.pos_embed[:, 0], method.teacher["backbone"].pos_embed[:, 0])
    model, _ = load_exported(stem)
    assert torch.equal(model.pos_embed, method.teacher["backbone"].pos_embed)


def _fake_official(path: Path, source: torch.nn.Module) -> None:
    backbone = {k: v.clone() for k, v in source.state_dict().items() if not k.startswith("head.")}
    backbone["masked_embed"] = backbone.pop("mask_token").reshape(-1)
    head = {"head.mlp.0.weight": torch.zeros(2, 2), "head.last_layer.weight_g": torch.ones(3, 1)}
    torch.save(
        {
            "student": {f"module.backbone.{k}": v + 1 for k, v in backbone.items()}
            | {f"module.{k}": v for k, v in head.items()},
            "teacher": {f"backbone.{k}": v for k, v in backbone.items()} | head,
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16),
        },
        path,
    )


def test_import_official_checkpoint(tmp_path: Path) -> None:
    source = tiny_vit()
    with torch.no_grad():
        source.mask_token.normal_()
    _fake_official(tmp_path / "ibot.pth", source)
    target = tiny_vit()
    report = import_ibot_checkpoint(target, tmp_path / "ibot.pth", which="teacher")
    assert torch.equal(target.mask_token, source.mask_token)
    assert torch.equal(target.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    assert sorted(report.skipped) == ["head.last_layer.weight_g", "head.mlp.0.weight"]
    assert report.missing == ["head.bias", "head.weight"] and report.resized == []
    student = tiny_vit()
    report = import_ibot_checkpoint(student, tmp_path / "ibot.pth", which="student")
    assert torch.equal(student.cls_token, source.cls_token + 1)
    assert "module.head.mlp.0.weight" in report.skipped
    bigger = tiny_vit(img_size=32)
    assert import_ibot_checkpoint(bigger, tmp_path / "ibot.pth").resized == ["pos_embed"]


def test_official_checkpoint_through_timm_keeps_the_mask_token(tmp_path: Path) -> None:
    """timm's pretrained path runs the same filter: the mask embedding is kept, the head skipped, pos_embed
    resampled (a file without the pickled ``args`` namespace, which timm's weights-only reader refuses)."""
    source = tiny_vit()
    with torch.no_grad():
        source.mask_token.normal_()
    _fake_official(tmp_path / "ibot.pth", source)
    obj = torch.load(tmp_path / "ibot.pth", weights_only=False)
    torch.save({"teacher": obj["teacher"]}, tmp_path / "teacher.pth")
    loaded = timm.create_model(
        "ibot_vit_tiny_patch4_32",
        pretrained=True,
        num_classes=4,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "teacher.pth")),
        **MODEL_KW,
    )
    assert torch.equal(loaded.mask_token, source.mask_token)
    assert torch.equal(loaded.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    bigger = timm.create_model(
        "ibot_vit_tiny_patch4_32",
        pretrained=True,
        num_classes=4,
        pretrained_cfg_overlay=dict(file=str(tmp_path / "teacher.pth")),
        **(MODEL_KW | dict(img_size=32)),
    )
    assert torch.equal(bigger.mask_token, source.mask_token) and bigger.pos_embed.shape == (1, 1 + 64, 32)


def test_import_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        import_ibot_checkpoint(tiny_vit(), tmp_path / "nope.pth")
    _fake_official(tmp_path / "ibot.pth", tiny_vit())
    with pytest.raises(ValueError, match="valid: teacher, student"):
        import_ibot_checkpoint(tiny_vit(), tmp_path / "ibot.pth", which="ema")
    with pytest.raises(ValueError, match="lacks backbone keys"):
        import_ibot_checkpoint(tiny_vit(depth=3), tmp_path / "ibot.pth")


# ---- through the engine --------------------------------------------------------------------------------------------
def _cfg(run_dir: Path, *extra: str):
    return load_config(
        None,
        [
            f"run_dir={run_dir}",
            "model.name=ibot_vit_tiny_patch4_32",
            "model.num_classes=4",
            *[f"model.kwargs.{k}={v}" for k, v in MODEL_KW.items()],
            "method.name=ibot",
            *[f"method.kwargs.{k}={v}" for k, v in HEAD_KW.items()],
            "method.kwargs.teacher_momentum=0.9",
            "method.kwargs.warmup_teacher_temp_epochs=1",
            "data.batch_size=4",
            "data.val_split=null",
            "optim.lr=0.001",
            "optim.weight_decay=0.04",
            "optim.weight_decay_end=0.4",
            "optim.decay_embeddings=true",
            "optim.clip_grad=3.0",
            "train.clip_mode=per_param",
            "schedule.epochs=2",
            "train.deterministic=true",
            "train.max_nonfinite=1",
            "log.every_steps=1",
            "log.progress=false",
            "log.tensorboard=false",
            "train.min_free_disk_mb=0",
            "seed=1",
            *extra,
        ],
    )


@pytest.mark.timeout(120)
def test_engine_run_and_exact_resume(tmp_path: Path) -> None:
    full = Trainer(_cfg(tmp_path / "full"), TinyCrops()).fit()
    assert full.step == 8 and full.nonfinite_steps == 0
    Trainer(_cfg(tmp_path / "split", "schedule.max_steps=3"), TinyCrops()).fit()
    resumed = Trainer(_cfg(tmp_path / "split", "checkpoint.resume=auto"), TinyCrops()).fit()
    assert resumed.step == 8
    a = load_file(tmp_path / "full" / "checkpoints" / "step_000000008" / "method.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_000000008" / "method.safetensors")
    assert any(k.startswith("teacher.") for k in a) and "cls_loss.center.center" in a
    assert "patch_loss.center.center" in a and a["cls_loss.center.center"].abs().sum() > 0
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resume is not exact: {diff[:5]}"
    model, meta = load_exported(tmp_path / "full")
    assert meta["method"] == "ibot" and meta["num_classes"] == 0
    assert torch.equal(model.state_dict()["pos_embed"], a["teacher.backbone.pos_embed"])
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if r.get("kind") == "step"]
    assert {"teacher_entropy", "teacher_feature_std", "loss_cls", "loss_patch"} <= set(steps[0])


_DIST_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from test_ibot import TinyCrops, _cfg
from tokenlab.utils import distributed as D
from tokenlab.engine.trainer import Trainer
from tokenlab.losses.center import Center
from safetensors.torch import save_file
from pathlib import Path
torch.set_num_threads(1)
trainer = Trainer(_cfg(Path({run!r}), "schedule.epochs=1"), TinyCrops())
trainer.fit()
center = Center(2, momentum=0.5)
center.update(torch.full((3, 2), float(D.rank())))  # ranks hold 0 and 1: global mean 0.5 -> c = 0.25
state = {{k: v.contiguous() for k, v in trainer.method.teacher.state_dict().items()}}
state["probe_center"] = center.center
state["cls_center"] = trainer.method.cls_loss.center.center
save_file(state, f"{out}/rank{{D.rank()}}.safetensors")
D.cleanup_distributed()
"""


@pytest.mark.timeout(240)
@pytest.mark.slow
def test_two_process_gloo_run(tmp_path: Path) -> None:
    script = tmp_path / "dist_ibot.py"
    script.write_text(
        _DIST_SCRIPT.format(here=str(Path(__file__).parent), run=str(tmp_path / "run"), out=str(tmp_path))
    )
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=220)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert torch.allclose(r0["probe_center"], torch.tensor([0.25, 0.25]))
    assert all(torch.equal(r0[k], r1[k]) for k in r0), "teachers or centers differ across ranks"
    assert (tmp_path / "run" / "model.safetensors").is_file()


_IBOT_SHARED_BASES = ("ibot_in1k_base", "ibot_in1k_finetune_base")  # only used as `_base_` of size recipes


@pytest.mark.parametrize("name", [r for r in list_recipes() if r.startswith("ibot_") and r not in _IBOT_SHARED_BASES])
def test_ibot_recipes_fit_their_method_and_transform(name: str) -> None:
    import inspect

    from omegaconf import OmegaConf

    from tokenlab.data import build_transforms
    from tokenlab.methods import get_method_class

    cfg = load_config(name)
    cls = get_method_class(cfg.method.name)
    kwargs = OmegaConf.to_container(cfg.method.kwargs)
    assert set(kwargs) <= set(inspect.signature(cls.__init__).parameters), kwargs
    tf = build_transforms(
        cls.data_view, cfg.data.img_size, **cls.transform_options(kwargs), **OmegaConf.to_container(cfg.data.transform)
    )
    if cls is IBOT:
        assert cfg.data.val_split is None and cfg.train.max_nonfinite == 1
        assert cfg.optim.weight_decay == 0.04 and cfg.optim.weight_decay_end == 0.4
        # published: per-parameter clipping at 3.0, weight decay on pos_embed / cls_token / mask token
        assert cfg.optim.clip_grad == 3.0 and cfg.train.clip_mode == "per_param" and cfg.optim.decay_embeddings
        sample = tf({"image": torch.randint(0, 255, (3, 40, 40), dtype=torch.uint8), "label": 0})
        grid = cfg.data.img_size // cfg.data.transform.patch_size
        assert len(sample["crops"]) == 2 + cfg.data.transform.num_local and sample["masks"][0].shape == (grid, grid)


def test_centres_move_once_per_optimizer_step_under_accumulation() -> None:
    """Two micro-batches of B through ``training_step`` (contexts 0/2 and 1/2) give the centres of one batch of 2 B:
    the EMA is applied once, at the last micro-batch, not once per micro-batch."""
    batch = _batch(b=4)
    halves = [{k: [v[sl] for v in batch[k]] for k in ("crops", "masks")} for sl in (slice(0, 2), slice(2, 4))]
    big, acc = tiny_ibot(), tiny_ibot()
    acc.load_state_dict(big.state_dict())
    with torch.no_grad():
        big.training_step(batch, _ctx())
        plan = _ctx().plan
        for micro, half in enumerate(halves):
            ctx = StepContext(step=0, epoch=0, plan=plan, device=torch.device("cpu"), micro_batch=micro, accum_steps=2)
            acc.training_step(half, ctx)
            if micro == 0:
                assert torch.equal(acc.cls_loss.center.center, torch.zeros_like(acc.cls_loss.center.center))
    for loss in ("cls_loss", "patch_loss"):
        a, b = getattr(acc, loss).center.center, getattr(big, loss).center.center
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_published_pretraining_recipe_values() -> None:
    """ViT-S/16 as in the published README command (75.2 k-NN / 77.9 linear): norm_last_layer false; ViT-B keeps the
    prototype gains fixed (the published default)."""
    small, base = load_config("ibot_in1k_vit_small"), load_config("ibot_in1k_vit_base")
    assert small.method.kwargs.norm_last_layer is False and base.method.kwargs.norm_last_layer is True
    k = small.method.kwargs
    assert (k.out_dim, k.shared_head, k.teacher_temp, k.warmup_teacher_temp, k.warmup_teacher_temp_epochs) == (
        8192,
        True,
        0.07,
        0.04,
        30,
    )
    assert (k.teacher_patch_temp, k.warmup_teacher_patch_temp, k.pred_start_epoch, k.freeze_last_layer_epochs) == (
        0.07,
        0.04,
        0,
        1,
    )
    assert (k.teacher_momentum, k.center_momentum, k.student_temp) == (0.996, 0.9, 0.1)
    t = small.data.transform
    assert (t.num_local, list(t.global_scale), list(t.local_scale), list(t.mask_ratio), t.mask_prob) == (
        10,
        [0.25, 1.0],
        [0.05, 0.25],
        [0.1, 0.5],
        0.5,
    )
    assert small.schedule.epochs == 800 and small.schedule.warmup_epochs == 10
    assert small.optim.lr == pytest.approx(5e-4 * 1024 / 256) and small.data.batch_size * 8 == 1024
    assert small.optim.min_lr == 1e-6 and small.model.kwargs.drop_path_rate == 0.1


def test_published_finetune_recipes() -> None:
    from tokenlab.engine.builders import build_optimizer

    for name, model, epochs, drop_path, decay in (
        ("ibot_in1k_finetune_vit_small", "ibot_vit_small_patch16_224", 200, 0.1, 0.75),
        ("ibot_in1k_finetune_vit_base", "ibot_vit_base_patch16_224", 100, 0.2, 0.65),
    ):
        cfg = load_config(name)
        assert cfg.model.name == model and cfg.schedule.epochs == epochs and cfg.optim.layer_decay == decay
        assert cfg.model.kwargs.drop_path_rate == drop_path and cfg.schedule.warmup_epochs == 20
        assert cfg.data.eval.crop_pct == 0.875 and cfg.data.eval.interpolation == "bicubic"
        assert cfg.method.name == "supervised" and not cfg.optim.decay_embeddings
    vit = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=10, **MODEL_KW)  # depth 2: scales 0.75^(3..0)
    opt = build_optimizer(load_config("ibot_in1k_finetune_vit_small"), vit)
    scales = {p_id: g["lr_scale"] for g in opt.param_groups for p_id in map(id, g["params"])}
    assert scales[id(vit.pos_embed)] == pytest.approx(0.75**3) and scales[id(vit.head.weight)] == pytest.approx(1.0)
    assert scales[id(vit.blocks[0].attn.qkv.weight)] == pytest.approx(0.75**2)


def test_fp16_scaler_unscales_before_per_parameter_clipping(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Published iBOT under fp16: scaler.unscale_ first, then clip each parameter's gradient at 3.0. The CPU grad
    scaler stands in for CUDA's: the gradients the clipping sees equal those of the same step without a scaler."""
    from tokenlab.engine import builders as B

    seen: dict[str, list[list[float]]] = {"before": [], "after": []}
    real = B.clip_gradients

    def spy(params, max_norm, mode="global"):
        params = [p for p in params if p.grad is not None]
        assert mode == "per_param" and max_norm == 3.0
        seen["before"].append([p.grad.norm().item() for p in params])
        out = real(params, max_norm, mode)
        seen["after"].append([p.grad.norm().item() for p in params])
        return out

    monkeypatch.setattr(B, "clip_gradients", spy)
    for name, scaled in (("plain", False), ("scaled", True)):
        trainer = Trainer(_cfg(tmp_path / name, "schedule.max_steps=1", "checkpoint.export=false"), TinyCrops())
        if scaled:
            trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        trainer.fit()
    plain, scaled_norms = seen["before"]
    np.testing.assert_allclose(scaled_norms, plain, rtol=1e-4, atol=1e-7)
    assert max(max(a) for a in seen["after"]) <= 3.0 * (1 + 1e-5)


@pytest.mark.parametrize("shared_head", [True, False])
def test_masked_only_head_gives_the_all_token_losses_and_gradients(shared_head: bool) -> None:
    """The student head on the masked patch tokens only and the teacher's prototype layer on them plus one summed
    row (the default) against the all-token computation: same losses, gradients and centres on the same batch and
    weights."""
    batch = _batch(b=3)
    torch.manual_seed(0)
    fast = tiny_ibot(shared_head=shared_head)
    slow = tiny_ibot(shared_head=shared_head)
    slow.load_state_dict(fast.state_dict())
    assert fast.head_on_masked_only
    slow.head_on_masked_only = False
    outs = []
    for method in (fast, slow):
        out = method.training_step(batch, _ctx(step=3))
        out["loss"].backward()
        outs.append(out)
    for key in ("loss", "loss_cls", "loss_patch"):
        torch.testing.assert_close(outs[0][key].detach(), outs[1][key].detach(), atol=1e-5, rtol=1e-5)
    assert outs[0]["loss_patch"] > 0
    grads = [
        {n: p.grad for n, p in m.trainable_module().named_parameters() if p.grad is not None} for m in (fast, slow)
    ]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(fast.patch_loss.center.center, slow.patch_loss.center.center, atol=1e-6, rtol=0)


def test_head_with_batchnorm_sees_every_patch_token() -> None:
    method = tiny_ibot(use_bn=True)
    assert not method.head_on_masked_only  # the BatchNorm statistics would change on a subset
    out = method.training_step(_batch(), _ctx())
    assert torch.isfinite(out["loss"])
