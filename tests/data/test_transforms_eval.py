"""The evaluation transform follows the published FAN / STL preprocessing: bicubic resize, crop_pct 1.0."""

import pytest
import timm
import torch
from torchvision.transforms import v2

import tokenlab  # noqa: F401  (registers the FAN default cfgs)
from tokenlab.data.transforms import EvalTransform, build_transforms, eval_transform_from_meta


def _resize(tf: EvalTransform) -> v2.Resize:
    resize = tf.pipeline.transforms[0]
    assert isinstance(resize, v2.Resize)
    return resize


def test_published_fan_eval_is_bicubic_with_crop_pct_one() -> None:
    # NVlabs/FAN + NVlabs/STL _cfg: crop_pct 1.0, bicubic; timm: Resize(floor(224 / 1.0) = 224) + CenterCrop(224)
    for name in ("fan_tiny_8_p4_hybrid_token", "fan_small_12_p4_hybrid", "fan_base_18_p16_224"):
        cfg = timm.models.get_pretrained_cfg(name)
        assert (cfg.crop_pct, cfg.interpolation) == (1.0, "bicubic"), name
        tf = eval_transform_from_meta({"model": name, "img_size": 224})
        assert _resize(tf).size == [224] and _resize(tf).interpolation == v2.InterpolationMode.BICUBIC
        assert (tf.crop_pct, tf.interpolation) == (1.0, "bicubic")
        out = tf(torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8))["image"]
        assert out.shape == (3, 224, 224)


def test_the_export_wins_over_the_model_cfg_and_the_cfg_over_the_constants() -> None:
    meta = {"model": "fan_tiny_8_p4_hybrid_token", "img_size": 224, "crop_pct": 0.875, "interpolation": "bilinear"}
    tf = eval_transform_from_meta(meta)
    assert _resize(tf).size == [256] and tf.interpolation == "bilinear"  # floor(224 / 0.875) = 256
    tf = eval_transform_from_meta({"model": "not_a_registered_model", "img_size": 32})
    assert (tf.crop_pct, tf.interpolation) == (1.0, "bicubic")  # published FAN values
    assert tf.meta()["interpolation"] == "bicubic"
    assert build_transforms("eval", 224, model="fan_tiny_8_p4_hybrid_token").crop_pct == 1.0
    with pytest.raises(ValueError, match="unknown interpolation 'lanczos'"):
        EvalTransform(224, interpolation="lanczos")
