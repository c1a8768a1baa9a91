"""Contract suite run over every registered tokenlab model (timm's tests/test_models.py pattern)."""

import pytest
import timm
import torch

import tokenlab  # noqa: F401
from tokenlab.models import list_tokenlab_models

ALL = list_tokenlab_models()
FAN = [n for n in ALL if n.startswith("fan_")]
SMALL_VIT = ["ibot_vit_tiny_patch4_32", "ibot_vit_small_patch16_224"]


def _small_input(name: str, batch: int = 2) -> torch.Tensor:
    size = 32 if "hybrid" in name or "p16" in name else 32
    return torch.randn(batch, 3, size, size)


def _kwargs(name: str) -> dict:
    return {"num_classes": 5, "img_size": 32}


def test_registry_lists_every_family() -> None:
    assert len(FAN) == 19  # 9 published sizes (xlarge hybrid included) + 4 hybrid + 4 ViT-stem tokens + nano (+ token)
    assert {"fan_tiny_12_p16_224", "fan_large_16_p4_hybrid_token", "fan_nano_6_p16_224"} <= set(FAN)
    assert set(SMALL_VIT) <= set(ALL)


# fan_xlarge (120 M parameters) takes ~40 s to build on a CPU; its layout is pinned on the meta device in test_fan.py
_CONTRACT = [pytest.param(n, marks=pytest.mark.slow) if "xlarge" in n else n for n in FAN + SMALL_VIT]


@pytest.mark.parametrize("name", _CONTRACT)
def test_forward_backward_every_parameter_gets_grad(name: str) -> None:
    model = timm.create_model(name, **_kwargs(name))
    model.train()
    x = _small_input(name)
    out = model.forward_tokens(x)
    loss = out.cls_logits.logsumexp(-1).mean()
    if out.token_logits is not None:
        loss = loss + out.token_logits.logsumexp(-1).mean()
    if getattr(model, "mask_token", None) is not None:
        mask = torch.zeros(x.shape[0], out.grid[0] * out.grid[1], dtype=torch.bool)
        mask[:, 0] = True
        loss = loss + model.forward_features(x, mask)[1].sum() * 0
        loss = loss + model.forward_features(x, mask)[1][:, 0].mean()
    loss.backward()
    assert out.cls_logits.shape == (2, 5)
    assert torch.isfinite(out.cls_logits).all()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert not no_grad, f"parameters without gradient: {no_grad[:5]}"


@pytest.mark.parametrize("name", ["fan_nano_6_p16_224_token", "fan_tiny_8_p4_hybrid_token", "ibot_vit_tiny_patch4_32"])
def test_reset_classifier_zero_equals_pre_logits(name: str) -> None:
    model = timm.create_model(name, **_kwargs(name)).eval()
    x = _small_input(name)
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(0)
    assert torch.allclose(model(x), pre, atol=1e-6)
    assert pre.shape == (2, model.num_features)


@pytest.mark.parametrize("name", ["fan_nano_6_p16_224_token", "fan_tiny_8_p4_hybrid", "ibot_vit_tiny_patch4_32"])
def test_grad_checkpointing_same_outputs_and_grads(name: str) -> None:
    model = timm.create_model(name, **_kwargs(name)).eval()  # eval: BatchNorm stats are not updated twice
    x = _small_input(name)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        y = model(x)
        y.square().sum().backward()
        return y.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    y0, g0 = run()
    model.set_grad_checkpointing(True)
    y1, g1 = run()
    assert torch.allclose(y0, y1, atol=1e-6)
    assert len(g0) == len(g1) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1, strict=True))


@pytest.mark.parametrize("name", ["fan_nano_6_p16_224_token", "fan_tiny_8_p4_hybrid_token"])
def test_state_dict_round_trip_through_filter(name: str) -> None:
    from tokenlab.models.fan import checkpoint_filter_fn

    a = timm.create_model(name, **_kwargs(name)).eval()
    b = timm.create_model(name, **_kwargs(name)).eval()
    wrapped = {"model": {f"module.{k}": v for k, v in a.state_dict().items()}}
    b.load_state_dict(checkpoint_filter_fn(wrapped, b), strict=True)
    x = _small_input(name)
    assert torch.equal(a(x), b(x))
