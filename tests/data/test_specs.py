"""Data specs: one parser for DIR, DIR:split, list files and sets of splits, with training and evaluation defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenlab.data.specs import EVAL_SPLITS, parse_data_spec


def _splits_set(root: Path, splits=("train", "val")) -> Path:
    for split in splits:
        (root / split / "cat").mkdir(parents=True)
        (root / f"{split}_masks" / "cat").mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"classes": ["cat"]}))
    return root


def test_split_defaults_differ_for_training_and_evaluation(tmp_path: Path) -> None:
    root = _splits_set(tmp_path / "set")
    spec = parse_data_spec(root)
    assert spec.kind == "splits" and spec.split is None and spec.classes == ["cat"]
    assert spec.resolve(("train",)).root == root / "train"
    evaluation = spec.resolve(EVAL_SPLITS)
    assert evaluation.root == root / "val" and evaluation.masks == root / "val_masks"
    assert parse_data_spec(f"{root}:train").resolve(EVAL_SPLITS).split == "train"  # a named split wins
    assert parse_data_spec(f"{root}:train", split="val").split == "val"  # the argument wins over the suffix
    with pytest.raises(ValueError, match=r"split 'test' not in synthetic set .*valid: train, val"):
        parse_data_spec(root, "test").resolve()


def test_folders_lists_and_missing_paths(tmp_path: Path) -> None:
    (tmp_path / "tree" / "cat").mkdir(parents=True)
    tree = parse_data_spec(tmp_path / "tree").resolve(EVAL_SPLITS)
    assert tree.kind == "folder" and tree.root == tmp_path / "tree" and tree.dataset_dir is None
    (tmp_path / "tree" / "val.csv").write_text("cat/a.png,cat\n")
    assert parse_data_spec(tmp_path / "tree", "val").resolve().list_file() == tmp_path / "tree" / "val.csv"
    listed = parse_data_spec(tmp_path / "tree" / "val.csv")
    assert listed.kind == "list" and listed.list_file() == tmp_path / "tree" / "val.csv"
    with pytest.raises(ValueError, match="needs an image-folder tree"):
        _ = listed.root
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(ValueError, match="not a list file"):
        parse_data_spec(tmp_path / "notes.md")
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        parse_data_spec(tmp_path / "nowhere")


def test_a_split_folder_root_read_as_a_class_tree_names_the_split(tmp_path: Path) -> None:
    root = tmp_path / "imagefolder"
    for split in ("train", "test"):
        (root / split / "cat").mkdir(parents=True)
        (root / split / "cat" / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=rf"holds the splits \['test', 'train'\].*name the split: {root}:test$"):
        parse_data_spec(root).resolve(EVAL_SPLITS)  # evaluation: val, else test
    with pytest.raises(ValueError, match=rf"{root}:train$"):
        parse_data_spec(root).resolve(("train",))
    assert parse_data_spec(f"{root}:test").resolve(EVAL_SPLITS).root == root / "test"
    # class folders that happen to be called like splits but hold images are a class tree
    tree = tmp_path / "tree"
    for name in ("test", "other"):
        (tree / name).mkdir(parents=True)
        (tree / name / "a.png").write_bytes(b"")
    assert parse_data_spec(tree).resolve(EVAL_SPLITS).root == tree
