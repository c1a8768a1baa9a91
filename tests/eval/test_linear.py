"""Linear probe on cached features: learns separable data, chooses the lr on held-out training features."""

import pytest
import torch

from tokenlab.eval.knn import FeatureSet
from tokenlab.eval.linear import linear_probe, train_linear


def _blobs(n: int, seed: int, noise: float = 1.0) -> FeatureSet:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, 12, generator=torch.Generator().manual_seed(99)) * 3
    labels = torch.randint(0, 4, (n,), generator=g)
    return FeatureSet(centers[labels] + noise * torch.randn(n, 12, generator=g) + 10.0, labels, "cls")


def test_probe_learns_separable_features() -> None:
    result = linear_probe(_blobs(200, 0), _blobs(100, 1), lrs=(0.01, 0.1), epochs=20, batch_size=32)
    assert result.top1 > 0.95 and result.top5 == 1.0
    assert set(result.val_top1) == {0.01, 0.1} and result.lr in result.val_top1


def test_random_labels_stay_near_chance() -> None:
    train, test = _blobs(200, 0), _blobs(200, 1)
    train.labels = torch.randint(0, 4, (200,), generator=torch.Generator().manual_seed(5))
    result = linear_probe(train, test, lrs=(0.1,), epochs=10, batch_size=32)
    assert result.top1 < 0.45 and result.val_top1 == {}


def test_probe_standardises_features() -> None:
    data = _blobs(64, 2)
    probe = train_linear(data.features, data.labels, 4, lr=0.1, epochs=2, batch_size=16)
    assert torch.allclose(probe.mean, data.features.mean(0))
    assert probe(data.features).shape == (64, 4)


def test_errors() -> None:
    data = _blobs(20, 0)
    with pytest.raises(ValueError, match="at least one"):
        linear_probe(data, data, lrs=())
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(data, data, val_fraction=1.0)
    with pytest.raises(ValueError, match="feature sizes differ"):
        linear_probe(data, FeatureSet(torch.zeros(3, 5), torch.zeros(3, dtype=torch.long), "cls"))
    with pytest.raises(ValueError, match="lr > 0"):
        train_linear(data.features, data.labels, 4, lr=0.0)


def _image_tree(root, per_class: int = 6) -> None:
    """Two classes that differ in colour: red-ish and blue-ish 16x16 PNGs."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(0)
    for split in ("train", "test"):
        for c, name in enumerate(("red", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = g.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                img[..., 0 if c == 0 else 2] += 180
                Image.fromarray(img).save(folder / f"{i}.png")


def test_evaluate_frozen_uses_the_cache(tmp_path) -> None:
    import timm

    import tokenlab.models  # noqa: F401
    from tokenlab.eval.linear import evaluate_frozen

    model = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, img_size=16, embed_dim=32, depth=1, num_heads=2)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(12) % 2
    images = torch.randn(12, 3, 16, 16, generator=g) + labels.view(-1, 1, 1, 1) * 2.0
    loader = [{"image": images[i : i + 6], "label": labels[i : i + 6]} for i in (0, 6)]
    res = evaluate_frozen(
        model, loader, loader, kind="cls", k=3, linear_kwargs={"lrs": (0.1,), "epochs": 5}, cache_dir=tmp_path
    )
    assert (tmp_path / "train_cls.safetensors").is_file() and (tmp_path / "test_cls.safetensors").is_file()
    assert res.knn is not None and res.knn.top1 == 1.0 and res.linear is not None and res.feature_dim == 32
    assert res.to_dict()["knn"]["k"] == 3


def test_eval_ssl_cli_with_random_baseline(tmp_path, capsys) -> None:
    import json

    import timm

    import tokenlab.models  # noqa: F401
    from tokenlab.cli import main
    from tokenlab.models import save_exported

    _image_tree(tmp_path / "data")
    kwargs = {"img_size": 16, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 0}
    model = timm.create_model("ibot_vit_tiny_patch4_32", **kwargs)
    save_exported(
        model,
        tmp_path / "run" / "model",
        {"model": "ibot_vit_tiny_patch4_32", "model_kwargs": kwargs, "img_size": 16, "num_classes": 0},
    )
    rc = main(
        [
            "eval-ssl",
            str(tmp_path / "run"),
            "--data",
            str(tmp_path / "data"),
            "--random-init",
            "--k",
            "3",
            "--kind",
            "cls,last4_cls",
            "--linear-epochs",
            "3",
            "--linear-lrs",
            "0.1",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "run" / "eval_ssl.json").read_text())
    assert set(report["results"]) == {"pretrained", "random"} and report["num_train"] == 12
    assert set(report["results"]["pretrained"]) == {"cls", "last4_cls"}
    assert report["results"]["pretrained"]["last4_cls"]["feature_dim"] == 128
    assert "k-NN top-1" in capsys.readouterr().out
    assert main(["eval-ssl", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--kind", "patch"]) == 2
    assert main(["eval-ssl", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "-o", "a=1"]) == 2
