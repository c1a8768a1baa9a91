"""Fine-tuning from published weights through the engine (``model.pretrained``, ``finetune_folder``).

The published files cannot be downloaded in tests; they are built with the published key names and shapes: FAN
from the vendored key table (``tests/models/reference/fan_state_dict_keys.json``) in timm's ``CheckpointSaver``
layout (``state_dict``, ``state_dict_ema``, a pickled ``argparse.Namespace``), iBOT as ``main_ibot.py`` saves it
(``teacher`` with ``backbone.`` / ``head.`` keys, ``student`` with ``module.backbone.`` / ``module.head.``).
The data is a small generated folder tree without masks and with unbalanced classes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from evalhelpers import make_tree, published_state_dict

import tokenlab  # noqa: F401
from tokenlab.engine.builders import build_method_from_config
from tokenlab.engine.config import load_config
from tokenlab.engine.trainer import train
from tokenlab.models import save_exported

FAN = "fan_tiny_12_p16_224"
QUIET = [
    "log.progress=false",
    "log.tensorboard=false",
    "train.min_free_disk_mb=0",
    "data.num_workers=0",
    "data.batch_size=4",
    "schedule.max_steps=2",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0.5",
]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ROOT/{train,val}/<class>/*.png, three classes, 'a' holding three times as many images as 'b' and 'c'."""
    root = tmp_path_factory.mktemp("folder")
    for split, n in (("train", 2), ("val", 1)):
        make_tree(root / split, ("a",), per_class=3 * n)
        make_tree(root / split, ("b", "c"), per_class=n)
    return root


@pytest.fixture(scope="module")
def fan_file(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("fan")
    model_sd = published_state_dict(FAN, 1)
    ema_sd = {k: v + 0.5 if v.is_floating_point() else v for k, v in model_sd.items()}
    torch.save(
        {
            "epoch": 299,
            "arch": FAN,
            "state_dict": model_sd,
            "state_dict_ema": ema_sd,
            "optimizer": {"state": {}, "param_groups": [{"lr": 1e-6, "params": [0]}]},
            "args": argparse.Namespace(model=FAN, lr=2e-3),
            "metric": 80.1,
        },
        root / "fan_tiny.pth.tar",
    )
    return {"path": root / "fan_tiny.pth.tar", "model": model_sd, "ema": ema_sd}


def _cfg(tree: Path, run_dir: Path, *extra: str):
    return load_config(
        "finetune_folder", [f"data.root={tree}", f"run_dir={run_dir}", "data.img_size=32", *QUIET, *extra]
    )


def test_finetune_folder_recipe_loads_the_published_fan_before_training(
    tree: Path, fan_file: dict, tmp_path: Path
) -> None:
    cfg = _cfg(tree, tmp_path / "run", f"model.pretrained={fan_file['path']}")
    assert cfg.optim.layer_decay == 0.75 and cfg.data.val_split == "val" and cfg.model.name == FAN
    method = build_method_from_config(cfg, {"classes": ["a", "b", "c"]})
    own = method.model.state_dict()
    backbone = [k for k in own if not k.startswith("head.")]
    assert all(torch.equal(own[k], fan_file["ema"][k]) for k in backbone)  # EMA weights first, every key
    assert own["head.weight"].shape == (3, 192)  # re-initialised for the three classes
    assert method.pretrained_from["entry"] == "state_dict_ema"
    assert method.pretrained_from["reinitialised"] == ["head.bias", "head.weight"]

    result = train(cfg)
    assert result.step == 2
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    rec = meta["pretrained"]
    assert rec["path"] == str(fan_file["path"].resolve()) and rec["entry"] == "state_dict_ema"
    assert rec["reinitialised"] == ["head.bias", "head.weight"] and "head.weight" in rec["dropped"]
    assert meta["classes"] == ["a", "b", "c"] and meta["num_classes"] == 3
    # two steps at a warm-up lr moved the weights by little: training started from the file, not a random init
    from tokenlab.models import load_exported

    trained, _ = load_exported(tmp_path / "run")
    w = trained.state_dict()["blocks.3.attn.q.weight"]
    assert (w - fan_file["ema"]["blocks.3.attn.q.weight"]).abs().max() < 1e-2


def test_prefer_model_takes_the_plain_weights(tree: Path, fan_file: dict, tmp_path: Path) -> None:
    cfg = _cfg(tree, tmp_path / "run", f"model.pretrained={fan_file['path']}", "model.pretrained_prefer=model")
    method = build_method_from_config(cfg, {"classes": ["a", "b", "c"]})
    assert torch.equal(method.model.state_dict()["norm.weight"], fan_file["model"]["norm.weight"])
    assert method.pretrained_from["entry"] == "state_dict"


def test_a_published_file_of_another_architecture_is_one_clear_error(
    tree: Path, fan_file: dict, tmp_path: Path
) -> None:
    cfg = _cfg(tree, tmp_path / "run", f"model.pretrained={fan_file['path']}", "model.name=fan_nano_6_p16_224")
    with pytest.raises(ValueError, match="model.pretrained needs the same model.name") as err:
        build_method_from_config(cfg, {"classes": ["a", "b"]})
    assert "shape mismatches" in str(err.value) and "blocks.0.attn.q.weight" in str(err.value)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        build_method_from_config(_cfg(tree, tmp_path / "r2", f"model.pretrained={junk}"), {"classes": ["a"]})
    with pytest.raises(FileNotFoundError, match="pretrained weights not found"):
        build_method_from_config(
            _cfg(tree, tmp_path / "r3", f"model.pretrained={tmp_path}/none.pth"), {"classes": ["a"]}
        )
    with pytest.raises(ValueError, match="model.pretrained_prefer"):
        _cfg(tree, tmp_path / "r4", "model.pretrained_prefer=teacher")


# ---- iBOT ---------------------------------------------------------------------------------------------------------
VIT_KW = ["model.name=ibot_vit_tiny_patch4_32", "model.kwargs.img_size=32", "model.kwargs.patch_size=4",
          "model.kwargs.depth=2"]  # fmt: skip


def _published_ibot(path: Path) -> dict[str, torch.Tensor]:
    """An iBOT ``checkpoint.pth`` of a depth-2 ViT-T/4 pre-trained at 16 px (a 4x4 grid): ``masked_embed``, the
    projection heads, ``module.`` prefixes on the student."""
    import timm

    src = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, img_size=16, patch_size=4, depth=2)
    backbone = {k: v.clone() for k, v in src.state_dict().items()}
    backbone["masked_embed"] = torch.randn(192)
    del backbone["mask_token"]
    head = {"head.mlp.0.weight": torch.randn(8, 192), "head.last_layer.weight_g": torch.ones(16, 1)}
    torch.save(
        {
            "teacher": {f"backbone.{k}": v for k, v in backbone.items()} | head,
            "student": {f"module.backbone.{k}": v + 1 for k, v in backbone.items()}
            | {f"module.{k}": v for k, v in head.items()},
            "optimizer": {"state": {}, "param_groups": []},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_tiny", patch_size=4),
            "ibot_loss": {"center": torch.zeros(1, 16)},
        },
        path,
    )
    return backbone


def test_published_ibot_checkpoint_fine_tunes_from_its_teacher(tree: Path, tmp_path: Path) -> None:
    backbone = _published_ibot(tmp_path / "checkpoint.pth")
    cfg = _cfg(tree, tmp_path / "run", *VIT_KW, f"model.pretrained={tmp_path / 'checkpoint.pth'}")
    method = build_method_from_config(cfg, {"classes": ["a", "b", "c"]})
    model, rec = method.model, method.pretrained_from
    assert rec["entry"] == "teacher" and rec["resized"] == ["pos_embed (1, 17, 192) -> (1, 65, 192)"]
    assert torch.equal(model.blocks[1].mlp.fc2.weight, backbone["blocks.1.mlp.fc2.weight"])
    assert torch.equal(model.mask_token.flatten(), backbone["masked_embed"])
    assert torch.equal(model.pos_embed[:, 0], backbone["pos_embed"][:, 0])  # the class token's entry is kept
    assert sorted(rec["dropped"]) == ["head.last_layer.weight_g", "head.mlp.0.weight"]
    assert rec["reinitialised"] == ["head.bias", "head.weight"] and model.head.weight.shape == (3, 192)
    student = build_method_from_config(
        _cfg(tree, tmp_path / "r2", *VIT_KW, f"model.pretrained={tmp_path / 'checkpoint.pth'}",
             "model.pretrained_prefer=model"), {"classes": ["a", "b"]},
    )  # fmt: skip
    assert student.pretrained_from["entry"] == "student"
    assert torch.equal(student.model.cls_token, backbone["cls_token"] + 1)


def test_eval_ssl_finetune_and_the_recipe_go_through_model_pretrained(tree: Path, tmp_path: Path) -> None:
    """``finetune_run`` (``tokenlab eval-ssl RUN --finetune``) loads an iBOT run's backbone export with
    ``model.pretrained``, and the recipe names its weights the same way."""
    import timm

    from tokenlab.eval.linear import finetune_run

    assert load_config("ibot_cifar10_finetune").model.pretrained == "runs/ibot_cifar10_vit_tiny/model"
    src = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, img_size=32, patch_size=4, depth=2)
    kw = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 0}
    save_exported(src, tmp_path / "ibot" / "model", {"model": "ibot_vit_tiny_patch4_32", "model_kwargs": kw})
    result = finetune_run(
        tmp_path / "ibot", "ibot_cifar10_finetune", [f"data.root={tree}", "data.val_split=val", *QUIET]
    )
    meta = json.loads((result.run_dir / "model.json").read_text())
    assert meta["pretrained"]["path"] == str((tmp_path / "ibot" / "model.safetensors").resolve())
    assert meta["pretrained"]["reinitialised"] == ["head.bias", "head.weight"] and meta["num_classes"] == 3
