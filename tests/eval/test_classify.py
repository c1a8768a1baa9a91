"""Classification evaluation: rules, subset restriction, OOD mappings, unreadable images, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tokenlab.eval.class_maps import imagenet_subset, load_class_mapping, resolve_ood_classes
from tokenlab.eval.classify import (
    CONFUSION_MAX_CLASSES,
    evaluate_classifier,
    restrict_logits,
    score_predictions,
)
from tokenlab.eval.folders import eval_loader
from tokenlab.models import TokenOutput


class FixedLogits(nn.Module):
    """Returns a fixed logit row per label-coded image: image value v (constant) -> row v of ``table``."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


class TinyTokenModel(nn.Module):
    """cls logits favour class 0; the token head favours class 1, so the two rules differ."""

    def forward_tokens(self, x: torch.Tensor) -> TokenOutput:
        b = x.shape[0]
        cls = torch.tensor([[1.0, 0.0]]).expand(b, 2)
        tok = torch.tensor([[0.0, 4.0]]).expand(b, 4, 2)
        return TokenOutput(cls, tok, (2, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_tokens(x).combined()


def _batches(values: list[int], labels: list[int], valid: list[bool] | None = None) -> list[dict]:
    x = torch.tensor(values, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 4, 4)
    b = {"image": x, "label": torch.tensor(labels)}
    if valid is not None:
        b["valid"] = torch.tensor(valid)
    return [b]


def test_restrict_logits_maps_columns():
    logits = torch.tensor([[0.0, 5.0, 1.0, 2.0], [3.0, 9.0, 0.0, 4.0]])
    sub = restrict_logits(logits, [0, 2, 3])
    assert torch.equal(sub, torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 4.0]]))
    # class 1 wins on the full logits but is not in the subset: the argmax moves to full class 3 (position 2)
    assert sub.argmax(1).tolist() == [2, 2]
    with pytest.raises(ValueError, match="out of range"):
        restrict_logits(logits, [4])


def test_evaluate_with_subset_restriction():
    # 3 classes; class 1 always has the largest logit, so full top-1 is 1/3 (only the label-1 image)
    table = torch.tensor([[1.0, 5.0, 0.0], [0.0, 5.0, 1.0], [2.0, 5.0, 0.0]])
    batches = _batches([0, 1, 2], [0, 1, 0])
    full = evaluate_classifier(FixedLogits(table), batches)["official"]
    assert full.top1 == pytest.approx(1 / 3) and full.num_classes == 3
    # restricted to {0, 2}: rows [1,0], [0,1], [2,0] -> argmax positions 0,1,0 = targets 0,2,0 -> all correct
    sub = evaluate_classifier(FixedLogits(table), _batches([0, 1, 2], [0, 2, 0]), subset=[0, 2])["official"]
    assert sub.top1 == 1.0 and sub.num_classes == 2
    with pytest.raises(ValueError, match=r"targets \[1\] are not in the class subset"):
        evaluate_classifier(FixedLogits(table), batches, subset=[0, 2])


def test_rules_official_and_cls():
    res = evaluate_classifier(TinyTokenModel(), _batches([0, 0], [0, 1]), rules=("official", "cls"))
    # official: cls + 0.5 * max tokens = [1, 2] -> class 1; cls only -> class 0
    assert res["official"].top1 == 0.5 and res["cls"].top1 == 0.5
    res = evaluate_classifier(TinyTokenModel(), _batches([0], [1]), rules=("official", "cls"))
    assert res["official"].top1 == 1.0 and res["cls"].top1 == 0.0
    with pytest.raises(ValueError, match="rule 'cls' needs a model with forward_tokens"):
        evaluate_classifier(FixedLogits(torch.eye(2)), _batches([0], [0]), rules=("cls",))
    with pytest.raises(ValueError, match="unknown prediction rule"):
        evaluate_classifier(TinyTokenModel(), _batches([0], [0]), rules=("max",))


def test_invalid_rows_are_skipped_and_counted():
    res = evaluate_classifier(FixedLogits(torch.eye(2)), _batches([0, 1, 1], [0, 1, 0], [True, True, False]))
    assert res["official"].n == 2 and res["official"].skipped == 1 and res["official"].top1 == 1.0


def test_loader_counts_unreadable_images(image_tree: Path):
    (image_tree / "dog" / "broken.png").write_bytes(b"garbage")
    meta = {"img_size": 16, "mean": [0.5] * 3, "std": [0.5] * 3}
    loader = eval_loader(image_tree, {"cat": 0, "dog": 1}, meta, batch_size=4, workers=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    res = evaluate_classifier(model, loader)["official"]
    assert res.n == 6 and res.skipped == 1


def test_bad_data_dirs(tmp_path: Path, image_tree: Path):
    meta = {"img_size": 16}
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        eval_loader(tmp_path / "missing", {"cat": 0}, meta)
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        eval_loader(tmp_path / "empty", {"cat": 0}, meta)
    with pytest.raises(KeyError, match=r"class folders \['dog'\].*not classes of the model"):
        eval_loader(image_tree, {"cat": 0, "bird": 1}, meta)


def test_ood_mapping(tmp_path: Path, image_tree: Path):
    classes = ["bird", "cat", "dog"]
    # folders are a subset of the training classes: no mapping needed
    c2i, subset = resolve_ood_classes(image_tree, classes)
    assert c2i == {"cat": 1, "dog": 2} and subset == [1, 2]
    # a renaming through a text file
    f = tmp_path / "map.txt"
    f.write_text("# folder class\ncat bird\ndog, dog\n")
    assert load_class_mapping(f) == {"cat": "bird", "dog": "dog"}
    c2i, subset = resolve_ood_classes(image_tree, classes, f)
    assert c2i == {"cat": 0, "dog": 2} and subset == [0, 2]
    with pytest.raises(KeyError, match=r"mapping names unknown classes \['wolf'\]; valid training classes"):
        resolve_ood_classes(image_tree, classes, {"dog": "wolf"})
    with pytest.raises(KeyError, match=r"OOD folders \['dog'\] .* neither training classes"):
        resolve_ood_classes(image_tree, ["bird", "cat"])
    with pytest.raises(FileNotFoundError, match="class mapping file not found"):
        resolve_ood_classes(image_tree, classes, tmp_path / "nope.json")


def test_imagenet_subsets_from_timm(tmp_path: Path):
    synsets, idx = imagenet_subset("imagenet-r")
    assert len(synsets) == len(idx) == 200 and idx == sorted(idx)
    root = tmp_path / "inr"
    for s in synsets[:2]:
        (root / s).mkdir(parents=True)
    from tokenlab.eval.class_maps import imagenet_synsets

    c2i, subset = resolve_ood_classes(root, [f"class{i}" for i in range(1000)], "imagenet-r")
    assert subset == idx[:2] and c2i[synsets[0]] == imagenet_synsets().index(synsets[0])
    with pytest.raises(ValueError, match="needs a 1000-class ImageNet model"):
        resolve_ood_classes(root, ["a", "b"], "imagenet-a")
    with pytest.raises(ValueError, match="unknown ImageNet subset"):
        imagenet_subset("imagenet-x")


def test_scores_report_class_balance_and_collapse(caplog: pytest.LogCaptureFixture):
    # 3 classes, 2 images each; the "official" rule always says class 1, the "cls" rule is right every time
    targets = torch.tensor([0, 0, 1, 1, 2, 2])
    collapsed = torch.tensor([[0.0, 5.0, 1.0]]).expand(6, 3)
    honest = torch.nn.functional.one_hot(targets, 3).float() * 4
    with caplog.at_level("WARNING", logger="tokenlab.eval.classify"):
        res = score_predictions({"official": collapsed, "cls": honest}, targets)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "rule official): class 1 takes 100 % of 6 predictions but 33 %" in warned[0]
    d, h = res["official"].to_dict(), res["cls"].to_dict()
    assert d["top1"] == pytest.approx(1 / 3) and d["balanced_accuracy"] == pytest.approx(1 / 3)
    assert d["per_class_accuracy"] == [0.0, 1.0, 0.0] and d["prediction_counts"] == [0, 6, 0]
    assert (d["majority_class"], d["majority_rate"], d["prediction_entropy"], d["collapsed"]) == (1, 1.0, 0.0, True)
    assert h["balanced_accuracy"] == 1.0 and h["prediction_entropy"] == pytest.approx(1.0) and not h["collapsed"]
    assert {"top1", "top5", "nll", "ece", "reliability", "num_classes"} <= set(d)  # existing keys kept


def test_scores_on_a_subset_name_the_model_class():
    # model classes 0..3; the set covers classes [1, 3]; the restricted argmax is always position 1 = model class 3
    logits = torch.tensor([[9.0, 0.0, 0.0, 2.0]]).expand(4, 4)
    targets = torch.tensor([1, 1, 3, 3])
    d = score_predictions({"official": logits}, targets, subset=[1, 3])["official"].to_dict()
    assert d["num_classes"] == 2 and d["prediction_counts"] == [0, 4] and d["per_class_accuracy"] == [0.0, 1.0]
    assert d["majority_class"] == 3 and d["majority_true_rate"] == 0.5 and d["collapsed"]
    assert d["confusion"] == [[0, 2], [0, 2]]
    # beyond CONFUSION_MAX_CLASSES the K x K matrix stays out of eval.json; the rest is still there
    k = CONFUSION_MAX_CLASSES + 1
    many = score_predictions({"official": torch.eye(k)}, torch.arange(k))["official"].to_dict()
    assert "confusion" not in many and many["balanced_accuracy"] == 1.0 and len(many["per_class_accuracy"]) == k
