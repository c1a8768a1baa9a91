"""FAN specifics: published parameter counts and key layout, token outputs, input sizes, errors, golden outputs."""

import json
from pathlib import Path

import pytest
import timm
import torch

import tokenlab  # noqa: F401
from tokenlab.models import TokenOutput, create_model

REFERENCE = Path(__file__).resolve().parent / "reference"  # vendored copies, see reference/README.md
KEYS_FILE = REFERENCE / "fan_state_dict_keys.json"
GOLDEN_FILE = REFERENCE / "fan_golden.json"


@pytest.mark.parametrize("name", sorted(json.loads(KEYS_FILE.read_text())))
def test_published_key_layout_and_parameter_count(name: str) -> None:
    ref = json.loads(KEYS_FILE.read_text())[name]
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=1000)
    sd = model.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == ref["state_dict"]
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - ref["params"]) / ref["params"] < 0.005
    assert count == ref["params"]  # exact, in fact


def _golden_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The deterministic weights described in reference/README.md."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for key, t in sorted(model.state_dict().items()):
        if not t.dtype.is_floating_point:
            out[key] = t
        elif key.endswith("running_var"):
            out[key] = torch.rand(t.shape, generator=g) + 0.5
        else:
            out[key] = torch.randn(t.shape, generator=g) * 0.2
    return out


def _golden_run(name: str) -> tuple[TokenOutput, dict]:
    ref = json.loads(GOLDEN_FILE.read_text())[name]
    model = timm.create_model(name, num_classes=ref["num_classes"]).eval()
    model.load_state_dict(_golden_weights(model))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model.forward_tokens(x), ref


def test_golden_vit_stem_matches_published_implementation() -> None:
    out, ref = _golden_run("fan_tiny_12_p16_224")
    assert torch.allclose(out.cls_logits, torch.tensor(ref["cls_logits"]), atol=1e-4, rtol=0)


def test_golden_hybrid_token_model_matches_published_implementation() -> None:
    # Needs the unbiased-variance LayerNorm2d in the ConvNeXt stages; the usual biased one is off by ~1e-3.
    out, ref = _golden_run("fan_tiny_8_p4_hybrid_token")
    tok = torch.tensor(ref["token_logits"]).reshape(ref["token_logits_shape"])
    assert torch.allclose(out.cls_logits, torch.tensor(ref["cls_logits"]), atol=1e-4, rtol=0)
    assert torch.allclose(out.token_logits, tok, atol=1e-4, rtol=0)


def test_unbiased_layer_norm_2d() -> None:
    from tokenlab.models.layers import UnbiasedLayerNorm2d

    norm = UnbiasedLayerNorm2d(5)
    x = torch.randn(2, 5, 3, 4)
    expect = (x - x.mean(1, keepdim=True)) / torch.sqrt(x.var(1, unbiased=True, keepdim=True) + norm.eps)
    assert torch.allclose(norm(x), expect, atol=1e-6)


def test_token_output_and_official_rule() -> None:
    model = timm.create_model("fan_nano_6_p16_224_token", num_classes=7, patch_size=4).eval()
    x = torch.randn(3, 3, 32, 48)
    out = model.forward_tokens(x)
    assert out.grid == (8, 12)
    assert out.cls_logits.shape == (3, 7) and out.token_logits.shape == (3, 96, 7)
    expected = out.cls_logits + 0.5 * out.token_logits.max(dim=1).values
    assert torch.allclose(model(x), expected, atol=1e-6)
    assert torch.allclose(out.combined(), expected)


@pytest.mark.parametrize("size", [160, 224, 288])
def test_any_size_divisible_by_patch(size: int) -> None:
    model = timm.create_model("fan_nano_6_p16_224_token", num_classes=3).eval()
    out = model.forward_tokens(torch.randn(1, 3, size, size))
    assert out.token_logits.shape[1] == (size // 16) ** 2


@pytest.mark.parametrize("patch", [4, 8, 16])
def test_vit_stem_patch_sizes(patch: int) -> None:
    model = timm.create_model("fan_nano_6_p16_224", num_classes=3, patch_size=patch)
    cls, patches = model.forward_features(torch.randn(1, 3, 32, 32))
    assert patches.shape == (1, (32 // patch) ** 2, 128)


def test_bad_inputs_have_clear_errors() -> None:
    model = timm.create_model("fan_nano_6_p16_224", num_classes=3)
    with pytest.raises(ValueError, match="not divisible by the patch size 16"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="no mask token"):
        model.forward_features(torch.randn(1, 3, 32, 32), torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="patch_size must be one of"):
        timm.create_model("fan_nano_6_p16_224", patch_size=32)
    with pytest.raises(ValueError, match="fan_tiny_12_p16_224"):
        create_model("fan_tiny_12_p16_22")


def test_mask_token_replaces_masked_patches() -> None:
    model = timm.create_model("fan_nano_6_p16_224", num_classes=0, patch_size=4, use_mask_token=True).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 64, dtype=torch.bool)
    assert torch.allclose(model.forward_features(x, mask)[1], model.forward_features(x)[1], atol=1e-6)
    mask[0, :32] = True
    with torch.no_grad():
        model.mask_token.fill_(3.0)
        changed = model.forward_features(x, mask)[1]
    assert not torch.allclose(changed[0], model.forward_features(x)[1][0])
    assert torch.allclose(changed[1], model.forward_features(x)[1][1], atol=1e-6)  # unmasked image unchanged


def test_class_attention_maps_and_intermediates() -> None:
    model = timm.create_model("fan_nano_6_p16_224_token", num_classes=3, patch_size=8).eval()
    x = torch.randn(2, 3, 64, 32)
    maps = model.class_attention_maps(x)
    assert maps.shape == (2, 4, 8, 4)
    total = maps.sum(dim=(-1, -2))  # the rest of each head's weight sits on the class token itself
    assert ((total > 0.5) & (total <= 1 + 1e-5)).all()
    feats = model.forward_intermediates(x, indices=[1, 3, 5])
    assert [tuple(f.shape) for f in feats] == [(2, 128, 8, 4)] * 3


@pytest.mark.slow
def test_torch_compile_fan_tiny_runs() -> None:
    model = timm.create_model("fan_tiny_12_p16_224", num_classes=4, patch_size=8).eval()
    compiled = torch.compile(model)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(compiled(x), model(x), atol=1e-4)
