"""Published FAN / STL checkpoint layouts (built from the vendored key table): EMA first, strict, weights_only.

Published checkpoints cannot be downloaded in tests; these files carry the published key names and shapes of
``fan_tiny_8_p4_hybrid_token`` (``reference/fan_state_dict_keys.json``, 1000 classes) with random values, nested
the way the published code saves them:
- timm ``CheckpointSaver`` (NVlabs/FAN and NVlabs/STL ``main.py`` / ``train_token_labeler.py``): ``epoch``, ``arch``,
  ``state_dict``, ``optimizer``, ``version``, ``args`` (a pickled ``argparse.Namespace``), ``amp_scaler``, ``metric``
  and, with ``--model-ema``, ``state_dict_ema``;
- timm's ``clean_checkpoint.py`` output: the flat state dict (one set of weights);
- a plain ``{"state_dict": ...}`` file without EMA weights.
"""

import argparse
from pathlib import Path

import pytest
import timm
import torch
from evalhelpers import published_state_dict

import tokenlab  # noqa: F401
from tokenlab.models import (
    convert_checkpoint,
    load_checkpoint,
    load_exported,
    load_published,
    read_checkpoint,
    save_exported,
)

NAME = "fan_tiny_8_p4_hybrid_token"


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("published")
    model_sd = published_state_dict(NAME, 1)
    ema_sd = {k: v + 1 if v.is_floating_point() else v for k, v in model_sd.items()}  # differs from model_sd
    saver = {
        "epoch": 309,
        "arch": NAME,
        "state_dict": model_sd,
        "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "weight_decay": 0.05, "params": [0, 1]}]},
        "version": 2,
        "args": argparse.Namespace(model=NAME, lr=2e-3, mixup=0.8, token_label=True, aa="rand-m9-mstd0.5-inc1"),
        "amp_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000},
        "metric": 79.9,
        "state_dict_ema": ema_sd,
    }
    torch.save(saver, root / "model_best.pth.tar")
    torch.save({"state_dict": {f"module.{k}": v for k, v in model_sd.items()}}, root / "no_ema.pth.tar")
    return {"root": root, "model": model_sd, "ema": ema_sd}


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return timm.create_model(NAME, num_classes=1000).eval()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_saver_file_loads_its_ema_weights_first(published: dict, tiny: torch.nn.Module) -> None:
    path = published["root"] / "model_best.pth.tar"
    sd, entry = read_checkpoint(path)
    assert entry == "state_dict_ema" and _same(sd, published["ema"])
    sd, entry = read_checkpoint(path, prefer="model")
    assert entry == "state_dict" and _same(sd, published["model"])
    load_checkpoint(tiny, path)  # strict: the key table is exactly our model's
    assert _same(tiny.state_dict(), published["ema"])


def test_files_without_ema_give_their_one_set_of_weights(published: dict) -> None:
    sd, entry = read_checkpoint(published["root"] / "no_ema.pth.tar", prefer="ema")
    assert entry == "state_dict" and _same(sd, published["model"])  # module. prefixes stripped


def test_flat_file_is_its_own_state_dict(tmp_path: Path) -> None:
    flat = {"head.weight": torch.randn(3, 4), "head.bias": torch.zeros(3)}
    torch.save(flat, tmp_path / "clean.pth")  # timm clean_checkpoint.py output
    for prefer in ("ema", "model"):
        sd, entry = read_checkpoint(tmp_path / "clean.pth", prefer=prefer)
        assert entry == "" and _same(sd, flat)


def test_only_namespace_args_are_allowed_through_weights_only(tmp_path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": {"x": Path("/tmp")}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="weights_only=True"):
        read_checkpoint(tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="unknown prefer='teacher'"):
        read_checkpoint(tmp_path / "odd.pth", prefer="teacher")


def test_convert_writes_an_export_whose_logits_equal_the_source(
    published: dict, tiny: torch.nn.Module, tmp_path: Path
) -> None:
    stem, meta = convert_checkpoint(published["root"] / "model_best.pth.tar", NAME, tmp_path / "labeler")
    assert meta["source"]["entry"] == "state_dict_ema" and meta["source"]["prefer"] == "ema"
    # the published evaluation preprocessing (NVlabs/FAN, NVlabs/STL _cfg): 224 px, bicubic, crop_pct 1.0
    assert (meta["img_size"], meta["interpolation"], meta["crop_pct"]) == (224, "bicubic", 1.0)
    assert meta["num_classes"] == 1000 and meta["classes"] is None
    converted, got = load_exported(stem)
    tiny.load_state_dict(published["ema"])  # the source model, built and loaded the ordinary way
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in converted.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), tiny(x), rtol=0, atol=0)
    assert got["source"] == meta["source"]


def test_published_file_with_the_wrong_architecture_lists_the_bad_keys(published: dict) -> None:
    with pytest.raises(ValueError, match="shape mismatches"):
        load_published(published["root"] / "no_ema.pth.tar", "fan_small_12_p4_hybrid_token")
    with pytest.raises(ValueError, match="unknown model 'fan_tiny_nope'"):
        load_published(published["root"] / "no_ema.pth.tar", "fan_tiny_nope")


# ---- fine-tuning (model.pretrained): the classifier re-initialised, everything else strict ------------------------
def test_load_pretrained_reinitialises_both_classifiers_and_matches_the_rest(published: dict, tmp_path: Path) -> None:
    from tokenlab.models import load_pretrained

    torch.manual_seed(0)
    token = timm.create_model(NAME, num_classes=5, img_size=64)
    fresh_head = token.aux_head.weight.clone()
    rec = load_pretrained(token, published["root"] / "no_ema.pth.tar")  # module. prefixes, no EMA
    sd = token.state_dict()
    assert rec["entry"] == "state_dict" and rec["resized"] == []
    assert rec["reinitialised"] == ["aux_head.bias", "aux_head.weight", "head.bias", "head.weight"]
    assert torch.equal(sd["aux_head.weight"], fresh_head)  # the model's own initialisation, 5 classes
    assert all(torch.equal(sd[k], published["model"][k]) for k in sd if not k.startswith(("head.", "aux_head.")))
    # an STL token checkpoint into the plain FAN of the same size: its aux_head is dropped, not an error
    plain = timm.create_model(NAME.removesuffix("_token"), num_classes=2)
    rec = load_pretrained(plain, published["root"] / "model_best.pth.tar")
    assert rec["entry"] == "state_dict_ema" and {"aux_head.weight", "head.weight"} <= set(rec["dropped"])
    assert torch.equal(plain.norm.weight, published["ema"]["norm.weight"])
    # a tokenlab export is found from its run directory
    run = tmp_path / "run"
    save_exported(plain, run / "model", {"model": NAME.removesuffix("_token"), "model_kwargs": {"num_classes": 2}})
    saved = plain.blocks[0].attn.q.weight.clone()
    with torch.no_grad():
        plain.blocks[0].attn.q.weight.zero_()
    rec = load_pretrained(plain, run)
    assert rec["path"] == str((run / "model.safetensors").resolve()) and rec["entry"] == ""
    assert torch.equal(plain.blocks[0].attn.q.weight, saved)


def test_load_pretrained_refuses_what_does_not_fit(published: dict, tiny: torch.nn.Module, tmp_path: Path) -> None:
    from tokenlab.models import load_pretrained

    with pytest.raises(ValueError, match=r"missing keys \(\d+\)") as err:
        load_pretrained(timm.create_model("fan_tiny_12_p16_224", num_classes=2), published["root"] / "no_ema.pth.tar")
    assert "unexpected keys" in str(err.value) and "patch_embed.backbone" in str(err.value)
    with pytest.raises(FileNotFoundError, match="without an exported model"):
        load_pretrained(tiny, tmp_path)
    torch.save({"state_dict": {"blocks.0.extra": torch.zeros(1)} | published["model"]}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"unexpected keys \(1\):\n    blocks.0.extra"):
        load_pretrained(tiny, tmp_path / "extra.pth")  # refused before anything is loaded
