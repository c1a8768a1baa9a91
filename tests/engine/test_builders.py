"""engine.builders: weight-decay groups (timm's no-decay set or iBOT's), layer decay, gradient clipping modes."""

from __future__ import annotations

import pytest
import timm
import torch
from omegaconf import OmegaConf

import tokenlab.models  # noqa: F401  (registers the models)
from tokenlab.engine.builders import build_optimizer, clip_gradients, param_groups
from tokenlab.engine.config import load_config

TINY = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def _vit() -> torch.nn.Module:
    return timm.create_model("ibot_vit_tiny_patch4_32", num_classes=3, **TINY)


def _decayed(model: torch.nn.Module, groups: list[dict]) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}


def test_timm_no_decay_set_is_the_default() -> None:
    model = _vit()
    decayed = _decayed(model, param_groups(model, 0.05, None))
    assert not {"pos_embed", "cls_token", "mask_token"} & decayed
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.0.attn.qkv.bias" not in decayed
    assert "blocks.0.norm1.weight" not in decayed


def test_decay_embeddings_is_ibots_rule() -> None:
    """Published get_params_groups: only biases and 1-d tensors go undecayed."""
    model = _vit()
    for layer_decay in (None, 0.75):
        groups = param_groups(model, 0.05, layer_decay, decay_embeddings=True)
        decayed = _decayed(model, groups)
        expected = {n for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")}
        assert decayed == expected, layer_decay
        assert {"pos_embed", "cls_token", "mask_token"} <= decayed
        assert all(g["wd_scale"] == (1.0 if g["weight_decay"] > 0 else 0.0) for g in groups)


def test_build_optimizer_reads_the_option() -> None:
    model = _vit()
    on = load_config(None, ["optim.decay_embeddings=true"])
    off = load_config(None, [])
    assert off.optim.decay_embeddings is False and off.train.clip_mode == "global"
    pos = model.pos_embed
    for cfg, decayed in ((on, True), (off, False)):
        opt = build_optimizer(cfg, model)
        group = next(g for g in opt.param_groups if any(p is pos for p in g["params"]))
        assert (group["weight_decay"] > 0) == decayed


@pytest.mark.parametrize("name", ["adamw", "sgd", "lamb"])
def test_fused_optimizer_gives_the_same_update(name: str) -> None:
    """``train.fast`` builds torch's fused kernel where one exists (AdamW, SGD) and the usual optimizer otherwise;
    the fused update matches the per-parameter loop to float rounding."""
    cfg = load_config(None, [f"optim.name={name}", "optim.lr=0.01"])
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in _vit().parameters()]
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = _vit()
        opt = build_optimizer(cfg, model, fused=fused)
        assert all(bool(g.get("fused")) == (fused and name != "lamb") for g in opt.param_groups)
        for _ in range(3):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-6)


def test_layer_decay_groups_for_finetuning() -> None:
    """timm's layer-decay groups: scale decay ** (L + 1 - layer), the head at 1."""
    model = _vit()
    groups = param_groups(model, 0.05, 0.75)
    scales = sorted({g["lr_scale"] for g in groups})
    layers = len(model.blocks) + 2  # embeddings, blocks, head
    assert scales == pytest.approx(sorted(0.75**i for i in range(layers)))


def _with_grads(*grads: torch.Tensor) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def test_per_param_clipping_caps_each_gradient_on_its_own() -> None:
    """Published clip_gradients: g <- g * min(1, c / (||g|| + 1e-6)) per parameter."""
    big, small = torch.full((4,), 3.0), torch.tensor([0.3, 0.4])  # norms 6 and 0.5
    params = _with_grads(big, small)
    norm = clip_gradients(params, 1.0, "per_param")
    assert norm.item() == pytest.approx((36 + 0.25) ** 0.5)
    assert params[0].grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(params[1].grad, small)  # under the cap: untouched
    params = _with_grads(big, small)
    clip_gradients(params, 1.0, "global")  # one norm over both: both scaled by 1 / 6.02
    assert params[1].grad.norm().item() == pytest.approx(0.5 / (36.25**0.5), rel=1e-4)
    with pytest.raises(ValueError, match="clip_mode"):
        clip_gradients(params, 1.0, "layer")


def test_clip_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="clip_mode"):
        load_config(None, ["train.clip_mode=layer"])
    assert OmegaConf.select(load_config(None, ["train.clip_mode=per_param"]), "train.clip_mode") == "per_param"
