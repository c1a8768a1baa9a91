"""Checkpoint loading: formats, nesting, prefixes, strict key reports, refusal to unpickle objects."""

import collections
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import tokenlab  # noqa: F401
from tokenlab.models import load_checkpoint, load_exported, save_exported


def _model(**kw) -> torch.nn.Module:
    return timm.create_model("fan_nano_6_p16_224_token", num_classes=4, patch_size=8, **kw).eval()


@pytest.mark.parametrize("fmt", [".pth", ".pth.tar", ".safetensors"])
@pytest.mark.parametrize("wrap", ["flat", "state_dict", "model", "model_ema"])
def test_round_trip_formats_and_nesting(tmp_path: Path, fmt: str, wrap: str) -> None:
    a, b = _model(), _model()
    sd = {f"module.{k}": v for k, v in a.state_dict().items()}
    path = tmp_path / f"ckpt{fmt}"
    if fmt == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd if wrap == "flat" else {wrap: sd, "epoch": 3}, path)
    load_checkpoint(b, path)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(a(x), b(x))


def test_mismatched_keys_are_listed(tmp_path: Path) -> None:
    sd = _model().state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    sd["aux_head.weight"] = torch.zeros(9, 128)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load_checkpoint(_model(), tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing keys (1)" in msg and "head.bias" in msg
    assert "unexpected keys (1)" in msg and "extra.weight" in msg
    assert "aux_head.weight: checkpoint (9, 128) vs model (4, 128)" in msg


def test_not_a_checkpoint(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(_model(), junk)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a valid safetensors"):
        load_checkpoint(_model(), bad_st)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(_model(), tmp_path / "missing.pth")


class Evil:
    """A class that a full unpickler would import and instantiate."""


def test_arbitrary_objects_are_never_unpickled(tmp_path: Path) -> None:
    sd = collections.OrderedDict(_model().state_dict())
    torch.save({"state_dict": sd, "args": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        load_checkpoint(_model(), tmp_path / "evil.pth")


def test_export_round_trip(tmp_path: Path) -> None:
    a = _model()
    meta = {
        "model": "fan_nano_6_p16_224_token",
        "model_kwargs": {"num_classes": 4, "patch_size": 8},
        "classes": list("abcd"),
    }
    save_exported(a, tmp_path / "run" / "model", meta)
    b, got = load_exported(tmp_path / "run")
    assert got["classes"] == list("abcd")
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
    with pytest.raises(FileNotFoundError, match="no exported model"):
        load_exported(tmp_path / "nowhere")


def test_exported_model_is_built_without_init_and_stays_trainable(tmp_path: Path) -> None:
    """``load_exported`` builds on the meta device and assigns the weights: nothing may be left on meta."""
    a = _model()
    meta = {"model": "fan_nano_6_p16_224_token", "model_kwargs": {"num_classes": 4, "patch_size": 8}}
    save_exported(a, tmp_path / "model", meta)
    b, _ = load_exported(tmp_path)
    tensors = list(b.parameters()) + list(b.buffers())
    assert all(t.device.type == "cpu" for t in tensors)
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in b.parameters())
    b.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all(p.grad is not None for p in b.parameters())
