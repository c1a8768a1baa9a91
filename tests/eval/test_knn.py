"""k-NN: weighted cosine votes, feature kinds and the feature cache."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenlab.models  # noqa: F401  (registers the models)
from tokenlab.eval.knn import FeatureSet, extract_features, features_of, knn_classify


def _fs(rows: list[list[float]], labels: list[int]) -> FeatureSet:
    return FeatureSet(torch.tensor(rows), torch.tensor(labels), "cls")


def test_weighted_vote_pinned() -> None:
    # cosine of the query (1, .1) with the bank: (1, 0) -> .995037 [class 0], (1, 1) -> .773957 [class 1],
    # (0, 1) -> .099504 [class 1].  T = 1: k = 2 votes e^.995 = 2.705 (class 0) vs e^.774 = 2.168 -> class 0;
    # k = 3 adds e^.0995 = 1.105 to class 1 (3.273 > 2.705) -> class 1;  T = .07, k = 3: e^14.21 beats
    # e^11.06 + e^1.42 -> class 0 again.
    bank = _fs([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]], [0, 1, 1])
    query0, query1 = _fs([[1.0, 0.1]], [0]), _fs([[1.0, 0.1]], [1])
    assert knn_classify(bank, query0, k=2, temperature=1.0).top1 == 1.0
    assert knn_classify(bank, query1, k=3, temperature=1.0).top1 == 1.0
    assert knn_classify(bank, query0, k=3, temperature=0.07).top1 == 1.0


def _reference_predictions(train: FeatureSet, test: FeatureSet, k: int, t: float, c: int) -> torch.Tensor:
    preds = []
    bank = F.normalize(train.features, dim=1)
    for f in F.normalize(test.features, dim=1):
        sims = bank @ f
        idx = sorted(range(len(sims)), key=lambda j: -float(sims[j]))[:k]
        votes = [0.0] * c
        for j in idx:
            votes[int(train.labels[j])] += math.exp(float(sims[j]) / t)
        preds.append(max(range(c), key=lambda i: votes[i]))
    return torch.tensor(preds)


def test_matches_loop_reference_and_chunking() -> None:
    g = torch.Generator().manual_seed(3)
    train = FeatureSet(torch.randn(60, 8, generator=g), torch.randint(0, 4, (60,), generator=g), "cls")
    test = FeatureSet(torch.randn(25, 8, generator=g), torch.randint(0, 4, (25,), generator=g), "cls")
    expected = (_reference_predictions(train, test, 7, 0.07, 4) == test.labels).float().mean().item()
    for chunk in (4, 1024):
        result = knn_classify(train, test, k=7, temperature=0.07, num_classes=4, chunk_size=chunk)
        assert result.top1 == pytest.approx(expected)
        assert result.top1 <= result.top5 and (result.num_train, result.num_test) == (60, 25)


def test_separable_clusters_are_found() -> None:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 16, generator=g) * 5
    labels = torch.arange(90) % 3
    feats = centers[labels] + torch.randn(90, 16, generator=g)
    train, test = FeatureSet(feats[:60], labels[:60], "cls"), FeatureSet(feats[60:], labels[60:], "cls")
    assert knn_classify(train, test, k=20).top1 == 1.0


def test_knn_errors() -> None:
    bank = _fs([[1.0, 0.0], [0.0, 1.0]], [0, 1])
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        knn_classify(bank, bank, k=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(bank, bank, k=1, temperature=0)
    with pytest.raises(ValueError, match="feature sizes differ"):
        knn_classify(bank, _fs([[1.0, 0.0, 0.0]], [0]), k=1)


@pytest.fixture(scope="module")
def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "ibot_vit_tiny_patch4_32", num_classes=0, img_size=16, embed_dim=32, depth=4, num_heads=2
    ).eval()


def test_feature_kinds(tiny_vit: nn.Module) -> None:
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        cls, patches = tiny_vit.forward_features(x)
        assert torch.allclose(features_of(tiny_vit, x, "cls"), cls)
        assert torch.allclose(features_of(tiny_vit, x, "avgpool"), patches.mean(1))
        assert features_of(tiny_vit, x, "cls_avgpool").shape == (3, 64)
        last4 = features_of(tiny_vit, x, "last4_cls")
    assert last4.shape == (3, 128)
    # the last of the four [CLS] (after the final norm) is the final [CLS]
    assert torch.allclose(last4[:, 96:], cls, atol=1e-5)
    with pytest.raises(ValueError, match="valid kinds"):
        features_of(tiny_vit, x, "patch")


def test_last4_needs_a_class_token_in_the_blocks() -> None:
    class NoPrefix(nn.Module):
        num_prefix_tokens = 0

    with pytest.raises(ValueError, match="class token"):
        features_of(NoPrefix(), torch.randn(1, 3, 16, 16), "last4_cls")


def test_extract_features_and_cache(tiny_vit: nn.Module, tmp_path, monkeypatch) -> None:
    images, labels = torch.randn(10, 3, 16, 16), torch.arange(10) % 2
    loader = [{"image": images[i : i + 4], "label": labels[i : i + 4]} for i in range(0, 10, 4)]
    cache = tmp_path / "feats" / "train.safetensors"
    first = extract_features(tiny_vit, loader, kind="cls", cache=cache)
    assert first.features.shape == (10, 32) and torch.equal(first.labels, labels) and cache.is_file()
    monkeypatch.setattr(tiny_vit, "forward_features", lambda *a, **k: (_ for _ in ()).throw(AssertionError("ran")))
    again = extract_features(tiny_vit, loader, kind="cls", cache=cache)
    assert torch.equal(again.features, first.features)
    monkeypatch.undo()
    other = extract_features(tiny_vit, loader, kind="avgpool", cache=cache)  # another kind: extracted again
    assert other.kind == "avgpool" and not torch.equal(other.features, first.features)
    with pytest.raises(ValueError, match="no batches"):
        extract_features(tiny_vit, [], kind="cls")
