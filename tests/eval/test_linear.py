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


def _export(tmp_path, depth: int = 1):
    import timm

    import tokenlab.models  # noqa: F401
    from tokenlab.models import save_exported

    kwargs = {"img_size": 16, "embed_dim": 32, "depth": depth, "num_heads": 2, "num_classes": 0}
    torch.manual_seed(0)
    model = timm.create_model("ibot_vit_tiny_patch4_32", **kwargs)
    meta = {"model": "ibot_vit_tiny_patch4_32", "model_kwargs": kwargs, "img_size": 16, "num_classes": 0,
            "crop_pct": 1.0, "interpolation": "bilinear"}  # fmt: skip
    save_exported(model, tmp_path / "run" / "model", meta)
    return tmp_path / "run"


def test_published_lr_grid() -> None:
    from tokenlab.eval.linear import PUBLISHED_LINEAR_LRS

    assert len(PUBLISHED_LINEAR_LRS) == 45 and PUBLISHED_LINEAR_LRS[0] == pytest.approx(1e-4)
    assert PUBLISHED_LINEAR_LRS[-1] == pytest.approx(9.0) and PUBLISHED_LINEAR_LRS[9] == pytest.approx(1e-3)


def test_ssl_eval_uses_ibots_preprocessing_by_default(tmp_path) -> None:
    """Resize 256 bicubic + centre crop 224 is crop_pct 224/256, bicubic; at 16 px: resize 18, crop 16."""
    from tokenlab.eval.linear import evaluate_ssl_run

    _image_tree(tmp_path / "data", per_class=2)
    run = _export(tmp_path)
    res = evaluate_ssl_run(run, str(tmp_path / "data"), linear=False, k=1)
    assert res.preprocessing["crop_pct"] == pytest.approx(224 / 256)
    assert res.preprocessing["interpolation"] == "bicubic" and res.preprocessing["img_size"] == 16
    assert res.to_dict()["preprocessing"] == res.preprocessing
    kept = evaluate_ssl_run(run, str(tmp_path / "data"), linear=False, k=1, crop_pct=None, interpolation=None)
    assert kept.preprocessing["crop_pct"] == 1.0 and kept.preprocessing["interpolation"] == "bilinear"
    folders = sorted(p.name for p in (run / "ssl_features").iterdir())
    assert len(folders) == 2  # features are cached per preprocessing, never mixed up


def test_augmented_protocol_trains_on_augmented_images_and_reports_it(tmp_path, monkeypatch) -> None:
    """The published protocol: RRC + flip training view, no standardisation, every lr of the grid side by side, best
    (lr, epoch) on the test split; the result says which protocol ran."""
    import json

    from tokenlab.data.transforms import ViewTransform
    from tokenlab.eval import linear as L

    _image_tree(tmp_path / "data", per_class=4)
    run = _export(tmp_path)
    seen: list = []
    original = ViewTransform.__call__

    def spy(self, *args, **kwargs):
        seen.append((self.scale, self.hflip, self.rand_augment, self.re_prob, self.color_jitter))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ViewTransform, "__call__", spy)
    res = L.evaluate_ssl_run(run, str(tmp_path / "data"), knn=False, linear_protocol="augmented", batch_size=4,
                             linear_kwargs={"lrs": (1e-4, 1.0), "epochs": 2})  # fmt: skip
    lin = res.results["pretrained"]["cls"].linear
    assert lin is not None and lin.protocol == "augmented" and "test split" in lin.selected_on
    assert set(lin.val_top1) == {1e-4, 1.0} and lin.top1 == max(lin.val_top1.values()) and lin.best_epoch in (1, 2)
    assert seen and set(seen) == {((0.08, 1.0), 0.5, None, 0.0, None)}  # 2 epochs x 8 training images
    assert len(seen) == 2 * 8
    report = json.loads((run / "eval_ssl.json").read_text())
    assert report["linear_protocol"] == "augmented"
    assert report["results"]["pretrained"]["cls"]["linear"]["protocol"] == "augmented"
    cached = L.evaluate_ssl_run(run, str(tmp_path / "data"), knn=False, linear_kwargs={"lrs": (0.1,), "epochs": 2})
    assert cached.results["pretrained"]["cls"].linear.protocol == "cached" and cached.linear_protocol == "cached"
    with pytest.raises(ValueError, match="linear protocol"):
        L.evaluate_ssl_run(run, str(tmp_path / "data"), linear_protocol="published")


def test_augmented_probe_classifiers_are_plain_linear_layers(monkeypatch) -> None:
    """No feature standardisation: with one lr and one step, the head's update is SGD on raw features."""
    import timm

    import tokenlab.models  # noqa: F401
    from tokenlab.eval.knn import features_of
    from tokenlab.eval.linear import linear_probe_augmented

    class Images(torch.utils.data.Dataset):
        classes = ["a", "b"]

        def __len__(self) -> int:
            return 4

        def __getitem__(self, i: int) -> dict:
            g = torch.Generator().manual_seed(i)
            return {"image": torch.randn(3, 16, 16, generator=g) + 3.0 * (i % 2), "label": i % 2}

    model = timm.create_model("ibot_vit_tiny_patch4_32", num_classes=0, img_size=16, embed_dim=32, depth=1,
                              num_heads=2).eval()  # fmt: skip
    data = Images()
    with torch.no_grad():
        feats = features_of(model, torch.stack([data[i]["image"] for i in range(4)]))
    test = FeatureSet(feats, torch.tensor([0, 1, 0, 1]), "cls")
    from tokenlab.eval import linear as L

    calls: dict[str, list] = {"feats": [], "logits": []}
    real_features, real_ce = L.features_of, L.F.cross_entropy

    def spy_features(*args, **kwargs):
        out = real_features(*args, **kwargs)
        calls["feats"].append(out.detach().clone())
        return out

    def spy_ce(logits, target):
        calls["logits"].append(logits.detach().clone())
        return real_ce(logits, target)

    monkeypatch.setattr(L, "features_of", spy_features)
    monkeypatch.setattr(L.F, "cross_entropy", spy_ce)
    res = linear_probe_augmented(model, data, test, lrs=(0.5,), epochs=3, batch_size=4)
    assert res.protocol == "augmented" and res.epochs == 3 and 0.0 <= res.top1 <= 1.0 and res.lr == 0.5
    # first step: logits = f W0^T with W0 ~ N(0, 0.01) (seeded), b = 0, on the raw (unstandardised) features
    w0 = torch.empty(2, 32).normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(calls["logits"][0], calls["feats"][0] @ w0.T)
    with pytest.raises(ValueError, match="lrs > 0"):
        linear_probe_augmented(model, data, test, lrs=())
