"""End-to-end evaluation of a tiny exported run: clean, corruptions (cached), OOD, references and bad input."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from evalhelpers import make_run, make_tree
from PIL import Image

from tokenlab.data.specs import EVAL_SPLITS, parse_data_spec
from tokenlab.eval.classify_corruptions import load_reference
from tokenlab.eval.robustness import evaluate_classifier_run, evaluate_runs, reference_run


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    """A dataset dir in the synthetic layout: dataset.json + val/ + rendition/ + shortcut/."""
    d = tmp_path / "synth"
    (d / "val").mkdir(parents=True)
    make_tree(d / "val", per_class=3)
    make_tree(d / "rendition", classes=("dog",), per_class=2)
    make_tree(d / "shortcut", per_class=2)
    (d / "dataset.json").write_text(json.dumps({"classes": ["cat", "dog"]}))
    return d


def test_evaluate_run_writes_eval_json(tmp_path: Path, synth: Path):
    run = make_run(tmp_path / "run")
    res = evaluate_classifier_run(run, synth, corruptions="gaussian_noise,contrast", severities="1,2",
                       cache_dir=tmp_path / "cache", workers=0, progress=False)  # fmt: skip
    data = json.loads((run / "eval.json").read_text())
    assert data["rules"] == ["official", "cls"] and set(data["clean"]) == {"official", "cls"}
    assert data["clean"]["official"]["n"] == 6
    corr = data["corruptions"]["official"]
    assert set(corr["accuracy"]) == {"gaussian_noise", "contrast"} and set(corr["accuracy"]["contrast"]) == {"1", "2"}
    assert corr["mce"] is None  # 2-class model: the AlexNet table does not apply ("auto")
    assert corr["retention"] == pytest.approx(corr["robust_accuracy"] / data["clean"]["official"]["top1"])
    # the rendition split covers only 'dog' -> logits restricted to 1 class -> accuracy 1
    assert data["ood"]["rendition"]["subset"] == [1] and data["ood"]["rendition"]["official"]["top1"] == 1.0
    assert data["ood"]["shortcut"]["official"]["n"] == 4
    assert res.corruptions is not None and res.corruptions.num_images == 4 * 6

    # a second run uses the first as mCE reference; the corruption cache is reused
    run2 = make_run(tmp_path / "run2", seed=1)
    res2 = evaluate_classifier_run(run2, synth, corruptions="gaussian_noise,contrast", severities="1,2", reference=run,
                        cache_dir=tmp_path / "cache", workers=0, ood=None, progress=False)  # fmt: skip
    s = res2.corruptions.scores["official"]
    ref = load_reference(run, 2)
    assert s.reference == "run" and ref is not None
    expected = (
        sum(sum(1 - s.accuracy[c][k] for k in (1, 2)) / sum(ref.table[c][k] for k in (1, 2)) for c in s.accuracy) / 2
    )
    assert s.mce == pytest.approx(expected)


def test_reads_existing_imagenet_c_tree(tmp_path: Path, synth: Path):
    tree = tmp_path / "inc"
    make_tree(tree / "fog" / "3", per_class=2)
    (tree / "fog" / "3" / "cat" / "bad.jpg").write_bytes(b"\x00\x01")
    run = make_run(tmp_path / "run", token=False)
    res = evaluate_classifier_run(run, synth, corruption_tree=tree, workers=0, ood=None, out=tmp_path / "e.json")
    assert res.rules == ["official"]
    assert res.corruptions is not None and res.corruptions.skipped == {"fog/3": 1}
    assert res.corruptions.num_images == 4
    assert json.loads((tmp_path / "e.json").read_text())["corruptions"]["skipped"] == {"fog/3": 1}


def test_bad_input(tmp_path: Path, synth: Path):
    run = make_run(tmp_path / "run", classes=("cat", "dog", "bird"))
    with pytest.raises(ValueError, match=r"checkpoint classes do not match data set .*only in checkpoint: \['bird'\]"):
        evaluate_classifier_run(run, synth, workers=0)
    with pytest.raises(FileNotFoundError, match="data directory not found"):
        evaluate_classifier_run(run, tmp_path / "nope", workers=0)
    with pytest.raises(ValueError, match=r"split 'test' not in .*valid: rendition, shortcut, val"):
        parse_data_spec(f"{synth}:test").resolve(EVAL_SPLITS)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        evaluate_classifier_run(run, tmp_path / "empty", workers=0)
    with pytest.raises(FileNotFoundError, match="no exported model"):
        evaluate_classifier_run(tmp_path / "norun", synth, workers=0)
    run2 = make_run(tmp_path / "run2")
    with pytest.raises(KeyError, match=r"mapping names unknown classes \['wolf'\]"):
        evaluate_classifier_run(run2, synth, ood=[f"x={synth / 'val'}@{_mapping(tmp_path)}"], workers=0)
    with pytest.raises(FileNotFoundError, match="reference 'nowhere'"):
        evaluate_classifier_run(run2, synth, corruption_tree=tmp_path, reference="nowhere", workers=0, ood=None)


def _mapping(tmp_path: Path) -> Path:
    f = tmp_path / "map.json"
    f.write_text(json.dumps({"cat": "wolf"}))
    return f


def test_corruptions_are_generated_at_the_model_size_by_default(tmp_path: Path):
    data = make_tree(tmp_path / "val64", per_class=2, size=64)  # a 32 px model on 64 px images
    run = make_run(tmp_path / "run", token=False)
    kw = {"corruptions": "contrast", "severities": "1", "cache_dir": tmp_path / "cache", "workers": 0, "ood": None,
          "progress": False}  # fmt: skip
    evaluate_classifier_run(run, data, **kw)
    (model_tree,) = (tmp_path / "cache").iterdir()
    manifest = json.loads((model_tree / "manifest.json").read_text())
    assert manifest["work_size"] == {"model_resize": [[32], "bicubic"]}
    assert all(Image.open(f).size == (32, 32) for f in model_tree.rglob("*.png"))
    corr = json.loads((run / "eval.json").read_text())["corruptions"]
    assert corr["work_size"] == "model" and corr["unchanged"] == []
    res = evaluate_classifier_run(run, data, work_size="source", out=tmp_path / "src.json", **kw)
    assert res.corruptions is not None and res.corruptions.source != str(model_tree)
    assert res.corruptions.work_size == "source"
    assert all(Image.open(f).size == (64, 64) for f in Path(res.corruptions.source).rglob("*.png"))
    with pytest.raises(ValueError, match="bad work size 'huge'"):
        evaluate_classifier_run(run, data, work_size="huge", **kw)


def test_the_reference_of_several_runs_is_baseline_else_the_first(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "baseline"
    a.mkdir(), b.mkdir()
    assert reference_run([a, b]) == 1
    assert reference_run([a, tmp_path / "c"]) == 0
    assert reference_run([a, b / "model.json"]) == 1  # an exported file names its run by its directory


def test_runs_with_another_resize_need_their_own_cache_and_the_log_says_so(tmp_path: Path, caplog):
    caplog.set_level(logging.INFO)
    tree = make_tree(tmp_path / "photo", per_class=2)
    first, other = make_run(tmp_path / "first", token=False), make_run(tmp_path / "other", token=False)
    meta = json.loads((other / "model.json").read_text())
    (other / "model.json").write_text(json.dumps({**meta, "crop_pct": 0.5}))  # resize to 64, then crop 32
    res = evaluate_runs([first, other], tree, corruptions="pixelate", severities="1", cache_dir=tmp_path / "cache",
                        workers=0, progress=False, ood=[])  # fmt: skip
    assert res[1].reference == {"name": "first", "path": str(first), "this_run": False}  # auto, no baseline: first
    assert res[0].reference is not None and res[0].reference["this_run"]
    assert len({r.corruptions.source for r in res if r.corruptions}) == 2
    warning = next(r.getMessage() for r in caplog.records if "different corruption caches" in r.getMessage())
    assert "needed 2 different corruption caches" in warning and "first:" in warning and "other:" in warning
    with pytest.raises(ValueError, match="with several runs"):
        evaluate_runs([first, other], tree, out=tmp_path / "x.json")
