"""Config loading: defaults -> recipe -> dotlist, and one clear error per bad key."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tokenlab.engine.config import list_recipes, load_config


def test_defaults_load_and_overrides_apply():
    cfg = load_config(None, ["optim.lr=5e-4", "method.kwargs.label_type=softmax", "model.kwargs.patch_size=4"])
    assert cfg.optim.lr == 5e-4 and cfg.method.kwargs.label_type == "softmax" and cfg.model.kwargs.patch_size == 4
    assert cfg.data.batch_size == 32


@pytest.mark.parametrize(
    "override, match",
    [
        ("optim.lrr=5", "optim.lrr.*Did you mean: 'lr'"),
        ("optim.lr=abc", "'optim.lr' must be float, got 'abc'"),
        ("optim.lr=0", "'optim.lr' must be > 0"),
        ("data.batch_size=2.5", "'data.batch_size' must be int"),
        ("train.amp=fp8", "'train.amp' is 'fp8'; valid: none, bf16, fp16"),
        ("train.deterministic=maybe", "'train.deterministic' must be bool"),
        ("schedule.warmup_epochs=5", "'schedule.warmup_epochs'"),
        ("optim.min_lr=1", "'optim.min_lr'"),
        ("train.ema.decay=1.5", "'train.ema.decay'"),
        ("optim.betas=[0.9]", "'optim.betas'"),
        ("model.num_classes=ten", "'model.num_classes' must be int"),
        ("optim", "key=value"),
    ],
)
def test_bad_values_name_the_key(override, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, [override])


def test_recipe_with_base_and_struct(tmp_path: Path):
    (tmp_path / "base.yaml").write_text("optim:\n  lr: 0.01\nmethod:\n  name: stl_labeler\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nschedule:\n  epochs: 3\n")
    cfg = load_config(tmp_path / "child.yaml", ["schedule.epochs=4"])
    assert (cfg.optim.lr, cfg.method.name, cfg.schedule.epochs) == (0.01, "stl_labeler", 4)
    (tmp_path / "typo.yaml").write_text("optimizer:\n  lr: 0.01\n")
    with pytest.raises(ValueError, match="optimizer"):
        load_config(tmp_path / "typo.yaml")


def test_missing_recipe_and_resume_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="recipe not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(FileNotFoundError, match="checkpoint.resume"):
        load_config(None, [f"checkpoint.resume={tmp_path / 'none'}"])


@pytest.mark.parametrize("name", [r for r in list_recipes() if not r.endswith("_base")])
def test_shipped_recipes_validate(name: str):
    # `*_base` recipes are partial: they are only used through `_base_:` by complete recipes
    cfg = load_config(name)
    assert OmegaConf.select(cfg, "method.name")


@pytest.mark.parametrize("name", [r for r in list_recipes() if r.startswith(("in1k_", "cifar10_", "synthetic_"))])
def test_stl_recipes_fit_their_method_and_transform(name: str):
    import inspect

    from tokenlab.data import build_transforms
    from tokenlab.methods import get_method_class

    cfg = load_config(name)
    cls = get_method_class(cfg.method.name)
    kwargs = OmegaConf.to_container(cfg.method.kwargs)
    assert set(kwargs) <= set(inspect.signature(cls.__init__).parameters), kwargs
    options = cls.transform_options(kwargs)
    build_transforms(cls.data_view, cfg.data.img_size, **options, **OmegaConf.to_container(cfg.data.transform))


_IN1K_FAN_RECIPES = [r for r in list_recipes() if r.startswith(("in1k_stl_", "in1k_fan_")) and not r.endswith("_base")]


@pytest.mark.parametrize("name", _IN1K_FAN_RECIPES)
def test_in1k_fan_recipes_train_the_published_hybrids(name: str):
    # The STL paper trains hybrid-stem FANs (NVlabs/STL scripts: fan_*_p4_hybrid_token, --min-lr 1e-6); a ViT-stem
    # recipe would only be kept under a name that says so.
    cfg = load_config(name)
    hybrids = ("fan_tiny_8_p4_hybrid", "fan_small_12_p4_hybrid", "fan_base_16_p4_hybrid", "fan_large_16_p4_hybrid")
    if "_vit_" not in name:
        wanted = {h + "_token" for h in hybrids} if name.startswith("in1k_stl_") else set(hybrids)
        assert cfg.model.name in wanted, cfg.model.name
    assert cfg.optim.min_lr == 1e-6


def test_every_in1k_stl_stage_has_a_recipe():
    assert len([r for r in _IN1K_FAN_RECIPES if r.startswith("in1k_stl_")]) == 8


@pytest.mark.parametrize("size", ["tiny", "small", "base", "large"])
def test_in1k_stl_student_takes_the_labelers_best_ema_export(size: str):
    """Published: the student loads the labeler run's best EMA checkpoint by class-head top-1."""
    labeler = load_config(f"in1k_stl_{size}_labeler")
    student = load_config(f"in1k_stl_{size}_student")
    assert (labeler.checkpoint.best_metric, labeler.checkpoint.best_mode) == ("acc1", "max")
    assert labeler.train.ema.enabled
    assert student.method.kwargs.labeler_export == "best"
